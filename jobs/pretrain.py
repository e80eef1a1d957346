"""Pretrain a model on a prepared dataset with Ray Train, tracked and registered in MLflow.

    python -m jobs.pretrain --config configs/llama-tiny.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/llama-tiny.yaml
    python -m jobs.pretrain --help
Prepares the data section's dataset first when train.dataset is not given and it is missing.
"""

from __future__ import annotations

from generalmodel.cli import RUN_SECTIONS, run_job
from generalmodel.cluster import refuse_ephemeral_paths
from generalmodel.config import Config
from generalmodel.infer import SamplingParams, load_model, sample_text
from generalmodel.tracking import check_reachable, tracking_uri
from generalmodel.train.init_from import load_init
from generalmodel.train.job import train_and_register


def main(cfg: Config) -> dict:
    refuse_ephemeral_paths(cfg)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    cfg, init = load_init(cfg, uri)  # train.init_from: the model config and tokenizer come from it
    trained = train_and_register(cfg, uri, init)
    model, tokenizer = load_model(trained.export_dir)
    for prompt in cfg.train.sample_prompts:
        text = "".join(sample_text(model, tokenizer, prompt, SamplingParams(max_new_tokens=60, top_p=0.95)))
        print(f"sample: {prompt}{text}")
    return {
        "run_id": trained.run_id,
        "model_uri": trained.model_uri,
        "metrics": trained.metrics,
        "val_loss": trained.val_loss,
    }


def cli() -> None:
    run_job(main, Config, __doc__, sections=(*RUN_SECTIONS, "mixture"))


if __name__ == "__main__":
    cli()
