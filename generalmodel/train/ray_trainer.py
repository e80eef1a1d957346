"""The per-worker loop under Ray Train: a TorchTrainer with one worker per data-parallel rank,
restarted from the last checkpoint by FailureConfig(max_failures) when a worker dies.

Rank 0 sends its metrics to MLflow (asynchronously) and to the driver through a Ray queue; the
driver shows them as a live progress bar on a terminal, or as plain log lines otherwise. Every
rank forwards its `generalmodel` log lines through the same queue, so the console shows them
without streaming the workers' stderr (`ray.verbose` turns that on). Ray Train's own per-report
INFO lines stay in the worker logs. A failure is one line on the console; the tracebacks of the
failed workers go to a log file and to the MLflow run (`failure_log`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from generalmodel import RunFailed, UserError
from generalmodel.config import Config
from generalmodel.storage import MANIFEST, RunLayout, resolve
from generalmodel.train.init import InitSource
from generalmodel.train.loop import check_compatible, train

log = logging.getLogger(__name__)
progress_log = logging.getLogger("generalmodel.progress")

EVALUATIONS = {"val_loss", "heldout_accuracy"}  # the metrics Ray Train hears about (pretraining/SFT/DPO, RL)


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    cfg: Config = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    _quiet_ray_train()
    root = logging.getLogger("generalmodel")
    root.setLevel(logging.INFO)  # the worker's default level is WARNING
    if config.get("progress") is not None:
        root.addHandler(_ForwardToDriver(config["progress"], rank))
    log.info("train worker rank %d on node %s", rank, ray.get_runtime_context().get_node_id())
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
        # Ray gets the evaluations (what Tune schedulers act on), not every log line: each
        # ray.train.report is a synchronization with the controller that costs up to ~1 s.
        if EVALUATIONS & metrics.keys():
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


class _ForwardToDriver(logging.Handler):
    """A worker's `generalmodel` log records, sent to the driver's console through the progress
    queue (the driver logs them under the worker's logger name, prefixed by the rank)."""

    def __init__(self, queue, rank: int):
        super().__init__(logging.INFO)
        self.queue, self.rank = queue, rank

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            self.queue.put_nowait({"log": record.levelno, "logger": record.name, "rank": self.rank, "msg": message})
        except Exception:  # a full or vanished queue costs a console line; the worker's log file keeps it
            pass


def _quiet_ray_train() -> None:
    """Ray Train logs every report at INFO ('Reporting training result ...') through loggers named
    by file path; keep those in the worker's log file, off the user's console."""
    for name in list(logging.root.manager.loggerDict):
        if "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


class Progress:
    """The driver's view of training: rank 0's metrics from a Ray queue, shown as a tqdm bar on a
    terminal (step, loss, val loss, tokens/s, MFU, ETA) or as one log line per report otherwise."""

    def __init__(self, steps: int, name: str):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: the queue must outlive the loss of a worker node, whose workers'
        # restart (and "resumed from" line) the user wants to see.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.steps, self.name = steps, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._show, name="training-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.queue.shutdown()

    def _show(self) -> None:
        from ray.util.queue import Empty
        from tqdm import tqdm

        bar = tqdm(total=self.steps, desc=self.name, unit="step", dynamic_ncols=True) if sys.stderr.isatty() else None
        while True:
            try:
                m = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    break
                continue
            except Exception as e:  # the queue actor is gone (cluster shutting down)
                log.debug("progress display stopped: %s", e)
                break
            if "log" in m:
                if bar is not None:
                    bar.clear()
                logging.getLogger(m["logger"]).log(m["log"], "[rank %d] %s", m["rank"], m["msg"])
                if bar is not None:
                    bar.refresh()
                continue
            if bar is None:
                progress_log.info(progress_line(m, self.steps))
                continue
            bar.n = m["step"]
            bar.set_postfix_str(progress_line(m, self.steps, with_step=False), refresh=True)
        if bar is not None:
            bar.close()


def progress_line(m: dict[str, Any], steps: int, with_step: bool = True) -> str:
    parts = [f"step {m['step']:>5}/{steps}"] if with_step else []
    if "loss" in m:  # absent from RL's step-0 evaluation
        parts.append(f"loss {m['loss']:.4f}")
    if "val_loss" in m:
        parts.append(f"val {m['val_loss']:.4f}")
    if "preference_accuracy" in m:  # DPO
        parts.append(f"pref acc {m['preference_accuracy']:.0%} margin {m['reward_margin']:.3f}")
    if "val_preference_accuracy" in m:
        parts.append(f"val pref acc {m['val_preference_accuracy']:.0%}")
    if "reward_mean" in m:  # RL
        parts.append(f"reward {m['reward_mean']:.3f} (zero-var groups {m['zero_variance_groups']:.0%})")
    if "heldout_accuracy" in m:
        parts.append(f"held-out acc {m['heldout_accuracy']:.1%}")
    if "tokens_per_s" in m:
        parts += [f"{m['tokens_per_s'] / 1e3:.1f}K tok/s", f"lr {m['lr']:.2e}", f"ETA {m['eta_s'] / 60:.1f} min"]
    if "mfu" in m:
        parts.append(f"MFU {m['mfu']:.1%}")
    if "checkpoint_stall_s" in m:
        parts.append(f"ckpt stall {m['checkpoint_stall_s']:.2f}s")
    return " | ".join(parts)


def ensure_dataset(cfg: Config, layout: RunLayout, init: InitSource | None = None) -> tuple[Config, Any]:
    """(cfg, the run's TokenDataset): the dataset prepared with Ray Data first when train.dataset
    is not given and the data section's output is missing; `model.vocab_size` follows the
    dataset's tokenizer unless the config sets it. Needs a Ray session. With `init` (the loaded
    train.init_from), the dataset must be tokenized with its tokenizer."""
    from generalmodel.data.loader import TokenDataset
    from generalmodel.data.prepare import build_dataset, describe, plan_dataset
    from generalmodel.train.init import check_tokenizer

    uri, storage = layout.dataset, layout.storage
    exists = resolve(uri, storage).join(MANIFEST).exists()
    changed = exists and not cfg.train.dataset and source_changed(cfg, TokenDataset.open(uri, storage).manifest)
    if changed and not cfg.data.overwrite:
        raise UserError(
            f"dataset {uri} was prepared from {changed}: pass --data.overwrite=true to prepare it again "
            "(or --data.output=URI for another dataset)"
        )
    if not exists or changed:
        if cfg.train.dataset:
            raise UserError(f"train.dataset {uri} is not a published dataset (no {MANIFEST})")
        print(f"dataset {uri} is {'stale' if changed else 'missing'}: preparing it")
        print(describe(build_dataset(plan_dataset(cfg, layout)), uri))
    ds = TokenDataset.open(uri, storage)
    if init is not None:
        check_tokenizer(init, ds.tokenizer_json(), uri)
    if "vocab_size" not in cfg.explicit_model_keys and cfg.model.vocab_size != ds.vocab_size:
        model = dataclasses.replace(cfg.model, vocab_size=ds.vocab_size)
        cfg = cfg.model_copy(update={"model": model})  # keeps the explicit keys (a private attribute)
    check_compatible(cfg, ds)
    return cfg, ds


def source_changed(cfg: Config, manifest: dict[str, Any]) -> str | None:
    """How the source differs from the one the dataset was prepared from (its files' count or
    total size changed), or None: a job must not train on a stale dataset."""
    from generalmodel.data.sources import list_pieces

    before = manifest.get("source", {})
    if cfg.data.source == "sotu" or "files" not in before:
        return None  # the built-in corpus does not change under a user
    pieces = list_pieces(cfg.data, cfg.storage.resolved())
    now = (len(pieces), sum(p.size for p in pieces))
    if now != (before["files"], before["bytes"]):
        return (
            f"{cfg.data.source} when it had {before['files']} files of {before['bytes']} bytes; "
            f"it now has {now[0]} files of {now[1]} bytes"
        )
    return None


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
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from generalmodel.train.memory import check_fits

    memory = ray.cluster_resources().get("memory")
    estimate = check_fits(cfg, seq_len, memory / cfg.ray.num_workers if memory else None)
    log.info("memory estimate: %s", estimate.describe())
    results = resolve(layout.ray_results, layout.storage)
    progress = Progress(cfg.train.steps, cfg.train.run_name)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "cfg": cfg.model_copy(update={"storage": layout.storage}),
            "layout": layout,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "progress": progress.queue,
            "init": ray.put(init.state) if init is not None else None,
            "loop": loop,
            "loop_args": loop_args or {},
        },
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
            # Ray Train's INFO chatter (resource requests, worker group start-up) stays in its log
            # files under the session's logs/train/; the console shows our progress and warnings.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        with progress:
            result = _fit_interruptibly(trainer)
        error = result.error
    except Exception as e:
        error = e
    if error is not None:
        raise failure(error, failure_log(error, cfg.train.run_name, run_id, tracking_uri)) from None


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


def failure(e: BaseException, tracebacks: str | None = None) -> Exception:
    """What a failed fit raises: the worker's own UserError (a config or input problem found
    while running: exit 2), else RunFailed (exit 1), each with one line, which names where the
    `tracebacks` went (failure_log)."""
    cause = root_cause(e)
    where = f" (tracebacks: {tracebacks}; --ray.verbose=true streams them here)" if tracebacks else ""
    if isinstance(cause, UserError):
        return UserError(root_message(cause) + where)
    return RunFailed(f"training failed: {root_message(cause)}{where}")


LOG_DIR = Path(".generalmodel/logs")
FAILURE_ARTIFACT = "failure/tracebacks.txt"


def failure_log(e: BaseException, run_name: str, run_id: str | None, tracking_uri: str | None) -> str | None:
    """Write the failed workers' tracebacks to LOG_DIR/<run>-<time>.log and, when there is an
    MLflow run, to its artifact FAILURE_ARTIFACT. Returns where they went (None: nowhere)."""
    text = failure_report(e)
    where = []
    try:
        path = LOG_DIR / f"{run_name}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        where.append(str(path.resolve()))
    except OSError as err:
        log.warning("could not write the failure log under %s: %s", LOG_DIR, err)
    if run_id and tracking_uri:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).log_text(run_id, text, FAILURE_ARTIFACT)
            where.append(f"MLflow run {run_id} artifact {FAILURE_ARTIFACT}")
        except Exception as err:  # the artifact store may be what failed
            log.warning("could not log the failure to MLflow run %s: %s", run_id, err)
    return ", ".join(where) or None


def failure_report(e: BaseException) -> str:
    """Every failed worker's traceback (as Ray carried it), rank by rank, then the driver's."""
    parts = []
    failures, _ = _worker_failures(e)
    for rank, exc in sorted(failures.items()):
        parts.append(f"=== worker rank {rank}: {type(exc).__name__}\n{_traceback_text(exc)}")
    parts.append(f"=== driver: {type(e).__name__}\n{_traceback_text(e)}")
    return "\n".join(parts)


def _worker_failures(e: BaseException) -> tuple[dict[int, BaseException], BaseException]:
    """(rank → exception, the exception holding them) of Ray Train's structured failure
    (`WorkerGroupError.worker_failures`), found through Ray's controller and task wrappers;
    ({}, the innermost exception) when there is none."""
    for _ in range(10):  # wrappers nest: TrainingFailedError → worker exception → RayTaskError cause
        failures = getattr(e, "worker_failures", None)
        if failures:
            return dict(failures), e
        inner = getattr(e, "controller_failure", None) or getattr(e, "cause", None)
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    return {}, e


def _traceback_text(e: BaseException) -> str:
    """A Ray-carried exception's text holds the remote traceback; a local one has its own."""
    local = "".join(traceback.format_exception(e)) if e.__traceback__ else ""
    remote = str(e) if "Traceback" in str(e) else ""
    notes = "".join(getattr(e, "__notes__", []))  # the worker's own traceback (_worker)
    return "\n".join(t for t in (remote, local or notes) if t) or f"{type(e).__name__}: {e}\n"


def root_cause(e: BaseException) -> BaseException:
    """The first failed worker's exception, unwrapped from Ray's task and controller wrappers."""
    for _ in range(10):  # a worker's exception may wrap another structured failure
        failures, e = _worker_failures(e)
        if not failures:
            return e
        _, e = min(failures.items())
    return e


def root_message(e: BaseException) -> str:
    """One line for the console: the root cause's type and message (the last line of a crash)."""
    e = root_cause(e)
    text = str(e).strip()
    if not isinstance(e, UserError | RunFailed):  # a crash: its last line (Ray's text keeps the traceback)
        text = text.splitlines()[-1].strip() if text else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
