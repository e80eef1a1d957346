"""Direct preference optimisation: from a registered SFT model to BASE-dpo.

    python -m jobs.dpo --train.init_from=models:/llama-tiny-sft/1 --data.source=pairs.jsonl
    make dpo          # the offline demo (jobs/sotu_qa.py), after `make sft`
Preference pairs (`prompt`/`chosen`/`rejected`, strings or message lists) are prepared into a
dataset by Ray Data. The policy starts from train.init_from and the frozen reference is the same
model: its log-probs are computed once by a Ray Data pass and stored beside the dataset
(dpo.reference=precomputed, the default), or a frozen copy runs on every worker
(dpo.reference=online). Losses: dpo.loss sigmoid (β = dpo.beta) or ipo, plus dpo.sft_weight × NLL.
At the end: held-out preference accuracy (the implicit reward prefers the chosen answer) and
held-out answer accuracy before and after; the model is registered as BASE-dpo with its lineage.
"""

from __future__ import annotations

import dataclasses

from generalmodel.cli import RUN_SECTIONS, run_job
from generalmodel.config import Config
from generalmodel.post.base import start
from generalmodel.post.before_after import answers_before_after, preference_report
from generalmodel.train.job import train_and_register
from generalmodel.train.reference import ensure_reference


def main(cfg: Config) -> dict:
    cfg, uri, init = start(cfg, "dpo", "preference")

    def precompute_reference(cfg, layout, ds):
        if cfg.dpo.reference != "precomputed":
            return layout
        return dataclasses.replace(layout, reference=ensure_reference(cfg, layout, ds, init.state))

    trained = train_and_register(cfg, uri, init, precompute_reference)
    accuracy = preference_report(trained, init, uri)
    answers = answers_before_after(trained, "dpo", {"sft": init}, uri)
    return {
        "run_id": trained.run_id,
        "model_uri": trained.model_uri,
        "metrics": trained.metrics,
        "preference_accuracy": accuracy,
        "answers": answers,
    }


def cli() -> None:
    run_job(main, Config, __doc__, sections=(*RUN_SECTIONS, "dpo"))


if __name__ == "__main__":
    cli()
