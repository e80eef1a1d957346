"""Reading and rewriting a model's activations at its named hook points (models/hooks.py).

    logits, cache = run_with_cache(model, ids)                           # every hook point but patterns
    logits, cache = run_with_cache(model, ids, ["*hook_pattern"])         # attention patterns (eager)
    logits = run_with_hooks(model, ids, [("blocks.2.hook_attn_out", lambda x, name: 0 * x)])

A hook is `fn(activation, name) -> tensor | None`: a tensor replaces the activation, None keeps it.
Names are module paths (`hook_names(model)` lists them) or fnmatch patterns (`blocks.*.hook_mlp_out`).
Hooks are removed when the call returns, and the attention modules whose pattern was asked for
are switched back to SDPA: the model is left as it was found.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from models.hooks import HookPoint

Hook = Callable[[torch.Tensor, str], "torch.Tensor | None"]
PATTERN = "hook_pattern"
# The per-block hook points every decoder has, in forward order (residual stream and sublayer outputs).
BLOCK_POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Name → hook point, in the order the modules were registered."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def hook_names(model: nn.Module) -> list[str]:
    return list(hook_points(model))


def block_point(layer: int, point: str) -> str:
    """The name of a block's hook point: `block_point(3, "resid_pre")` → blocks.3.hook_resid_pre;
    a point with a dot is a path inside the block (`attn.hook_z`)."""
    return f"blocks.{layer}.{point if '.' in point or point.startswith('hook_') else 'hook_' + point}"


def select(model: nn.Module, names: Iterable[str] | None) -> dict[str, HookPoint]:
    """The hook points `names` (exact names or fnmatch patterns) select; None: every one but the
    attention patterns (they need the eager attention path). A name that selects nothing is an
    error naming the model's hook points."""
    points = hook_points(model)
    if names is None:
        return {n: p for n, p in points.items() if not n.endswith(PATTERN)}
    chosen: dict[str, HookPoint] = {}
    for pattern in [names] if isinstance(names, str) else names:
        hits = [n for n in points if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"no hook point {pattern!r} in this model; its hook points are: {_summary(points)}")
        chosen.update((n, points[n]) for n in hits)
    return chosen


def _summary(points: dict[str, HookPoint]) -> str:
    """blocks.{0..L-1}.X once per X, then the top-level ones."""
    per_block = sorted({n.split(".", 2)[2] for n in points if n.startswith("blocks.")})
    others = [n for n in points if not n.startswith("blocks.")]
    return ", ".join([f"blocks.N.{p}" for p in per_block] + others)


@contextmanager
def hooked(model: nn.Module, hooks: Sequence[tuple[str, Hook]]) -> Iterator[nn.Module]:
    """The model with `hooks` registered (name or pattern, fn) for the duration of the block; the
    attention of every layer whose `hook_pattern` is hooked runs eagerly meanwhile."""
    handles, eager = [], []
    try:
        for pattern, fn in hooks:
            for name, point in select(model, [pattern]).items():
                handles.append(point.register_forward_hook(_forward_hook(fn, name)))
                if name.endswith(PATTERN):
                    attention = model.get_submodule(name.rsplit(".", 1)[0])
                    if not attention.eager:
                        attention.eager = True
                        eager.append(attention)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for attention in eager:
            attention.eager = False


def _forward_hook(fn: Hook, name: str):
    def hook(module, inputs, output):
        return fn(output, name)

    return hook


def run_with_hooks(model: nn.Module, ids: torch.Tensor, hooks: Sequence[tuple[str, Hook]], **forward) -> torch.Tensor:
    """The model's logits on `ids` with `hooks` in place (keyword arguments go to the forward)."""
    with hooked(model, hooks):
        return model(ids, **forward)


class ActivationCache(dict):
    """Hook-point name → activation (detached) of one forward pass."""

    def layers(self, point: str) -> torch.Tensor:
        """One per-block point stacked over the layers: (n_layers, ...); `point` as in `block_point`."""
        values, layer = [], 0
        while block_point(layer, point) in self:
            values.append(self[block_point(layer, point)])
            layer += 1
        if not values:
            raise KeyError(f"{block_point(0, point)} is not in the cache (cached: {', '.join(self)})")
        return torch.stack(values)


def run_with_cache(
    model: nn.Module, ids: torch.Tensor, names: Iterable[str] | None = None, **forward
) -> tuple[torch.Tensor, ActivationCache]:
    """(logits, cache) of one forward pass on `ids`, caching the hook points `names` select (see
    `select`). Without attention patterns the logits are bit-identical to the model's own."""
    cache = ActivationCache()

    def keep(x: torch.Tensor, name: str) -> None:
        cache[name] = x.detach()

    logits = run_with_hooks(model, ids, [(name, keep) for name in select(model, names)], **forward)
    return logits, cache


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Every attention module of the model on the eager path (the pattern materialised) meanwhile."""
    modules = [m for m in model.modules() if hasattr(m, "eager") and hasattr(m, PATTERN) and not m.eager]
    try:
        for m in modules:
            m.eager = True
        yield model
    finally:
        for m in modules:
            m.eager = False
