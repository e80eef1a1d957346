"""The KV cache of generation: preallocated per-layer buffers for a batch of rows, each row at its
own position.

Each attention part says what it caches (`cache_shapes()`: GQA its K and V heads, MLA only its
latent and the shared RoPE key); a layer that reuses another layer's K/V (cross-layer sharing)
caches nothing and reads its group's buffers. A group whose layers all have a sliding window
keeps a ring buffer of `window` entries (slot = position mod window), so local layers decode in
memory that does not grow with the sequence; global layers keep `capacity` entries.

Every slot remembers the absolute position it holds (-1: empty), and attention masks are built
from those positions: rows of one batch can hold prompts of different lengths, and a row can be
emptied and refilled while the others keep decoding (continuous batching). Buffers are only
written in place, so a decode step over all rows has static shapes (torch.compile, CUDA graphs).

A long-memory layer (models/longmem.py) also keeps its memory of the positions that have left its
window (`LayerCache.memory`, a `MemoryState` per row: bounded, emptied by `reset` with the row);
its ring folds each entry into that memory as the entry leaves.

Capacity is checked on the host by `reserve` before a forward (the model itself never syncs); it
also tells the next forward how many slots of the full-length buffers are in use, so attention
reads only those (unless `trim` is off: then every slot, masked, for static shapes under compile).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LayerCache:
    """The buffers of one layer (or one KV-sharing group): tensors (B, heads, size, dim) and the
    position each slot holds, (B, size)."""

    def __init__(self, shapes: Sequence[tuple[int, int]], batch: int, size: int, ring: bool, device, dtype):
        self.tensors = [torch.zeros(batch, h, size, d, device=device, dtype=dtype) for h, d in shapes]
        self.pos = torch.full((batch, size), -1, dtype=torch.long, device=device)
        self.size, self.ring = size, ring
        self.memory = None  # a long-memory layer's MemoryState (models/longmem.py)

    def write(self, rows: torch.Tensor, pos: torch.Tensor, new: Sequence[torch.Tensor]) -> None:
        slots = pos % self.size if self.ring else pos  # (b, T)
        index = rows[:, None]
        for buffer, value in zip(self.tensors, new, strict=True):
            buffer[index, :, slots] = value.transpose(1, 2).to(buffer.dtype)  # (b, T, h, d)
        self.pos[index, slots] = pos

    def read(self, rows: torch.Tensor | None, span: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The rows' entries, the first `span` slots only when given (a full cache's used part)."""
        tensors, pos = self.tensors, self.pos
        if span is not None and not self.ring and span < self.size:
            tensors, pos = [t[:, :, :span] for t in tensors], pos[:, :span]
        if rows is None:
            return list(tensors), pos
        return [t[rows] for t in tensors], pos[rows]

    def nbytes(self) -> int:
        memory = self.memory.nbytes() if self.memory is not None else 0
        return (
            sum(t.numel() * t.element_size() for t in self.tensors)
            + self.pos.numel() * self.pos.element_size()
            + memory
        )


class KVCache:
    """Buffers for `batch` rows of `model` (a models.decoder.Decoder), each row holding up to
    `capacity` tokens (default and at most the model's max_seq_len).

    `view(rows)` continues only some rows (the others keep their state); `reset(rows)` empties
    rows for new sequences; `lengths` holds the tokens each row has."""

    def __init__(self, model, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None):
        cfg = model.cfg
        self.capacity = min(capacity or cfg.max_seq_len, cfg.max_seq_len)
        if self.capacity <= 0 or batch <= 0:
            raise ValueError(f"a KV cache needs batch > 0 and capacity > 0, got {batch} and {self.capacity}")
        device = model.embed.weight.device
        dtype = dtype or model.embed.weight.dtype
        self.batch = batch
        self.layers: dict[int, LayerCache] = {}  # by the layer that owns them
        attns = [block.attn for block in model.blocks]
        owner: list[int] = []  # a layer without its own K/V reads the last owner's
        for layer, attn in enumerate(attns):
            owner.append(layer if attn.cache_shapes() is not None else owner[-1])
        for layer in sorted(set(owner)):
            windows = [attns[j].window for j, o in enumerate(owner) if o == layer]
            local = all(w is not None for w in windows) and max(windows) < self.capacity
            size = max(windows) if local else self.capacity
            self.layers[layer] = LayerCache(attns[layer].cache_shapes(), batch, size, local, device, dtype)
            if attns[layer].memory is not None:
                self.layers[layer].memory = attns[layer].memory.new_state(
                    batch, self.capacity, attns[layer].window, device, dtype
                )
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch  # the same, on the host: capacity checks without a sync
        self._rows: torch.Tensor | None = None
        self._all_rows = torch.arange(batch, device=device)  # what a forward over every row writes
        self._host_rows: list[int] = list(range(batch))
        self.trim = True  # attend over the used slots only (False: always all, static shapes for compile)
        self._span: int | None = None  # set by reserve for the next forward

    # -- what the generation code calls --------------------------------------------------------

    def view(self, rows: Sequence[int]) -> KVCache:
        """The same buffers, continuing only `rows` (in that order) in the next forward."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view._host_rows = list(rows)
        view._rows = torch.tensor(view._host_rows, dtype=torch.long, device=self.lengths.device)
        return view

    def reset(self, rows: Sequence[int]) -> None:
        """Empty `rows` for new sequences."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.lengths.device)
        self.lengths[index] = 0
        for layer in self.layers.values():
            layer.pos[index] = -1
            if layer.memory is not None:
                layer.memory.reset(index)
        for r in rows:
            self.host_lengths[r] = 0

    def reserve(self, T: int) -> None:
        """Check that the rows of this view can take T more tokens; raise ValueError otherwise.
        Call before each forward with a cache (the model does not check, to stay sync-free)."""
        for r in self._host_rows:  # all rows checked before any is counted
            if self.host_lengths[r] + T > self.capacity:
                raise ValueError(
                    f"row {r} would hold {self.host_lengths[r] + T} tokens, over the cache's capacity "
                    f"{self.capacity} (the model's max_seq_len or less)"
                )
        for r in self._host_rows:
            self.host_lengths[r] += T
        if self.trim:
            self._span = max(self.host_lengths[r] for r in self._host_rows)

    def rollback(self, lengths: Sequence[int]) -> None:
        """The rows of this view back to `lengths` tokens each (fewer than they hold): the entries
        past them are forgotten (a speculative continuation, e.g. a Quiet-STaR thought, dropped).
        Ring buffers cannot: what the continuation overwrote is gone (a ValueError)."""
        if any(layer.ring for layer in self.layers.values()):
            raise ValueError("a sliding-window (ring buffer) cache cannot roll back: its old entries were overwritten")
        rows = self._host_rows
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        keep = torch.tensor(list(lengths), dtype=torch.long, device=self.lengths.device)
        self.lengths[index] = keep
        for layer in self.layers.values():
            slots = torch.arange(layer.size, device=keep.device)[None]
            layer.pos[index] = layer.pos[index].masked_fill(slots >= keep[:, None], -1)
        for r, n in zip(rows, lengths, strict=True):
            self.host_lengths[r] = n

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())

    # -- what the model calls -------------------------------------------------------------------

    def positions(self, T: int) -> torch.Tensor:
        """(b, T) absolute positions of the next T tokens of each row of this view."""
        lengths = self.lengths if self._rows is None else self.lengths[self._rows]
        return lengths[:, None] + torch.arange(T, device=lengths.device)

    def update(self, layer: int, pos: torch.Tensor, *new: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Store a layer's new entries (each (b, h, T, d)) at positions `pos` (b, T); return
        what attention reads — every entry of the rows, (b, h, S, d) — and their positions (b, S)."""
        cache = self.layers[layer]
        rows = self._rows if self._rows is not None else self._all_rows
        T = pos.shape[1]
        if cache.ring and (T > 1 or cache.memory is not None):
            # A chunk would overwrite entries its own earlier queries still see: attend over the
            # ring as it was plus the chunk, then keep the chunk's last `size` entries. (A long
            # memory reads and folds the entries leaving the ring: it takes this path for T = 1 too.)
            past, past_pos = cache.read(self._rows)  # a ring: all of it
            out = [torch.cat([p, n.to(p.dtype)], dim=2) for p, n in zip(past, new, strict=True)]
            key_pos = torch.cat([past_pos, pos], dim=1)  # copies: before the write below
            keep = min(T, cache.size)
            cache.write(rows, pos[:, -keep:], [n[:, :, -keep:] for n in new])
            return out, key_pos
        cache.write(rows, pos, new)
        return cache.read(self._rows, self._span)

    def memory(self, layer: int):
        """A long-memory layer's MemoryState and the rows of this view (an index tensor)."""
        return self.layers[layer].memory, self._rows if self._rows is not None else self._all_rows

    def advance(self, T: int) -> None:
        """The rows of this view took T tokens (the model calls it at the end of a forward)."""
        if self._rows is None:
            self.lengths += T
        else:
            self.lengths[self._rows] += T
        self._span = None  # the next forward reserves again (or reads every slot)


def new_cache(model, batch: int, capacity: int | None = None, dtype: torch.dtype | None = None):
    """The decoding cache of `model`: its own (`model.new_cache`, e.g. a byte model's several caches
    and patch state, models/blt.py) or a `KVCache`."""
    make = getattr(model, "new_cache", None)
    return make(batch, capacity, dtype) if make is not None else KVCache(model, batch, capacity, dtype)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(b, 1, T, S) bool for SDPA: a query at position p sees the filled slots at positions ≤ p
    (and > p - window)."""
    q, k = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= k > q - window
    return mask
