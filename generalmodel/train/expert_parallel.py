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

from models.moe import MoE, _grouped_matmul, expert_counts


class ExpertParallel:
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shard(self, moe: MoE) -> None:
        """Keep this rank's experts only."""
        if moe.n_experts % self.world:
            raise ValueError(f"{moe.n_experts} experts do not split over {self.world} ranks")
        self.per_rank = moe.n_experts // self.world
        local = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        moe.w_up = nn.Parameter(moe.w_up.detach()[local].clone())
        moe.w_down = nn.Parameter(moe.w_down.detach()[local].clone())
        moe.expert_parallel = self

    def __call__(self, moe: MoE, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_to_all_single

        N, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # (token, choice) pairs by expert, so by the rank that owns it
        token_of = order // k
        experts = flat[order]
        send = expert_counts(flat, moe.n_experts).view(self.world, self.per_rank).sum(1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()  # the host learns the split sizes
        rows = all_to_all_single(
            x.new_empty(sum(recv_sizes), x.shape[1]), x[token_of], recv_sizes, send_sizes, group=self.group
        )
        theirs = experts.new_empty(sum(recv_sizes))
        dist.all_to_all_single(theirs, experts, recv_sizes, send_sizes, group=self.group)
        local = theirs - self.rank * self.per_rank
        by_expert = local.argsort(stable=True)
        counts = expert_counts(local, self.per_rank)
        gate, value = _grouped_matmul(rows[by_expert], moe.w_up, counts).chunk(2, dim=-1)
        done = _grouped_matmul(torch.nn.functional.silu(gate) * value, moe.w_down, counts)
        done = done[by_expert.argsort()].type_as(x)  # back to the order the rows arrived in
        back = all_to_all_single(x.new_empty(N * k, x.shape[1]), done, send_sizes, recv_sizes, group=self.group)
        back = back * gates.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, back)


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
