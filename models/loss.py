"""The language-modelling loss from the last hidden states: head, soft-cap, cross-entropy.

    linear_cross_entropy(x, weight, targets, softcap, chunk)  →  Σ over targets ≠ ignore of
        −log softmax(cap(x·Wᵀ))[target],   cap(z) = c·tanh(z/c) (or z)

`chunk=0` is the plain computation: the whole (N, vocab) logits, then an fp32 cross-entropy —
what torch.compile fuses when the loss is compiled with the model (`Decoder.forward(targets=)`).
`chunk=n` never holds more than n × vocab logits: rows are taken n at a time, each chunk's
logits are made, turned into its loss and into its gradients (softmax − one-hot, through the
soft-cap, times W for x and times x for W) in the same pass, and dropped; backward only scales
the stored gradients by the incoming one. At GPT-2's vocabulary that is 16 × 1024 × 50304 fp32
logits (3.3 GB, plus their gradient) replaced by n × 50304 — the idea of Liger-Kernel's fused
linear cross-entropy, written here with torch ops. Matmuls run in the autocast dtype like the
head's; softmax, log-sum-exp and the loss in fp32, as `F.cross_entropy(logits.float())` does.

Under tensor parallel the head's weight is split by vocabulary over a group of ranks (a DTensor
`Shard(0)`): `linear_cross_entropy` then runs the chunked computation on this rank's rows of the
weight — its columns of the logits — with each position's max and sum of exponentials, and its
target's logit, combined over the group by two all-reduces per chunk (Megatron's vocab-parallel
cross-entropy); the gradient for x, a partial sum over the vocabulary, is all-reduced once. No
rank holds all the logits.

    token_losses(x, weight, targets, softcap, chunk)  →  each target's cross-entropy (N,), no gradient
    selected_cross_entropy(x, weight, targets, Selection(reference, fraction), softcap, chunk)

The second is selective language modelling (Rho-1, Lin et al. 2024, arXiv 2404.07965): of the n
supervised targets of each row, only the `kept(n, fraction)` ones whose loss most exceeds a
reference model's loss on the same token (`reference`, precomputed, one row per row) count; the
others get no gradient. Per row, so the tokens kept do not depend on how rows are split into
micro-batches and ranks. Ranks are taken by a stable sort (ties: the earlier position first) and
compared with device counts, so nothing is read back to the host, and the host knows the count
from the batch (`kept`).
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE = -100  # cross_entropy's ignore_index: targets outside the loss mask


def capped_logits(x: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """x·Wᵀ, or c·tanh(x·Wᵀ/c) with 1/c folded into the weight (one pass fewer over the logits)."""
    if softcap is None:
        return F.linear(x, weight)
    return softcap * torch.tanh(F.linear(x, weight / softcap))


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk: int = 0,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """x (N, d), weight (V, d), targets (N,) → the summed cross-entropy (0-d fp32). See the module
    doc; `weight` a DTensor split by vocabulary: the vocab-parallel computation."""
    group, first = None, 0  # first: the first vocabulary row of this rank's part of the weight
    if _is_dtensor(weight):
        mesh = weight.device_mesh
        weight = weight.to_local()
        group, first = mesh.get_group(), mesh.get_local_rank() * weight.shape[0]
        chunk = chunk if chunk > 0 else x.shape[0]
    elif chunk <= 0:
        logits = capped_logits(x, weight, softcap)
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    # ctx.needs_input_grad does not see the caller's no_grad (evaluation): say it here
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(x, weight, targets, softcap, chunk, ignore_index, with_grad, group, first)


def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor; without importing torch.distributed.tensor (half a second a process)
    when nothing has (then nothing is one). An isinstance check, which torch.compile traces."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight of a DTensor split over ranks (gathered; differentiable), else the weight."""
    return weight.full_tensor() if _is_dtensor(weight) else weight


def _normaliser_and_target(logits, targets, valid, group, first: int):
    """Each row's log-sum-exp over the whole vocabulary, its target's logit, and where the target is
    among these columns ([first, first + columns) of the vocabulary: all of it without a group)."""
    columns = logits.shape[1]
    local = targets - first
    here = valid & (local >= 0) & (local < columns)
    safe = torch.where(here, local, 0).unsqueeze(1)
    target = torch.where(here, logits.gather(1, safe).squeeze(1), 0.0)
    if group is None:
        return torch.logsumexp(logits, dim=-1), target, safe, here
    top = logits.max(dim=-1).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(logits - top.unsqueeze(1)).sum(dim=-1), target])
    dist.all_reduce(sums, group=group)
    return top + sums[0].log(), sums[1], safe, here


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, softcap, chunk, ignore_index, with_grad, group=None, first=0):
        need_x, need_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        w = weight if softcap is None else weight / softcap
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, x.shape[0], chunk):
            xs, ys = x[start : start + chunk], targets[start : start + chunk]
            z = F.linear(xs, w)  # the autocast dtype, as the head computes it
            t = None
            logits = z.float()
            if softcap is not None:
                t = torch.tanh(logits)
                logits = softcap * t
            valid = ys != ignore_index
            lse, target, safe, here = _normaliser_and_target(logits, ys, valid, group, first)
            loss = loss + ((lse - target) * valid).sum()
            if not (need_x or need_w):
                continue
            # d loss / d logits = softmax − one-hot, on the supervised rows only
            g = torch.exp(logits - lse.unsqueeze(1))
            g.scatter_add_(1, safe, -here.to(g.dtype).unsqueeze(1))
            g.mul_(valid.unsqueeze(1))
            if t is not None:  # through c·tanh(z), z = x·(W/c)ᵀ: d logits / dz = c·(1 − tanh²)
                g.mul_(softcap * (1 - t * t))
            g = g.to(z.dtype)
            if need_x:
                grad_x[start : start + chunk] = (g @ w.to(g.dtype)).to(x.dtype)
            if need_w:
                grad_w += (g.t() @ xs.to(g.dtype)).float()
        if need_w and softcap is not None:
            grad_w /= softcap  # w = weight / c
        if need_x and group is not None:  # each rank's part of the vocabulary: a partial sum
            dist.all_reduce(grad_x, group=group)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        gx = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gx, gw, None, None, None, None, None, None, None


def token_losses(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk: int = 0,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """x (N, d), weight (V, d), targets (N,) → each target's cross-entropy (N,) fp32, 0 where it is
    `ignore_index`; no gradient. `chunk` > 0: never more than chunk × V logits at once."""
    step = chunk if chunk > 0 else max(1, x.shape[0])
    with torch.no_grad():
        return torch.cat(
            [
                F.cross_entropy(
                    capped_logits(x[i : i + step], weight, softcap).float(),
                    targets[i : i + step],
                    ignore_index=ignore_index,
                    reduction="none",
                )
                for i in range(0, x.shape[0], step)
            ]
        )


class Selection(NamedTuple):
    """Rho-1's token selection: each target's reference loss (rows × positions: the rows the
    selection ranks within; float, or float16 bits viewed as int16 — what FSDP2's cast of the
    forward's float inputs to bf16 leaves alone) and the fraction of each row's supervised
    targets kept."""

    reference: torch.Tensor
    fraction: float


def kept(n: int, fraction: float) -> int:
    """How many of a row's n supervised targets the selection keeps: ⌊n·fraction⌋ (in float64,
    with a 1e-9 nudge so that 0.29 × 100 is 29), the same number `keep_mask` computes on the device."""
    return math.floor(n * fraction + 1e-9)


def keep_mask(losses: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    """The kept targets of (rows, positions) `losses` (a bool mask like it): in each row, the
    `kept(its valid count, fraction)` valid ones with the largest excess loss `losses − reference`,
    without a host read."""
    if reference.dtype == torch.int16:
        reference = reference.view(torch.float16)
    excess = torch.where(valid, losses.float() - reference.float(), -math.inf)
    k = torch.floor(valid.sum(dim=-1, keepdim=True).double() * fraction + 1e-9).long()
    order = torch.argsort(excess, dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return rank < k


def selected_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    selection: Selection,
    softcap: float | None = None,
    chunk: int = 0,
    ignore_index: int = IGNORE,
) -> torch.Tensor:
    """The summed cross-entropy of the targets `selection` keeps (see the module doc). `chunk=0`:
    one head pass, the per-token losses with their graph, masked; `chunk=n`: the losses of every
    target first without a gradient (`token_losses`), then the chunked loss of the kept ones."""
    rows = selection.reference.shape
    valid = (targets != ignore_index).view(rows)
    if chunk <= 0:
        logits = capped_logits(x, weight, softcap)
        losses = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
        keep = keep_mask(losses.detach().view(rows), selection.reference, valid, selection.fraction)
        return torch.where(keep.flatten(), losses, 0.0).sum()
    losses = token_losses(x.detach(), weight.detach(), targets, softcap, chunk, ignore_index)
    keep = keep_mask(losses.view(rows), selection.reference, valid, selection.fraction).flatten()
    return linear_cross_entropy(x, weight, targets.masked_fill(~keep, ignore_index), softcap, chunk, ignore_index)
