"""The per-worker loop under Ray Train: a TorchTrainer with one worker per data-parallel rank,
restarted from the last checkpoint by FailureConfig(max_failures) when a worker dies."""

from __future__ import annotations

import logging
from typing import Any

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.storage import resolve, under_root

log = logging.getLogger(__name__)


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    from generalmodel.train.loop import train

    cfg: Config = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    logger = None
    if rank == 0 and config.get("run_id"):
        from generalmodel.tracking import MetricLogger

        logger = MetricLogger(config["tracking_uri"], config["run_id"])

    # Ray Train streams worker logging to the driver once (print()s would arrive twice); our
    # INFO lines (progress, resume) must pass the worker's default WARNING level.
    logging.getLogger("generalmodel").setLevel(logging.INFO)
    progress = logging.getLogger("generalmodel.progress")
    progress.info("train worker rank %d on node %s", rank, ray.get_runtime_context().get_node_id())

    def report(metrics: dict[str, Any]) -> None:
        if rank == 0:
            progress.info(progress_line(metrics, cfg.train.steps))
            if logger is not None:
                logger.log(metrics)
        # Ray gets the evaluations (what Tune schedulers act on), not every log line: each
        # ray.train.report is a synchronization with the controller that costs up to ~1 s.
        if "val_loss" in metrics:
            ray.train.report(metrics)

    train(cfg, report)


def progress_line(m: dict[str, Any], steps: int) -> str:
    parts = [f"step {m['step']:>5}/{steps}", f"loss {m['loss']:.4f}"]
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    if "tokens_per_s" in m:
        parts += [f"{m['tokens_per_s'] / 1e3:.1f}K tok/s", f"lr {m['lr']:.2e}", f"ETA {m['eta_s'] / 60:.1f} min"]
    if "mfu" in m:
        parts.append(f"MFU {m['mfu']:.1%}")
    if "checkpoint_stall_s" in m:
        parts.append(f"ckpt stall {m['checkpoint_stall_s']:.2f}s")
    return " | ".join(parts)


def ensure_dataset(cfg: Config):
    """The run's dataset (a TokenDataset), prepared with Ray Data first when train.dataset is not
    given and the data section's output is missing. Needs a Ray session."""
    from generalmodel.data.loader import TokenDataset
    from generalmodel.data.prepare import build_dataset, plan_dataset
    from generalmodel.storage import MANIFEST
    from generalmodel.train.loop import check_compatible, dataset_uri

    uri, storage = dataset_uri(cfg), cfg.storage.resolved()
    if not resolve(uri, storage).join(MANIFEST).exists():
        if cfg.train.dataset:
            raise UserError(f"train.dataset {uri} is not a published dataset (no {MANIFEST})")
        print(f"dataset {uri} is missing: preparing it")
        build_dataset(plan_dataset(cfg))
    ds = TokenDataset.open(uri, storage)
    check_compatible(cfg, ds)
    return ds


def fit(cfg: Config, run_id: str | None, tracking_uri: str | None, callbacks: list | None = None) -> None:
    """Run training on the connected Ray cluster; metrics go to MLflow (run_id) and the log.
    `callbacks`: Ray Train callbacks, e.g. Tune's TuneReportCallback when this runs in a trial."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = cfg.storage.resolved()
    results = resolve(under_root("ray-results", storage), storage)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_copy(update={"storage": storage}), "run_id": run_id,
                           "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=results.path,
            storage_filesystem=results.fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        raise UserError(f"training failed: {root_message(e)}") from None
    if result.error is not None:
        raise UserError(f"training failed: {root_message(result.error)}")


def root_message(e: BaseException) -> str:
    """The exception a worker's traceback ends with (Ray passes worker errors on as text):
    ours by preference, else the last `SomeError: message` line, else the last line."""
    import re

    text = str(e)
    ours = re.findall(r"generalmodel\.[\w.]+?(\w+Error): (.+)", text)
    if ours:
        return f"{ours[-1][0]}: {ours[-1][1].strip()}"
    raised = re.findall(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    raised = [r for r in raised if not r[0].startswith(("WorkerGroupError", "TrainingFailedError"))]
    if raised:
        return f"{raised[-1][0]}: {raised[-1][1].strip()}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__
