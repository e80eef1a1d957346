"""Write the reasoning task suite: multi-digit addition with carries, two-operation expressions and
Countdown, in difficulty levels, with worked solutions and a held-out split by problem.

    python -m jobs.reasoning --out=.generalmodel/reasoning
Writes sft_cot.jsonl (worked solutions), sft_answer.jsonl (the same problems, the answer only) and
sft_tools.jsonl (the same, half of them with the calculator tool: docs/tools.md) for SFT,
train.jsonl (RL prompts) and test.jsonl (held-out problems, for `jobs/eval.py --problems`); see
generalmodel.eval.reasoning. Counts are per task and level.
"""

from __future__ import annotations

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section, Strings
from generalmodel.eval.reasoning import TASKS, write_suite


class ReasoningConfig(Section):
    """Where to write the suite, which tasks, how many problems of each level."""

    out: str = Field(".generalmodel/reasoning", description="Directory to write the jsonl files to.")
    tasks: Strings = Field(list(TASKS), description=f"Tasks of the suite ({', '.join(TASKS)}).")
    sft: int = Field(600, ge=0, description="Worked problems for SFT, per task and level.")
    train: int = Field(300, ge=0, description="RL training prompts, per task and level.")
    test: int = Field(100, gt=0, description="Held-out problems, per task and level.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of all problems held out (by hash).")
    seed: int = Field(0, description="Seeds the problems.")


def main(cfg: ReasoningConfig) -> dict[str, int]:
    counts = write_suite(cfg.out, list(cfg.tasks), cfg.sft, cfg.train, cfg.test, cfg.seed, cfg.test_fraction)
    levels = {task: list(TASKS[task][1]) for task in cfg.tasks}
    print(
        f"wrote {counts['sft_cot']} worked problems (sft_cot.jsonl; answer-only: sft_answer.jsonl), "
        f"{counts['train']} RL prompts (train.jsonl) and {counts['test']} held-out problems (test.jsonl) "
        f"to {cfg.out}/; levels {levels}"
    )
    return counts


def cli() -> None:
    run_job(main, ReasoningConfig, __doc__)


if __name__ == "__main__":
    cli()
