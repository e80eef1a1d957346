"""Coconut (chain of continuous thought): from a chain-of-thought SFT model to BASE-coconut.

    python -m jobs.coconut --train.init_from=models:/llama-tiny-reason-cot/1 --data.source=worked.jsonl
    make reasoning-coconut    # the reasoning suite's worked solutions, from `make reasoning-sft`'s model
The rows (`messages`, the last the assistant's worked answer, and `steps`: the reasoning steps it
starts with; .jsonl/.parquet, local, s3:// or hf:) are trained in coconut.stages stages: stage k
replaces the first k steps with k·coconut.thoughts_per_step continuous thoughts (the last hidden
state fed back as the next input; generalmodel.post.coconut). The base gets the latent tokens
(<|start-latent|> <|latent|> <|end-latent|>) added; training is the platform's loop on Ray Train
(FSDP2, checkpoints, exact resume); the model is registered with model.continuous_thoughts set,
so every decoder here (jobs/sample.py, jobs/eval.py --problems, the served API) runs its thoughts
before answering. Measure it with jobs/eval.py --problems.
"""

from __future__ import annotations

import dataclasses

from generalmodel import UserError
from generalmodel.cli import RUN_SECTIONS, run_job
from generalmodel.config import Config
from generalmodel.post.base import start, with_tokens
from generalmodel.post.coconut import coconut_train, load_worked, rendered_length
from generalmodel.post.rows import fit_and_register
from generalmodel.tokens import LATENT_TOKENS


def main(cfg: Config) -> dict:
    if cfg.train.steps < cfg.coconut.stages:
        raise UserError(
            f"train.steps={cfg.train.steps} is fewer than coconut.stages={cfg.coconut.stages}: every stage needs a "
            "step (the model decodes with the last stage's thoughts)"
        )
    cfg, uri, init = start(cfg, "coconut", "chat")
    cfg, init = with_tokens(cfg, init, LATENT_TOKENS.values(), "latent")
    model = dataclasses.replace(cfg.model, continuous_thoughts=cfg.coconut.stages * cfg.coconut.thoughts_per_step)
    cfg, init = cfg.model_copy(update={"model": model}), dataclasses.replace(init, model=model)
    data = load_worked(cfg, init.tokenizer_json)
    longest = max(rendered_length(row, cfg) for row in data.rows)
    print(
        f"{len(data.rows)} worked rows; {cfg.coconut.stages} stages of {cfg.train.steps // cfg.coconut.stages} "
        f"steps, {cfg.coconut.thoughts_per_step} thoughts per replaced step; decoding runs "
        f"{model.continuous_thoughts} thoughts"
    )
    trained = fit_and_register(cfg, uri, init, data, longest, coconut_train)
    return {"run_id": trained.run_id, "model_uri": trained.model_uri, "metrics": trained.metrics}


def cli() -> None:
    run_job(main, Config, __doc__, sections=(*RUN_SECTIONS, "coconut"))


if __name__ == "__main__":
    cli()
