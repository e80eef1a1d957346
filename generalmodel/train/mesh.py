"""The device mesh of a training run, from the `parallel` config section.

Every rank is a data-parallel rank; the mesh says how FSDP2 shards over them:

    replicate × shard × tensor = the world size (ray.num_workers)

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

With `tensor=T > 1` (tensor parallel, generalmodel/train/tensor_parallel.py) the mesh gains an
innermost `tensor` dimension: T consecutive ranks (one node) hold one data-parallel rank's model
split by heads and columns and see the same batch; FSDP2 shards over the other dimensions, so the
data-parallel world is replicate × shard (`MeshShape.data`).

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
    tensor: int = 1  # tensor-parallel ranks: one data-parallel rank's model split over them

    @property
    def data(self) -> int:
        """Data-parallel ranks: distinct batches per micro-step."""
        return self.replicate * self.shard

    @property
    def world(self) -> int:
        return self.data * self.tensor

    @property
    def dims(self) -> tuple[tuple[str, int], ...]:
        """(name, size) of each dimension of the mesh FSDP2 shards over, outermost first."""
        shard = ("shard", self.shard)
        return (("replicate", self.replicate), shard) if self.replicate > 1 else (shard,)

    def describe(self) -> str:
        if self.world == 1:
            return "one process"
        if self.data == 1:
            mesh = "no data parallel"
        elif self.replicate == 1:
            mesh = f"FSDP over {self.shard} ranks"
        else:
            mesh = f"HSDP: {self.replicate} replicas x {self.shard} shards"
        mesh += f", experts over {self.expert} ranks" if self.expert > 1 else ""
        return mesh + (f", tensor parallel over {self.tensor} ranks" if self.tensor > 1 else "")


def mesh_shape(parallel: ParallelConfig, world: int) -> MeshShape:
    """The mesh for `world` ranks; a UserError naming the keys when it cannot be laid out."""
    replicate, shard, tensor = parallel.replicate, parallel.shard, parallel.tensor
    if world % tensor:
        raise UserError(
            f"parallel.tensor={tensor} does not divide the {world} train workers (ray.num_workers): "
            f"every tensor-parallel group has {tensor} ranks"
        )
    data = world // tensor
    if replicate == -1:
        replicate = _rest(data, "shard", shard, "replicate", tensor)
    elif shard == -1:
        shard = _rest(data, "replicate", replicate, "shard", tensor)
    if replicate * shard * tensor != world:
        product = f"parallel.replicate={replicate} x parallel.shard={shard}"
        product += f" x parallel.tensor={tensor}" if tensor > 1 else ""
        raise UserError(
            f"{product} = {replicate * shard * tensor} ranks, but there are {world} train workers "
            f"(ray.num_workers): the product must equal it"
        )
    if shard % parallel.expert:
        raise UserError(
            f"parallel.expert={parallel.expert} does not divide parallel.shard={shard}: an expert group lies "
            f"inside a shard group (so inside a node when a shard group is a node)"
        )
    return MeshShape(replicate, shard, parallel.expert, tensor)


def _rest(data: int, given: str, degree: int, free: str, tensor: int) -> int:
    if data % degree:
        ranks = f"{data} train workers (ray.num_workers)"
        if tensor > 1:
            ranks = f"{data} data-parallel ranks ({data * tensor} train workers / parallel.tensor={tensor})"
        raise UserError(
            f"parallel.{given}={degree} does not divide the {ranks}, so parallel.{free}=-1 has no whole value"
        )
    return data // degree


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
    shard group with its tensor ranks (`workers_per_node`: how many train workers each node of the
    cluster can hold)."""
    group = shape.shard * shape.tensor
    if not parallel.shard_within_node or group == 1 or not workers_per_node:
        return
    most = max(workers_per_node)
    if group > most:
        size = f"parallel.shard={shape.shard}" + (f" x parallel.tensor={shape.tensor}" if shape.tensor > 1 else "")
        raise UserError(
            f"{size} with parallel.shard_within_node=true, but no node of the Ray "
            f"cluster holds more than {most} train workers (its nodes hold {sorted(workers_per_node, reverse=True)}): "
            f"a shard group would span nodes. Use parallel.shard<={most // shape.tensor} (and more replicas), or "
            f"turn parallel.shard_within_node off"
        )


@dataclass(frozen=True)
class ExpertMeshes:
    """The meshes of expert parallelism (submeshes of one root mesh)."""

    expert: Any  # ("expert",): the ranks one layer's routed experts are spread over
    fsdp: Any  # what FSDP2 shards each rank's experts over: ("efsdp",), or ("replicate", "efsdp") for HSDP


@dataclass(frozen=True)
class Meshes:
    """A run's device meshes (submeshes of one root mesh; all None in one process)."""

    fsdp: Any = None  # what FSDP2 shards over: ("shard",) or ("replicate", "shard"); None without data parallel
    experts: ExpertMeshes | None = None  # parallel.expert > 1
    tensor: Any = None  # ("tensor",): parallel.tensor > 1, the ranks one model is split over


def build_mesh(shape: MeshShape, device: torch.device) -> Meshes:
    """The run's meshes: the one FSDP2 shards the model over, with expert parallelism the
    experts' meshes, with tensor parallelism the tensor ranks'. Needs the default process group."""
    if shape.world == 1:
        return Meshes()
    from torch.distributed.device_mesh import init_device_mesh

    dims = shape.dims + ((("tensor", shape.tensor),) if shape.tensor > 1 else ())  # tensor ranks innermost
    names, sizes = zip(*dims, strict=True)
    root = init_device_mesh(device.type, sizes, mesh_dim_names=names)
    fsdp = None if shape.data == 1 else root[tuple(name for name, _ in shape.dims)]
    tensor = root["tensor"] if shape.tensor > 1 else None
    if shape.expert == 1:
        return Meshes(fsdp, None, tensor)
    # The shard dimension split in two, the expert ranks innermost (consecutive ranks, so on one node).
    split = root._unflatten("shard", (shape.shard // shape.expert, shape.expert), ("efsdp", "expert"))
    experts_fsdp = split["replicate", "efsdp"] if shape.replicate > 1 else split["efsdp"]
    return Meshes(fsdp, ExpertMeshes(split["expert"], experts_fsdp), tensor)


def group_nodes(group, node_rank: int) -> list[int]:
    """The node rank of every rank of `group` (a collective over that group)."""
    mine = torch.tensor([node_rank], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [int(t) for t in everyone]


def check_groups_within_node(parallel: ParallelConfig, meshes: Meshes, rank: int, node_rank: int) -> None:
    """On the workers: with parallel.shard_within_node, every shard group and every tensor group
    lies on one node."""
    if not parallel.shard_within_node:
        return
    groups = [("shard", meshes.fsdp, "shard"), ("tensor", meshes.tensor, "tensor")]
    for kind, mesh, dim in groups:
        if mesh is None:
            continue
        nodes = group_nodes(mesh.get_group(dim), node_rank)
        if len(set(nodes)) > 1:
            raise UserError(
                f"parallel.shard_within_node: rank {rank}'s {kind} group spans nodes {sorted(set(nodes))} "
                f"(node rank of each of its ranks: {nodes}); Ray Train placed the workers so that a node "
                f"does not hold whole groups: give parallel.shard x parallel.tensor = the train workers per node"
            )
