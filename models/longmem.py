"""Memory beyond the sliding window: what a local attention layer reads of the positions that have
left its window (`long_memory` in the decoder's config, on the `long_memory_layers`).

A memory layer is a sliding-window GQA layer whose heads each read two things and mix them with a
learned per-head gate g = sigmoid(gate) (0.5 at init): `(1 − g)·local + g·far`. `local` is the
layer's ordinary attention over its last `window` positions; `far` reads every earlier position
of the sequence (of the document, in packed rows), j ≤ t − window, in one of two ways:

- `compressive` — Infini-attention's memory (Munkhdalai et al. 2024, arXiv 2404.07143): the far
  positions are summed into one matrix per KV head, M = Σ σ(k_j)ᵀ v_j and z = Σ σ(k_j) with
  σ = ELU + 1, read as σ(q)·M / σ(q)·z. Constant size whatever the length. Here a position enters
  the memory when it leaves the window (the paper folds whole segments; one position at a time
  is the same memory at a finer grain, and is what the ring-buffer KV cache evicts).
- `knn` — Memorizing Transformers' memory (Wu et al. 2022, arXiv 2203.08913): the far keys and
  values are kept as they are; each query reads the `top_k` best-matching ones (exact search,
  softmax over those). Lossless for what it keeps, bounded by `size` entries per row and layer
  when decoding (the oldest dropped first).

Both read by content: the far read uses the queries and keys before RoPE, so it does not depend
on how far back a position lies, and a model trained on short rows reads memories older than any
distance it saw. Training computes the far read over the whole row (dense, masked to the far
positions; gradients flow into it). Decoding keeps the state in the KV cache (`MemoryState`, one
per row and memory layer): each position is folded in as it leaves the window's ring buffer, so
a decoded token's far read equals the full forward's (for knn, while nothing was dropped);
resetting a row for a new request empties its memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.hooks import HookPoint

KINDS = ("compressive", "knn")
_EPS = 1e-6


def far_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(b, 1, T, S) bool: a query at position p reads the filled slots at positions ≤ p − window
    (those that have left its window; models.cache.attention_mask is the complement)."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    return (k >= 0) & (k <= q - window)


def _feature(x: torch.Tensor) -> torch.Tensor:
    """Infini-attention's σ = ELU + 1: positive features of queries and keys, in float32."""
    return F.elu(x.float()) + 1


class MemoryState:
    """One memory layer's memory of a cache's rows: `compressive` M (B, H_kv, d, d) and z
    (B, H_kv, d) in float32; `knn` keys and values (B, H_kv, size + 1, d) and the position each slot
    holds, (B, size + 1), -1 empty (the last slot takes the writes that keep nothing, so a fold has
    static shapes). Only written in place."""

    def __init__(self, kind: str, batch: int, kv_heads: int, head_dim: int, size: int, device, dtype):
        self.kind, self.size = kind, size
        if kind == "compressive":
            self.M = torch.zeros(batch, kv_heads, head_dim, head_dim, device=device)
            self.z = torch.zeros(batch, kv_heads, head_dim, device=device)
        else:
            shape = (batch, kv_heads, size + 1, head_dim)
            self.keys = torch.zeros(shape, device=device, dtype=dtype)
            self.values = torch.zeros(shape, device=device, dtype=dtype)
            self.pos = torch.full((batch, size + 1), -1, dtype=torch.long, device=device)

    def reset(self, rows: torch.Tensor) -> None:
        if self.kind == "compressive":
            self.M[rows] = 0
            self.z[rows] = 0
        else:
            self.pos[rows] = -1

    def fold(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, upto: torch.Tensor):
        """Take the entries (k, v (b, H_kv, S, d) at positions k_pos (b, S)) at positions ≤ `upto`
        (b, 1) into the rows' memory: those leaving the window. The caller passes each position
        once: the ring buffer and the new chunk, before the ring is overwritten."""
        leaving = (k_pos >= 0) & (k_pos <= upto)  # (b, S)
        if self.kind == "compressive":
            fk = _feature(k) * leaving[:, None, :, None]
            self.M[rows] += fk.transpose(-2, -1) @ v.float()
            self.z[rows] += fk.sum(dim=2)
            return
        # Slot = position mod size: each position has its own slot until `size` newer ones arrive
        # (first in, first out). Only the newest `size` leaving entries are written, so no two
        # writes of one fold share a slot; the rest go to the spare last slot.
        leaving &= k_pos > upto - self.size
        slots = torch.where(leaving, k_pos % self.size, self.size)
        index = rows[:, None]
        self.keys[index, :, slots] = k.transpose(1, 2).to(self.keys.dtype)
        self.values[index, :, slots] = v.transpose(1, 2).to(self.values.dtype)
        self.pos[index, slots] = torch.where(leaving, k_pos, -1)
        self.pos[:, self.size] = -1

    def nbytes(self) -> int:
        tensors = (self.M, self.z) if self.kind == "compressive" else (self.keys, self.values, self.pos)
        return sum(t.numel() * t.element_size() for t in tensors)


class LongMemory(nn.Module):
    """The far read of one attention layer and the gate that mixes it in (see the module doc)."""

    def __init__(self, kind: str, n_heads: int, n_kv_heads: int, head_dim: int, top_k: int, size: int | None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"long memory kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.n_heads, self.n_kv_heads, self.head_dim = kind, n_heads, n_kv_heads, head_dim
        self.top_k, self.size = top_k, size  # size: knn entries a decoding row keeps (None: the cache's capacity)
        self.gate = nn.Parameter(torch.zeros(n_heads))  # sigmoid(0) = 0.5: local and far weigh alike at init
        self.hook_far = HookPoint()  # (B, H, T, head_dim): each head's far read, before the gate

    def init_weights(self) -> None:
        nn.init.zeros_(self.gate)

    def new_state(self, batch: int, capacity: int, window: int, device, dtype) -> MemoryState:
        """Empty memory for `batch` rows of a cache holding `capacity` tokens per row."""
        size = self.size or max(1, capacity - window)
        return MemoryState(self.kind, batch, self.n_kv_heads, self.head_dim, size, device, dtype)

    def mix(self, local: torch.Tensor, far: torch.Tensor) -> torch.Tensor:
        """local, far (B, H, T, d) → (1 − g)·local + g·far, g per head."""
        g = torch.sigmoid(self.gate).to(local.dtype)[None, :, None, None]
        return local + g * (self.hook_far(far).to(local.dtype) - local)

    def read(self, q, k, v, far: torch.Tensor, state: MemoryState | None = None, rows=None) -> torch.Tensor:
        """q (B, H, T, d) and the keys/values k, v (B, H_kv, S, d) that `far` (B or 1, 1, T, S)
        marks readable for each query, plus what `state` holds for `rows` (decoding) → the far read
        (B, H, T, d); zero for a query with nothing to read."""
        repeat = self.n_heads // self.n_kv_heads
        if self.kind == "compressive":
            fq, fk = _feature(q), _feature(k).repeat_interleave(repeat, dim=1)
            weights = (fq @ fk.transpose(-2, -1)) * far  # (B, H, T, S)
            num, den = weights @ v.float().repeat_interleave(repeat, dim=1), weights.sum(-1)
            if state is not None:
                M = state.M[rows].repeat_interleave(repeat, dim=1)  # (B, H, d, d)
                z = state.z[rows].repeat_interleave(repeat, dim=1)
                num = num + fq @ M
                den = den + (fq * z[:, :, None]).sum(-1)
            return (num / den.clamp_min(_EPS)[..., None]).to(q.dtype)
        if state is not None:  # the kept entries first, then this step's candidates
            k = torch.cat([state.keys[rows].to(k.dtype), k], dim=2)
            v = torch.cat([state.values[rows].to(v.dtype), v], dim=2)
            kept = (state.pos[rows] >= 0)[:, None, None, :].expand(-1, 1, far.shape[2], -1)
            far = torch.cat([kept, far.expand(kept.shape[0], -1, -1, -1)], dim=-1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, T, S)
        ranked = scores.detach().masked_fill(~far, float("-inf"))
        kth = ranked.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        chosen = far & (ranked >= kth)  # the top_k far entries (all of them, when fewer)
        # A finite fill: a query with nothing to read gets a uniform row, zeroed here (no NaN to
        # reach the gradients).
        probs = scores.float().masked_fill(~chosen, torch.finfo(torch.float32).min).softmax(-1)
        probs = probs * chosen.any(-1, keepdim=True)
        return probs.type_as(v) @ v
