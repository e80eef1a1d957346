"""MLflow: which store (`store`), one run per training job (`runs`), model references and the
registry (`registry`), the registered model as an MLflow pyfunc (`pyfunc`), parent/child runs for
sweeps (`sweep`)."""

from generalmodel.tracking.registry import (
    ModelRef,
    artifact_uri,
    download_model,
    is_registered,
    lineage_tags,
    model_tags,
    model_version,
)
from generalmodel.tracking.runs import (
    MetricLogger,
    end_failed_run,
    finish_run,
    log_config,
    log_dataset_input,
    log_results,
    register,
    start_run,
)
from generalmodel.tracking.store import LOCAL_DB, check_reachable, ensure_experiment, prepare_store, tracking_uri

__all__ = [
    "LOCAL_DB",
    "MetricLogger",
    "ModelRef",
    "artifact_uri",
    "check_reachable",
    "download_model",
    "end_failed_run",
    "ensure_experiment",
    "finish_run",
    "is_registered",
    "lineage_tags",
    "log_config",
    "log_dataset_input",
    "log_results",
    "model_tags",
    "model_version",
    "prepare_store",
    "register",
    "start_run",
    "tracking_uri",
]
