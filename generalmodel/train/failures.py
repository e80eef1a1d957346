"""A failed run told plainly: one line on the console (`failure`: a UserError or RunFailed with the
root cause), the failed workers' tracebacks in a log file and in the MLflow run (`failure_log`)."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from generalmodel.errors import RunFailed, UserError

log = logging.getLogger(__name__)


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
