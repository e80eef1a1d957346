"""Pretrain a model on a prepared dataset with Ray Train, tracked and registered in MLflow.

    python jobs/pretrain.py --config configs/llama-tiny.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/llama-tiny.yaml
    python jobs/pretrain.py --help
Prepares the data section's dataset first when train.dataset is not given and it is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generalmodel.cli import run_job  # noqa: E402
from generalmodel.cluster import ray_session  # noqa: E402
from generalmodel.config import Config  # noqa: E402
from generalmodel.data.prepare import code_version  # noqa: E402
from generalmodel.infer import SamplingParams, load_model, sample_text  # noqa: E402
from generalmodel.tracking import (  # noqa: E402
    check_reachable,
    download_export,
    end_failed_run,
    finish_run,
    start_run,
    tracking_uri,
)
from generalmodel.train.loop import export_uri  # noqa: E402
from generalmodel.train.ray_trainer import ensure_dataset, fit  # noqa: E402

SAMPLE_PROMPTS = ["Fellow citizens,", "The state of the Union"]


def main(cfg: Config) -> dict:
    check_reachable(tracking_uri(cfg))
    with ray_session(cfg.ray):
        ds = ensure_dataset(cfg)
        run_id = start_run(cfg, ds.manifest_sha256, code_version())
        print(f"MLflow run {run_id} ({tracking_uri(cfg)}, experiment {cfg.tracking.experiment!r})")
        try:
            fit(cfg, run_id, tracking_uri(cfg))
        except BaseException:
            end_failed_run()  # the MLflow run says FAILED instead of staying RUNNING
            raise
    export_dir = download_export(cfg, export_uri(cfg))
    model_uri = finish_run(cfg, run_id, export_dir)
    val = val_history(cfg, run_id)
    metrics = final_metrics(cfg, run_id)
    print(f"registered {model_uri} (run {run_id})")
    if val:
        print(f"val loss: first eval (step {val[0][0]}) {val[0][1]:.4f} -> last (step {val[-1][0]}) {val[-1][1]:.4f}")
    model, tokenizer = load_model(export_dir)
    for prompt in SAMPLE_PROMPTS:
        text = "".join(sample_text(model, tokenizer, prompt, SamplingParams(max_new_tokens=60, top_p=0.95)))
        print(f"sample: {prompt}{text}")
    return {"run_id": run_id, "model_uri": model_uri, "metrics": metrics, "val_loss": val}



def final_metrics(cfg: Config, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri(cfg)).get_run(run_id).data.metrics)


def val_history(cfg: Config, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri(cfg)).get_metric_history(run_id, "val_loss")
    return sorted((m.step, m.value) for m in history)


if __name__ == "__main__":
    run_job(main, Config, __doc__)
