"""The optimizer step as the training loop takes it (generalmodel/train/step.py: `found_inf` set
every step, so a non-finite step can be skipped without a host sync) against the plain step, in
one process, on the model of `make pretrain` (configs/llama-tiny.yaml) with random gradients:

    python -m benchmarks.optimizer_step [--repeats 30] [--config configs/llama-tiny.yaml]

Rows: Muon + AdamW unmasked (the reference), with fused AdamW unmasked, and masked (Muon's
nan_to_num and 0/1-weighted updates, fused AdamW's found_inf); AdamW foreach (torch's CPU default,
the reference) vs fused with found_inf (what build_optimizer now gives). Median ms per step and
the ratio to each reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from generalmodel.config import load_config
from generalmodel.optim import build_optimizer
from models import build_model

ROOT = Path(__file__).resolve().parent.parent


def time_steps(model, optimizer, masked: bool, repeats: int) -> float:
    """Median ms of optimizer.step() over `repeats` steps (after 3 warm-up steps)."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()]
    times = []
    for i in range(repeats + 3):
        for p, grad in zip(model.parameters(), grads, strict=True):
            p.grad = grad.clone()
        optimizer.found_inf = torch.zeros(()) if masked else None
        t0 = time.perf_counter()
        optimizer.step()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    optimizer.found_inf = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/llama-tiny.yaml"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    cfg = load_config(args.config)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model of {args.config}")
    rows = [  # (optimizer, fused AdamW, masked, label); the first row of each optimizer is its reference
        ("muon", False, False, "Muon + AdamW (foreach), unmasked: reference"),
        ("muon", True, False, "Muon + AdamW (fused), unmasked"),
        ("muon", True, True, "Muon + AdamW (fused), masked: the loop's step"),
        ("adamw", False, False, "AdamW foreach, unmasked: reference"),
        ("adamw", True, True, "AdamW fused, found_inf: the loop's step"),
    ]
    references: dict[str, float] = {}
    for name, fused, masked, label in rows:
        torch.manual_seed(0)
        model = build_model(cfg.model)
        optimizer = build_optimizer(model, cfg.optim.model_copy(update={"name": name}), fused=fused)
        ms = time_steps(model, optimizer, masked, args.repeats)
        ratio = f"  {ms / references[name]:.2f}x the reference" if name in references else ""
        references.setdefault(name, ms)
        print(f"{label:>48}: {ms:7.2f} ms{ratio}", flush=True)


if __name__ == "__main__":
    main()
