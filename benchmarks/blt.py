"""The Byte Latent Transformer (models/blt.py) with entropy patches vs with a patch every 4 bytes vs
the BPE llama-tiny, at equal training FLOPs, in bits per byte on the val split.

    python -m benchmarks.blt                                   # CPU: sotu, seeds 0 and 1
    python -m benchmarks.blt --corpus shakespeare --seeds 0,1

Needs the corpus prepared twice: with BPE (the sparse-layer harness's datasets: `make prepare-data`
for sotu, `datasets/shakespeare-v8192-s256`) and as bytes, rows of 1024 (`--data.tokenizer=bytes
--data.seq_len=1024 --data.output=datasets/CORPUS-bytes-s1024`). Per corpus:

1. The entropy model: a byte llama of blt-tiny's `entropy_config()` (2 × 64) trained with the
   platform's loop (generalmodel.train.loop.train, one process) for --entropy-steps, seed 0.
2. Its threshold: the (1 − 1/patch_size) quantile of its next-byte entropies over training rows,
   so that entropy patches average patch_size (4) bytes, as the static ones do: the two BLTs then
   differ only in where the patches fall (the paper tunes its threshold the same way).
3. Each variant with configs/llama-tiny.yaml's training section (Muon recipe, batch 8): the BPE
   llama-tiny for --steps steps of 8 × 256 tokens; the BLTs for as many steps of 8 × 1024 bytes
   as spend the same training FLOPs (each model's `flops_per_token` — per byte for BLT, the frozen
   entropy model's forward included — times what a step reads).
4. Bits per byte over the val split, as jobs/eval.py computes it (generalmodel.eval.scoring:
   Σ NLL / ln 2 / Σ UTF-8 bytes of the predicted tokens; separators not counted). The val split
   holds the same documents in both datasets (documents are hashed into it).

Prints a table per corpus; record it, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from generalmodel.config import load_config
from models import PRESETS, build_model

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / ".generalmodel/store/datasets"
BPE = {"sotu": STORE / "sotu", "shakespeare": STORE / "shakespeare-v8192-s256"}


def config(model: dict, dataset: Path, steps: int, seed: int, name: str):
    return load_config(
        ROOT / "configs/llama-tiny.yaml",
        {
            "model": model,
            "train.dataset": str(dataset.resolve()),
            "storage.root": tempfile.mkdtemp(prefix="gm-blt-"),
            "train.steps": steps,
            "train.seed": seed,
            "train.eval_every": steps,
            "train.eval_batches": 4,
            "train.checkpoint_every": steps,
            "train.log_every": steps,
            "train.run_name": name,
        },
    )


def train(cfg, init: dict | None = None) -> tuple[torch.nn.Module, float]:
    """Train with the platform's loop; the trained model (read back from its export) and seconds."""
    from generalmodel.infer.export import load_model
    from generalmodel.storage import RunLayout, download_export
    from generalmodel.train.loop import train as loop

    t0 = time.perf_counter()
    loop(cfg, lambda m: None, init=(lambda: init) if init is not None else None)
    seconds = time.perf_counter() - t0
    layout = RunLayout.of(cfg)
    model, _ = load_model(download_export(layout.export, layout.storage))
    return model.eval(), seconds


@torch.no_grad()
def threshold(entropy_model, dataset: Path, patch_size: int, rows: int = 64) -> float:
    """The entropy above which 1/patch_size of the training positions lie."""
    from generalmodel.data.loader import TokenDataset
    from models.blt import entropies

    ds = TokenDataset.open(str(dataset))
    ids = torch.as_tensor(ds.read_shard(ds.split_shards("train")[0])[:rows, :-1].astype("int64"))
    ent = entropies(entropy_model(ids))[:, 1:].flatten()
    return float(torch.quantile(ent, 1 - 1 / patch_size))


def bits_per_byte(model, dataset: Path) -> float:
    from generalmodel.data.loader import TokenDataset
    from generalmodel.data.tokenizer import load_tokenizer
    from generalmodel.eval.scoring import score_windows, token_bytes

    ds = TokenDataset.open(str(dataset))
    rows = [row for shard in ds.split_shards("val") for row in ds.read_shard(shard).astype("int64")]
    return score_windows(model, rows, token_bytes(load_tokenizer(ds.tokenizer_json(), ds.uri))).bits_per_byte


def blt_init(cfg, entropy_model) -> dict:
    """The BLT's initial state (the run's seed) with the trained entropy model in it."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    model.entropy.load_state_dict(entropy_model.state_dict())
    return model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="sotu", choices=sorted(BPE))
    parser.add_argument("--steps", type=int, default=400, help="the BPE model's steps (8 x 256 tokens)")
    parser.add_argument("--entropy-steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default="bpe,blt-static,blt-entropy")
    args = parser.parse_args()
    bpe_ds, byte_ds = BPE[args.corpus], STORE / f"{args.corpus}-bytes-s1024"
    for ds in (bpe_ds, byte_ds):
        if not (ds / "manifest.json").exists():
            raise SystemExit(f"no prepared dataset at {ds} (see this module's doc)")
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    bpe_cfg = PRESETS["llama-tiny"]
    bpe_flops = build_model(bpe_cfg).flops_per_token(bpe_cfg.max_seq_len) * 8 * bpe_cfg.max_seq_len * args.steps
    static = PRESETS["blt-static-tiny"]
    entropy_cfg = PRESETS["blt-tiny"]
    theta, entropy_model = None, None
    if "blt-entropy" in variants:
        ecfg = config(dataclasses.asdict(static.entropy_config()), byte_ds, args.entropy_steps, 0, "blt-entropy-model")
        entropy_model, seconds = train(ecfg)
        theta = threshold(entropy_model, byte_ds, entropy_cfg.patch_size)
        print(
            f"entropy model: {bits_per_byte(entropy_model, byte_ds):.4f} bpb ({seconds:.0f} s); threshold {theta:.3f}"
        )
        entropy_cfg = dataclasses.replace(entropy_cfg, entropy_threshold=theta)
    rows = {}
    for variant in variants:
        model_cfg = {"bpe": bpe_cfg, "blt-static": static, "blt-entropy": entropy_cfg}[variant]
        per_step = build_model(model_cfg).flops_per_token(model_cfg.max_seq_len) * 8 * model_cfg.max_seq_len
        steps = args.steps if variant == "bpe" else round(bpe_flops / per_step)
        results = []
        for seed in seeds:
            cfg = config(dataclasses.asdict(model_cfg), bpe_ds if variant == "bpe" else byte_ds, steps, seed, variant)
            init = blt_init(cfg, entropy_model) if variant == "blt-entropy" else None
            model, seconds = train(cfg, init)
            bpb = bits_per_byte(model, bpe_ds if variant == "bpe" else byte_ds)
            patch = ""
            if variant != "bpe":
                patch = f", {_bytes_per_patch(model, byte_ds):.2f} bytes/patch"
            print(f"{variant} seed {seed}: {steps} steps, {bpb:.4f} bpb ({seconds:.0f} s{patch})", flush=True)
            results.append((bpb, seconds, patch))
        rows[variant] = (steps, per_step * steps, results)
    print(f"\n{args.corpus}: equal training FLOPs ({bpe_flops / 1e12:.1f} TFLOP), seeds {seeds}, val bits per byte")
    print("| variant | steps | FLOPs | bpb (mean ± half spread) | vs BPE | s/run |")
    print("|---|---|---|---|---|---|")
    base = statistics.mean(r[0] for r in rows["bpe"][2]) if "bpe" in rows else math.nan
    for variant, (steps, flops, results) in rows.items():
        bpbs = [r[0] for r in results]
        mean = statistics.mean(bpbs)
        print(
            f"| {variant} | {steps} | {flops / 1e12:.1f}T | {mean:.4f} ± {(max(bpbs) - min(bpbs)) / 2:.4f} | "
            f"{mean - base:+.4f} | {statistics.mean(r[1] for r in results):.0f} |"
        )


@torch.no_grad()
def _bytes_per_patch(model, dataset: Path) -> float:
    from generalmodel.data.loader import TokenDataset

    ds = TokenDataset.open(str(dataset))
    ids = torch.as_tensor(ds.read_shard(ds.split_shards("val")[0])[:16, :-1].astype("int64"))
    model.train()
    model(ids, targets=ids)
    model.eval()
    return float(model.bytes_per_patch)


if __name__ == "__main__":
    main()
