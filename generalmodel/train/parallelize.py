"""The one place that decides how a built model is prepared for training, and in which order:

    move to the device → attention backend → fp8 linears (torchao) → expert parallel →
    tensor parallel → activation checkpointing → compile → FSDP2

torchao converts plain `nn.Linear`s, so fp8 comes first; activation checkpointing wraps whole
blocks (torch's `checkpoint_wrapper`, whose state-dict hooks keep parameter names unchanged);
compile then sees the wrapped blocks (regional: each block, one graph reused by every layer, and
the loss tail — final norm, head, cross-entropy; full: the whole model with its loss); FSDP2
shards each block and then the root, last, as torchtitan's `parallelize_llama` does (tensor
parallel before it: FSDP2 then shards the split weights over the data-parallel mesh as 2-D
DTensors). What to shard is the model's own knowledge (`ModelSpec.shard`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from generalmodel import UserError
from generalmodel.config import TrainConfig
from generalmodel.train import fp8
from generalmodel.train.expert_parallel import apply_expert_parallel
from generalmodel.train.mesh import ExpertMeshes
from generalmodel.train.tensor_parallel import apply_tensor_parallel
from models import LanguageModel, get_spec
from models.attention import CUDA_ONLY, set_backend

log = logging.getLogger(__name__)


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class StepHooks:
    """What the optimizer step calls around itself for the parallelism chosen."""

    before_step: Callable[[], None] = _nothing  # tensor parallel: the partial gradients summed (PartialGrads)
    after_step: Callable[[], None] = _nothing  # fp8 under FSDP2: the new weights' scales


def parallelize(
    model: LanguageModel,
    train: TrainConfig,
    device: torch.device,
    mesh=None,
    log_info: bool = True,
    seq_len: int | None = None,
    experts: ExpertMeshes | None = None,
    tensor=None,
    sequence_parallel: bool = True,
) -> StepHooks:
    """Prepare `model` in place; returns what to call around each optimizer step. `mesh`: the
    DeviceMesh FSDP2 shards over (generalmodel.train.mesh: 1-D FSDP, 2-D HSDP), None without
    data parallel. `seq_len`: the length of the training rows (train.attention=flex makes its
    block masks for it). `experts`: parallel.expert > 1, the routed experts' meshes. `tensor`:
    parallel.tensor > 1, the mesh of this rank's tensor group; `sequence_parallel` with it:
    parallel.sequence_parallel."""
    fsdp = mesh is not None
    after_step, before_step = _nothing, _nothing
    if train.attention in CUDA_ONLY and device.type != "cuda":
        raise UserError(f"train.attention={train.attention}: an SDPA backend of CUDA only; on {device} use auto")
    if train.attention == "flex" and device.type != "cuda":
        raise UserError("train.attention=flex: FlexAttention has no backward on CPU; use auto (or flash, math)")
    model.to(device)
    flex = set_backend(model, train.attention, seq_len)
    if log_info and train.attention == "flex":
        log.info("attention: FlexAttention in %d layers for rows of %s tokens; the others keep SDPA", flex, seq_len)
    if train.fp8 != "none":
        converted = fp8.convert(model, train.fp8, train.fp8_min_dim, fsdp)
        after_step = fp8.scale_precompute(model, train.fp8, fsdp)
        if log_info:
            log.info(
                "fp8 %s: %d linears converted (min dim %d); head, routers and MoE experts stay bf16",
                train.fp8,
                len(converted),
                train.fp8_min_dim,
            )
    if experts is not None:
        layers = apply_expert_parallel(model, experts.expert)
        if log_info:
            log.info(
                "expert parallel: the routed experts of %d MoE layers over %d ranks", layers, experts.expert.size()
            )
    if tensor is not None:
        before_step = _tensor_parallel(model, tensor, sequence_parallel, log_info)
    checkpoint_blocks(model, train.activation_checkpointing, train.ac_every)
    if train.compile == "regional":
        for block in model.blocks:
            block.compile()
        if hasattr(model, "lm_loss"):  # the tail: final norm, head, soft-cap, cross-entropy in one graph
            model.lm_loss = torch.compile(model.lm_loss)
    elif train.compile == "full":
        model.compile()
    if fsdp:
        _fully_shard(model, mesh, device, experts, log_info)
    return StepHooks(before_step, after_step)


def _tensor_parallel(model: LanguageModel, mesh, sequence_parallel: bool, log_info: bool) -> Callable[[], None]:
    partial_grads = apply_tensor_parallel(model, mesh, sequence_parallel)
    if log_info:
        log.info(
            "tensor parallel: %d blocks and the head over %d ranks%s",
            len(model.blocks),
            mesh.size(),
            ", the residual stream split along the sequence" if sequence_parallel else "",
        )
    return partial_grads


def _fully_shard(model: LanguageModel, mesh, device: torch.device, experts: ExpertMeshes | None, log_info: bool):
    """FSDP2 over `mesh` (bf16 parameters and fp32 gradient reduction on a GPU), the model's own plan."""
    if log_info:
        log.info("FSDP2 over the mesh %s", dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True)))
    mp = None
    if device.type == "cuda":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    expert_mesh = experts.fsdp if experts is not None else None
    get_spec(model.cfg.name).shard(model, mesh=mesh, mp_policy=mp, expert_mesh=expert_mesh)


def checkpoint_blocks(model: LanguageModel, mode: str, every: int) -> list[int]:
    """Activation checkpointing: `full` recomputes every block in backward, `selective` blocks
    0, k, 2k, ... (memory for speed in between); returns the indices of the wrapped blocks."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return []
    chosen = [i for i in range(len(model.blocks)) if mode == "full" or i % every == 0]
    for i in chosen:
        block: nn.Module = model.blocks[i]
        model.blocks[i] = checkpoint_wrapper(block)
    return chosen
