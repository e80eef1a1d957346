"""Quiet-STaR: a model that thinks a short thought after every token, from a registered model to
BASE-quiet-star.

    python -m jobs.quiet_star --train.init_from=models:/llama-tiny/1 --data.source=chats.jsonl
    make reasoning-quiet-star    # the reasoning suite's answer-only conversations, from `make pretrain`'s model
The conversations (`messages`; .jsonl/.parquet, local, s3:// or hf:) are scored on the assistant's
tokens: after every token the model samples a thought of quiet_star.thought_tokens tokens between
<|startofthought|> and <|endofthought|> (added to its tokenizer), all positions at once, and a
mixing head (model.quiet_star_thoughts set, the head added) weighs the prediction of the next quiet_star.lookahead
tokens after the thought against the one without; the thoughts learn by REINFORCE
(generalmodel.post.quiet_star). Training is the platform's loop on Ray Train (FSDP2, checkpoints,
exact resume); `base_nll` beside the mixed `loss` says whether the thoughts help. Every decoder
here (jobs/sample.py, jobs/eval.py --problems, the served API) thinks before each token of it.
"""

from __future__ import annotations

import dataclasses

from generalmodel.cli import RUN_SECTIONS, run_job
from generalmodel.config import Config
from generalmodel.post.base import start, with_tokens
from generalmodel.post.quiet_star import load_rows, quiet_star_train
from generalmodel.post.rows import fit_and_register
from generalmodel.tokens import THOUGHT_TOKENS


def main(cfg: Config) -> dict:
    import torch

    from models.decoder import ThoughtMixer

    cfg, uri, init = start(cfg, "quiet-star", "chat")
    cfg, init = with_tokens(cfg, init, THOUGHT_TOKENS.values(), "thought")
    model = dataclasses.replace(cfg.model, quiet_star_thoughts=cfg.quiet_star.thought_tokens)
    state = init.state
    if not any(key.startswith("mixer.") for key in state):  # a new mixing head, seeded by the run
        torch.manual_seed(cfg.train.seed)
        mixer = ThoughtMixer(model.d_model)
        mixer.reset_parameters(model.init_std)
        state = {**state, **{f"mixer.{k}": v for k, v in mixer.state_dict().items()}}
    cfg, init = cfg.model_copy(update={"model": model}), dataclasses.replace(init, model=model, state=state)
    data = load_rows(cfg, init.tokenizer_json)
    qs = cfg.quiet_star
    longest = max(len(r.ids) for r in data.rows) * (qs.thought_tokens + qs.lookahead + 2) * qs.samples
    print(
        f"{len(data.rows)} conversations; a thought of {qs.thought_tokens} tokens after every token, scored on the "
        f"next {qs.lookahead}, {qs.samples} thoughts per position"
    )
    trained = fit_and_register(cfg, uri, init, data, longest, quiet_star_train)
    return {"run_id": trained.run_id, "model_uri": trained.model_uri, "metrics": trained.metrics}


def cli() -> None:
    run_job(main, Config, __doc__, sections=(*RUN_SECTIONS, "quiet_star"))


if __name__ == "__main__":
    cli()
