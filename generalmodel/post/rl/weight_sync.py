"""New policy versions to the rollout actors through a collective group (rl.weight_sync=collective).

The learner's rank 0 and the `rl.rollout_workers` actors form a standalone gloo group of their own
(a `torch.distributed.ProcessGroupGloo` over a TCPStore the learner hosts: it never touches the
learner ranks' default group). A version is flattened into one contiguous buffer per dtype
(`Layout`, the same key order on both sides) and broadcast from rank 0; each actor unflattens it
into its model. The object store's way (`rl.weight_sync=object_store`) is one `ray.put` and one
`get` per actor; on one node that is shared memory, across nodes every actor pulls its own copy.

A group cannot take a new member: when an actor is replaced (it died), the group is formed again,
with every actor, under a new generation (a key prefix of the same store) before the next version
goes out; the replacement itself loads the version it needs through the object store.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=10)  # an actor busy with a long rollout joins the broadcast late


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a state dict lies in the flat buffers (one per dtype, keys in order)."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, state: dict[str, torch.Tensor]) -> Layout:
        return cls(tuple((k, tuple(state[k].shape), state[k].dtype) for k in sorted(state)))

    @property
    def dtypes(self) -> list[torch.dtype]:
        return sorted({dtype for _, _, dtype in self.entries}, key=str)

    @property
    def nbytes(self) -> int:
        return sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in self.entries)

    def flatten(self, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [
            torch.cat([state[k].detach().reshape(-1).cpu() for k, _, d in self.entries if d == dtype])
            for dtype in self.dtypes
        ]

    def empty(self) -> list[torch.Tensor]:
        sizes = {dtype: 0 for dtype in self.dtypes}
        for _, shape, dtype in self.entries:
            sizes[dtype] += torch.Size(shape).numel()
        return [torch.empty(sizes[dtype], dtype=dtype) for dtype in self.dtypes]

    def unflatten(self, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out, offsets = {}, dict.fromkeys(self.dtypes, 0)
        by_dtype = dict(zip(self.dtypes, buffers, strict=True))
        for key, shape, dtype in self.entries:
            n = torch.Size(shape).numel()
            out[key] = by_dtype[dtype][offsets[dtype] : offsets[dtype] + n].view(shape)
            offsets[dtype] += n
        return out


def host_store(port: int) -> dist.TCPStore:
    """The learner's store (it listens on every interface; actors on other nodes connect to it)."""
    return dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False, timeout=TIMEOUT)


class WeightGroup:
    """One generation of the group: rank 0 the learner (the source), ranks 1.. the actors. Forming
    it blocks until every rank has joined."""

    def __init__(self, store: dist.Store | None, host: str, port: int, rank: int, size: int, generation: int):
        if store is None:  # an actor: a client of the learner's store
            store = dist.TCPStore(host, port, is_master=False, timeout=TIMEOUT)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(f"weights/{generation}", store), rank, size, TIMEOUT)

    def broadcast(self, buffers: list[torch.Tensor]) -> None:
        """Rank 0's buffers into every other rank's (in place)."""
        for buffer in buffers:
            self.pg.broadcast(buffer, 0).wait()
