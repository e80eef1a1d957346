"""Expert parallelism: the routed experts of every MoE layer spread over the ranks of a 1-D
device mesh (rank r holds experts r·E/W … (r+1)·E/W − 1), tokens sent to them and back with two
all-to-alls. Each rank routes its own tokens; the router, the shared experts and everything else
are data-parallel weights like any other, and the local experts' gradients come from every rank's
tokens routed to them. The result equals one process running the union of the ranks' batches
(tests/test_expert_parallel.py, tests/test_mesh.py).

The expert weights become DTensors sharded on the expert index (`Shard(0)`): checkpoints (DCP)
save them with their global shapes, so a run saved with experts over 2 ranks resumes with them over
4, or none, and exports to one process. FSDP2 then shards each rank's experts over the rest of its
data-parallel ranks (`models.registry.fsdp_decoder`, the mesh's `efsdp` dimension).

The all-to-all's split sizes are the one host sync of the layer (each rank learns how many rows
the others send). Apply before FSDP2 (`generalmodel.train.parallelize`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from models.moe import MoE, expert_counts


class ExpertParallel:
    def __init__(self, mesh):
        if mesh.ndim != 1:
            raise ValueError(f"expert parallelism takes a 1-D mesh, got {mesh}")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.world = mesh.size()

    def shard(self, moe: MoE) -> None:
        """Keep this rank's experts only, as the local shards of DTensors over the mesh."""
        if moe.n_experts % self.world:
            raise ValueError(f"{moe.n_experts} experts do not split over {self.world} ranks")
        per_rank = moe.n_experts // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        for name in ("w_up", "w_down"):
            local = getattr(moe.experts, name).detach()[mine].clone()
            setattr(moe.experts, name, nn.Parameter(DTensor.from_local(local, self.mesh, [Shard(0)], run_check=False)))
        moe.experts.sharded = True
        moe.expert_parallel = self

    def __call__(self, moe: MoE, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`rows` (M, d) sorted by their (global) `experts` → the experts' outputs, same order."""
        per_rank = moe.n_experts // self.world  # the experts this rank holds
        device = rows.device.type
        if torch.is_autocast_enabled(device):  # the experts compute in it anyway: half the bytes to send
            rows = rows.to(torch.get_autocast_dtype(device))
        send = expert_counts(experts, moe.n_experts).view(self.world, per_rank).sum(1)  # rows per owner
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()  # the host learns the split sizes
        arrived = _AllToAll.apply(rows, recv_sizes, send_sizes, self.group)
        theirs = experts.new_empty(sum(recv_sizes))
        dist.all_to_all_single(theirs, experts, recv_sizes, send_sizes, group=self.group)
        local = theirs - self.rank * per_rank
        by_expert = local.argsort(stable=True)
        done = moe.run_experts(arrived[by_expert], expert_counts(local, per_rank))  # this rank's experts
        done = done[by_expert.argsort()].type_as(rows)  # back to the order the rows arrived in
        return _AllToAll.apply(done, send_sizes, recv_sizes, self.group)


class _AllToAll(torch.autograd.Function):
    """Rows (M, d) split `sent` per rank → the rows the ranks sent here, `received` from each; the
    gradient goes back the way the rows came (the same exchange with the split sizes swapped)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, received: list[int], sent: list[int], group) -> torch.Tensor:
        ctx.received, ctx.sent, ctx.group = received, sent, group
        out = rows.new_empty(sum(received), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), received, sent, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.sent), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.sent, ctx.received, group=ctx.group)
        return back, None, None, None


def apply_expert_parallel(model: nn.Module, mesh) -> int:
    """Spread the routed experts of every MoE layer of `model` over the 1-D `mesh`; returns how
    many layers."""
    parallel = ExpertParallel(mesh)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        parallel.shard(moe)
    return len(layers)
