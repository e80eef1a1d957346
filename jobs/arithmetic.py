"""Write the offline RL demo's task: arithmetic word problems with a held-out split.

    python -m jobs.arithmetic --out=.generalmodel/arithmetic
Writes sft.jsonl (worked answers, for the SFT stage that teaches the answer format), train.jsonl
and test.jsonl (RL prompts with their `answer`); see generalmodel.post.arithmetic.
"""

from __future__ import annotations

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section
from generalmodel.post.arithmetic import build


class ArithmeticConfig(Section):
    """Where to write the task, how many problems, how hard."""

    out: str = Field(".generalmodel/arithmetic", description="Directory to write sft/train/test.jsonl to.")
    sft: int = Field(8000, ge=0, description="Worked conversations for SFT.")
    train: int = Field(4000, gt=0, description="RL training prompts.")
    test: int = Field(500, gt=0, description="Held-out prompts.")
    digits: int = Field(2, gt=0, le=6, description="Digits of each operand.")
    direct: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of SFT answers given at once, without the worked line (RL finds which pays).",
    )
    seed: int = Field(0, description="Seeds the problems.")


def main(cfg: ArithmeticConfig) -> dict[str, int]:
    counts = build(cfg.out, cfg.sft, cfg.train, cfg.test, cfg.digits, cfg.seed)
    print(
        f"wrote {counts['sft']} worked problems (sft.jsonl), {counts['train']} training and {counts['test']} "
        f"held-out prompts (train.jsonl, test.jsonl) of {cfg.digits}-digit arithmetic to {cfg.out}/"
    )
    return counts


def cli() -> None:
    run_job(main, ArithmeticConfig, __doc__)


if __name__ == "__main__":
    cli()
