"""The batch-size schedule (train.batch_warmup_steps): the micro-batches a rank accumulates grow from
a share of train.grad_accum to all of them; the loader serves exactly those rows, in the plain
run's order (a warmed-up run's first step is the plain run's first micro-batch); the tokens metric
counts what was served; a run killed inside the warmup resumes exactly."""

import math

import pytest
from test_train import tiny

from generalmodel.config import ConfigError, load_config
from generalmodel.train.core import micro_batches, micro_batches_before
from generalmodel.train.loop import train

WARM = {"train.grad_accum": 4, "train.batch_size": 2, "train.batch_warmup_steps": 8, "train.steps": 9}


def test_the_micro_batches_grow_linearly_to_grad_accum():
    cfg = load_config(overrides={"train.grad_accum": 4, "train.batch_warmup_steps": 4})  # from a quarter
    assert [micro_batches(cfg, s) for s in range(7)] == [1, 2, 3, 4, 4, 4, 4]
    assert [micro_batches_before(cfg, s) for s in range(7)] == [0, 1, 3, 6, 10, 14, 18]
    half = load_config(
        overrides={"train.grad_accum": 8, "train.batch_warmup_steps": 3, "train.batch_warmup_start": 0.5}
    )
    assert [micro_batches(half, s) for s in range(4)] == [4, 6, 7, 8]
    plain = load_config(overrides={"train.grad_accum": 4})
    assert [micro_batches(plain, s) for s in range(3)] == [4, 4, 4]
    with pytest.raises(ConfigError, match=r"up to train.grad_accum=1, so it has nothing to grow"):
        load_config(overrides={"train.batch_warmup_steps": 10})
    with pytest.raises(ConfigError, match="batch_warmup_start"):
        load_config(overrides={"train.grad_accum": 2, "train.batch_warmup_steps": 10, "train.batch_warmup_start": 0})


def test_a_warmed_up_run_serves_the_scheduled_rows_and_resumes_exactly(train_dataset, tmp_path):
    logged: list[dict] = []
    train(tiny(train_dataset, tmp_path / "a", **WARM), logged.append)
    steps = {m["step"]: m for m in logged if "lr" in m}
    per_micro = 2 * 32  # rows x tokens of one micro-batch (one rank)
    # micro-batches per step: 1, 2, 2, 3, 3, 3, 4, 4, 4
    assert [steps[s]["tokens"] for s in range(1, 10)] == [n * per_micro for n in (1, 3, 5, 8, 11, 14, 18, 22, 26)]
    # Step 1 is one micro-batch of 2 rows: the plain run's first step on a batch of 2 rows.
    first: list[dict] = []
    train(tiny(train_dataset, tmp_path / "plain", **{"train.batch_size": 2, "train.steps": 1}), first.append)
    assert math.isclose(steps[1]["loss"], first[-1]["loss"], rel_tol=1e-6)
    with pytest.raises(RuntimeError, match="injected failure at step 6"):  # checkpoints at 3 and 6
        train(tiny(train_dataset, tmp_path / "b", **WARM, **{"train.fail_at_step": 6}), lambda m: None)
    resumed: list[dict] = []
    train(tiny(train_dataset, tmp_path / "b", **WARM), resumed.append)
    again = {m["step"]: m for m in resumed if "lr" in m}
    assert min(again) in (4, 7) and all(again[s]["loss"] == steps[s]["loss"] for s in again)
    assert all(again[s]["tokens"] == steps[s]["tokens"] for s in again)


def test_the_row_objectives_refuse_a_batch_warmup_and_tensor_parallel_by_name():
    """Coconut, Quiet-STaR and the RL learner step over rows in fixed batches (generalmodel/post/rows.py)."""
    from types import SimpleNamespace

    from generalmodel import UserError
    from generalmodel.post.rl.learner import GrpoStep
    from generalmodel.post.rows import RowsStep

    cfg = load_config(overrides={"train.grad_accum": 2, "train.batch_warmup_steps": 3})
    with pytest.raises(UserError, match=r"train.batch_warmup_steps=3: the batch warmup is the dataset loop's"):
        RowsStep(SimpleNamespace(cfg=cfg), [])
    # Tensor parallel too: its ranks must read the same rows, and these steps hand each rank its own.
    cfg = load_config(overrides={"parallel.tensor": 2})
    for step in (RowsStep, GrpoStep):
        with pytest.raises(UserError, match=rf"parallel.tensor=2: .* {step.__name__} hands each rank rows of its own"):
            step(SimpleNamespace(cfg=cfg), *([[]] if step is RowsStep else [None, None, None]))
