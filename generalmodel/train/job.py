"""One training job, whatever the objective: what `jobs/pretrain.py`, `jobs/sft.py` and
`jobs/dpo.py` share. The dataset (prepared with Ray Data when missing) → [Rho-1: the reference's
per-token losses beside it, a Ray Data pass] → an MLflow run with its config, dataset and lineage
→ Ray Train → the exported model logged and registered, its version tagged with its lineage. A
failure or Ctrl-C ends the MLflow run FAILED or KILLED.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from generalmodel import RunFailed
from generalmodel.cluster import ray_session
from generalmodel.config import Config
from generalmodel.storage import MANIFEST, RunLayout, download_export, resolve
from generalmodel.tracking import end_failed_run, finish_run, start_run
from generalmodel.tracking.registry import download_model
from generalmodel.train.init_from import InitSource, adapter_config, load_model_source
from generalmodel.train.ray_trainer import fit
from generalmodel.train.readiness import ensure_dataset
from generalmodel.train.reference import check_selection_reference, with_token_references
from generalmodel.train.resume import refuse_finished
from generalmodel.version import code_version

# Called inside the Ray session once the dataset is open, before training: may return another
# layout (DPO adds the reference's log-probs).
BeforeFit = Callable[[Config, RunLayout, Any], RunLayout]


@dataclass
class Trained:
    run_id: str
    model_uri: str
    export_dir: str  # a local copy of the exported model (an adapter: merged into its base)
    cfg: Config  # as trained (the dataset's vocabulary, the source's model)
    layout: RunLayout
    metrics: dict[str, float] = field(default_factory=dict)
    val_loss: list[tuple[int, float]] = field(default_factory=list)


def train_and_register(cfg: Config, uri: str, init: InitSource | None, before_fit: BeforeFit | None = None) -> Trained:
    if cfg.train.adapter != "none":
        cfg = adapter_config(cfg, init)
    layout = RunLayout.of(cfg)
    refuse_finished(cfg, layout)
    # A mixture prepares nothing: its datasets are checked before a Ray cluster starts.
    mixed = ensure_dataset(cfg, layout, init) if layout.mixture else None
    selection = selection_reference(cfg, uri, layout, mixed[1] if mixed else None)
    with ray_session(cfg.ray):
        cfg, ds = mixed or ensure_dataset(cfg, layout, init)
        if selection is not None:  # Rho-1: the reference's per-token losses beside each dataset
            layout = with_token_references(cfg, layout, ds, selection)
        if before_fit is not None:
            layout = before_fit(cfg, layout, ds)
        run_id, lineage = tracked_fit(
            cfg, uri, ds, init, lambda run_id: fit(cfg, layout, ds.seq_len, run_id, uri, init=init)
        )
    return register_trained(cfg, uri, run_id, layout, ds, lineage)


def selection_reference(cfg: Config, uri: str, layout: RunLayout, ds=None) -> InitSource | None:
    """Rho-1's reference model (train.selection_reference), loaded before a Ray cluster starts, and
    checked against what the run trains on when that is published already (`ds`, a mixture, or
    the run's dataset); None without token selection."""
    from generalmodel.data.loader import TokenDataset

    if cfg.train.selection_reference is None:
        return None
    source = load_model_source(cfg.train.selection_reference, uri, cfg)
    if ds is None and resolve(layout.dataset, layout.storage).join(MANIFEST).exists():
        ds = TokenDataset.open(layout.dataset, layout.storage)
    if ds is not None:
        check_selection_reference(source, ds)
    return source


def tracked_fit(cfg: Config, uri: str, data, init: InitSource | None, run: Callable[[str], None]):
    """Start the MLflow run (config, dataset `data`, lineage of `init`), call run(run_id); a
    failure or Ctrl-C ends the run FAILED or KILLED. Returns (run_id, lineage tags)."""
    lineage = dict(init.tags) if init else {}
    run_id = start_run(cfg, data, code_version(), lineage or None)
    print(f"MLflow run {run_id} ({uri}, experiment {cfg.tracking.experiment!r})")
    try:
        run(run_id)
    except BaseException as e:  # the MLflow run says so instead of staying RUNNING
        end_failed_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return run_id, lineage


def register_trained(cfg: Config, uri: str, run_id: str, layout: RunLayout, data, lineage: dict[str, str]) -> Trained:
    """Log the exported model to the run and register it, its version tagged with its lineage
    and its data (`data.uri`, `data.manifest_sha256`)."""
    metrics = final_metrics(uri, run_id)
    if "loss" not in metrics:  # never register a model that trained no step
        end_failed_run()
        raise RunFailed(f"run {cfg.train.run_name!r} trained no step; no model was registered")
    export_dir = download_export(layout.export, layout.storage)
    lineage = {
        **lineage,
        "dataset": data.uri,
        "dataset_sha256": data.manifest_sha256,
        "run_name": cfg.train.run_name,
    }
    if cfg.train.adapter != "none":  # the version holds only the vectors: which base they adapt
        lineage |= {"adapter": cfg.train.adapter, "adapter_base": cfg.train.init_from}
    model_uri = finish_run(cfg, run_id, export_dir, lineage)
    if cfg.train.adapter != "none":  # what readers of the version get: the vectors merged into the base
        export_dir = download_model(model_uri, uri, layout.storage)
    val = val_history(uri, run_id)
    print(f"registered {model_uri} (run {run_id})")
    if val:
        print(f"val loss: first eval (step {val[0][0]}) {val[0][1]:.4f} -> last (step {val[-1][0]}) {val[-1][1]:.4f}")
    return Trained(run_id, model_uri, export_dir, cfg, layout, final_metrics(uri, run_id), val)


def final_metrics(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def val_history(uri: str, run_id: str, key: str = "val_loss") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)
