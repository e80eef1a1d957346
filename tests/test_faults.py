"""Faults injected for real, with the real components: the S3 server restarted under a running
training loop (it rides it out, the same losses) or gone for good (a clear failure)."""

import json
import threading
import time

import pytest
from conftest import make_documents

from generalmodel.config import load_config
from generalmodel.storage import StorageUnavailable
from generalmodel.train.checkpoint import Checkpointer
from generalmodel.train.loop import train
from jobs import prepare_data

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3_dataset(ray_cluster, s3_server):
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    for i, doc in enumerate(make_documents(60, seed=51)):
        client.put_object(Bucket=bucket, Key=f"corpus/{i:03d}.txt", Body=doc.encode())
    overrides = {
        "data.source": f"s3://{bucket}/corpus", "data.output": f"s3://{bucket}/ds", "data.vocab_size": 320,
        "data.seq_len": 32, "data.val_fraction": 0.1, **s3_server.storage_overrides(),
    }  # fmt: skip
    prepare_data.main(load_config(overrides=overrides))
    return bucket


def config(bucket, s3_server, tmp_path, run_name, **extra):
    return load_config(overrides={
        "train.dataset": f"s3://{bucket}/ds", "storage.root": f"s3://{bucket}/store", "train.run_name": run_name,
        "model.vocab_size": 320, "model.max_seq_len": 32, "model.n_layers": 2, "model.n_heads": 2,
        "model.d_model": 32, "train.steps": 40, "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 20,
        "train.eval_batches": 2, "train.checkpoint_every": 4, "optim.warmup_steps": 2,
        "train.metrics_log": str(tmp_path / f"{run_name}.jsonl"), **s3_server.storage_overrides(), **extra,
    })  # fmt: skip


def wait_for_step(log_path, step, timeout_s=120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if log_path.exists() and any(json.loads(line)["step"] >= step for line in log_path.read_text().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"training never reached step {step}")


def in_thread(cfg):
    """train(cfg) in a thread: (thread, losses by step, the exception it raised, if any)."""
    losses, errors = {}, []

    def target():
        try:
            train(cfg, lambda m: losses.__setitem__(m["step"], m["loss"]))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, losses, errors


def test_training_rides_out_a_restart_of_the_s3_server(s3_dataset, s3_server, tmp_path):
    reference, _, errors = in_thread(config(s3_dataset, s3_server, tmp_path, "reference"))
    reference.join(timeout=300)
    assert not errors, errors  # the same run without an outage, for its losses
    cfg = config(s3_dataset, s3_server, tmp_path, "restarted")
    thread, losses, errors = in_thread(cfg)
    wait_for_step(tmp_path / "restarted.jsonl", 6)
    s3_server.stop_gateway()
    try:
        time.sleep(8)  # the outage: checkpoint uploads and shard reads fail and back off meanwhile
    finally:
        s3_server.start_gateway()
    thread.join(timeout=300)
    assert not errors, errors
    assert max(losses) == 40
    ckpt = Checkpointer(f"s3://{s3_dataset}/store/checkpoints/restarted", cfg.storage.resolved(), 0, 1)
    loc, manifest = ckpt.latest()
    assert manifest["step"] == 40
    ckpt.check(loc, manifest)
    ref_log = [json.loads(line) for line in (tmp_path / "reference.jsonl").read_text().splitlines()]
    run_log = [json.loads(line) for line in (tmp_path / "restarted.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in run_log] == [m["loss"] for m in ref_log]  # the outage changed nothing


def test_a_store_that_stays_down_fails_the_run_with_a_clear_error(s3_dataset, s3_server, tmp_path):
    cfg = config(s3_dataset, s3_server, tmp_path, "outage", **{"storage.retry_timeout_s": 3})
    thread, _, errors = in_thread(cfg)
    wait_for_step(tmp_path / "outage.jsonl", 6)
    s3_server.stop_gateway()
    try:
        thread.join(timeout=120)
    finally:
        s3_server.start_gateway()
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], StorageUnavailable), errors
    assert "the store kept failing for 3s (storage.retry_timeout_s)" in str(errors[0])
    assert "cannot reach the S3 endpoint" in str(errors[0])


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs: a disk that fills up (needs root, as in CI; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_full_disk_while_preparing_publishes_nothing(ray_cluster, small_disk, tmp_path):
    from generalmodel import RunFailed

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(make_documents(80, seed=61)):
        (corpus / f"{i:03d}.txt").write_text(doc)
    cfg = load_config(overrides={"data.source": str(corpus), "data.output": str(small_disk / "ds"),
                                 "data.vocab_size": 400, "data.seq_len": 32})  # fmt: skip
    with pytest.raises(RunFailed, match="no space left on the device"):  # exit 1, not a user error
        prepare_data.main(cfg)
    assert leftovers(small_disk) in ([], ["ds"])  # no manifest, no version, no temp file


def test_a_full_disk_while_checkpointing_fails_the_run_and_leaves_no_half_checkpoint(
    s3_dataset, s3_server, small_disk, tmp_path
):
    from generalmodel.storage import StorageFull

    cfg = config(s3_dataset, s3_server, tmp_path, "full", **{"train.checkpoint_dir": str(small_disk / "ckpt")})
    with pytest.raises(StorageFull, match="no space left on the device"):
        train(cfg)
    assert not list((small_disk / "ckpt").glob("step-*")), leftovers(small_disk)  # the failed save is gone
    assert not [p for p in leftovers(small_disk) if ".tmp-" in p]


def test_a_full_disk_while_exporting_to_transformers_leaves_no_files(small_disk):
    from conftest import make_documents

    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.interop.hf import write_hf
    from generalmodel.storage import StorageFull
    from models import build_model
    from models.llama import LlamaConfig

    tokenizer = train_bpe(make_documents(30, seed=5), 384)
    model = build_model(
        LlamaConfig(vocab_size=384, max_seq_len=32, n_layers=1, n_heads=2, d_model=12, tie_embeddings=True)
    )
    with pytest.raises(StorageFull, match="no space left on the device"):  # the weights fit, the rest does not
        write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(small_disk / "hf"))
    assert leftovers(small_disk) == ["hf"]  # no temporary file, no config.json


def test_a_full_disk_while_writing_gguf_leaves_no_file(small_disk):
    from conftest import make_documents

    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.interop.llamacpp import write_gguf
    from generalmodel.storage import StorageFull
    from models import build_model
    from models.llama import LlamaConfig

    tokenizer = train_bpe(make_documents(30, seed=5), 384)
    model = build_model(LlamaConfig(vocab_size=384, max_seq_len=32, n_layers=2, n_heads=2, d_model=64))
    with pytest.raises(StorageFull, match="no space left on the device"):  # ~0.3 MB of weights on 48 KB
        write_gguf(model.cfg, model.state_dict(), tokenizer.to_str(), str(small_disk / "m.gguf"))
    assert leftovers(small_disk) == []
