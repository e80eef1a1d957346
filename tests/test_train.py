"""The per-worker training loop without Ray: loss goes down, 2-process FSDP2 == one process,
exact resume (with a long memory too), NaN handling, incompatible resume; LR schedules; sampling parameters."""

import math
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from conftest import spawn_ranks

from generalmodel.cluster import free_port
from generalmodel.config import ConfigError, OptimConfig, load_config
from generalmodel.infer import SamplingParams, filter_logits
from generalmodel.optim import lr_multiplier
from generalmodel.train.loop import train
from generalmodel.train.resume import TrainingError
from generalmodel.train.step import TrainingDiverged

# Tests on `train_dataset` (prepared once with the real Ray Data job) are marked integration by
# conftest; the rest are unit tests.


def tiny(dataset, root, **overrides):
    base = {
        "train.dataset": dataset,
        "storage.root": str(root),
        "model.vocab_size": 320,
        "model.max_seq_len": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.d_model": 32,
        "train.steps": 12,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.eval_every": 6,
        "train.eval_batches": 2,
        "train.checkpoint_every": 3,
        "optim.warmup_steps": 2,
        "optim.lr": 1e-2,
    }
    base.update(overrides)
    return load_config(overrides=base)


def run(cfg):
    losses = {}
    last = train(cfg, lambda m: losses.__setitem__(m["step"], m["loss"]))
    return losses, last


def test_loss_goes_down_and_checkpoints_are_published(train_dataset, tmp_path):
    losses, last = run(tiny(train_dataset, tmp_path, **{"train.steps": 30, "train.eval_every": 10}))
    assert losses[30] < losses[1] - 0.5
    saves = sorted(p for p in (tmp_path / "checkpoints/pretrain").iterdir() if p.name.startswith("step-"))
    # 10 saves (every 3 steps), the newest train.keep_last=3 kept, each complete with its manifest
    assert [p.name[:13] for p in saves] == ["step-00000024", "step-00000027", "step-00000030"]
    assert all((p / "manifest.json").exists() for p in saves)
    assert (tmp_path / "checkpoints/pretrain/export/model.safetensors").exists()
    assert "checkpoint_stall_s" in last and "val_loss" in last


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(train_dataset, tmp_path, optimizer):
    """Muon's momentum (and the AdamW moments of its other groups) travel in the checkpoint."""
    opt = {"optim.name": optimizer}
    reference, _ = run(tiny(train_dataset, tmp_path / "a", **opt))
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run(tiny(train_dataset, tmp_path / "b", **opt, **{"train.fail_at_step": 8}))
    resumed, _ = run(tiny(train_dataset, tmp_path / "b", **opt, **{"train.fail_at_step": 8}))
    assert min(resumed) in (4, 7)  # continued from a published checkpoint (step 3 or 6)
    for step, loss in resumed.items():
        assert loss == reference[step], step  # bit-identical on CPU


def test_grad_accumulation_and_activation_checkpointing_keep_the_losses(train_dataset, tmp_path):
    """4 × 2 micro-batches == 8 in one batch; recomputing blocks in backward changes nothing."""
    whole, _ = run(tiny(train_dataset, tmp_path / "a", **{"train.batch_size": 8, "train.steps": 6}))
    accumulated, _ = run(
        tiny(train_dataset, tmp_path / "b", **{"train.batch_size": 4, "train.grad_accum": 2, "train.steps": 6})
    )
    full, _ = run(
        tiny(
            train_dataset,
            tmp_path / "c",
            **{"train.batch_size": 8, "train.steps": 6, "train.activation_checkpointing": "full"},
        )
    )
    selective, _ = run(
        tiny(
            train_dataset,
            tmp_path / "d",
            **{
                "train.batch_size": 8,
                "train.steps": 6,
                "train.activation_checkpointing": "selective",
                "train.ac_every": 2,
            },
        )
    )
    for step in whole:
        assert math.isclose(accumulated[step], whole[step], rel_tol=1e-5), step
        assert full[step] == whole[step], step
        assert selective[step] == whole[step], step


def test_activation_checkpointing_choices():
    from generalmodel.train.parallelize import checkpoint_blocks
    from models import build_model
    from models.llama import LlamaConfig

    def wrapped(mode, every=2):
        model = build_model(LlamaConfig(vocab_size=300, max_seq_len=16, n_layers=5, n_heads=2, d_model=32))
        return checkpoint_blocks(model, mode, every)

    assert wrapped("none") == []
    assert wrapped("full") == [0, 1, 2, 3, 4]
    assert wrapped("selective", 2) == [0, 2, 4]
    assert wrapped("selective", 3) == [0, 3]


def test_compile_modes_and_the_chunked_loss_keep_the_losses(train_dataset, tmp_path):
    """Regional (per block and the loss tail) and whole-model torch.compile, and the head +
    cross-entropy in chunks of 24 positions (eager and compiled), train to the eager losses."""
    eager, _ = run(tiny(train_dataset, tmp_path / "a", **{"train.steps": 3}))
    for mode, chunk in (("regional", 0), ("full", 0), ("none", 24), ("regional", 24)):
        compiled, _ = run(
            tiny(
                train_dataset,
                tmp_path / f"{mode}-{chunk}",
                **{"train.steps": 3, "train.compile": mode, "train.loss_chunk": chunk},
            )
        )
        for step in eager:
            assert math.isclose(compiled[step], eager[step], rel_tol=1e-4), (mode, chunk, step)


def test_document_masks_reach_the_model_from_the_config(train_dataset, tmp_path):
    """train.document_mask: the rows with an EOS inside lose something else at the first step (same
    weights, same batch); the masks are a function of the tokens, so the run resumes as any other."""
    common = {"train.steps": 2, "train.batch_size": 16}  # 16 rows of 33 tokens: documents of ~400 end in some
    plain, _ = run(tiny(train_dataset, tmp_path / "plain", **common))
    masked, _ = run(tiny(train_dataset, tmp_path / "masked", **common, **{"train.document_mask": True}))
    assert math.isfinite(masked[1]) and masked[1] != plain[1]


def test_incompatible_resume_names_the_keys(train_dataset, tmp_path):
    run(tiny(train_dataset, tmp_path, **{"train.steps": 3}))
    with pytest.raises(TrainingError, match=r"config differs in model.n_layers: checkpoint 2, now 3"):
        run(tiny(train_dataset, tmp_path, **{"train.steps": 6, "model.n_layers": 3}))


def test_dataset_and_model_must_agree(train_dataset, tmp_path):
    with pytest.raises(TrainingError, match="vocab_size 320, model.vocab_size is 512"):
        run(tiny(train_dataset, tmp_path, **{"model.vocab_size": 512}))
    with pytest.raises(TrainingError, match="seq_len 32, above model.max_seq_len=16"):
        run(tiny(train_dataset, tmp_path, **{"model.max_seq_len": 16}))


def test_non_finite_losses_stop_training(train_dataset, tmp_path):
    cfg = tiny(
        train_dataset,
        tmp_path,
        **{
            "optim.lr": 1e30,
            "optim.warmup_steps": 0,
            "optim.grad_clip": 0,
            "train.max_bad_steps": 2,
            "train.checkpoint_every": 0,
        },
    )
    with pytest.raises(TrainingDiverged, match="2 steps in a row with a non-finite loss or gradient"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()  # never checkpointed


def checkpoint_dirs(root):
    return sorted(p for p in (root / "checkpoints/pretrain").iterdir() if p.name.startswith("step-"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(train_dataset, tmp_path, caplog):
    reference, _ = run(tiny(train_dataset, tmp_path / "a"))
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run(tiny(train_dataset, tmp_path / "b", **{"train.fail_at_step": 8}))
    step3, step6 = checkpoint_dirs(tmp_path / "b")
    shard = next(step6.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the sha256 tells
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        resumed, _ = run(tiny(train_dataset, tmp_path / "b", **{"train.fail_at_step": 8}))
    assert min(resumed) == 4  # from step 3, not the damaged step 6
    assert f"{step6.name}: {shard.name} does not match its sha256" in caplog.text
    for step, loss in resumed.items():
        assert loss == reference[step], step


def test_a_crashed_save_never_looks_complete(train_dataset, tmp_path, caplog):
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        run(tiny(train_dataset, tmp_path, **{"train.fail_at_step": 4}))
    (good,) = checkpoint_dirs(tmp_path)
    # A save that crashed after every rank's upload marker but before its manifest, and one whose
    # manifest names a file that never arrived.
    crashed = good.with_name("step-00000006-" + "f" * 18)
    shutil.copytree(good, crashed)
    (crashed / "manifest.json").unlink()
    broken = good.with_name("step-00000005-" + "e" * 18)
    shutil.copytree(good, broken)
    next(broken.glob("*.distcp")).unlink()
    with caplog.at_level("WARNING"):
        resumed, _ = run(tiny(train_dataset, tmp_path, **{"train.fail_at_step": 4}))
    assert min(resumed) == 4  # from the step-3 checkpoint
    assert f"{broken.name}: " in caplog.text and "is missing" in caplog.text
    names = [p.name for p in checkpoint_dirs(tmp_path)]
    assert crashed.name not in names and broken.name not in names  # pruned once newer ones exist
    assert good.name in names or len(names) == 3


def test_a_finished_run_is_refused_and_never_does_not_mix_runs(train_dataset, tmp_path):
    from generalmodel.storage import RunLayout
    from generalmodel.train.resume import refuse_finished

    cfg = tiny(train_dataset, tmp_path, **{"train.steps": 3})
    refuse_finished(cfg, RunLayout.of(cfg))  # nothing there yet
    run(cfg)
    with pytest.raises(TrainingError, match=r"has already finished: .*\(step 3 of train.steps=3\)"):
        refuse_finished(cfg, RunLayout.of(cfg))
    with pytest.raises(TrainingError, match=r"train.steps: checkpoint 3, now 6 \(the LR schedule"):
        run(tiny(train_dataset, tmp_path, **{"train.steps": 6}))
    with pytest.raises(TrainingError, match="train.resume=never, but .* already holds checkpoints"):
        run(tiny(train_dataset, tmp_path, **{"train.steps": 3, "train.resume": "never"}))


def test_resume_keeps_the_global_batch_or_names_it(train_dataset, tmp_path):
    reference, _ = run(tiny(train_dataset, tmp_path / "a", **{"train.batch_size": 8}))
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tiny(train_dataset, tmp_path / "b", **{"train.batch_size": 8, "train.fail_at_step": 5}))
    with pytest.raises(TrainingError, match=r"from 8 x 1 x 1 workers = 8 to 4 x 1 x 1 = 4 sequences per step"):
        run(tiny(train_dataset, tmp_path / "b", **{"train.batch_size": 4}))
    # Same global batch, split differently (4 x 2 micro-steps): continues the same data stream.
    resumed, _ = run(tiny(train_dataset, tmp_path / "b", **{"train.batch_size": 4, "train.grad_accum": 2}))
    assert min(resumed) == 4
    for step, loss in resumed.items():
        assert math.isclose(loss, reference[step], rel_tol=1e-4), step


def test_a_nan_gradient_with_a_finite_loss_is_skipped_and_training_recovers(train_dataset, tmp_path):
    reference, _ = run(tiny(train_dataset, tmp_path / "a"))
    reports = []
    train(tiny(train_dataset, tmp_path / "b", **{"train.nan_grad_at_step": 4}), reports.append)
    logged = {m["step"]: m for m in reports if "grad_norm" in m}
    # step index 4 is the 5th step: its gradient norm is NaN, it is skipped and counted from then on
    assert [logged[s]["skipped_steps"] for s in sorted(logged)] == [0] * 4 + [1] * 8
    assert math.isnan(logged[5]["grad_norm"]) and all(math.isfinite(logged[s]["grad_norm"]) for s in logged if s != 5)
    losses = {s: m["loss"] for s, m in logged.items()}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[12] < reference[1] - 0.3  # it went on learning from unpoisoned weights


def test_the_training_step_reads_nothing_back_outside_log_steps(train_dataset, tmp_path):
    """No `.item()`, `float(t)`, `if t:` ... between log steps (a GPU would wait at each): a run of 6
    steps reads back exactly as often as one of 3, when both log, evaluate and save at the end only."""
    from generalmodel.train.step import HostReads

    opt = {"optim.name": "muon", "model.logit_softcap": 15.0, "model.value_residual": True}
    opt.update({"model.memory_layers": [1], "model.memory_keys": 8, "model.memory_top_k": 4})
    opt.update({"train.log_every": 100, "train.eval_every": 100, "train.checkpoint_every": 0})
    reads = {}
    for steps in (3, 6):
        with HostReads() as counter:
            run(tiny(train_dataset, tmp_path / str(steps), **opt, **{"train.steps": steps}))
        reads[steps] = counter.reads
    assert reads[6] == reads[3], reads
    assert 0 < len(reads[3]) < 20  # the last step's metrics, the guard, the evaluation


def _worker(rank, port, cfg, out, counts):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    # Count FSDP2's gradient reduce-scatters: the real collective runs, each call is counted.
    reduce_scatter, calls = dist.reduce_scatter_single, []

    def counted(*args, **kwargs):
        calls.append(1)
        return reduce_scatter(*args, **kwargs)

    dist.reduce_scatter_single = counted
    losses, _ = run(cfg)
    if rank == 0:
        out.update(losses)
        counts["reduce_scatters"] = len(calls)
    torch.distributed.destroy_process_group()


def two_processes(cfg, counts: dict | None = None) -> dict:
    """The losses of rank 0 of a 2-process run; `counts` gets its number of gradient reduce-scatters."""
    manager = mp.Manager()
    out, shared = manager.dict(), manager.dict()
    spawn_ranks(_worker, (free_port(), cfg, out, shared), 2)
    if counts is not None:
        counts.update(shared)
    return dict(out)


def test_two_process_fsdp_matches_one_process(train_dataset, tmp_path):
    """The same global batch (2 × 4 sequences vs 1 × 8) gives the same losses."""
    torch.set_num_threads(1)
    single, _ = run(tiny(train_dataset, tmp_path / "one", **{"train.batch_size": 8, "train.steps": 8}))
    out = two_processes(tiny(train_dataset, tmp_path / "two", **{"train.batch_size": 4, "train.steps": 8}))
    for step, loss in single.items():
        assert math.isclose(out[step], loss, rel_tol=1e-5), (step, out[step], loss)
    # Elastic: a 1-worker run that died resumes on 2 workers (4 each: the same global batch of 8).
    with pytest.raises(RuntimeError, match="injected failure"):
        run(
            tiny(
                train_dataset,
                tmp_path / "elastic",
                **{"train.batch_size": 8, "train.steps": 8, "train.fail_at_step": 5},
            )
        )
    resumed = two_processes(tiny(train_dataset, tmp_path / "elastic", **{"train.batch_size": 4, "train.steps": 8}))
    assert min(resumed) == 4
    for step, loss in resumed.items():
        assert math.isclose(loss, single[step], rel_tol=1e-4), (step, loss, single[step])


# A long memory (models/longmem.py) whose window of 8 the 32-token rows overrun.
MEMORY = {"model.window": 8, "model.long_memory_layers": [1]}


def test_training_with_a_knn_memory_resumes_exactly(train_dataset, tmp_path):
    cfg = dict(MEMORY, **{"model.long_memory": "knn", "model.long_memory_top_k": 4})
    reference, _ = run(tiny(train_dataset, tmp_path / "a", **cfg))
    with pytest.raises(RuntimeError, match="injected failure at step 8"):
        run(tiny(train_dataset, tmp_path / "b", **cfg, **{"train.fail_at_step": 8}))
    resumed, _ = run(tiny(train_dataset, tmp_path / "b", **cfg))
    assert min(resumed) in (4, 7)
    assert all(loss == reference[step] for step, loss in resumed.items())


def test_a_compressive_memory_under_fsdp2_on_two_processes_equals_one(train_dataset, tmp_path):
    torch.set_num_threads(1)
    cfg = dict(MEMORY, **{"model.long_memory": "compressive", "train.steps": 6})
    single, _ = run(tiny(train_dataset, tmp_path / "one", **cfg, **{"train.batch_size": 8}))
    out = two_processes(tiny(train_dataset, tmp_path / "two", **cfg, **{"train.batch_size": 4}))
    for step, loss in single.items():
        assert math.isclose(out[step], loss, rel_tol=1e-5), (step, out[step], loss)


def test_gradient_accumulation_under_fsdp_reduce_scatters_once_per_step(train_dataset, tmp_path):
    """2 ranks × 2 micro-batches of 2 == one process with 8 rows, and FSDP2 reduce-scatters each
    shard group's gradients once per optimizer step (set_requires_gradient_sync), not per micro-batch."""
    torch.set_num_threads(1)
    single, _ = run(tiny(train_dataset, tmp_path / "one", **{"train.batch_size": 8, "train.steps": 4}))
    counts = {}
    accumulated = two_processes(
        tiny(train_dataset, tmp_path / "two", **{"train.batch_size": 2, "train.grad_accum": 2, "train.steps": 4}),
        counts,
    )
    for step, loss in single.items():
        assert math.isclose(accumulated[step], loss, rel_tol=1e-5), (step, accumulated[step], loss)
    groups = 2 + 1  # the 2 blocks and the root (embedding, final norm, head) — tiny() has 2 layers
    assert counts["reduce_scatters"] == 4 * groups


def test_two_process_fsdp_with_muon_matches_one_process(train_dataset, tmp_path):
    """The training loop with the make pretrain recipe (Muon, each matrix orthogonalised on one
    rank, and the model switches) on 2 FSDP2 ranks follows the single-process run — a step with a
    NaN gradient skipped by both alike (the masked update on sharded DTensors)."""
    torch.set_num_threads(1)
    opt = {"optim.name": "muon", "train.steps": 6, "model.tie_embeddings": False, "model.mlp": "relu2"}
    opt["train.nan_grad_at_step"] = 2
    opt.update(
        {f"model.{k}": True for k in ("qk_norm", "value_residual", "zero_init")}, **{"model.logit_softcap": 15.0}
    )
    single, _ = run(tiny(train_dataset, tmp_path / "one", **opt, **{"train.batch_size": 8}))
    out = two_processes(tiny(train_dataset, tmp_path / "two", **opt, **{"train.batch_size": 4}))
    assert single[6] < single[1] - 0.3
    for step, loss in single.items():
        assert math.isclose(out[step], loss, rel_tol=1e-3), (step, out[step], loss)


def test_a_checkpoint_from_before_the_optimizer_groups_is_refused_by_name():
    from generalmodel.config import Config, dump_config
    from generalmodel.storage import resolve
    from generalmodel.train.resume import check_resumable

    cfg = Config()
    old = dump_config(cfg)
    del old["optim"]["name"]  # a manifest written before optim.name (and the new parameter groups)
    loc = resolve("/tmp/ckpt/step-00000100-abc", cfg.storage)
    with pytest.raises(TrainingError, match="before optim.name existed.*start a new run"):
        check_resumable(loc, {"config": old, "dataset": "x", "world_size": 1}, cfg, dump_config(cfg), "x", 1)
    check_resumable(loc, {"config": dump_config(cfg), "dataset": "x", "world_size": 1}, cfg, dump_config(cfg), "x", 1)


def test_lr_schedules():
    cosine = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, 100, cosine) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cosine) == 1.0
    assert lr_multiplier(99, 100, cosine) == pytest.approx(0.1)
    wsd = OptimConfig(warmup_steps=0, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(79, 100, wsd) == 1.0
    assert lr_multiplier(99, 100, wsd) == pytest.approx(0.0)
    linear = OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.5)
    assert lr_multiplier(49, 100, linear) == pytest.approx(0.75)


def test_sampling_parameters_are_validated():
    for key, value, message in [
        ("top_p", 0, "top_p = 0: Input should be greater than 0"),
        ("top_p", 1.5, "top_p = 1.5: Input should be less than or equal to 1"),
        ("temperature", -1, "temperature = -1: Input should be greater than or equal to 0"),
        ("top_k", 0, "top_k = 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, {key: value}, SamplingParams)


def test_logit_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(min_p=0.5) == [True, True, False, False]
