"""GRPO on the reasoning suite, before and after: held-out pass@1 (greedy and sampled) and pass@8 of
the chain-of-thought SFT models and of the same models after RL, per task and level, and the share
of the SFT model's pass@1 -> pass@8 gap that RL closed (issue 35's goal: at least half).

    python -m benchmarks.reasoning --variants cot      # the SFT models (seeds 0, 1), once
    python -m benchmarks.reasoning_rl                  # CPU, 2 cores: ~12 min per RL run + evals
    python -m benchmarks.reasoning_rl --variants grpo,dynamic --steps 100
    python -m benchmarks.reasoning_rl --variants grpo,dynamic --trained grpo=URI0,URI1   # reuse runs
    python -m benchmarks.reasoning_rl --variants dynamic-lowlr --levels addition:2,addition:3,expression:1
    python -m benchmarks.reasoning_rl --sft models:/M/1,models:/M/1 ...   # two RL seeds from one SFT model

For each SFT model in --sft (one per seed) and each variant, runs jobs.rl with
configs/reasoning-rl.yaml from it (train.seed = the model's position in --sft) on the suite's
training prompts, registered as llama-tiny-reason-cot-rl-VARIANT; then evaluates the SFT models
and every RL model with jobs.eval --problems on the held-out problems (the greedy answer and 8
top-p samples per problem). Variants: grpo (the config as it is), dynamic (DAPO's dynamic
sampling: rl.oversample 2), lowlr (optim.lr 2e-5, a tenth), dynamic-lowlr (both),
dynamic-midlr-kl (lr 6e-5, dynamic sampling, rl.beta 0.04), dynamic-midlr-kl-prime (the same
with PRIME's implicit process rewards), clip-higher (DAPO's, 0.28), curriculum
(rl.skip_uniform_for 25: acts only when prompts repeat, not in 100 steps × 16 of 3000).
--trained VARIANT=URI,URI evaluates models an earlier invocation trained (one per --sft model, in
order; an empty one is trained).
Record the output, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.reasoning import STRATEGIES, mean_spread, table

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "grpo": {},
    "dynamic": {"rl.oversample": 2.0},
    "lowlr": {"optim.lr": 2e-5},
    "dynamic-lowlr": {"rl.oversample": 2.0, "optim.lr": 2e-5},
    # between the lr that kept the CoT model (2e-5) and the one that broke it (2e-4), held near the
    # start by the KL term
    "dynamic-midlr-kl": {"rl.oversample": 2.0, "optim.lr": 6e-5, "rl.beta": 0.04},
    # PRIME's implicit process rewards on top of the best setting above
    "dynamic-midlr-kl-prime": {"rl.oversample": 2.0, "optim.lr": 6e-5, "rl.beta": 0.04, "rl.prime": True},
    "clip-higher": {"rl.clip_eps_high": 0.28},
    "curriculum": {"rl.skip_uniform_for": 25},
}


def train(sft_uri: str, seed: int, variant: str, args) -> str:
    from generalmodel.config import load_config
    from jobs.rl import main as rl

    cfg = load_config(
        ROOT / "configs/reasoning-rl.yaml",
        {
            "data.source": training_prompts(args),
            "rl.eval_source": f"{args.out}/test.jsonl",
            "train.init_from": sft_uri,
            "train.seed": seed,
            "train.steps": args.steps,
            "train.run_name": f"reason-rl-{variant}-s{seed}-{args.tag}",
            "tracking.registered_model": f"llama-tiny-reason-cot-rl-{variant}",
            **VARIANTS[variant],
        },
    )
    return rl(cfg)["model_uri"]


def training_prompts(args) -> str:
    """The suite's training prompts, or (--levels) those of the named task levels only: a file
    beside them, written once per selection."""
    if not args.levels:
        return f"{args.out}/train.jsonl"
    import json

    try:
        keep = {(task, int(level)) for task, level in (item.split(":") for item in args.levels.split(","))}
    except ValueError:
        raise SystemExit(f"--levels {args.levels!r}: expected TASK:LEVEL[,TASK:LEVEL...], e.g. addition:2") from None
    path = Path(args.out) / f"train-{'-'.join(sorted(f'{t}{lv}' for t, lv in keep))}.jsonl"
    rows = [json.loads(line) for line in open(f"{args.out}/train.jsonl")]
    chosen = [row for row in rows if (row["task"], row["level"]) in keep]
    if not chosen:
        raise SystemExit(f"--levels {args.levels}: no training prompt of those task levels")
    path.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return str(path)


def main() -> None:
    from jobs.eval import EvalConfig
    from jobs.eval import main as evaluate
    from jobs.reasoning import ReasoningConfig
    from jobs.reasoning import main as write_suite

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".generalmodel/reasoning-bench"))
    parser.add_argument("--sft", default="models:/llama-tiny-reason-cot/1,models:/llama-tiny-reason-cot/2")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--test", type=int, default=50, help="held-out problems per task and level")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tag", default=time.strftime("%m%d%H%M"), help="suffix of the RL runs' names")
    parser.add_argument("--trained", action="append", default=[], help="VARIANT=URI,URI: already trained ('': train)")
    parser.add_argument(
        "--levels", default="", help="train on these task levels only, e.g. addition:2,expression:1 (default: all)"
    )
    args = parser.parse_args()
    trained = dict(item.split("=", 1) for item in args.trained)
    write_suite(ReasoningConfig(out=args.out, test=args.test))  # the same problems benchmarks.reasoning wrote
    sft = args.sft.split(",")
    runs: dict[str, list[str]] = {"sft (before)": sft}
    for variant in args.variants.split(","):
        done = trained.get(variant, "").split(",")
        runs[variant] = [
            done[seed] if seed < len(done) and done[seed] else train(uri, seed, variant, args)
            for seed, uri in enumerate(sft)
        ]
    uris = list(dict.fromkeys(uri for group in runs.values() for uri in group))  # a model once (seeds of one SFT)
    cfg = EvalConfig(models=uris, problems=f"{args.out}/test.jsonl", sampling=STRATEGIES["top_p"])
    results = {"top_p": {r.reference: r.metrics for r in evaluate(cfg)}}
    trained_on = f"the task levels {args.levels}" if args.levels else "every task level"
    print(f"\n{args.steps} GRPO steps from {args.sft} on {trained_on}; held-out problems, 8 samples per problem:")
    table(runs, results)
    by_uri = results["top_p"]
    print("\nshare of the SFT model's pass@1 (greedy) -> pass@8 gap closed by RL, per seed:")
    for variant, after in list(runs.items())[1:]:
        closed = []
        for before, rl_uri in zip(sft, after, strict=True):
            greedy, best = by_uri[before]["problems.pass1_greedy"], by_uri[before]["problems.pass8"]
            closed.append((by_uri[rl_uri]["problems.pass1_greedy"] - greedy) / max(best - greedy, 1e-9))
        print(f"{variant}: " + ", ".join(f"{c:+.2f}" for c in closed) + f" (mean {mean_spread(closed)})")


if __name__ == "__main__":
    main()
