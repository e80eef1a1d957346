"""The model zoo's registry: names → (config class, builder, FSDP2 sharding), the named presets,
and `LanguageModel`, what the training loop, the sampler and the exporters need of a model.

Pure PyTorch, single-device model code; sharding is applied from outside the model
(`ModelSpec.shard`), in the order the platform's `generalmodel.train.parallelize` owns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from models.blt import BLT, BLTConfig
from models.decoder import Decoder, DecoderConfig
from models.deepseek import DeepSeekConfig
from models.gpt2 import GPT2Config
from models.llama import LlamaConfig
from models.moe import MoE
from models.moeut import MoEUT, MoEUTConfig, fsdp_whole


def fsdp_decoder(model: Decoder, mesh=None, mp_policy=None, expert_mesh=None) -> Decoder:
    """FSDP2: shard each block, then the root (embeddings, final norm, head). `expert_mesh`: the
    routed experts are DTensors over an expert axis already (expert parallel) and are sharded
    over this mesh instead, in a unit of their own; the router and the shared experts stay in
    their block's, as torchtitan's `parallelize_deepseekv3` does. Within the MoE layer's backward
    the only collectives are then on the routed path (all-to-all, the experts' all-gather and
    reduce-scatter), in one order on every rank."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.blocks:
        moe_layers = [m for m in block.modules() if isinstance(m, MoE)] if expert_mesh is not None else []
        for moe in moe_layers:
            experts = fully_shard(moe.experts, **{**kwargs, "mesh": expert_mesh})
            # An expert's gradient arrives summed over the tokens of its expert group's ranks:
            # the mean over all ranks divides by the world size (expert_mesh has world / E ranks).
            experts.set_gradient_divide_factor(float(mesh.size()))
            # A reduce-scatter as a plain sum and one division after (gloo has no PREMUL_SUM); not
            # over a single rank, where FSDP2 (torch 2.13) would divide twice.
            experts.set_force_sum_reduction_for_comms(expert_mesh.size(expert_mesh.ndim - 1) > 1)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@runtime_checkable
class LanguageModel(Protocol):
    """What a registered builder returns. `forward(idx (B, T), cache=None) -> logits (B, T, vocab)`."""

    cfg: DecoderConfig
    blocks: nn.ModuleList  # the repeated units: activation checkpointing, regional compile, FSDP2

    def __call__(
        self,
        idx: torch.Tensor,
        cache=None,
        *,
        targets=None,
        loss_chunk: int = 0,
        docs=None,
        select=None,
        per_token=False,
    ) -> torch.Tensor:
        """With `targets`: the summed loss (or, `select`, Rho-1's selected part; `per_token`, each
        target's loss without a gradient) instead of the logits; see models.decoder.Decoder.forward."""

    def aux_loss(self) -> torch.Tensor | None:
        """A loss term of the last forward to add to the training loss (MoE balance), or None."""

    def after_optimizer_step(self, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Called after every optimizer step (MoE routing biases; `keep` 0: the step was skipped);
        returns metrics to log as device tensors (the loop reads them at log steps only)."""

    def num_params(self, embeddings: bool = True, active: bool = False) -> int: ...

    def layer_modules(self) -> nn.Module:
        """The modules owning the blocks' parameters (`blocks`, or a shared-layer model's units)."""

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token over the active parameters (for MFU)."""


@dataclass(frozen=True)
class ModelSpec:
    config_cls: type[DecoderConfig]
    build: Callable[[DecoderConfig], LanguageModel]
    shard: Callable[..., nn.Module]  # FSDP2: (model, mesh=None, mp_policy=None, expert_mesh=None) -> model


REGISTRY: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(GPT2Config, Decoder, fsdp_decoder),
    "llama": ModelSpec(LlamaConfig, Decoder, fsdp_decoder),
    "deepseek": ModelSpec(DeepSeekConfig, Decoder, fsdp_decoder),
    "moeut": ModelSpec(MoEUTConfig, MoEUT, fsdp_whole),
    "blt": ModelSpec(BLTConfig, BLT, fsdp_decoder),
}

# Named presets: `--model.preset=NAME` (fields given beside it override the preset's).
_TINY = dict(vocab_size=8192, max_seq_len=256, n_layers=4, n_heads=4, d_model=192, tie_embeddings=True)
_124M = dict(vocab_size=50304, max_seq_len=1024, n_layers=12, n_heads=12, d_model=768, tie_embeddings=True)
_BYTES = dict(vocab_size=263, max_seq_len=1024, n_layers=4, n_heads=4, n_kv_heads=2, d_model=192, tie_embeddings=True)
PRESETS: dict[str, DecoderConfig] = {
    "gpt2-tiny": GPT2Config(**_TINY),
    "llama-tiny": LlamaConfig(**_TINY, n_kv_heads=2),
    "mla-tiny": LlamaConfig(**_TINY, attention="mla", kv_lora_rank=32, qk_rope_head_dim=16),
    "moe-tiny": LlamaConfig(**_TINY, n_kv_heads=2, moe_experts=8, moe_top_k=2),
    "deepseek-tiny": DeepSeekConfig(**_TINY, kv_lora_rank=32, qk_rope_head_dim=16, moe_experts=8, moe_top_k=2),
    "hybrid-tiny": LlamaConfig(**_TINY, n_kv_heads=2, window=64, global_every=2),
    "kvshare-tiny": LlamaConfig(**_TINY, n_kv_heads=2, kv_share_group=2),
    # Block 1's MLP becomes a memory: 32² = 1024 slots, 4 heads × 16 retrieved (or 1024 PEER experts).
    "memory-tiny": LlamaConfig(**_TINY, n_kv_heads=2, memory_layers=(1,)),
    "peer-tiny": LlamaConfig(**_TINY, n_kv_heads=2, memory_layers=(1,), memory_kind="peer", memory_top_k=8),
    # UltraMem in block 1: 64² = 4096 virtual slots read through 4 projectors from memory-tiny's
    # 1024 × 192 physical table; rank-2 Tucker cores; 4 heads × 16 retrieved.
    "ultramem-tiny": LlamaConfig(
        **_TINY, n_kv_heads=2, memory_layers=(1,), memory_kind="ultramem", memory_keys=64, memory_expansion=4
    ),
    # Sliding windows of 64 in every block, and block 1 also reads what has left its window
    # (models/longmem.py): one linear memory per head (Infini-attention), or the 32 best-matching
    # past keys/values (Memorizing Transformers). Trained on rows of 256, they read 4096 tokens.
    "infini-tiny": LlamaConfig(
        **{**_TINY, "max_seq_len": 4096}, n_kv_heads=2, window=64, long_memory="compressive", long_memory_layers=(1,)
    ),
    "memorizing-tiny": LlamaConfig(
        **{**_TINY, "max_seq_len": 4096}, n_kv_heads=2, window=64, long_memory="knn", long_memory_layers=(1,)
    ),
    # MoEUT (models/moeut.py): 2 shared layers used twice each; SwitchHead with 4 value/output
    # experts per head (top-1), σ-MoE with 16 ReLU experts of 160 (top-4): about llama-tiny's
    # active FLOPs per token with 1.34x its parameters.
    "moeut-tiny": MoEUTConfig(**_TINY),
    # Byte Latent Transformer (models/blt.py) over a bytes dataset (263 ids: 7 specials + 256 bytes),
    # 1024 bytes a row: llama-tiny's latent shape over patches, a byte encoder (1 block) and decoder
    # (2 blocks) of width 96. Entropy patches (blt-tiny: the job loads model.entropy_model, a byte
    # llama of 2 × 64 trained first) or a patch every 4 bytes (blt-static-tiny).
    "blt-tiny": BLTConfig(**_BYTES, patching="entropy", entropy_threshold=2.0),
    "blt-static-tiny": BLTConfig(**_BYTES, patching="static"),
    "gpt2-124m": GPT2Config(**_124M),
    "llama-124m": LlamaConfig(**_124M),
    "llama-350m": LlamaConfig(**{**_124M, "n_layers": 24, "n_heads": 16, "d_model": 1024}, n_kv_heads=4),
    "llama-1.3b": LlamaConfig(
        **{**_124M, "n_layers": 24, "n_heads": 16, "d_model": 2048, "max_seq_len": 2048}, n_kv_heads=4
    ),
    # fp8's home ground on one card: 4 layers at d=4096 (the GEMMs fp8 speeds up dominate).
    "llama-d4096": LlamaConfig(
        **{**_124M, "n_layers": 4, "n_heads": 32, "d_model": 4096, "max_seq_len": 2048}, n_kv_heads=8
    ),
    # llama-124m with block 6's MLP a memory of 512² = 262K values (+201M parameters; 4 heads × 32 read).
    "memory-124m": LlamaConfig(
        **_124M, memory_layers=(6,), memory_keys=512, memory_heads=4, memory_top_k=32, memory_key_dim=256
    ),
    # UltraMem's several smaller layers: blocks 3, 6 and 9 each 512² = 262K virtual slots over 65K
    # physical rows (+151M parameters in all; 4 heads × 32 read per layer).
    "ultramem-124m": LlamaConfig(
        **_124M,
        memory_layers=(3, 6, 9),
        memory_kind="ultramem",
        memory_keys=512,
        memory_heads=4,
        memory_top_k=32,
        memory_key_dim=256,
    ),
    # MoEUT at 124M: 2 shared layers used 6 times each; SwitchHead (4 experts per head, top-1),
    # σ-MoE with 64 ReLU experts of 384 (top-8): about llama-124m's active FLOPs and parameters.
    "moeut-124m": MoEUTConfig(**_124M, moe_experts=64, moe_top_k=8, moe_hidden=384),
    # BLT at llama-124m's latent shape over patches of 4 bytes (the GPU table's throughput row; its
    # entropy preset needs a trained entropy model), byte blocks of width 384, rows of 4096 bytes.
    "blt-static-124m": BLTConfig(
        **{**_124M, "vocab_size": 263, "max_seq_len": 4096},
        patching="static",
        local_d_model=384,
        local_heads=6,
        local_window=512,
        ngram_buckets=65536,
    ),
    # Llama 3 8B's shape (8.03B parameters): for planning a cluster run (benchmarks/scaling.py).
    "llama-8b": LlamaConfig(
        vocab_size=128256,
        max_seq_len=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_model=4096,
        ffn_hidden=14336,
        tie_embeddings=False,
        rope_theta=500000.0,
    ),
    # DeepSeek-V2-Lite's shape (15.7B total, 2.7B active): MLA, 64 routed experts top-6 + 2 shared.
    "deepseek-16b": DeepSeekConfig(
        vocab_size=102400,
        max_seq_len=4096,
        n_layers=27,
        n_heads=16,
        d_model=2048,
        ffn_hidden=10944,
        tie_embeddings=False,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        moe_experts=64,
        moe_top_k=6,
        moe_shared_experts=2,
        moe_hidden=1408,
        moe_first_dense=1,
    ),
    # ~124M active of ~0.4B total: MLA + 16 fine-grained experts, top-2, one shared.
    "deepseek-124m": DeepSeekConfig(
        **_124M,
        kv_lora_rank=256,
        q_lora_rank=None,
        qk_rope_head_dim=32,
        moe_experts=16,
        moe_top_k=2,
        moe_shared_experts=1,
        moe_hidden=768,
    ),
}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_model(cfg: DecoderConfig) -> LanguageModel:
    model = get_spec(cfg.name).build(cfg)
    assert isinstance(model, LanguageModel), f"the builder of {cfg.name!r} returned a {type(model).__name__}"
    return model
