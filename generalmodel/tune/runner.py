"""Ray Tune sweeps: a Tuner whose trainable drives one Ray Train run per trial (the Ray Train V2
pattern). Each trial is a normal pretraining run: its evaluations reach Tune through
TuneReportCallback, so ASHA can stop it early; its DCP checkpoints live on the storage layer under
the sweep, so a sweep restored after its driver died (Tuner.restore) resumes its trials exactly.
MLflow gets a parent run per sweep and a child run per trial (generalmodel.tracking.sweep)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import yaml

from generalmodel import UserError
from generalmodel.config import Config, dump_config
from generalmodel.storage import trial_checkpoint_dir
from generalmodel.tune.spec import Sweep, SweepError, trial_config

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list  # generalmodel.tracking.sweep.TrialRow, ranked
    best_model_uri: str | None
    markdown: str
    experiment_dir: str


def param_space(sweep: Sweep) -> dict[str, Any]:
    """The sweep's search space as Ray Tune domains, keyed by the dotted config keys."""
    from ray import tune

    space = {}
    for key, dist in sweep.search.items():
        ((kind, args),) = dist.items()
        if kind == "choice" and sweep.searcher == "grid":
            kind = "grid"
        space[key] = {
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a),
        }[kind](args)
    return space


def search_algorithm(sweep: Sweep):
    if sweep.searcher != "optuna":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune applies max_concurrent_trials only to a Searcher (it wraps one in a
        # ConcurrencyLimiter) and ignores it, with a warning, for a generator passed in: say it here.
        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials or 0)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise SweepError(
            "searcher 'optuna' needs the optuna package: pip install optuna (or pip install -e '.[tune]')"
        ) from None
    return OptunaSearch(seed=sweep.seed)


def scheduler(sweep: Sweep, steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sweep.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # Rungs in optimizer steps (what each evaluation reports), not in Tune iterations.
    return ASHAScheduler(
        time_attr="step", max_t=s.max_t or steps, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def check_resources(sweep: Sweep, base: Config) -> None:
    """A trial that can never be placed would wait forever: refuse it, naming both sides (CPUs,
    GPUs and the base config's ray.worker_resources)."""
    import ray

    total = ray.cluster_resources()
    r = sweep.resources
    for name, amount in base.ray.worker_resources.items():
        if r.num_workers * amount > total.get(name, 0) + 1e-9:
            raise SweepError(
                f"a trial needs {r.num_workers * amount:g} of the Ray resource {name!r} (ray.worker_resources: "
                f"{r.num_workers} workers x {amount:g}) but the Ray cluster has {total.get(name, 0):g}"
            )
    cpus = r.driver_cpus + r.num_workers * r.cpus_per_worker
    if cpus > total.get("CPU", 0) + 1e-9:
        raise SweepError(
            f"a trial needs {cpus:g} CPUs (resources: {r.num_workers} workers x {r.cpus_per_worker:g} CPU + "
            f"{r.driver_cpus:g} for its driver) but the Ray cluster has {total.get('CPU', 0):g}; lower "
            f"resources.num_workers / resources.cpus_per_worker or add nodes"
        )
    if r.use_gpu and r.num_workers > total.get("GPU", 0):
        raise SweepError(
            f"a trial needs {r.num_workers} GPUs (resources.num_workers with use_gpu) but the Ray "
            f"cluster has {total.get('GPU', 0):g}"
        )


def trial_keys(sweep: Sweep, trial_id: str) -> dict[str, Any]:
    """The config keys the sweep sets for each trial: its name, its checkpoints, its workers."""
    r = sweep.resources
    return {
        "train.run_name": f"{sweep.name}-{trial_id}",
        "train.checkpoint_dir": trial_checkpoint_dir(sweep.name, trial_id),
        "train.resume": "auto",  # a restored trial continues from its last checkpoint
        "ray.num_workers": r.num_workers,
        "ray.cpus_per_worker": r.cpus_per_worker,
        "ray.use_gpu": r.use_gpu,
    }


def _trial(params: dict[str, Any], sweep: Sweep, parent_run_id: str, uri: str) -> None:
    """One trial, run by Tune in its own actor: a pretraining run on Ray Train. The scheduler may
    end it at any report, the last one included (the model is exported before that report), so
    the sweep's driver, not the trial, closes its MLflow run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from generalmodel.storage import RunLayout
    from generalmodel.tracking import log_config
    from generalmodel.tracking.sweep import close_run, open_child_run
    from generalmodel.train.failures import root_message
    from generalmodel.train.init_from import load_init
    from generalmodel.train.job import selection_reference
    from generalmodel.train.ray_trainer import fit
    from generalmodel.train.readiness import ensure_dataset
    from generalmodel.train.reference import with_token_references
    from generalmodel.version import code_version

    logging.getLogger("generalmodel").setLevel(logging.INFO)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(sweep, params, trial_keys(sweep, trial_id))
    layout = RunLayout.of(cfg)
    run_id, resumed = open_child_run(uri, parent_run_id, trial_id, cfg.train.run_name)
    try:
        cfg, init = load_init(cfg, uri)
        cfg, ds = ensure_dataset(cfg, layout, init)
        selection = selection_reference(cfg, uri, layout)
        if selection is not None:  # scored once by the driver (the same base): found and reused here
            layout = with_token_references(cfg, layout, ds, selection)
        if not resumed:
            log_config(run_id, cfg, ds, code_version(), init.tags if init else None)
        fit(cfg, layout, ds.seq_len, run_id, uri, callbacks=[TuneReportCallback()], init=init)
    except Exception as e:
        close_run(uri, run_id, "FAILED", f"failed: {root_message(e)}"[:500])
        raise


def run_sweep(sweep: Sweep, base: Config, spec_yaml: str) -> SweepResult:
    """Run (or continue) the sweep on the connected Ray cluster and summarize it in MLflow."""
    from ray import tune

    from generalmodel.storage import RunLayout, resolve
    from generalmodel.tracking import ensure_experiment, prepare_store, tracking_uri
    from generalmodel.tracking.sweep import open_parent_run
    from generalmodel.train.init_from import load_init
    from generalmodel.train.job import selection_reference
    from generalmodel.train.readiness import ensure_dataset
    from generalmodel.train.reference import with_token_references

    # Trials run in other processes (another working directory, maybe another node): give them
    # the absolute store and tracking URI that this driver resolved.
    layout = RunLayout.of(base)
    uri = tracking_uri(base)
    sweep.base.overrides.update({"storage.root": layout.storage.root, "tracking.uri": uri})
    base = base.model_copy(update={"storage": layout.storage})
    sweeps_dir = resolve(layout.sweeps, layout.storage)
    experiment = sweeps_dir.join(sweep.name)

    check_resources(sweep, base)
    prepare_store(base)
    base, init = load_init(base, uri)  # with train.init_from, the dataset gets the source's tokenizer
    _, ds = ensure_dataset(base, layout, init)  # once for all trials
    selection = selection_reference(base, uri, layout)
    if selection is not None:  # Rho-1: the reference's per-token losses, once for all trials
        with_token_references(base, layout, ds, selection)
    restoring = tune.Tuner.can_restore(experiment.path, storage_filesystem=experiment.fs)
    if restoring and sweep.resume == "never":
        raise SweepError(
            f"sweep {sweep.name!r} already has state at {experiment.uri} and resume is 'never': "
            f"pick another name (--name) or remove it"
        )
    params = {
        "searcher": sweep.searcher,
        "num_samples": sweep.num_samples,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "max_concurrent_trials": sweep.max_concurrent_trials,
        "base.config": sweep.base.config,
        "resources": sweep.resources.model_dump(),
        **{f"scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items()},
        **{f"search.{k}": _describe(d) for k, d in sweep.search.items()},
    }
    params["trials_sha256"] = trials_fingerprint(sweep)
    experiment_id = ensure_experiment(uri, base.tracking.experiment)
    parent, found = open_parent_run(uri, experiment_id, sweep.name, experiment.uri, params, spec_yaml, base, restoring)
    if found:
        from mlflow.tracking import MlflowClient

        before = MlflowClient(uri).get_run(parent).data.params.get("trials_sha256")
        if before and before != params["trials_sha256"]:
            raise SweepError(
                f"sweep {sweep.name!r} at {experiment.uri} was started with another base config, search "
                f"space, scheduler or trial resources (MLflow run {parent}); continuing it would mix "
                f"trials of two sweeps: restore the original options or pick another name (--name)"
            )
    print(
        f"MLflow parent run {parent} ({uri}, experiment {base.tracking.experiment!r})"
        + (" [continuing]" if found else "")
    )

    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=sweep, parent_run_id=parent, uri=uri),
        {"cpu": sweep.resources.driver_cpus},
    )
    if restoring:
        print(f"restoring the interrupted sweep at {experiment.uri} (Tuner.restore)")
        tuner = tune.Tuner.restore(
            experiment.path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=experiment.fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                max_concurrent_trials=sweep.max_concurrent_trials,
                search_alg=search_algorithm(sweep),
                scheduler=scheduler(sweep, base.train.steps),
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=sweeps_dir.path, storage_filesystem=sweeps_dir.fs),
        )
    grid = tuner.fit()
    unfinished = unfinished_trials(experiment, planned_trials(sweep))
    if unfinished:
        stop_interrupted(unfinished, parent, uri, experiment.uri)
    return summarize(sweep, base, grid, parent, uri, experiment.uri)


def planned_trials(sweep: Sweep) -> int:
    """How many trials the sweep runs: num_samples, each a pass over the whole grid if it has one."""
    n = sweep.num_samples
    for domain in param_space(sweep).values():
        if isinstance(domain, dict) and "grid_search" in domain:
            n *= len(domain["grid_search"])
    return n


def unfinished_trials(experiment, planned: int) -> int:
    """Trials a restore would run, by the experiment state Tune saved: those it holds that did not
    end, and those not created yet (with max_concurrent_trials, Tune creates a trial only when a
    slot frees). Tune handles Ctrl-C itself: `fit()` returns normally, the trials it stopped shown
    as terminated, while the saved state keeps them pending so that `Tuner.restore` resumes them."""
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(experiment.path, storage_filesystem=experiment.fs)
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in saved.trials)
    return max(planned, len(saved.trials)) - ended


def stop_interrupted(unfinished: int, parent: str, uri: str, experiment_uri: str) -> None:
    """An interrupted sweep: mark it and its running trials KILLED (a rerun reopens them) and
    raise KeyboardInterrupt, instead of summarizing a half-run sweep as if it were done."""
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking.sweep import STOP_TAG, close_run

    client = MlflowClient(uri)
    running = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    reason = "interrupted: run the same sweep command again to continue"
    for child in running:
        if child.data.tags.get(STOP_TAG) is None:
            close_run(uri, child.info.run_id, "KILLED", reason)
    close_run(uri, parent, "KILLED", reason)
    print(f"sweep interrupted with {unfinished} trial(s) unfinished; its state is at {experiment_uri}: run the same "
          "command again to continue it")  # fmt: skip
    raise KeyboardInterrupt


def trials_fingerprint(sweep: Sweep) -> str:
    """What makes two runs of a sweep the same sweep: the base config trials start from (where
    runs go and how they reach Ray and MLflow aside), the search space, scheduler and resources."""
    import hashlib
    import json

    from generalmodel.tune.spec import SEARCHABLE_SECTIONS

    base = {k: str(v) for k, v in sweep.base.overrides.items() if k.split(".")[0] in (*SEARCHABLE_SECTIONS, "data")}
    what = {
        "base": base,
        "search": sweep.search,
        "searcher": sweep.searcher,
        "num_samples": sweep.num_samples,
        "scheduler": sweep.scheduler.model_dump(),
        "metric": sweep.metric,
        "mode": sweep.mode,
        "resources": sweep.resources.model_dump(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _describe(dist: dict[str, Any]) -> str:
    ((kind, args),) = dist.items()
    return f"{kind}{list(args)}"


def summarize(sweep: Sweep, base: Config, grid, parent: str, uri: str, experiment_uri: str) -> SweepResult:
    """Rows per trial (status, stop reason), the comparison on the parent, the best model registered."""
    from mlflow.tracking import MlflowClient

    from generalmodel.storage import RunLayout, download_export
    from generalmodel.tracking import log_results, register
    from generalmodel.tracking.sweep import (
        STOP_TAG,
        TRIAL_TAG,
        TrialRow,
        close_run,
        curves,
        log_comparison,
        rank,
        table,
    )
    from generalmodel.train.failures import root_message

    client = MlflowClient(uri)
    children = {
        r.data.tags.get(TRIAL_TAG): r
        for r in client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10000
        )
    }
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or next(
            (t for t in children if t and t in os.path.basename(result.path or "")), "?"
        )
        child = children.get(trial_id)
        params = {k: result.config.get(k) for k in sweep.search}
        steps = int(child.data.params.get("train.steps", base.train.steps)) if child else base.train.steps
        step = (result.metrics or {}).get("step")
        value = (result.metrics or {}).get(sweep.metric)
        if result.error is not None:
            status, reason, mlflow_status = "failed", f"failed: {root_message(result.error)}"[:500], "FAILED"
        elif step is None:
            status, reason, mlflow_status = "pending", "never reported", "KILLED"
        elif step >= steps:
            status, reason, mlflow_status = "completed", "completed", "FINISHED"
        else:
            status, mlflow_status = "early-stopped", "KILLED"
            reason = f"stopped by {sweep.scheduler.kind.upper()} at step {step} of {steps} ({sweep.metric} {value:.4f})"
        # Tune's view is authoritative: a trial stopped by the scheduler may have been interrupted
        # anywhere (even marked failed by its own driver while being stopped after its last step).
        current = (child.info.status, child.data.tags.get(STOP_TAG)) if child is not None else None
        if child is not None and current != (mlflow_status, reason):
            if status == "completed":  # its plot and exported model, for comparison and registry
                cfg = trial_config(sweep, params, trial_keys(sweep, trial_id))
                layout = RunLayout.of(cfg)
                log_results(client, child.info.run_id, cfg, download_export(layout.export, layout.storage))
            if status != "failed" or child.info.status == "RUNNING":  # a failed trial said why itself
                close_run(uri, child.info.run_id, mlflow_status, reason)
        rows.append(TrialRow(trial_id, child.info.run_id if child else None, params, status, reason, step, value))
    if not any(r.metric_last is not None for r in rows):
        close_run(uri, parent, "FAILED", f"no trial reported {sweep.metric}")
        raise SweepError(
            f"no trial of sweep {sweep.name!r} reported {sweep.metric!r}: see the trials' errors above "
            f"and the child runs of MLflow run {parent}"
        )
    curves(uri, rows, sweep.metric)
    for row in rows:
        if row.curve:
            row.metric_best = (min if sweep.mode == "min" else max)(v for _, v in row.curve)
    rows = rank(rows, sweep.mode)
    log_comparison(uri, parent, rows, sweep.metric, sweep.name)
    best = next((r for r in rows if r.status == "completed"), None)
    model_uri = None
    if best is not None:
        cfg = trial_config(sweep, best.params, trial_keys(sweep, best.trial_id))
        client.log_text(parent, yaml.safe_dump(dump_config(cfg), sort_keys=False), "best_config.yaml")
        client.set_tag(parent, "best_trial", best.trial_id)
        client.set_tag(parent, "best_run_id", best.run_id)
        client.set_tag(parent, f"best_{sweep.metric}", f"{best.metric_last:.6g}")
        tags = client.get_run(parent).data.tags
        if tags.get("best_model") and tags.get("best_trial_registered") == best.trial_id:
            model_uri = tags["best_model"]  # a finished sweep run again: already registered
        else:
            model_uri = register(client, base.tracking.registered_model, best.run_id)
            client.set_tag(parent, "best_model", model_uri)
            client.set_tag(parent, "best_trial_registered", best.trial_id)
    stopped = sum(r.status == "early-stopped" for r in rows)
    failed = sum(r.status == "failed" for r in rows)
    close_run(
        uri,
        parent,
        "FINISHED" if best else "FAILED",
        f"{len(rows)} trials: {len(rows) - stopped - failed} ran to the end, {stopped} stopped early, {failed} failed",
    )
    if best is None:
        raise UserError(f"no trial of sweep {sweep.name!r} completed; the comparison is on MLflow run {parent}")
    return SweepResult(parent, rows, model_uri, table(rows, sweep.metric)[1], experiment_uri)
