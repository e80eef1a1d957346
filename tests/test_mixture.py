"""Mixtures (mixture.*): several prepared datasets read as one stream at set proportions that change
by stage. The stream's proportions hold in every batch, stages switch where they say, each rank
reads its own rows, resume is exact mid-stage and at another world size, a dataset that runs out
repeats or stops the run, and bad mixtures are refused by name before anything trains."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, make_documents

from generalmodel.config import ConfigError, load_config
from generalmodel.data.loader import DatasetError, TokenDataset
from generalmodel.data.mixture import MixedDataset, MixtureLoader
from generalmodel.train.loop import train


def prepare(root: Path, name: str, docs: list[str], **overrides) -> str:
    from jobs import prepare_data

    (root / name).mkdir()
    for i, doc in enumerate(docs):
        (root / name / f"{i:03d}.txt").write_text(doc)
    base = {
        "data.source": str(root / name),
        "data.output": str(root / f"ds-{name}"),
        "data.vocab_size": 320,
        "data.seq_len": 32,
        "data.val_fraction": 0.1,
        "data.shard_input_mb": 0.02,
    }
    prepare_data.main(load_config(overrides={**base, **overrides}))
    return str(root / f"ds-{name}")


@pytest.fixture(scope="module")
def sources(train_dataset, tmp_path_factory):
    """Two datasets with one tokenizer (the second reuses the first's), and one with its own."""
    root = tmp_path_factory.mktemp("mixture")
    # data.tokenizer names a prepared dataset: its tokenizer
    small = prepare(root, "small", make_documents(30, seed=5), **{"data.tokenizer": train_dataset})
    other = prepare(root, "other", make_documents(12, seed=6))
    return {"big": train_dataset, "small": small, "other_tokenizer": other}


def mixture(sources, **fields):
    overrides = {"mixture.datasets": {"big": sources["big"], "small": sources["small"]}}
    overrides.update({f"mixture.{k}": v for k, v in fields.items()})
    return load_config(overrides=overrides).mixture


def row_owner(sources) -> dict[bytes, str]:
    """Each train row's bytes -> the dataset it is in."""
    owner = {}
    for name in ("big", "small"):
        ds = TokenDataset.open(sources[name])
        for shard in ds.split_shards("train"):
            for row in ds.read_shard(shard):
                owner[row.astype(np.int64).tobytes()] = name
    return owner


def loader(sources, mix, batch_size=8, rank=0, world_size=1, seed=0):
    data = MixedDataset.open(mix.datasets)
    return MixtureLoader(data, mix, batch_size, rank, world_size, seed)


def global_batches(make, steps: int, world_size: int) -> list[np.ndarray]:
    """The global batches of `steps` steps: every rank's rows, rank after rank."""
    loaders = [make(rank, world_size) for rank in range(world_size)]
    out = []
    for _ in range(steps):
        out.append(np.concatenate([ld.next_batch()["tokens"].numpy() for ld in loaders]))
    return out


def test_every_batch_holds_the_stage_weights_and_stages_switch_where_they_say(sources):
    owner = row_owner(sources)
    # 70/30, then from token 32 x 160 (row 160) on only `small`
    stages = [{"start_tokens": 32 * 160, "weights": {"small": 1}}]
    mix = mixture(sources, weights={"big": 0.7, "small": 0.3}, stages=stages)
    ld = loader(sources, mix, batch_size=10)
    names = [[owner[r.tobytes()] for r in ld.next_batch()["tokens"].numpy()] for _ in range(20)]
    for batch in names[:16]:  # rows 0..159: 7 or so of 10 from big in every batch
        assert 6 <= batch.count("big") <= 8, batch
    assert all(name == "small" for batch in names[16:] for name in batch)
    metrics = ld.metrics()
    assert metrics["tokens_big"] + metrics["tokens_small"] == 200 * 32 and metrics["mixture_stage"] == 1
    assert abs(metrics["tokens_big"] / 32 - 0.7 * 160) <= 2
    # the stream as a function: long-run shares within a few rows, from any start
    src = ld.sources(10_000, 20_000)
    assert abs(np.mean(src == 0) - 0.0) < 1e-9  # stage 1: big weighs 0
    first = mixture(sources, weights={"big": 0.25, "small": 0.75})
    shares = loader(sources, first).sources(12_345, 22_345)
    assert abs(int((shares == 0).sum()) - 2500) <= 3


def test_a_dataset_that_runs_out_repeats_or_stops_the_run(sources):
    owner = row_owner(sources)
    small_rows = TokenDataset.open(sources["small"]).rows("train")
    mix = mixture(sources, weights={"small": 1})
    ld = loader(sources, mix, batch_size=small_rows // 3)
    seen = [r.tobytes() for _ in range(3) for r in ld.next_batch()["tokens"].numpy()]
    assert len(set(seen)) == len(seen) and all(owner[r] == "small" for r in seen)  # an epoch: each row once
    ld.next_batch()  # into its second epoch, in another order
    assert ld.metrics()["epochs_small"] > 1
    stop = loader(sources, mixture(sources, weights={"small": 1}, exhausted="error"), batch_size=small_rows // 3)
    for _ in range(3):
        stop.next_batch()
    with pytest.raises(DatasetError, match=r"mixture dataset 'small' \(.*ds-small\) ran out: its \d+ train rows"):
        stop.next_batch()


@pytest.mark.parametrize("stop_at", [3, 9])  # before and after the stage boundary (row 40: step 5)
def test_ranks_split_the_stream_and_resume_is_exact_at_another_world_size(sources, stop_at):
    stages = [{"start_step": 5, "weights": {"big": 0.1, "small": 0.9}}]
    mix = mixture(sources, weights={"big": 0.6, "small": 0.4}, stages=stages)
    one = global_batches(lambda r, w: loader(sources, mix, 8, r, w, seed=3), 14, 1)
    two = global_batches(lambda r, w: loader(sources, mix, 4, r, w, seed=3), 14, 2)
    assert all((a == b).all() for a, b in zip(one, two, strict=True))  # 2 ranks x 4 rows = 1 rank x 8
    first = loader(sources, mix, 8, seed=3)
    for _ in range(stop_at):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    resumed = []
    for rank in range(4):  # 4 ranks x 2 rows: the same global batch of 8
        ld = loader(sources, mix, 2, rank, 4, seed=3)
        ld.load_state_dict(state)
        resumed.append([ld.next_batch()["tokens"].numpy() for _ in range(14 - stop_at)])
    for k in range(14 - stop_at):
        assert (np.concatenate([r[k] for r in resumed]) == one[stop_at + k]).all(), k


def test_resume_refuses_another_mixture(sources):
    mix = mixture(sources, weights={"big": 0.6, "small": 0.4})
    state = loader(sources, mix).state_dict()
    other = loader(sources, mixture(sources, weights={"big": 0.5, "small": 0.5}))
    with pytest.raises(DatasetError, match="cannot resume the mixture: its stages were"):
        other.load_state_dict(state)


def test_datasets_of_another_tokenizer_or_row_length_are_refused_by_name(sources, tmp_path):
    with pytest.raises(DatasetError, match=r"mixture dataset 'b' \(.*\) has tokenizer \(sha256\) .* but 'a'"):
        MixedDataset.open({"a": sources["big"], "b": sources["other_tokenizer"]})
    same_tokenizer = {"data.seq_len": 64, "data.tokenizer": sources["big"]}
    longer = prepare(tmp_path, "long", make_documents(8, seed=9), **same_tokenizer)
    with pytest.raises(DatasetError, match="mixture dataset 'b' .* has seq_len 64, but 'a' .* has 32"):
        MixedDataset.open({"a": sources["big"], "b": longer})
    with pytest.raises(DatasetError, match=f"mixture dataset 'gone': {tmp_path}/nothing"):
        MixedDataset.open({"a": sources["big"], "gone": str(tmp_path / "nothing")})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"weights": {"a": -1, "b": 1}}, "mixture.weights: weight {'a': -1.0} must be a finite number >= 0"),
        ({"weights": {"a": 0, "b": 0}}, "mixture.weights: the weights are all zero"),
        ({"weights": {"a": 1, "c": 1}}, "mixture.weights: 'c' is not in mixture.datasets (a, b)"),
        (
            {"stages": [{"start_step": 50, "weights": {"a": 1}}, {"start_step": 20, "weights": {"b": 1}}]},
            "mixture.stages: the starts [50, 20] must increase",
        ),
        (
            {"stages": [{"start_step": 5, "weights": {"a": 1}}, {"start_tokens": 9000, "weights": {"b": 1}}]},
            "in the same unit",
        ),
        ({"stages": [{"weights": {"a": 1}}]}, "exactly one of them"),
        ({"stages": [{"start_step": 5, "weights": {"b": 0}}]}, "mixture.stages[0].weights: the weights are all zero"),
    ],
)
def test_bad_mixtures_are_config_errors(fields, message):
    overrides = {"mixture.datasets": {"a": "datasets/a", "b": "datasets/b"}}
    overrides.update({f"mixture.{k}": v for k, v in fields.items()})
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert message in str(e.value)


def test_a_bad_mixture_is_one_line_and_exit_2(sources, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    args = [
        f"--mixture.datasets={{a: {sources['big']}, b: {sources['other_tokenizer']}}}",
        f"--storage.root={tmp_path}",
        f"--tracking.uri=sqlite:///{tmp_path}/m.db",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "mixture dataset 'b'" in out.stderr and "has tokenizer (sha256)" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]


def test_a_mixture_and_train_dataset_are_not_both_given():
    with pytest.raises(ConfigError, match="train.dataset and mixture.datasets both name what to train on"):
        load_config(overrides={"mixture.datasets": {"a": "x"}, "train.dataset": "y"})


def test_training_on_a_mixture_reports_each_dataset_and_resumes_across_a_stage_exactly(sources, tmp_path):
    """The loop on a 70/30 mixture with a stage at step 6: per-dataset tokens and val losses in the
    metrics; a run that fails at step 8 (after the stage began) resumes to the same losses."""

    def cfg(root, **extra):
        return load_config(
            overrides={
                "mixture.datasets": {"big": sources["big"], "small": sources["small"]},
                "mixture.weights": {"big": 0.7, "small": 0.3},
                "mixture.stages": [{"start_step": 6, "weights": {"big": 0.2, "small": 0.8}}],
                "storage.root": str(root),
                "model.vocab_size": 320, "model.max_seq_len": 32, "model.n_layers": 1, "model.n_heads": 2,
                "model.d_model": 32, "train.steps": 10, "train.batch_size": 4, "train.log_every": 1,
                "train.eval_every": 5, "train.eval_batches": 1, "train.checkpoint_every": 3,
                **extra,
            }
        )  # fmt: skip

    logged: list[dict] = []
    last = train(cfg(tmp_path / "a"), logged.append)
    by_step = {m["step"]: m for m in logged if "loss" in m}
    assert by_step[10]["tokens_big"] + by_step[10]["tokens_small"] == 10 * 4 * 32
    assert by_step[10]["mixture_stage"] == 1 and by_step[5]["mixture_stage"] == 0
    assert {"val_loss_big", "val_loss_small", "val_loss"} <= set(last)
    n_big, n_small = 1 * 4, 1 * 4  # eval_batches x batch rows of each, all of seq_len tokens
    mean = (last["val_loss_big"] * n_big + last["val_loss_small"] * n_small) / (n_big + n_small)
    assert math.isclose(last["val_loss"], mean, rel_tol=1e-5)

    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        train(cfg(tmp_path / "b", **{"train.fail_at_step": 8}))
    resumed: list[dict] = []
    train(cfg(tmp_path / "b", **{"train.fail_at_step": 8}), resumed.append)
    again = {m["step"]: m["loss"] for m in resumed if "loss" in m}
    assert min(again) == 7  # from the step-6 checkpoint, in the second stage
    assert all(loss == by_step[step]["loss"] for step, loss in again.items())  # bit-identical on CPU


def test_a_mixture_of_one_dataset_still_reports_its_val_loss(sources, tmp_path):
    """What a sweep ranking on val_loss_NAME needs, whatever the number of datasets."""
    cfg = load_config(
        overrides={
            "mixture.datasets": {"only": sources["small"]}, "storage.root": str(tmp_path), "model.vocab_size": 320,
            "model.max_seq_len": 32, "model.n_layers": 1, "model.n_heads": 2, "model.d_model": 32,
            "train.steps": 2, "train.batch_size": 4, "train.eval_every": 2, "train.eval_batches": 1,
        }
    )  # fmt: skip
    last = train(cfg)
    assert last["val_loss_only"] == last["val_loss"] and last["tokens_only"] == 2 * 4 * 32


@pytest.mark.e2e
def test_the_pretrain_job_on_a_mixture_tracks_each_dataset_and_selects_tokens(ray_cluster, sources, tmp_path):
    """jobs/pretrain on 2 Ray Train workers: both datasets are the MLflow run's inputs, and each one's
    tokens and val loss are its metrics; the stage at step 4 takes only `small` from then on. With
    Rho-1 on (a reference export of the datasets' tokenizer), the job scores each dataset of the
    mixture once with Ray Data before training, beside that dataset."""
    import torch
    from mlflow.tracking import MlflowClient

    from generalmodel.infer.export import export_files
    from jobs import pretrain
    from models import build_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {
        **TINY_RUN,
        "mixture.datasets": {"big": sources["big"], "small": sources["small"]},
        "mixture.weights": {"big": 0.7, "small": 0.3},
        "mixture.stages": [{"start_step": 4, "weights": {"small": 1}}],
        "storage.root": str(tmp_path), "tracking.uri": uri, "tracking.registered_model": "mixture-test",
        "train.steps": 6, "train.log_every": 2, "train.eval_every": 3, "train.checkpoint_every": 6,
    }  # fmt: skip
    cfg = load_config(overrides=overrides)
    torch.manual_seed(5)
    reference = tmp_path / "reference"
    reference.mkdir()
    tokenizer = TokenDataset.open(sources["big"]).tokenizer_json()
    for name, data in export_files(cfg.model, build_model(cfg.model).state_dict(), tokenizer).items():
        (reference / name).write_bytes(data)
    overrides.update({"train.token_selection": 0.5, "train.selection_reference": str(reference)})

    def scored(name):  # published references beside a dataset (other tests score `big` too)
        return {p for p in (Path(sources[name]) / "references").glob("*/manifest.json")}

    before = {name: scored(name) for name in ("big", "small")}
    result = pretrain.main(load_config(overrides=overrides))
    for name in ("big", "small"):
        (new,) = scored(name) - before[name]
        assert json.loads(new.read_text())["kind"] == "token-reference"
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    shas = {TokenDataset.open(sources[name]).manifest_sha256[:36] for name in ("big", "small")}
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == shas

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    big, small = history("tokens_big"), history("tokens_small")
    rows_per_step, seq = 2 * 4, 32  # 2 workers x 4 rows
    assert sorted(big) == [2, 4, 6] and all(big[s] + small[s] == s * rows_per_step * seq for s in big)
    assert big[6] == big[4] and small[6] - small[4] == 2 * rows_per_step * seq  # steps 5-6: only `small`
    assert sorted(history("val_loss_big")) == sorted(history("val_loss_small")) == [3, 6]
    version = client.get_model_version("mixture-test", result["model_uri"].rsplit("/", 1)[1])
    assert version.tags["dataset"].startswith("mixture:big=")
