"""Tensor parallel for the dense blocks: Megatron's layout, with torch's DTensor parallel styles.

Over the ranks of a tensor group (`parallel.tensor`; the mesh's innermost dimension, so one
node), each block's attention is split by heads and its MLP by hidden columns:

    q_proj, k_proj, v_proj, gate, up    column-parallel: each rank computes its heads / columns
    out_proj, down                      row-parallel: the ranks' partial outputs summed (all-reduce)

so a block costs two all-reduces of its (B, T, d) output forward and two backward (the
column-parallel layers' input gradients). With sequence parallel (`parallel.sequence_parallel`,
the default; Korthikanti et al. 2022) the residual stream between those layers is split along
the sequence: each rank holds T/tensor positions of it, runs the norms and residual adds on them,
and each all-reduce becomes an all-gather of the split layers' input and a reduce-scatter of
their output (the same bytes), so those activations take 1/tensor of the memory. Without it the
residual stream, the norms and what runs between blocks are replicated: every rank of the group
computes them on the same batch. The embedding and the final norm see the whole sequence either
way (the split happens after the embedding, the gather before the final norm).

The token embedding and the head are split by vocabulary (`Shard(0)`; one parameter when tied):
a rank looks up the tokens in its rows and the ranks' partial embeddings are summed (one
all-reduce), and the training loss comes from each rank's slice of the logits (models/loss.py,
vocab-parallel cross-entropy: two all-reduces of a few numbers per position and chunk; no rank
holds all the logits); what needs whole logits (sampling, per-token scores) gathers the head's
weight.

Parameters that stay whole but act on a rank's own heads — QK-norm's weights, value residual's λ
— or, under sequence parallel, on its own positions — the blocks' norms, the speedrun's skip
weights — get a partial gradient on each rank of the group: `PartialGrads` sums them over it once
per optimizer step (after FSDP2's reduce-scatter; they are a few vectors per layer).

FSDP2 then shards every parameter over the data-parallel mesh: the split ones as 2-D DTensors
(data × tensor). Tensor parallel first, then activation checkpointing, compile and FSDP2, the
order torch's FSDP2 + TP composition and torchtitan's `parallelize_llama` use. What the config
refuses (MLA, MoE, memory layers, value embeddings, fp8, adapters) is named in
generalmodel/config/sections.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from models import LanguageModel


@dataclass
class PartialGrads:
    """The parameters a tensor rank uses on its own heads or positions only — (module, attribute
    name) pairs: FSDP2 replaces the parameter objects after this is made — and their group."""

    group: object = None
    params: list[tuple[nn.Module, str]] = field(default_factory=list)

    def __call__(self) -> None:
        """Sum their gradients over the tensor group (one all-reduce of all of them)."""
        grads = [_local(p.grad) for p in (getattr(m, name) for m, name in self.params) if p.grad is not None]
        if self.group is None or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        for g, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(summed.view_as(g))


def apply_tensor_parallel(model: LanguageModel, mesh, sequence_parallel: bool = True) -> PartialGrads:
    """Split `model`'s blocks and head over the 1-D `mesh` in place (every rank holds the same
    full model before: the same seed); returns what sums the partial gradients."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    partial = PartialGrads(mesh.get_group())
    # Under sequence parallel the row-parallel layers reduce-scatter along the sequence (dim 1).
    rowwise = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        plan = {"attn.q_proj": ColwiseParallel(), "attn.out_proj": rowwise}
        if attn.owns_kv:
            plan |= {"attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel()}
        plan |= {"mlp.up": ColwiseParallel(), "mlp.down": rowwise}
        if mlp.gate is not None:
            plan["mlp.gate"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                partial.params.append((norm, "weight"))
        if attn.v_mix is not None:
            partial.params.append((attn, "v_mix"))
        if sequence_parallel:
            for layer in (attn, mlp):  # its input gathered along the sequence, once for all its projections
                layer.register_forward_pre_hook(_gathered_input(mesh))
            for norm in (block.attn_norm, block.mlp_norm):
                partial.params += [(norm, name) for name, _ in norm.named_parameters()]
    if sequence_parallel:
        _split_sequence_between_blocks(model, mesh)
        partial.params += [(model, name) for name in ("x0_mix", "skip_weights") if getattr(model, name) is not None]
    # The token embedding split by vocabulary: each rank looks up the rows it holds, the ranks'
    # partial embeddings summed (an all-reduce; the gradient reaches only a rank's own rows).
    parallelize_module(model.embed, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if model.cfg.tie_embeddings:  # the head is the embedding: the same split parameter
        model.head.weight = model.embed.weight
    else:  # read by the loss as a weight (models/loss.py), not called: split by hand
        model.head.weight = nn.Parameter(distribute_tensor(model.head.weight.detach(), mesh, [Shard(0)]))
    return partial


def _gathered_input(mesh):
    """A forward pre-hook: the layer's first input, this rank's positions (B, T/t, d), as the whole
    sequence (a replicated DTensor the column-parallel projections take as it is). Backward: their
    partial input gradients summed and split along the sequence, one reduce-scatter."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(module, args):
        x = DTensor.from_local(args[0], mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])
        return (x, *args[1:])

    return hook


def _split_sequence_between_blocks(model: LanguageModel, mesh) -> None:
    """`model.run_blocks` on this rank's positions: its input (the embeddings, replicated) split
    along the sequence (backward: the gradient all-gathered, so the embedding sees every position's
    gradient on every rank), its output gathered (backward: this rank's part of the replicated
    gradient)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    inner, ranks = model.run_blocks, mesh.size()

    def run_blocks(x, *args, **kwargs):
        if x.shape[1] % ranks:
            raise ValueError(
                f"sequence parallel splits rows of {x.shape[1]} positions over parallel.tensor={ranks} ranks: "
                f"use rows of a multiple of {ranks} (data.seq_len) or parallel.sequence_parallel=false"
            )
        mine = DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(1)]).to_local()
        out = inner(mine, *args, **kwargs)
        return DTensor.from_local(out, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()]).to_local()

    model.run_blocks = run_blocks


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
