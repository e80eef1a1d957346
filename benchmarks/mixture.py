"""Mixtures (mixture.*): what each weighting of two corpora does to each one's val loss, and
curricula over difficulty buckets of one corpus.

    python -m benchmarks.mixture                      # CPU: sotu + Shakespeare, 5 settings x 2 seeds, ~15 min
    python -m benchmarks.mixture --seeds 0 --settings sotu,70/30
    python -m benchmarks.mixture --curriculum         # sotu in 3 buckets by compression ratio, ~8 min

The platform's loop (generalmodel.train.loop.train, one process, no Ray) with the `default` recipe
of benchmarks/learning_efficiency.py at its CPU size and budget (125 steps x 16 x 256 tokens), on
sotu and on Shakespeare tokenized with sotu's tokenizer (benchmarks/corpora.py prepares both), read
as a mixture at each setting's weights: one corpus alone, 70/30, 30/70, and 70/30 annealed to
30/70 for the last 20% of the steps. Every run evaluates on both val splits (val_loss_sotu,
val_loss_shakespeare: the same rows every time), so each setting's cost on one corpus and gain on
the other are read side by side. Prints the table (mean ± half spread over seeds) for
benchmarks/RESULTS.md.

--curriculum: sotu prepared as three datasets by the zlib compression ratio of its documents
(data.difficulty: the easiest, middle and hardest third, one tokenizer) and read as a mixture:
uniform (equal weights: the corpus in random order), easy→hard (one bucket per third of the steps),
warmup (the easy bucket for the first 20%, then uniform), and hard→easy (the control). The val loss
is the mean over the three buckets' val splits: the corpus's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from benchmarks.learning_efficiency import CPU_SIZE, add_cpu_budget, recipe_config

# name -> (first stage's weights, [(start as a fraction of the steps, weights), ...])
Setting = tuple[dict[str, float], list[tuple[float, dict[str, float]]]]
LATE = {"sotu": 0.3, "shakespeare": 0.7}
SETTINGS: dict[str, Setting] = {
    "sotu": ({"sotu": 1.0}, []),
    "shakespeare": ({"shakespeare": 1.0}, []),
    "70/30": ({"sotu": 0.7, "shakespeare": 0.3}, []),
    "30/70": (LATE, []),
    "70/30->30/70": ({"sotu": 0.7, "shakespeare": 0.3}, [(0.8, LATE)]),  # anneal: the last 20%
}
EVEN = {"easy": 1.0, "medium": 1.0, "hard": 1.0}
CURRICULA: dict[str, Setting] = {
    "uniform": (EVEN, []),
    "easy->hard": ({"easy": 1.0}, [(1 / 3, {"medium": 1.0}), (2 / 3, {"hard": 1.0})]),
    "warmup": ({"easy": 1.0}, [(0.2, EVEN)]),
    "hard->easy": ({"hard": 1.0}, [(1 / 3, {"medium": 1.0}), (2 / 3, {"easy": 1.0})]),
}
BUCKETS = {"easy": (0.0, 1 / 3), "medium": (1 / 3, 2 / 3), "hard": (2 / 3, 1.0)}


def run_setting(
    name: str, setting: Setting, seed: int, args, datasets: dict[str, str], threads: int | None
) -> dict[str, Any]:
    import torch

    from generalmodel.config import MixtureConfig
    from generalmodel.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    weights, later = setting
    base = recipe_config("default", args, seed, tempfile.mkdtemp(prefix="gm-mixture-"))
    stages = [{"start_step": round(args.steps * start), "weights": w} for start, w in later]
    mixture = MixtureConfig(datasets=datasets, weights=weights, stages=stages)
    cfg = base.model_copy(update={"mixture": mixture, "train": base.train.model_copy(update={"dataset": None})})
    t0 = time.perf_counter()
    last = train(cfg)
    return {
        "setting": name,
        "seed": seed,
        "val": {corpus: last[f"val_loss_{corpus}"] for corpus in datasets},
        "tokens": {corpus: last[f"tokens_{corpus}"] for corpus in datasets},
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", help="a subset of the settings (default: all)")
    parser.add_argument("--curriculum", action="store_true", help="curricula over sotu's difficulty buckets")
    add_cpu_budget(parser)
    args = parser.parse_args()
    args.gpu, args.eval_every, args.dataset = False, args.steps, None
    table = CURRICULA if args.curriculum else SETTINGS
    settings = args.settings.split(",") if args.settings else list(table)
    unknown = [s for s in settings if s not in table]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(table)}")
    from benchmarks.corpora import prepared

    size = dict(seq_len=CPU_SIZE["max_seq_len"], vocab_size=CPU_SIZE["vocab_size"])
    if args.curriculum:
        datasets = {name: prepared("sotu", **size, difficulty=("compression", *q)) for name, q in BUCKETS.items()}
    else:
        datasets = {"sotu": prepared("sotu", **size), "shakespeare": prepared("shakespeare", **size, tokenizer="sotu")}
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    results: dict[str, list[dict]] = {s: [] for s in settings}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(run_setting, s, table[s], seed, args, datasets, threads) for s in settings for seed in seeds
        ]
        for future in as_completed(futures):
            r = future.result()
            print(f"{r['setting']} seed {r['seed']}: {r['val']} ({r['seconds']:.0f} s)", flush=True)
            results[r["setting"]].append(r)
    tokens = args.steps * args.batch_size * CPU_SIZE["max_seq_len"]
    names = list(datasets)
    what = "sotu in 3 buckets by compression ratio" if args.curriculum else "sotu + Shakespeare (sotu's tokenizer)"
    lines = [
        f"{what}, CPU size: {args.steps} steps x {args.batch_size} x {CPU_SIZE['max_seq_len']} = "
        f"{tokens / 1e6:.2f}M tokens, seeds {seeds}, default recipe",
        "",
        f"| setting | share of tokens ({' / '.join(names)}) | "
        + "".join(f"val loss {n} | " for n in names)
        + "mean | s/run |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"

    for name in settings:
        rs = results[name]
        share = " / ".join(
            f"{statistics.mean(r['tokens'][n] / sum(r['tokens'].values()) for r in rs):.0%}" for n in names
        )
        losses = {n: [r["val"][n] for r in rs] for n in names}
        mean = [statistics.mean(r["val"][n] for n in names) for r in rs]
        seconds = statistics.mean(r["seconds"] for r in rs)
        per_dataset = "".join(f"{cell(losses[n])} | " for n in names)
        lines.append(f"| {name} | {share} | {per_dataset}{cell(mean)} | {seconds:.0f} |")
    lines += ["", f"total {time.perf_counter() - t0:.0f} s"]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
