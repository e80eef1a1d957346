"""Which MLflow a job talks to: the tracking URI (default: a sqlite store under .generalmodel/),
checked reachable, with the run's experiment in it."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from generalmodel.config import Config
from generalmodel.errors import UserError

LOCAL_DB = ".generalmodel/mlflow.db"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or f"sqlite:///{os.path.abspath(LOCAL_DB)}"


def check_reachable(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot reach the MLflow server at {uri} (tracking.uri): {e}") from None
    raise UserError(f"the MLflow server at {uri} (tracking.uri) is not healthy")


def prepare_store(cfg: Config) -> str:
    """The tracking URI, checked reachable, with the run's experiment in it."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    if cfg.tracking.uri is None:  # the default local store
        os.makedirs(os.path.dirname(os.path.abspath(LOCAL_DB)), exist_ok=True)
    ensure_experiment(uri, cfg.tracking.experiment)
    return uri


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it if needed. With a sqlite store, artifacts go next to the
    database, not to ./mlruns of whatever directory the job runs in (MLflow's default)."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    if not uri.startswith("sqlite:///"):
        return client.create_experiment(name)
    artifacts = Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"
    return client.create_experiment(name, artifact_location=artifacts.as_uri())
