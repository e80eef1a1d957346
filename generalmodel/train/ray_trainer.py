"""The per-worker loop under Ray Train: a TorchTrainer with one worker per data-parallel rank,
restarted from the last checkpoint by FailureConfig(max_failures) when a worker dies.

Rank 0 sends its metrics to MLflow (asynchronously) and to the driver through a Ray queue; the
driver shows them (generalmodel.train.progress). Every rank forwards its `generalmodel` log lines
through the same queue, so the console shows them without streaming the workers' stderr
(`ray.verbose` turns that on). Ray Train's own per-report INFO lines stay in the worker logs. A
failure is one line on the console (generalmodel.train.failures). Whether the dataset is ready is
generalmodel.train.readiness.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from typing import Any

from generalmodel.config import Config
from generalmodel.storage import RunLayout, resolve
from generalmodel.train.failures import failure, failure_log
from generalmodel.train.init_from import InitSource
from generalmodel.train.loop import train
from generalmodel.train.progress import ForwardToDriver, Progress

log = logging.getLogger(__name__)

# How often Ray Train's controller polls the workers (Ray's default: 2 s). Each evaluation's
# ray.train.report and the end of every run wait for a poll; a poll is a cheap remote call, so a
# shorter interval costs little and saves seconds per run. The driver's value reaches the
# controller (Ray Train propagates it); set the variable to choose another.
HEALTH_CHECK_ENV, HEALTH_CHECK_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
EVALUATIONS = {"val_loss", "heldout_accuracy"}  # the metrics Ray Train hears about (pretraining/SFT/DPO, RL)


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    from generalmodel.train.mesh import for_world

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _quiet_ray_train()
    root = logging.getLogger("generalmodel")
    root.setLevel(logging.INFO)  # the worker's default level is WARNING
    if config.get("progress") is not None:
        root.addHandler(ForwardToDriver(config["progress"], rank))
    here = ray.get_runtime_context()
    log.info("train worker rank %d on node %s, holding %s", rank, here.get_node_id(), here.get_assigned_resources())
    cfg: Config = for_world(config["cfg"], world)  # an elastic group below ray.num_workers accumulates more
    if rank == 0 and elastic(cfg):
        log.info(
            "elastic: a group of %d of at most %d workers, %d micro-batches each per step",
            world,
            cfg.ray.num_workers,
            cfg.train.grad_accum,
        )
    logger = None
    if rank == 0 and config.get("run_id"):
        from generalmodel.tracking import MetricLogger

        logger = MetricLogger(config["tracking_uri"], config["run_id"])
    queue = config.get("progress") if rank == 0 else None

    def report(metrics: dict[str, Any]) -> None:
        if logger is not None:
            logger.log(metrics)
        if queue is not None:
            try:
                queue.put_nowait(metrics)
            except Exception:  # a full or vanished queue only costs the driver a progress line
                pass
        # At a checkpoint and before an evaluation is reported, the metrics logged so far reach
        # the server: a crash resumes from a checkpoint and never logs the steps before it again,
        # and a scheduler may stop the trial as soon as it hears an evaluation (ASHA kills its
        # workers). Otherwise what the background queue had not sent would be lost.
        evaluation = bool(EVALUATIONS & metrics.keys())
        if logger is not None and (evaluation or "checkpoint_stall_s" in metrics):
            logger.flush()
        # Ray gets the evaluations (what Tune schedulers act on), not every log line: each
        # ray.train.report is a synchronization with the controller that costs up to ~1 s.
        if evaluation:
            ray.train.report(metrics)

    init = config.get("init")
    loop = config.get("loop") or train
    try:
        loop(
            cfg, report, config["layout"], (lambda: ray.get(init)) if init is not None else None, **config["loop_args"]
        )
    except BaseException as e:  # the traceback travels with the exception for the driver's failure log
        e.add_note(f"traceback on rank {rank}:\n{traceback.format_exc()}")
        raise
    if logger is not None:
        logger.flush()  # every metric is on the server before the driver plots and closes the run


def _quiet_ray_train() -> None:
    """Ray Train logs every report at INFO ('Reporting training result ...') through loggers named
    by file path; keep those in the worker's log file, off the user's console."""
    for name in list(logging.root.manager.loggerDict):
        if "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def fit(
    cfg: Config,
    layout: RunLayout,
    seq_len: int,
    run_id: str | None,
    tracking_uri: str | None,
    callbacks: list | None = None,
    init: InitSource | None = None,
    loop=None,
    loop_args: dict[str, Any] | None = None,
) -> None:
    """Run training on the connected Ray cluster; metrics go to MLflow (run_id) and the driver's
    console. `seq_len`: the dataset's (from ensure_dataset), for the memory check.
    `callbacks`: Ray Train callbacks, e.g. Tune's TuneReportCallback in a sweep trial.
    `init`: the loaded train.init_from (load_init); its weights go to the workers through the
    object store, put once. `loop`: the per-worker loop (default: generalmodel.train.loop.train;
    RL passes its learner), called as loop(cfg, report, layout, init, **loop_args)."""
    import ray

    from generalmodel.train.memory import check_fits
    from generalmodel.train.mesh import check_node_capacity, check_world_sizes

    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_S)

    shape = check_world_sizes(cfg)
    capacity = workers_per_node(cfg)
    if not capacity and cfg.ray.worker_resources:
        log.warning(
            "no live node has room for a train worker with ray.worker_resources=%s yet: the workers wait for one "
            "(an autoscaler may add it; else start nodes with `ray start --resources=...`)",
            cfg.ray.worker_resources,
        )
    check_node_capacity(cfg.parallel, shape, capacity)
    memory = ray.cluster_resources().get("memory")
    estimate = check_fits(cfg, seq_len, memory / cfg.ray.num_workers if memory else None)
    log.info("memory estimate: %s", estimate.describe())
    progress = Progress(cfg.train.steps, cfg.train.run_name)
    loop_config = {
        "cfg": cfg.model_copy(update={"storage": layout.storage}),
        "layout": layout,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "progress": progress.queue,
        "init": ray.put(init.state) if init is not None else None,
        "loop": loop,
        "loop_args": loop_args or {},
    }
    trainer = _trainer(cfg, layout, loop_config, callbacks)
    try:
        with progress:
            result = _fit_interruptibly(trainer)
        error = result.error
    except Exception as e:
        error = e
    if error is not None:
        raise failure(error, failure_log(error, cfg.train.run_name, run_id, tracking_uri)) from None


def elastic(cfg: Config) -> bool:
    """ray.min_workers below ray.num_workers: the group may shrink and grow (min = num is a fixed group)."""
    return cfg.ray.min_workers is not None and cfg.ray.min_workers < cfg.ray.num_workers


def workers_per_node(cfg: Config) -> list[int]:
    """How many train workers each live node of the cluster can hold (by its CPUs, or GPUs with
    ray.use_gpu, and ray.worker_resources), for the nodes that hold at least one: an autoscaling
    cluster whose worker nodes are not up yet gives [], and the workers check their groups once
    placed."""
    import ray

    fits = [worker_slots(node.get("Resources", {}), cfg) for node in ray.nodes() if node.get("Alive")]
    return [n for n in fits if n > 0]


def worker_slots(have: dict[str, float], cfg: Config) -> int:
    """How many train workers a node with resources `have` holds: by its CPUs (or GPUs with
    ray.use_gpu) and each custom resource of ray.worker_resources (0 where it has none)."""
    need = {"GPU": 1.0} if cfg.ray.use_gpu else {"CPU": cfg.ray.cpus_per_worker}
    need.update(cfg.ray.worker_resources)
    return min(int(have.get(name, 0) // amount) for name, amount in need.items())


def _trainer(cfg: Config, layout: RunLayout, loop_config: dict[str, Any], callbacks: list | None):
    """A TorchTrainer of `_worker`: one worker per rank, restarted after a failure up to
    ray.max_failures times, its results under the layout's ray_results."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    results = resolve(layout.ray_results, layout.storage)
    return TorchTrainer(
        _worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            # Elastic: Ray Train starts as many as it can place, at least min_workers, and grows
            # the group (from the last checkpoint) when more fit, every resize_interval_s.
            num_workers=(cfg.ray.min_workers, cfg.ray.num_workers) if elastic(cfg) else cfg.ray.num_workers,
            elastic_resize_monitor_interval_s=cfg.ray.resize_interval_s,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **cfg.ray.worker_resources},
        ),
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=results.path,
            storage_filesystem=results.fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            callbacks=callbacks,
            # Ray Train's INFO chatter (resource requests, worker group start-up) stays in its log
            # files under the session's logs/train/; the console shows our progress and warnings.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _fit_interruptibly(trainer):
    """trainer.fit() in a helper thread, the calling thread waiting on it. Called from the main
    thread, TorchTrainer.fit installs its own SIGINT handler, which outlives the run and ends the
    process with sys.exit; this way Ctrl-C raises KeyboardInterrupt here, the job marks its run
    KILLED, and shutting Ray down (or the driver exiting) stops the workers."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
