"""Pretrain a model on a prepared dataset with Ray Train, tracked and registered in MLflow.

    python -m jobs.pretrain --config configs/llama-tiny.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/llama-tiny.yaml
    python -m jobs.pretrain --help
Prepares the data section's dataset first when train.dataset is not given and it is missing.
"""

from __future__ import annotations

from generalmodel import RunFailed
from generalmodel.cli import run_job
from generalmodel.cluster import ray_session, refuse_ephemeral_paths
from generalmodel.config import Config
from generalmodel.data.prepare import code_version
from generalmodel.infer import SamplingParams, load_model, sample_text
from generalmodel.storage import RunLayout, download_export
from generalmodel.tracking import check_reachable, end_failed_run, finish_run, start_run, tracking_uri
from generalmodel.train.init import load_init
from generalmodel.train.loop import refuse_finished
from generalmodel.train.ray_trainer import ensure_dataset, fit


def main(cfg: Config) -> dict:
    refuse_ephemeral_paths(cfg)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    cfg, init = load_init(cfg, uri)  # train.init_from: the model config and tokenizer come from it
    layout = RunLayout.of(cfg)
    refuse_finished(cfg, layout)
    with ray_session(cfg.ray):
        cfg, ds = ensure_dataset(cfg, layout, init)
        run_id = start_run(cfg, ds, code_version(), init.tags if init else None)
        print(f"MLflow run {run_id} ({uri}, experiment {cfg.tracking.experiment!r})")
        try:
            fit(cfg, layout, ds.seq_len, run_id, uri, init=init)
        except BaseException as e:  # the MLflow run says so instead of staying RUNNING
            end_failed_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    if "loss" not in final_metrics(uri, run_id):  # never register a model that trained no step
        end_failed_run()
        raise RunFailed(f"run {cfg.train.run_name!r} trained no step; no model was registered")
    export_dir = download_export(layout.export, layout.storage)
    model_uri = finish_run(cfg, run_id, export_dir)
    val = val_history(uri, run_id)
    print(f"registered {model_uri} (run {run_id})")
    if val:
        print(f"val loss: first eval (step {val[0][0]}) {val[0][1]:.4f} -> last (step {val[-1][0]}) {val[-1][1]:.4f}")
    model, tokenizer = load_model(export_dir)
    for prompt in cfg.train.sample_prompts:
        text = "".join(sample_text(model, tokenizer, prompt, SamplingParams(max_new_tokens=60, top_p=0.95)))
        print(f"sample: {prompt}{text}")
    return {"run_id": run_id, "model_uri": model_uri, "metrics": final_metrics(uri, run_id), "val_loss": val}


def final_metrics(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(uri).get_run(run_id).data.metrics)


def val_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, "val_loss")
    return sorted((m.step, m.value) for m in history)


def cli() -> None:
    run_job(main, Config, __doc__)


if __name__ == "__main__":
    cli()
