"""Expert parallelism: the routed experts of every MoE layer spread over the ranks of a process
group (rank r holds experts r·E/W … (r+1)·E/W − 1), tokens sent to them and back with two
all-to-alls. Each rank routes its own tokens; the router, the shared experts and everything else
stay replicated (their gradients are averaged like any data-parallel weight), the local experts'
gradients come from every rank's tokens routed to them. The result equals one process running the
union of the ranks' batches (tests/test_expert_parallel.py, 2 gloo ranks).

The all-to-all's split sizes are the one host sync of the layer (each rank learns how many rows
the others send). Apply before FSDP2, and keep FSDP off the expert weights (`expert_parameters`):
they are sharded already.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from models.moe import MoE, expert_counts


class ExpertParallel:
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shard(self, moe: MoE) -> None:
        """Keep this rank's experts only."""
        if moe.n_experts % self.world:
            raise ValueError(f"{moe.n_experts} experts do not split over {self.world} ranks")
        per_rank = moe.n_experts // self.world
        local = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        moe.w_up = nn.Parameter(moe.w_up.detach()[local].clone())
        moe.w_down = nn.Parameter(moe.w_down.detach()[local].clone())
        moe.expert_parallel = self

    def __call__(self, moe: MoE, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """`rows` (M, d) sorted by their (global) `experts` → the experts' outputs, same order."""
        from torch.distributed.nn.functional import all_to_all_single

        per_rank = moe.w_up.shape[0]  # the experts this rank holds
        send = expert_counts(experts, moe.n_experts).view(self.world, per_rank).sum(1)  # rows per owner
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()  # the host learns the split sizes
        arrived = all_to_all_single(
            rows.new_empty(sum(recv_sizes), rows.shape[1]), rows, recv_sizes, send_sizes, group=self.group
        )
        theirs = experts.new_empty(sum(recv_sizes))
        dist.all_to_all_single(theirs, experts, recv_sizes, send_sizes, group=self.group)
        local = theirs - self.rank * per_rank
        by_expert = local.argsort(stable=True)
        done = moe.run_experts(arrived[by_expert], expert_counts(local, per_rank))
        done = done[by_expert.argsort()].type_as(rows)  # back to the order the rows arrived in
        return all_to_all_single(rows.new_empty(rows.shape), done, send_sizes, recv_sizes, group=self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[nn.Parameter]:
    """Spread the experts of every MoE layer of `model` over `group`; returns the expert weights
    (to leave out of FSDP and out of the data-parallel gradient average)."""
    parallel = ExpertParallel(group)
    experts = []
    for module in model.modules():
        if isinstance(module, MoE):
            parallel.shard(module)
            experts += [module.w_up, module.w_down]
    return experts
