"""Held-out arithmetic with and without the calculator tool, from the same pretrained base:
answer-only SFT vs tool-use SFT (the same problems and steps), the tool model evaluated with the
calculator and without it.

    make pretrain && python -m benchmarks.tools                  # CPU, 2 cores: ~20 min a seed
    python -m benchmarks.tools --seeds 0,1 \
        --answer=models:/llama-tiny-reason-answer/1,models:/llama-tiny-reason-answer/2

Writes the reasoning suite (jobs.reasoning, into --out: by default benchmarks.reasoning's, so its
answer-only models saw the same problems) and, for each seed, runs jobs.sft with
configs/reasoning-sft.yaml on sft_tools.jsonl with data.tools=true (registered
llama-tiny-reason-tools): half its conversations declare the calculator and answer addition and
expression problems through one call; the other half, and Countdown, answer at once. The
answer-only reference is the same run on sft_answer.jsonl (trained here unless --answer names its
versions, one per seed). Then jobs.eval --problems scores every model's greedy answer on the
held-out problems: the answer-only model as it is, the tool model without tools and with the
calculator (its calls run, the answer after the last one verified). Prints one row per model,
way and task level: pass@1 greedy (seeds' mean ± half their spread), and with the calculator the
share of answers that called it and that wrote a call that does not parse. Record the output,
with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.reasoning import mean_spread

ROOT = Path(__file__).resolve().parent.parent
WAYS = {  # how a model answers: which SFT variant, which tools it is told of
    "answer-only SFT": ("answer", []),
    "tool SFT, no tools": ("tools", []),
    "tool SFT + calculator": ("tools", ["calculator"]),
}


def train(variant: str, seed: int, args) -> str:
    """The registered URI of the SFT run of `variant` (answer, tools) for `seed`."""
    from generalmodel.config import load_config
    from jobs.sft import main as sft

    overrides = {
        "data.source": str(Path(args.out) / f"sft_{variant}.jsonl"),
        "data.tools": variant == "tools",
        "train.seed": seed,
        "train.steps": args.steps,
        "train.run_name": f"reason-{variant}-s{seed}-{time.strftime('%m%d%H%M')}",
        "tracking.registered_model": f"llama-tiny-reason-{variant}",
    }
    return sft(load_config(ROOT / "configs/reasoning-sft.yaml", overrides))["model_uri"]


def main() -> None:
    from jobs.eval import EvalConfig
    from jobs.eval import main as evaluate
    from jobs.reasoning import ReasoningConfig
    from jobs.reasoning import main as write_suite

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".generalmodel/reasoning-bench"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--test", type=int, default=50, help="held-out problems per task and level")
    parser.add_argument("--answer", default=None, help="the answer-only models, one per seed (else trained here)")
    args = parser.parse_args()
    write_suite(ReasoningConfig(out=args.out, test=args.test))
    seeds = [int(s) for s in args.seeds.split(",")]
    models = {"tools": [train("tools", seed, args) for seed in seeds]}
    models["answer"] = args.answer.split(",") if args.answer else [train("answer", seed, args) for seed in seeds]
    if len(models["answer"]) != len(seeds):
        raise SystemExit(f"--answer names {len(models['answer'])} models for {len(seeds)} seeds")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for way, (variant, tools) in WAYS.items():
        cfg = EvalConfig(
            models=models[variant], problems=f"{args.out}/test.jsonl", samples=0, pass_k=[], tools=tools, name=way
        )
        results[way] = {r.reference: r.metrics for r in evaluate(cfg)}
    print(f"\n{args.steps} SFT steps, seeds {args.seeds}; held-out problems, greedy answers:")
    groups = sorted({k.rsplit(".", 1)[0] for k in next(iter(results[next(iter(WAYS))].values()))})
    print("| model | problems | pass1_greedy | called the calculator | unparsable calls |")
    print("|---|---|---|---|---|")
    for way, (variant, tools) in WAYS.items():
        for group in groups:
            runs = [results[way][uri] for uri in models[variant]]
            cells = [mean_spread([r[f"{group}.pass1_greedy"] for r in runs])]
            for metric in ("tool_use", "tool_call_errors"):
                cells.append(mean_spread([r[f"{group}.{metric}"] for r in runs]) if tools else "–")
            name = "all" if group == "problems" else group.removeprefix("problems.")
            print(f"| {way} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
