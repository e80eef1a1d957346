"""MLflow: one run per training job — params (the resolved config), tags (git SHA, package
versions, dataset manifest hash), metrics per step, system metrics, artifacts (config YAML,
loss/LR plot, the exported model), and a registered model version."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any

import yaml

from generalmodel.config import Config, dump_config, flatten
from generalmodel.tracking.pyfunc import HF_SUBDIR, save
from generalmodel.tracking.store import prepare_store, tracking_uri

log = logging.getLogger(__name__)


def start_run(cfg: Config, dataset, code_version: dict[str, str], lineage: dict[str, str] | None = None) -> str:
    """Create the run, log config/tags; returns its id. The run stays open for the job."""
    import mlflow

    uri = prepare_store(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    run = mlflow.start_run(run_name=cfg.train.run_name, log_system_metrics=True)
    try:
        log_config(run.info.run_id, cfg, dataset, code_version, lineage)
    except BaseException:  # the run must not stay active (and RUNNING) for the next one
        mlflow.end_run("FAILED")
        raise
    return run.info.run_id


def log_config(
    run_id: str, cfg: Config, dataset, code_version: dict[str, str], lineage: dict[str, str] | None = None
) -> None:
    """The resolved config as params and config.yaml (secrets masked), versions as tags, the
    dataset as the run's inputs (`dataset.parts`: a TokenDataset, a mixture's datasets, RL's
    prompts; each with `uri` and `manifest_sha256`), and `lineage` tags (the model it started from)."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    params = flatten(dump_config(cfg))
    if cfg.train.fp8 != "none":  # what fp8 does not cover, stated with the run
        params["fp8.experts"] = "bf16 (grouped GEMM)" if getattr(cfg.model, "moe_experts", 0) else "no experts"
        params["fp8.kept_bf16"] = f"head, routers, linears with a dim < {cfg.train.fp8_min_dim} or not divisible by 16"
    batch = [Param(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=batch[i : i + 100])
    versions = {f"version.{p}": _version(p) for p in ("torch", "ray", "pyarrow", "tokenizers", "mlflow")}
    tags = {
        "git_sha": code_version.get("git_sha", "unknown"),
        "dataset_manifest_sha256": dataset.manifest_sha256,
        "generalmodel": code_version["generalmodel"],
        **versions,
        **(lineage or {}),
    }
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    for part in dataset.parts.values():  # a mixture's datasets, each an input
        log_dataset_input(client, run_id, part.uri, part.manifest_sha256)
    client.log_text(run_id, yaml.safe_dump(dump_config(cfg), sort_keys=False), "config.yaml")


def log_dataset_input(client, run_id: str, uri: str, manifest_sha256: str) -> None:
    """The prepared dataset as the run's MLflow input (Datasets in the UI; digest = its manifest)."""
    import json
    import time

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    dataset = Dataset(
        name=uri.rstrip("/").rsplit("/", 1)[-1],
        digest=manifest_sha256[:36],
        source_type="s3" if uri.startswith("s3://") else "local",
        source=json.dumps({"uri": uri}),
    )
    inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
    # The server creates a dataset it has not seen by check-then-insert: runs that log the same new
    # dataset at once (a sweep's concurrent trials) make all but one fail with an IntegrityError
    # (HTTP 400, measured with mlflow 3.x's sqlite store). Again, the dataset is there to be found.
    for attempt in range(3):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException:
            logged = client.get_run(run_id).inputs.dataset_inputs
            if any(i.dataset.digest == dataset.digest for i in logged):
                return
            if attempt == 2:
                raise
            time.sleep(0.1 * (attempt + 1))


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


class MetricLogger:
    """Logs a worker's metrics to an existing run (rank 0 of the train workers), asynchronously:
    MLflow's own background queue sends them, so the training step never waits on HTTP."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id
        self._pending: list = []

    def log(self, metrics: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        step = int(metrics["step"])
        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step) for k, v in metrics.items() if k != "step" and isinstance(v, int | float)
        ]
        self._pending.append(self.client.log_batch(self.run_id, metrics=batch, synchronous=False))

    def flush(self) -> None:
        """Wait until every logged batch has reached the server (raises the first failure)."""
        pending, self._pending = self._pending, []
        for operation in pending:
            if operation is not None:
                operation.wait()


def finish_run(cfg: Config, run_id: str, export_dir: str, version_tags: dict[str, str] | None = None) -> str:
    """Plot, log the exported model, register it (the version tagged with `version_tags`: its
    lineage); returns the `models:/` URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    log_results(client, run_id, cfg, export_dir)
    model_uri = register(client, cfg.tracking.registered_model, run_id, version_tags)
    mlflow.end_run()
    return model_uri


def log_results(client, run_id: str, cfg: Config, export_dir: str) -> None:
    """The loss/LR plot of a finished run and its exported model (under `model/`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
        history = client.get_metric_history(run_id, key)
        ax_loss.plot(
            [m.step for m in history],
            [m.value for m in history],
            marker="o" if key == "val_loss" else None,
            label=label,
        )
    lr = client.get_metric_history(run_id, "lr")
    ax_lr.plot([m.step for m in lr], [m.value for m in lr])
    ax_loss.set(xlabel="step", ylabel="loss", title=cfg.train.run_name)
    ax_loss.legend()
    ax_lr.set(xlabel="step", ylabel="learning rate")
    fig.tight_layout()
    client.log_figure(run_id, fig, "loss_lr.png")
    plt.close(fig)
    log_model(client, run_id, export_dir)


def log_model(client, run_id: str, export_dir: str) -> None:
    """The run's `model/` artifact: an MLflow pyfunc model around the native export (and the
    transformers directory when the architecture has one; the tag `hf_export` says which)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gm-mlflow-model-") as tmp:
        path = os.path.join(tmp, "model")
        no_hf = save(export_dir, path)
        client.log_artifacts(run_id, path, "model")
        client.set_tag(run_id, "hf_export", f"model/{HF_SUBDIR}" if no_hf is None else f"none: {no_hf}"[:5000])
        if no_hf is None:
            log_transformers_model(client, run_id, os.path.join(path, HF_SUBDIR), os.path.join(tmp, "transformers"))


TRANSFORMERS_ARTIFACT = "transformers"


def log_transformers_model(client, run_id: str, hf_dir: str, path: str) -> None:
    """The transformers export as an MLflow model of the `transformers` flavor, beside `model/`:
    `mlflow.transformers.load_model("runs:/ID/transformers")` gives a text-generation pipeline.
    Skipped, with the reason as the tag `transformers_model`, when transformers is not installed,
    the directory is remote code, or MLflow cannot save it."""
    from generalmodel.interop.hf import is_remote_code

    try:
        import mlflow
        import torch
        import transformers
    except ImportError as e:
        client.set_tag(run_id, "transformers_model", f"none: {e}")
        return
    if is_remote_code(hf_dir):  # a pipeline would run the directory's code: the user's choice, not ours
        reason = f"none: remote code; load model/{HF_SUBDIR} with trust_remote_code=True"
        client.set_tag(run_id, "transformers_model", reason)
        return
    try:
        pipe = transformers.pipeline("text-generation", model=hf_dir, dtype=torch.float32)
        mlflow.transformers.save_model(
            transformers_model=pipe,
            path=path,
            # MLflow's default requirements import torchvision, which a text model does not need.
            pip_requirements=[f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"],
        )
        client.log_artifacts(run_id, path, TRANSFORMERS_ARTIFACT)
    except Exception as e:  # an MLflow/transformers version pair that disagrees costs this copy only
        log.warning("the transformers flavor was not logged: %s", e)
        client.set_tag(run_id, "transformers_model", f"none: {type(e).__name__}: {e}"[:5000])
        return
    client.set_tag(run_id, "transformers_model", f"runs:/{run_id}/{TRANSFORMERS_ARTIFACT}")


def register(client, name: str, run_id: str, tags: dict[str, str] | None = None) -> str:
    """A new version of registered model `name` from the run's `model/` artifacts."""
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags or None)
    return f"models:/{name}/{version.version}"


def end_failed_run(status: str = "FAILED") -> None:
    """End the job's active run as FAILED (or KILLED: interrupted by the user)."""
    import mlflow

    mlflow.end_run(status=status)
