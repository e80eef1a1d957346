"""Muon (Keller Jordan, 2024): SGD with Nesterov momentum whose update of each weight matrix is
orthogonalised by a Newton–Schulz iteration before it is applied — every direction the gradient
spans gets the same step.

    B ← μ·B + (1 − μ)·G;   U ← (1 − μ)·G + μ·B (Nesterov);   O ← NS₅(U);
    W ← W·(1 − lr·wd) − lr·s(rows, cols)·O

`s` is the update's scale: `keller`, √max(1, rows/cols) (the original), or `moonlight`,
0.2·√max(rows, cols) ("Muon is Scalable", which matches AdamW's update RMS so that AdamW's LR and
weight decay carry over). This is what `torch.optim.Muon` computes for a plain 2-D tensor (the
tests hold it to that); this class also takes

- stacks of matrices (3-D: an MoE layer's experts), each `[i]` orthogonalised on its own, batched;
  a stack sharded on its stack index only (FSDP2's dim-0 shards, expert parallelism's experts)
  holds whole matrices on every rank, which orthogonalises its own, with no communication;
- FSDP2's sharded DTensors: orthogonalisation needs the whole matrix, so each matrix is given to
  one rank of its shard group (the matrices are dealt round-robin, so the work is shared), its
  shards gathered there by one all-to-all per round, orthogonalised, and the result scattered
  back to the shards by a second. The momentum stays sharded, like Adam's moments. Under HSDP
  each replica's shard group does this on its own (their gradients are equal).

Muon is for the hidden matrices only; `build_optimizer` (optim/build.py) gives embeddings, the
head, norms and biases to AdamW.

A step can be skipped without the host looking at it: set `optimizer.found_inf` (a 0-d float tensor
on the device, 1.0 = skip) as `torch.amp.GradScaler` does; a skipped step changes no weight, no
momentum and no step count (Muon masks its updates, fused AdamW skips in its kernel).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's (a, b, c), as published with Muon
SCALINGS = ("keller", "moonlight")
ORTHOGONALIZERS = ("newton_schulz", "polar_express")
PE_LOWER = 1e-3  # Polar Express: the smallest singular value (the largest is 1) its polynomials are made for
PE_CUSHION = 1.02  # ... and each one's interval widened at the top by this factor, against bf16 round-off


def orthogonalize(
    g: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7, method: str = "newton_schulz"
) -> Tensor:
    """≈ U·Vᵀ of g = U·S·Vᵀ, for a matrix (m, n) or a stack (..., m, n), by `steps` odd quintics
    x ← a·x + b·x·xᵀ·x + c·(x·xᵀ)²·x applied to g / ‖g‖_F: `newton_schulz` repeats Muon's
    published quintic (singular values pushed into roughly [0.7, 1.2]); `polar_express` uses a
    quintic per step, each the best one for the interval the singular values are in by then
    (`polar_express_coefficients`). Computed in `dtype`; returned in g's dtype."""
    if g.dim() > 3:
        return orthogonalize(g.flatten(0, -3), steps, dtype, eps, method).view(g.shape)
    if method == "newton_schulz":
        coefficients = [NS_COEFFICIENTS] * steps
    elif method == "polar_express":
        coefficients = list(polar_express_coefficients(steps))
    else:
        raise ValueError(f"unknown orthogonalizer {method!r}; one of {', '.join(ORTHOGONALIZERS)}")
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm ≤ Frobenius norm ≤ 1
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for a, b, c in coefficients:  # x ← a·x + (b·G + c·G²)·x with G = x·xᵀ, in torch.optim.Muon's order of operations
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(g.dtype)


@functools.lru_cache
def polar_express_coefficients(steps: int, lower: float = PE_LOWER, cushion: float = PE_CUSHION) -> tuple:
    """Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): for each step t, the odd
    quintic p_t(x) = a·x + b·x³ + c·x⁵ closest to 1 in the worst case over the interval [ℓ_t, u_t]
    that holds the singular values by then (the minimax polynomial, found by the Remez exchange:
    equal and alternating errors at ℓ_t, at p_t's two interior extrema and at u_t); the next
    interval is p_t's image of this one. ℓ_0 = `lower`, u_0 = 1 (the normalised input), each u_t
    widened by `cushion` so that a singular value a little above it, from round-off, is not
    thrown far off by the next, steeper polynomial. Once the interval has shrunk to a point the
    quintic is Newton–Schulz's own, (15/8, −10/8, 3/8). Computed here, not copied; with the
    default cushion they come within ~1% of the paper's published values."""
    import numpy as np

    out, low, high = [], lower, 1.0
    for _ in range(steps):
        high *= cushion
        if high - low < 1e-6:
            a, b, c = 15 / 8, -10 / 8, 3 / 8
        else:
            a, b, c = _minimax_quintic(low, high)
        grid = np.concatenate([np.geomspace(low, high, 4097), [low, high]])
        values = a * grid + b * grid**3 + c * grid**5
        low, high = float(values.min()), float(values.max())
        out.append((float(a), float(b), float(c)))
    return tuple(out)


def _minimax_quintic(low: float, high: float, iterations: int = 100) -> tuple[float, float, float]:
    """The odd quintic closest to 1 on [low, high] in the max norm: Remez exchange on the points
    low < x₁ < x₂ < high where the error alternates (x₁, x₂: the roots of p′, a quadratic in x²)."""
    import numpy as np

    x = np.array([low, *np.geomspace(low, high, 4)[1:3], high])
    signs = np.array([1.0, -1.0, 1.0, -1.0])  # p = 1 − E, 1 + E, 1 − E, 1 + E
    for _ in range(iterations):
        a, b, c, _ = np.linalg.solve(np.stack([x, x**3, x**5, signs], axis=1), np.ones(4))
        disc = 9 * b * b - 20 * a * c  # p′(x) = a + 3b·x² + 5c·x⁴
        if disc <= 0 or c <= 0:
            raise ArithmeticError(f"Polar Express: no minimax quintic found on [{low}, {high}]")
        extrema = np.sqrt(np.sort([(-3 * b - math.sqrt(disc)) / (10 * c), (-3 * b + math.sqrt(disc)) / (10 * c)]))
        if np.allclose(extrema, x[1:3], rtol=1e-14, atol=0):
            break
        x[1:3] = extrema
    return float(a), float(b), float(c)


def update_scale(shape: torch.Size, scaling: str) -> float:
    rows, cols = shape[-2], shape[-1]
    if scaling == "keller":
        return math.sqrt(max(1.0, rows / cols))
    if scaling == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"unknown Muon scaling {scaling!r}; one of {', '.join(SCALINGS)}")


class Muon(torch.optim.Optimizer):
    """Muon for the param groups marked `muon: True` (matrices and stacks of them), AdamW for the
    others — one optimizer, so one state dict, one checkpoint and one LR schedule for both. Every
    group may set its own lr and weight_decay; AdamW groups use torch's own AdamW step."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        scaling: str = "keller",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: torch.dtype = torch.bfloat16,
        fused: bool | None = None,
        orthogonalizer: str = "newton_schulz",
    ):
        update_scale(torch.Size([1, 1]), scaling)  # names a bad scaling now, not at the first step
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"unknown orthogonalizer {orthogonalizer!r}; one of {', '.join(ORTHOGONALIZERS)}")
        self.orthogonalizer = orthogonalizer
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            muon=True,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            scaling=scaling,
            betas=betas,
            eps=eps,
        )
        super().__init__(params, defaults)
        self.ns_dtype, self.fused = ns_dtype, fused
        for group in self.param_groups:
            for p in group["params"] if group["muon"] else ():
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon takes matrices (2-D) and stacks of them (3-D), got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else 1 - found_inf  # 0: this step changes nothing
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not group["muon"]:
                self._adamw(params, group, found_inf)
                continue
            updates = [self._momentum(p, group, keep) for p in params]
            for p, o in zip(params, self._orthogonalize_all(updates, group["ns_steps"]), strict=True):
                local, lr = _local(p), group["lr"]
                if keep is None:
                    local.mul_(1 - lr * group["weight_decay"])
                    local.add_(o, alpha=-lr * update_scale(p.shape, group["scaling"]))
                else:  # x·1 and x + 0·o are exact: a skipped step leaves the weight bit for bit
                    local.mul_(1 - lr * group["weight_decay"] * keep)
                    local.addcmul_(o, keep, value=-lr * update_scale(p.shape, group["scaling"]))
        return loss

    def _adamw(self, params: list[Tensor], group: dict, found_inf: Tensor | None) -> None:
        for p in params:
            state = self.state[p]
            if not state:  # the layout torch.optim.AdamW keeps: its checkpoints read the same
                # (fused AdamW keeps the step count on the parameter's device)
                state["step"] = torch.zeros((), device=p.device) if self.fused else torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=self.fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
            found_inf=found_inf,  # fused only (torch's other AdamW paths refuse it)
        )

    def _momentum(self, p: Tensor, group: dict, keep: Tensor | None) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)  # a DTensor for a sharded p: saved sharded
        buf, grad, mu = state["momentum_buffer"], p.grad, group["momentum"]
        if keep is None:
            buf.lerp_(grad, 1 - mu)
        else:  # a skipped step's gradient may hold NaN/inf: zeroed, and the buffer moves by 0
            torch.nan_to_num_(_local(grad), nan=0.0, posinf=0.0, neginf=0.0)
            _local(buf).lerp_(_local(grad), (1 - mu) * keep)
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    def _orthogonalize(self, m: Tensor, steps: int) -> Tensor:
        return orthogonalize(m, steps, self.ns_dtype, method=self.orthogonalizer)

    def _orthogonalize_all(self, updates: list[Tensor], steps: int) -> list[Tensor]:
        """The orthogonalised updates as local tensors (this rank's shards of sharded ones)."""
        out: list[Tensor | None] = [None] * len(updates)
        dims = [None if _whole_matrices_here(u) else _shard_dim(u) for u in updates]
        # Split some other way (tensor parallel's columns or rows, under FSDP2 also its rows):
        # gathered whole on every rank of its mesh, orthogonalised there, this rank's part kept.
        split = [i for i, d in enumerate(dims) if d == _OTHER]
        for i in split:
            out[i] = _local_part(self._orthogonalize(updates[i].full_tensor(), steps), updates[i])
        sharded = [i for i, d in enumerate(dims) if d is not None and d != _OTHER]
        by_shape: dict[tuple, list[int]] = {}  # matrices of one shape go through NS as one batch
        for i in sorted(set(range(len(updates))) - set(sharded) - set(split)):
            by_shape.setdefault((_local(updates[i]).shape, updates[i].dtype), []).append(i)
        for same in by_shape.values():
            done = self._orthogonalize(torch.stack([_local(updates[i]) for i in same]), steps)
            for i, o in zip(same, done, strict=True):
                out[i] = o
        if sharded:
            # The shard group (HSDP: each replica's group does the same work on the same gradients).
            group = updates[sharded[0]].device_mesh.get_group(dims[sharded[0]])
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            for start in range(0, len(sharded), world):
                batch = sharded[start : start + world]  # rank r orthogonalises updates[batch[r]]
                results = _round(
                    [updates[i] for i in batch], world, rank, group, lambda m: self._orthogonalize(m, steps)
                )
                for i, r in zip(batch, results, strict=True):
                    out[i] = r
        return out  # type: ignore[return-value]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _whole_matrices_here(t: Tensor) -> bool:
    """A stack of matrices (3-D) split over ranks along its stack index only: each rank's shard is
    whole matrices (an MoE layer's experts under FSDP2 and expert parallelism)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    def on_stack_index(p) -> bool:
        return p.is_shard(0) or (isinstance(p, _StridedShard) and p.dim == 0)

    placements = getattr(t, "placements", ())
    split = [p for p in placements if not p.is_replicate()]
    return t.dim() == 3 and bool(split) and all(on_stack_index(p) for p in split)


_OTHER = -1  # _shard_dim: split in a way the one-round exchange does not handle


def _shard_dim(t: Tensor) -> int | None:
    """The mesh dimension `t` is sharded over (on its dim 0: FSDP2's layout; under HSDP the other
    dimension replicates), None when every rank holds it whole, _OTHER when split another way
    (tensor parallel)."""
    placements = getattr(t, "placements", ())
    split = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not split:
        return None
    if len(split) != 1 or not placements[split[0]].is_shard(0):
        return _OTHER
    return split[0]


def _local_part(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of `whole`, laid out as the DTensor `like` (slicing, no communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


def _row_splits(rows: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard (torch.chunk's split, empty shards at the end), as FSDP2 lays them."""
    chunk = math.ceil(rows / world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def _round(updates: list[Tensor], world: int, rank: int, group, fn) -> list[Tensor]:
    """One round of at most `world` sharded matrices: rank r receives every shard of matrix r
    (all-to-all), applies `fn` to the whole matrix and sends each rank its shard of the result
    (all-to-all); returns this rank's shard of every result."""
    splits = [_row_splits(u.shape[0], world) for u in updates]
    inner = [math.prod(u.shape[1:]) for u in updates]
    width = max(max(s) * n for s, n in zip(splits, inner, strict=True))  # one padded shard, flat
    local = [_local(u) for u in updates]
    dtype, device = local[0].dtype, local[0].device
    send = torch.zeros(world, width, dtype=dtype, device=device)
    for j, shard in enumerate(local):  # slot j: my shard of matrix j, for rank j
        send[j, : shard.numel()] = shard.reshape(-1)
    recv = torch.empty_like(send)  # slot r: rank r's shard of my matrix
    dist.all_to_all_single(recv, send, group=group)
    back = torch.zeros_like(send)
    if rank < len(updates):
        mine, rows = updates[rank], splits[rank]
        whole = torch.cat([recv[r, : rows[r] * inner[rank]] for r in range(world)]).view(mine.shape)
        result = fn(whole).reshape(mine.shape[0], -1)
        for r, part in enumerate(result.split(rows)):
            back[r, : part.numel()] = part.reshape(-1)
    out = torch.empty_like(back)
    dist.all_to_all_single(out, back, group=group)
    return [out[j, : local[j].numel()].view(local[j].shape) for j in range(len(updates))]
