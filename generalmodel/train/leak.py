"""The causal-leak check: changing tokens after position t never changes what a model computes at
positions ≤ t — nor anything in another row of the batch (MoE routing, sorting and balancing see
the whole batch at once). Run in training mode, with gradients on, the way the training step runs
the model: eager, with each block compiled (regional), the whole model compiled (full: the
logits), and the model with the loss in one compiled graph (full+loss: its logits and its
per-token losses, both outputs of that graph, are compared).
tests/test_causality.py runs it on CPU for every tiny preset; `python -m benchmarks.gpu_train
--leak` on a card for the 124M presets (bf16 autocast)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("eager", "regional", "full", "full+loss")


@dataclass
class Leak:
    mode: str
    earlier: float  # largest change at row 0 before the cut: a leak unless 0
    later: float  # largest change at row 0 from the cut on: > 0, or the check saw nothing
    scale: float  # largest value compared

    @property
    def relative(self) -> float:
        return self.earlier / max(self.scale, 1e-30)


def forward_for(model: nn.Module, mode: str) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """ids (B, T + 1) → per-position values (B, T, ...) by name: the logits, and for full+loss the
    per-token losses too. `regional` compiles the model's blocks in place (build a fresh model for
    each mode)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")

    def logits(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": model(ids[:, :-1])}

    def losses(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model(ids[:, :-1])
        per_token = F.cross_entropy(out.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return {"logits": out, "losses": per_token.view(ids.shape[0], -1)}

    if mode == "regional":
        for block in model.blocks:
            block.compile()
    if mode == "full":
        return torch.compile(logits)
    if mode == "full+loss":
        return torch.compile(losses)
    return logits


def check(
    model: nn.Module,
    mode: str,
    vocab: int,
    batch: int = 2,
    seq: int = 32,
    cut: int | None = None,
    seed: int = 0,
    autocast: torch.dtype | None = None,
) -> Leak:
    """Run `model` (prepared for `mode` here) on random ids and on a copy whose row 0 changes after
    position `cut` and whose other rows change everywhere; compare row 0 at positions ≤ cut (the
    logits) and < cut (per-token losses: the loss at p reads the token at p + 1 as its target).
    The Leak is the worst of the outputs compared."""
    if batch < 2:
        raise ValueError("the check needs batch >= 2 (rows must not see each other)")
    cut = seq // 2 if cut is None else cut
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    changed = ids.clone()
    changed[0, cut + 1 :] = (ids[0, cut + 1 :] + torch.randint(1, vocab, (seq - cut,), generator=g)) % vocab
    changed[1:] = (ids[1:] + torch.randint(1, vocab, ids[1:].shape, generator=g)) % vocab
    forward = forward_for(model.train(), mode)
    context = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
    with context:
        a = forward(ids.to(device))
        b = forward(changed.to(device))
    leaks = []
    for name in a:
        x, y = a[name].float().detach(), b[name].float().detach()
        seen = cut if name == "losses" else cut + 1
        leaks.append(
            Leak(
                mode,
                earlier=float((x[0, :seen] - y[0, :seen]).abs().max()),
                later=float((x[0, seen:] - y[0, seen:]).abs().max()),
                scale=float(x[0, :seen].abs().max()),
            )
        )
    return Leak(
        mode,
        earlier=max(leak.earlier for leak in leaks),
        later=min(leak.later for leak in leaks),
        scale=max(leak.scale for leak in leaks),
    )
