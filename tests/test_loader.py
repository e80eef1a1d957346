"""The training loader: deterministic global order, exact resume (also across epochs and at
another world size), and refusal of datasets whose files disagree with their manifest."""

import json
import shutil

import numpy as np
import pytest
import torch

from generalmodel.config import load_config
from generalmodel.data.loader import DatasetError, TokenDataset, TokenLoader
from generalmodel.storage import StorageError


@pytest.fixture(scope="session")
def dataset_dir(ray_cluster, tmp_path_factory):

    from conftest import make_documents

    from jobs import prepare_data

    root = tmp_path_factory.mktemp("loader")
    src = root / "src"
    src.mkdir()
    for i, doc in enumerate(make_documents(120, seed=7, words_per_doc=200)):
        (src / f"{i:03d}.txt").write_text(doc)
    cfg = load_config(
        overrides={
            "data.source": str(src),
            "data.output": str(root / "ds"),
            "data.vocab_size": 300,
            "data.seq_len": 16,
            "data.val_fraction": 0.1,
            "data.shard_input_mb": 0.01,  # many small shards: windows and epochs get exercised
        }
    )
    prepare_data.main(cfg)
    return root / "ds"


@pytest.fixture
def dataset(dataset_dir):
    return TokenDataset.open(str(dataset_dir))


def take(loader, n):
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y in (next(loader) for _ in range(n))]


def test_dataset_has_many_shards(dataset):
    assert len(dataset.shards["train"]) >= 8
    assert dataset.rows("train") > 100


def test_batches_are_inputs_and_shifted_targets(dataset):
    x, y = next(TokenLoader(dataset, "train", batch_size=3))
    assert x.dtype == torch.int64 and x.shape == (3, 16) and y.shape == (3, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_same_seed_same_stream_other_seed_other_stream(dataset):
    a = take(TokenLoader(dataset, "train", batch_size=4, seed=1), 20)
    b = take(TokenLoader(dataset, "train", batch_size=4, seed=1), 20)
    c = take(TokenLoader(dataset, "train", batch_size=4, seed=2), 20)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=False))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=False))


def test_an_epoch_visits_every_row_once(dataset):
    from collections import Counter

    loader = TokenLoader(dataset, "train", batch_size=5, seed=3)
    rows = dataset.rows("train")
    seen = torch.cat(take(loader, rows // 5))
    everything = Counter(map(tuple, np.concatenate([dataset.read_shard(s) for s in dataset.shards["train"]]).tolist()))
    seen_rows = Counter(map(tuple, seen.tolist()))
    assert sum(seen_rows.values()) == rows - rows % 5  # only the last partial batch is dropped
    assert not seen_rows - everything  # no row twice, no row that is not in the dataset
    assert loader.epoch == 0
    next(loader)
    assert loader.epoch == 1  # the next batch starts the next epoch, in a new order
    second = TokenLoader(dataset, "train", batch_size=5, seed=3)
    second.load_state_dict({**second.state_dict(), "epoch": 1})
    assert not torch.equal(take(second, 1)[0], seen[:5])


@pytest.mark.parametrize("stop_at", [0, 7, 30, 61])  # 61 batches of 4 cross an epoch boundary
def test_resume_is_exact(dataset, stop_at):
    reference = take(TokenLoader(dataset, "train", batch_size=4, seed=5), stop_at + 15)
    first = TokenLoader(dataset, "train", batch_size=4, seed=5)
    take(first, stop_at)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = TokenLoader(dataset, "train", batch_size=4, seed=5)
    resumed.load_state_dict(state)
    after = take(resumed, 15)
    assert all(torch.equal(p, q) for p, q in zip(after, reference[stop_at:], strict=False))


def test_ranks_split_the_global_batch(dataset):
    whole = take(TokenLoader(dataset, "train", batch_size=6, seed=9), 10)
    ranks = [take(TokenLoader(dataset, "train", batch_size=3, rank=r, world_size=2, seed=9), 10) for r in range(2)]
    for step in range(10):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), whole[step])


def test_resume_at_another_world_size_continues_the_same_stream(dataset):
    whole = take(TokenLoader(dataset, "train", batch_size=4, seed=11), 12)
    two = [TokenLoader(dataset, "train", batch_size=2, rank=r, world_size=2, seed=11) for r in range(2)]
    for loader in two:
        take(loader, 5)
    one = TokenLoader(dataset, "train", batch_size=4, seed=11)
    one.load_state_dict(two[0].state_dict())
    assert all(torch.equal(p, q) for p, q in zip(take(one, 7), whole[5:], strict=False))


def test_resume_refuses_another_stream(dataset):
    state = TokenLoader(dataset, "train", batch_size=4, seed=1).state_dict()
    with pytest.raises(DatasetError, match="seed was 1, now 2"):
        TokenLoader(dataset, "train", batch_size=4, seed=2).load_state_dict(state)


def test_val_is_one_ordered_pass(dataset):
    loader = TokenLoader(dataset, "val", batch_size=2, shuffle=False, epochs=1)
    batches = list(loader)
    assert len(batches) == dataset.rows("val") // 2
    first = dataset.read_shard(dataset.shards["val"][0])
    assert torch.equal(batches[0][0], torch.from_numpy(first[:2, :-1].astype(np.int64)))


def copy_dataset(dataset_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(dataset_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    return target, manifest


def test_missing_manifest_is_refused(dataset_dir, tmp_path):
    target, _ = copy_dataset(dataset_dir, tmp_path)
    (target / "manifest.json").unlink()
    with pytest.raises(StorageError, match="files but no manifest.json"):
        TokenDataset.open(str(target))
    with pytest.raises(StorageError, match="holds nothing"):
        TokenDataset.open(str(tmp_path / "nothing"))


def test_missing_shard_is_refused(dataset_dir, tmp_path):
    target, manifest = copy_dataset(dataset_dir, tmp_path)
    shard = manifest["splits"]["train"]["shards"][3]["path"]
    (target / shard).unlink()
    with pytest.raises(DatasetError, match=f"shard {shard} listed in the manifest is missing"):
        TokenDataset.open(str(target))


def test_truncated_shard_is_refused(dataset_dir, tmp_path):
    target, manifest = copy_dataset(dataset_dir, tmp_path)
    shard = manifest["splits"]["train"]["shards"][0]["path"]
    data = (target / shard).read_bytes()
    (target / shard).write_bytes(data[:-10])
    with pytest.raises(DatasetError, match=f"shard {shard} has {len(data) - 10} bytes, the manifest says {len(data)}"):
        TokenDataset.open(str(target))


def test_corrupted_shard_fails_its_checksum(dataset_dir, tmp_path):
    target, manifest = copy_dataset(dataset_dir, tmp_path)
    shard = manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray((target / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / shard).write_bytes(bytes(data))
    ds = TokenDataset.open(str(target))  # same size: only the checksum can tell
    with pytest.raises(DatasetError, match=f"shard {shard} has sha256 .* the manifest says"):
        ds.verify()


def test_a_manifest_of_another_kind_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "checkpoint"}))
    with pytest.raises(StorageError, match="describes a 'checkpoint', expected a 'token-dataset'"):
        TokenDataset.open(str(tmp_path))


def test_rewind_repeats_the_same_batches(dataset):
    loader = TokenLoader(dataset, "val", batch_size=2, shuffle=False)
    first = take(loader, 3)
    loader.rewind()
    assert all(torch.equal(p, q) for p, q in zip(take(loader, 3), first, strict=False))
