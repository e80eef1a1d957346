"""Will the model fit? An estimate of a training worker's memory, made on the driver before any
worker starts, so that an impossible size is refused in seconds with the numbers, instead of
minutes later with Ray's out-of-memory text.

Per worker: fp32 parameters, gradients and AdamW's two moments (16 bytes per parameter, divided
by the ranks of a shard group under FSDP2 — all of them under FSDP, parallel.shard of them under
HSDP, whose replicas each hold a whole copy; under Muon the matrices keep one momentum instead, so
less), the full weights of the blocks FSDP2 has all-gathered (the one computing and the next,
prefetched: two of the largest block, in the compute dtype; under expert parallelism a block's
routed experts count 1/parallel.expert, the rank's own). Under tensor parallel the blocks'
linear layers, the token embedding and the head count 1/parallel.tensor before FSDP2's division
(the rest — norms, learned positions — is whole on every rank of the group), and so do the
activations (Korthikanti's 34·d/t
per token and layer with sequence parallel, (10 + 24/t)·d without) and the logits; plus
activations kept for the backward pass, after Korthikanti et al. (2022): at least 34·d bytes per
token and layer in 16-bit (twice that in fp32 on CPU; the 5·n_heads·T attention term is left out,
flash attention does not keep it),
only the block inputs (2·d) with full activation checkpointing, plus the logits and their
gradient (fp32) — of all B·T positions, or of one chunk of train.loss_chunk positions — and a
long-memory layer's far read (models/longmem.py), which is dense: its (B, heads, T, T) scores and
weights in fp32, 8·heads·T² bytes per row and memory layer (one layer's under full checkpointing). It is a
floor, not a bound: allocator slack, the compile cache and communication buffers come on top, so
only a model whose floor exceeds the memory is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from generalmodel.config import Config
from generalmodel.train.mesh import for_world, mesh_shape
from models import build_model
from models.moe import MoE

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    gathered_bytes: float = 0.0
    mesh: str = "one process"

    @property
    def total(self) -> float:
        held = self.params_bytes + self.grads_bytes + self.optimizer_bytes
        return held + self.gathered_bytes + self.activations_bytes

    def describe(self) -> str:
        return (
            f"{self.parameters / 1e6:,.1f}M parameters: weights {self.params_bytes / GIB:.1f} GiB + gradients "
            f"{self.grads_bytes / GIB:.1f} GiB + optimizer state ≤ {self.optimizer_bytes / GIB:.1f} GiB + "
            f"all-gathered blocks {self.gathered_bytes / GIB:.1f} GiB + activations "
            f"{self.activations_bytes / GIB:.1f} GiB = {self.total / GIB:.1f} GiB per worker ({self.mesh})"
        )


def estimate(cfg: Config, seq_len: int, world_size: int) -> MemoryEstimate:
    """The memory floor of one training worker (see the module docstring)."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_model(cfg.model)
    n = model.num_params()
    shape = mesh_shape(cfg.parallel, world_size)
    shard, t = shape.shard, shape.tensor  # FSDP2 shards weights, gradients and optimizer state over a shard group
    split = _split(model) if t > 1 else 0
    held = n - split + split / t  # on each rank of a tensor group
    m, B, T = cfg.model, cfg.train.batch_size, seq_len
    act_bytes = 2 if cfg.ray.use_gpu else 4  # bf16 autocast on GPU, fp32 on CPU
    # FSDP2's units: the blocks, or the whole model for one whose layers share parameters (moeut).
    units = [model] if getattr(model, "fsdp_whole", False) else model.blocks
    largest_block = max((_gathered(unit, shape.expert, t) for unit in units), default=0)
    gathered = 2 * largest_block * act_bytes if shard > 1 else 0  # bf16 params under FSDP2's mixed precision
    if cfg.train.activation_checkpointing == "full":  # the block inputs (split along the sequence: 1/t)
        per_token_layer = 2 * m.d_model * act_bytes / 2 / (t if cfg.parallel.sequence_parallel else 1)
    else:
        kept = 34 / t if cfg.parallel.sequence_parallel else 10 + 24 / t
        per_token_layer = kept * m.d_model * act_bytes / 2
    logit_rows = min(cfg.train.loss_chunk, B * T) if cfg.train.loss_chunk else B * T
    activations = B * T * m.n_layers * per_token_layer + 2 * logit_rows * m.vocab_size / t * 4
    memory_layers = len(m.long_memory_layers) if m.long_memory != "none" else 0
    if cfg.train.activation_checkpointing == "full":
        memory_layers = min(memory_layers, 1)
    activations += memory_layers * B * m.n_heads * T * T * 8
    per_rank = held / shard
    return MemoryEstimate(n, 4 * per_rank, 4 * per_rank, 8 * per_rank, activations, gathered, shape.describe())


def _split(module) -> int:
    """Parameters tensor parallel splits: every linear layer (of the blocks: MLA, MoE and memory
    layers, which it refuses, aside; the head) and the token embedding (a tied head counted once)."""
    linears = {p for sub in module.modules() if isinstance(sub, nn.Linear) for p in sub.parameters()}
    embed = getattr(module, "embed", None)
    if embed is not None:
        linears.add(embed.weight)
    return sum(p.numel() for p in linears)


def _gathered(block, expert: int, tensor: int = 1) -> int:
    """The parameters of `block` a rank holds whole while it computes: all of them, but only its
    1/expert of the routed experts under expert parallelism (FSDP2 gathers those over `efsdp`) and
    1/tensor of its linear layers under tensor parallelism."""
    experts = sum(p.numel() for m in block.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    whole = sum(p.numel() for p in block.parameters()) - experts + experts // expert
    return whole - _split(block) + _split(block) // tensor if tensor > 1 else whole


def check_fits(cfg: Config, seq_len: int, memory_per_worker: float | None) -> MemoryEstimate:
    """A UserError when the estimate exceeds the memory a worker has (CPU workers; GPU memory is not
    known on the driver, so GPU runs are estimated and logged only)."""
    from generalmodel import UserError

    world = cfg.ray.min_workers or cfg.ray.num_workers  # an elastic run's smallest group holds the most per rank
    est = estimate(for_world(cfg, world), seq_len, world)
    if memory_per_worker and not cfg.ray.use_gpu and est.total > memory_per_worker:
        raise UserError(
            f"the model does not fit: {est.describe()}, but each of the {cfg.ray.num_workers} workers has about "
            f"{memory_per_worker / GIB:.1f} GiB (the Ray cluster's memory / ray.num_workers). Use a smaller model, "
            f"a smaller train.batch_size (with train.grad_accum to keep the global batch), "
            f"--train.activation_checkpointing=full, or more workers/nodes"
        )
    return est
