"""MLflow: one run per training job (`runs`), parent/child runs for sweeps (`sweep`)."""

from generalmodel.tracking.runs import (
    LOCAL_DB,
    MetricLogger,
    check_reachable,
    end_failed_run,
    ensure_experiment,
    finish_run,
    lineage_tags,
    log_config,
    log_dataset_input,
    log_results,
    model_tags,
    prepare_store,
    register,
    start_run,
    tracking_uri,
)

__all__ = [
    "LOCAL_DB",
    "MetricLogger",
    "check_reachable",
    "end_failed_run",
    "ensure_experiment",
    "finish_run",
    "lineage_tags",
    "log_config",
    "log_dataset_input",
    "log_results",
    "model_tags",
    "prepare_store",
    "register",
    "start_run",
    "tracking_uri",
]
