"""The device mesh of a training run, from the `parallel` config section.

Every rank is a data-parallel rank; the mesh says how FSDP2 shards over them:

    replicate × shard = the world size (ray.num_workers)

- `replicate=1`: a 1-D mesh `("shard",)`, plain FSDP2 over every rank;
- `replicate>1`: a 2-D mesh `("replicate", "shard")`, HSDP: each block's weights are sharded
  over the `shard` ranks of a group and replicated across groups; the gradients are
  reduce-scattered inside a group and all-reduced across groups, once per optimizer step.

With `expert=E > 1` (expert parallel) each shard group is split further, into `shard/E` groups of
`E` consecutive ranks: the `shard` dimension unflattens into `("efsdp", "expert")`, the routed experts of every
MoE layer are spread over the `expert` ranks (DTensors sharded on the expert index; tokens go to
them and back by all-to-all, generalmodel/train/expert_parallel.py), and FSDP2 shards each rank's
experts over `efsdp` (replicated over `replicate`), as torchtitan does; every other weight is
sharded over `shard` as without experts.

Ranks `g·shard … (g+1)·shard − 1` form shard group `g` (torch's `init_device_mesh` lays the
last dimension fastest). Ray Train numbers its workers node by node (`NODE_RANK`, then
`LOCAL_RANK`), so with `shard` = the workers of a node, a group is a node and only the gradient
all-reduce crosses the network; `parallel.shard_within_node` makes that a checked promise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from generalmodel import UserError
from generalmodel.config import Config, ParallelConfig


@dataclass(frozen=True)
class MeshShape:
    replicate: int
    shard: int
    expert: int = 1  # expert-parallel ranks inside each shard group

    @property
    def world(self) -> int:
        return self.replicate * self.shard

    @property
    def dims(self) -> tuple[tuple[str, int], ...]:
        """(name, size) of each dimension of the mesh FSDP2 shards over, outermost first."""
        shard = ("shard", self.shard)
        return (("replicate", self.replicate), shard) if self.replicate > 1 else (shard,)

    def describe(self) -> str:
        if self.world == 1:
            return "one process"
        mesh = (
            f"FSDP over {self.shard} ranks"
            if self.replicate == 1
            else f"HSDP: {self.replicate} replicas x {self.shard} shards"
        )
        return mesh + (f", experts over {self.expert} ranks" if self.expert > 1 else "")


def mesh_shape(parallel: ParallelConfig, world: int) -> MeshShape:
    """The mesh for `world` ranks; a UserError naming the keys when it cannot be laid out."""
    replicate, shard = parallel.replicate, parallel.shard
    if replicate == -1:
        replicate = _rest(world, "shard", shard, "replicate")
    elif shard == -1:
        shard = _rest(world, "replicate", replicate, "shard")
    if replicate * shard != world:
        raise UserError(
            f"parallel.replicate={replicate} x parallel.shard={shard} = {replicate * shard} ranks, "
            f"but there are {world} train workers (ray.num_workers): the product must equal it"
        )
    if shard % parallel.expert:
        raise UserError(
            f"parallel.expert={parallel.expert} does not divide parallel.shard={shard}: an expert group lies "
            f"inside a shard group (so inside a node when a shard group is a node)"
        )
    return MeshShape(replicate, shard, parallel.expert)


def _rest(world: int, given: str, degree: int, free: str) -> int:
    if world % degree:
        raise UserError(
            f"parallel.{given}={degree} does not divide the {world} train workers (ray.num_workers), "
            f"so parallel.{free}=-1 has no whole value"
        )
    return world // degree


def world_sizes(cfg: Config) -> list[int]:
    """The worker-group sizes a run may have: ray.num_workers, or every size from ray.min_workers
    up to it for an elastic run."""
    low = cfg.ray.min_workers or cfg.ray.num_workers
    return list(range(low, cfg.ray.num_workers + 1))


def check_world_sizes(cfg: Config) -> MeshShape:
    """Before any worker starts: every size the group may take has a mesh and keeps the global
    batch (elastic runs). Returns the mesh at ray.num_workers."""
    top = cfg.ray.num_workers
    units = top * cfg.train.grad_accum  # micro-batches per optimizer step, all ranks together
    for world in world_sizes(cfg):
        if world != top:
            try:
                mesh_shape(cfg.parallel, world)
            except UserError as e:
                why = f"ray.min_workers={cfg.ray.min_workers}: a group of {world} workers has no mesh"
                raise UserError(f"{why}: {e}") from None
        if units % world:
            fine = min(w for w in range(1, top + 1) if all(units % v == 0 for v in range(w, top + 1)))
            raise UserError(
                f"ray.min_workers={cfg.ray.min_workers}: a group of {world} workers cannot keep the global batch "
                f"of {units} micro-batches (ray.num_workers x train.grad_accum = {top} x {cfg.train.grad_accum}); "
                f"use ray.min_workers>={fine}, or a train.grad_accum that every size divides"
            )
    return mesh_shape(cfg.parallel, cfg.ray.num_workers)


def for_world(cfg: Config, world: int) -> Config:
    """The config a rank of a group of `world` workers trains with: train.grad_accum scaled so the
    global batch is the one of ray.num_workers workers (an elastic group smaller than that)."""
    if world == cfg.ray.num_workers:
        return cfg
    units = cfg.ray.num_workers * cfg.train.grad_accum  # check_world_sizes has made sure `world` divides it
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": units // world})})


def check_node_capacity(parallel: ParallelConfig, shape: MeshShape, workers_per_node: list[int]) -> None:
    """Before any worker starts: with parallel.shard_within_node, some node must hold a whole
    shard group (`workers_per_node`: how many train workers each node of the cluster can hold)."""
    if not parallel.shard_within_node or shape.shard == 1 or not workers_per_node:
        return
    most = max(workers_per_node)
    if shape.shard > most:
        raise UserError(
            f"parallel.shard={shape.shard} with parallel.shard_within_node=true, but no node of the Ray "
            f"cluster holds more than {most} train workers (its nodes hold {sorted(workers_per_node, reverse=True)}): "
            f"a shard group would span nodes. Use parallel.shard<={most} (and more replicas), or turn "
            f"parallel.shard_within_node off"
        )


@dataclass(frozen=True)
class ExpertMeshes:
    """The meshes of expert parallelism (submeshes of one root mesh)."""

    expert: Any  # ("expert",): the ranks one layer's routed experts are spread over
    fsdp: Any  # what FSDP2 shards each rank's experts over: ("efsdp",), or ("replicate", "efsdp") for HSDP


def build_mesh(shape: MeshShape, device: torch.device) -> tuple[Any, ExpertMeshes | None]:
    """The DeviceMesh FSDP2 shards the model over (None for one process) and, with expert
    parallelism, the experts' meshes. Needs the default process group."""
    if shape.world == 1:
        return None, None
    from torch.distributed.device_mesh import init_device_mesh

    names, sizes = zip(*shape.dims, strict=True)
    mesh = init_device_mesh(device.type, sizes, mesh_dim_names=names)
    if shape.expert == 1:
        return mesh, None
    # The shard dimension split in two, the expert ranks innermost (consecutive ranks, so on one node).
    split = mesh._unflatten("shard", (shape.shard // shape.expert, shape.expert), ("efsdp", "expert"))
    fsdp = split["replicate", "efsdp"] if shape.replicate > 1 else split["efsdp"]
    return mesh, ExpertMeshes(split["expert"], fsdp)


def shard_group_nodes(mesh, node_rank: int) -> list[int]:
    """The node rank of every rank of this rank's shard group (a collective over that group)."""
    group = mesh.get_group("shard")
    mine = torch.tensor([node_rank], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [int(t) for t in everyone]


def check_groups_within_node(parallel: ParallelConfig, mesh, rank: int, node_rank: int) -> None:
    """On the workers: with parallel.shard_within_node, every shard group lies on one node."""
    if mesh is None or not parallel.shard_within_node:
        return
    nodes = shard_group_nodes(mesh, node_rank)
    if len(set(nodes)) > 1:
        raise UserError(
            f"parallel.shard_within_node: rank {rank}'s shard group spans nodes {sorted(set(nodes))} "
            f"(node rank of each of its ranks: {nodes}); Ray Train placed the workers so that a node "
            f"does not hold whole groups: give parallel.shard = the train workers per node"
        )
