"""The optimizer step without a host sync: clip, skip a non-finite step, step, MoE bias.

A GPU runs ahead of the Python that feeds it only while nothing reads a value back: `float(loss)`,
`.item()`, `if norm > x` each wait for every queued kernel. So the step decides on the device.
The gradient norm and the step's loss sum (already reduced over the ranks: every rank decides
the same) give a 0-d `bad` flag; the optimizer reads it as `found_inf`, the protocol of
`torch.amp.GradScaler` — fused AdamW skips in its kernel, Muon masks its updates — so a bad
step changes no weight, no optimizer state and no step count, and the MoE routing bias stays.

`NonFiniteGuard` counts on the device too (skipped, in a row, the step where the run of bad
steps reached train.max_bad_steps) and is read only when the host reads anything else anyway —
log, eval and checkpoint steps — where it warns with the skipped steps and raises
TrainingDiverged naming the step. A skipped step costs its compute and nothing else, so reading
late loses nothing; a checkpoint step reads first, so a diverged run never saves.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from generalmodel import RunFailed

log = logging.getLogger(__name__)


class TrainingDiverged(RunFailed):
    """Too many non-finite steps in a row."""


class NonFiniteGuard:
    """Never step on a NaN/inf — the weights (and Adam's moments) would be poisoned for good: a
    step whose loss or gradient norm is not finite is skipped (`optimizer_step`), counted, and
    after train.max_bad_steps in a row the run stops with TrainingDiverged — at the next `read`."""

    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad_steps = max_bad_steps
        # in a row, skipped in all, the step at which `in a row` reached max_bad_steps (-1: never)
        self.counters = torch.tensor([0, 0, -1], dtype=torch.long, device=device)
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, bad) since the last read
        self.skipped = 0  # as of the last read

    def record(self, step: int, bad: torch.Tensor) -> None:
        """On the device: count step `step` as bad (a 0-d bool tensor) or good."""
        in_a_row, skipped, diverged_at = self.counters.unbind()
        in_a_row = (in_a_row + 1) * bad
        first = (diverged_at < 0) & (in_a_row >= self.max_bad_steps)
        self.counters = torch.stack([in_a_row, skipped + bad, torch.where(first, step, diverged_at)])
        self.pending.append((step, bad))

    def read(self) -> int:
        """One host read: warns about the steps skipped since the last read, raises
        TrainingDiverged if a run of bad steps reached the limit; returns the skipped count."""
        values = torch.cat([self.counters, torch.stack([b for _, b in self.pending]).long()]) if self.pending else None
        if values is None:
            return self.skipped
        in_a_row, skipped, diverged_at, *flags = values.tolist()
        bad_steps = [step for (step, _), flag in zip(self.pending, flags, strict=True) if flag]
        self.pending, self.skipped = [], skipped
        if bad_steps:
            log.warning(
                "step%s %s: non-finite loss or gradient norm, skipped (%d in a row now, %d in all)",
                "s" if len(bad_steps) > 1 else "",
                ", ".join(map(str, bad_steps)),
                in_a_row,
                skipped,
            )
        if diverged_at >= 0:
            raise TrainingDiverged(
                f"{self.max_bad_steps} steps in a row with a non-finite loss or gradient (train.max_bad_steps="
                f"{self.max_bad_steps}) at step {diverged_at}; lower optim.lr or check the data"
            )
        return skipped


def optimizer_step(
    model, optimizer: torch.optim.Optimizer, loss_sum: torch.Tensor, max_norm: float, guard: NonFiniteGuard, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clip the gradients to `max_norm` (0: no clipping, the norm is still measured), step the
    optimizer unless the loss sum (reduced over ranks) or the gradient norm is not finite, zero
    the gradients, update the MoE routing biases. Returns (grad norm, routing metrics), device
    tensors; nothing here waits for the device."""
    norm = clip_grad_norm(list(model.parameters()), max_norm if max_norm > 0 else math.inf)
    bad = ~(torch.isfinite(norm) & torch.isfinite(loss_sum))
    guard.record(step, bad)
    hold_gradients(optimizer, step, bad)
    optimizer.found_inf = bad.float()
    try:
        optimizer.step()
    finally:
        optimizer.found_inf = None
    optimizer.zero_grad(set_to_none=True)
    routing: dict[str, Any] = model.after_optimizer_step((~bad).float())
    return norm, routing


def hold_gradients(optimizer: torch.optim.Optimizer, step: int, bad: torch.Tensor) -> None:
    """optim.embed_head_every=N (`optimizer.group_every`: group name -> N): the parameters of those
    groups step on steps N-1, 2N-1, ... only, on the mean of the (clipped) gradients of their N
    steps; in between their gradient is added to a held sum (`optimizer.held_grads`) and taken
    away, so the optimizer passes them over. A skipped step's gradient is left out of the sum (on
    the device: no host read). Checkpoints fall on window ends (the config checks it), where
    nothing is held."""
    every = getattr(optimizer, "group_every", None)
    if not every:
        return
    held: dict[torch.Tensor, torch.Tensor] = optimizer.__dict__.setdefault("held_grads", {})
    for group in optimizer.param_groups:
        n = every.get(group.get("name"), 1)
        for p in group["params"] if n > 1 else ():
            if p.grad is None:
                continue
            before = held.pop(p, None)
            total = p.grad if before is None else before + p.grad
            total = torch.where(bad, torch.zeros_like(total) if before is None else before, total)
            if (step + 1) % n:
                held[p], p.grad = total, None
            else:
                p.grad = total / n


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, also for gradients sharded over different device meshes (expert
    parallel: the routed experts' DTensors live on another mesh than the dense weights'): each
    rank sums the squares of its shards — a replicated dimension's copies counted once — and one
    all-reduce over all ranks gives the norm, bit-identical on every rank. Returns the norm (0-d)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):  # one process (or nothing sharded)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    copies = [_copies(g) for g in grads]
    squares = torch.stack([n.float() ** 2 / c for n, c in zip(torch._foreach_norm(local), copies, strict=True)]).sum()
    dist.all_reduce(squares)
    total = squares.sqrt()
    torch._foreach_mul_(local, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def _copies(grad: torch.Tensor) -> int:
    """How many ranks hold each element of `grad`: the product of its mesh's replicated
    dimensions, and every rank for a plain tensor in a multi-rank run."""
    if not isinstance(grad, DTensor):
        return dist.get_world_size()
    mesh = grad.device_mesh
    return math.prod(mesh.size(i) for i, p in enumerate(grad.placements) if p.is_replicate()) * (
        dist.get_world_size() // mesh.size()
    )


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__")


class HostReads(TorchFunctionMode):
    """Counts, while active, every call that reads a tensor's value back to the host — `.item()`,
    `.tolist()`, `bool/float/int(t)`, `.numpy()`, and `.cpu()`/`.to("cpu")` of a device tensor:
    on a GPU each one waits for the queued kernels. `reads` lists the call names in order. On a
    CPU-only machine it counts the same calls (a reads-per-step figure checked there holds on a
    card); `torch.cuda.set_sync_debug_mode` is the card's own check."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        elif name in ("cpu", "to") and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)  # .to(dtype) moves nothing
            to_cpu = isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"
            if name == "cpu" or to_cpu:
                self.reads.append(name)
        return func(*args, **kwargs)
