"""Chain-of-thought SFT vs answer-only SFT vs Coconut on the reasoning suite, from the same
pretrained base: held-out pass@1 (greedy and sampled) and pass@8 per task and level, over seeds.

    make pretrain && python -m benchmarks.reasoning            # CPU, 2 cores: ~35 min
    python -m benchmarks.reasoning --steps 600 --seeds 0,1 --test 50
    python -m benchmarks.reasoning --variants coconut --strategies top_p   # from the CoT models
    python -m benchmarks.reasoning --variants quiet_star          # from the answer-only models

Writes the suite (jobs.reasoning, `--test` held-out problems per task and level) to --out, then for
each seed and variant runs jobs.sft with configs/reasoning-sft.yaml (Ray Train, from
models:/llama-tiny/latest; `cot` on sft_cot.jsonl, `answer` on sft_answer.jsonl: the same problems
and steps, so the CoT run sees more supervised tokens), registered as llama-tiny-reason-VARIANT;
`coconut` runs jobs.coconut with configs/reasoning-coconut.yaml (--coconut-steps over its 3 stages)
from the CoT model of the same seed (trained in this invocation, else --cot's versions: the ones
an earlier invocation registered, by seed); `quiet_star` runs jobs.quiet_star with
configs/reasoning-quiet-star.yaml (--quiet-star-steps) on sft_answer.jsonl from the answer-only
model of the same seed (likewise, else --answer's versions), so the comparison is the same model
with and without learning to think; then it evaluates every trained version (and, --base,
the base) with jobs.eval --problems: the greedy answer and 8 samples per problem, once per
--strategies (top_p: temperature 0.8, top-p 0.9; entropy: the same with entropy-aware sampling;
plain: temperature 0.8). Prints one table row per variant, sampling and task level: the seeds'
mean (± half their spread). Record the output, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("pass1_greedy", "pass1_sampled", "pass8")


def train(variant: str, seed: int, args, starts: dict[str, dict[int, str]]) -> str:
    """The registered model URI of `variant`'s run for `seed`; starts: the SFT variant a
    continued objective begins from ("cot" for coconut, "answer" for quiet_star) -> seed -> URI."""
    from generalmodel.config import load_config
    from jobs.sft import main as sft

    if variant in CONTINUES:  # an objective continued from an SFT variant's model of the same seed
        import importlib

        start, data, config = CONTINUES[variant]
        job = importlib.import_module(f"jobs.{variant}")
        overrides = {
            "data.source": str(Path(args.out) / data),
            "train.init_from": starts[start][seed],
            "train.seed": seed,
            "train.steps": getattr(args, f"{variant}_steps"),
            "train.run_name": f"reason-{variant.replace('_', '-')}-s{seed}-{time.strftime('%m%d%H%M')}",
        }
        return job.main(load_config(ROOT / config, overrides))["model_uri"]

    cfg = load_config(
        ROOT / "configs/reasoning-sft.yaml",
        {
            "data.source": str(Path(args.out) / f"sft_{variant}.jsonl"),
            "train.seed": seed,
            "train.steps": args.steps,
            "train.run_name": f"reason-{variant}-s{seed}",
            "tracking.registered_model": f"llama-tiny-reason-{variant}",
        },
    )
    return sft(cfg)["model_uri"]


# objective -> (the SFT variant it starts from, its data, its config)
CONTINUES = {
    "coconut": ("cot", "sft_cot.jsonl", "configs/reasoning-coconut.yaml"),
    "quiet_star": ("answer", "sft_answer.jsonl", "configs/reasoning-quiet-star.yaml"),
}
STRATEGIES = {
    "top_p": {"temperature": 0.8, "top_p": 0.9},
    "entropy": {"temperature": 0.8, "top_p": 0.9, "strategy": "entropy"},
    "plain": {"temperature": 0.8},
}


def main() -> None:
    from jobs.eval import EvalConfig
    from jobs.eval import main as evaluate
    from jobs.reasoning import ReasoningConfig
    from jobs.reasoning import main as write_suite

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / ".generalmodel/reasoning-bench"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--test", type=int, default=50, help="held-out problems per task and level")
    parser.add_argument("--variants", default="cot,answer", help="of cot, answer, coconut, quiet_star")
    parser.add_argument("--coconut-steps", type=int, default=300)
    parser.add_argument("--quiet-star-steps", type=int, default=200)
    for start, variant in (("cot", "coconut"), ("answer", "quiet_star")):
        parser.add_argument(
            f"--{start}",
            default=f"models:/llama-tiny-reason-{start}/1,models:/llama-tiny-reason-{start}/2",
            help=f"{variant} without {start} in --variants: the models it starts from, one per seed in order",
        )
    parser.add_argument("--strategies", default="top_p,entropy", help=f"sampling for pass@k: {', '.join(STRATEGIES)}")
    parser.add_argument("--base", action="store_true", help="evaluate the base model too (it has not seen the format)")
    args = parser.parse_args()
    write_suite(ReasoningConfig(out=args.out, test=args.test))
    runs: dict[str, list[str]] = {"base": ["models:/llama-tiny/latest"]} if args.base else {}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    starts = {s: dict(zip(seeds, getattr(args, s).split(","), strict=False)) for s, _, _ in CONTINUES.values()}
    for variant in args.variants.split(","):
        start = CONTINUES.get(variant, (None,))[0]
        if start and start not in runs:  # the models it starts from, evaluated beside it
            runs[f"{start} ({variant}'s start)"] = [starts[start][seed] for seed in seeds]
        runs[variant] = [train(variant, seed, args, starts) for seed in seeds]
        if variant in starts:
            starts[variant] = dict(zip(seeds, runs[variant], strict=True))
    uris = [uri for group in runs.values() for uri in group]
    results = {}
    for strategy in args.strategies.split(","):
        cfg = EvalConfig(models=uris, problems=f"{args.out}/test.jsonl", sampling=STRATEGIES[strategy])
        results[strategy] = {r.reference: r.metrics for r in evaluate(cfg)}
    print(f"\n{args.steps} SFT steps, seeds {args.seeds}; held-out problems, 8 samples per problem:")
    table(runs, results)


def table(runs: dict[str, list[str]], results: dict[str, dict[str, dict[str, float]]]) -> None:
    """One markdown row per variant, sampling and task level: the mean over a variant's models
    (its seeds) of each metric, ± half their spread. runs: variant -> model URIs; results: sampling
    -> model URI -> jobs.eval --problems metrics."""
    any_metrics = next(iter(next(iter(results.values())).values()))
    groups = sorted({k.rsplit(".", 1)[0] for k in any_metrics if k.endswith(".pass8")})
    print("| variant | sampling | problems | " + " | ".join(METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for variant, group_uris in runs.items():
        for strategy, by_uri in results.items():
            for group in groups:
                cells = [mean_spread([by_uri[u][f"{group}.{metric}"] for u in group_uris]) for metric in METRICS]
                name = "all" if group == "problems" else group.removeprefix("problems.")
                print(f"| {variant} | {strategy} | {name} | " + " | ".join(cells) + " |")


def mean_spread(values: list[float]) -> str:
    spread = (max(values) - min(values)) / 2
    return f"{statistics.mean(values):.3f}" + (f" ± {spread:.3f}" if len(values) > 1 else "")


if __name__ == "__main__":
    main()
