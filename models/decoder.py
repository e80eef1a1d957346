"""A decoder-only transformer assembled from parts chosen in its config: positions (learned or
RoPE), norm (LayerNorm without bias or RMSNorm), MLP (GELU 4×, SwiGLU, ReLU² 4×, or a DeepSeek
MoE after `moe_first_dense` dense layers), attention (grouped KV heads, or MLA), sliding-window
layers with a global layer every `global_every`, cross-layer KV sharing in groups of
`kv_share_group`, product-key memory layers (PKM, PEER or UltraMem) in place of the MLP of chosen
blocks (models/memory.py), a memory beyond the window on chosen sliding-window layers (compressive
or kNN, models/longmem.py), tied or separate embeddings, and the recipe switches QK-norm, value residual,
logit soft-capping and zero-initialised output projections. `gpt2`, `llama` and `deepseek`
(models/gpt2.py, llama.py, deepseek.py) are defaults of it. Single-device PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import Documents, GroupedQueryAttention, MultiHeadLatentAttention, init_linear
from models.cache import KVCache
from models.common import RMSNorm, matmul_flops_per_token, rope_tables
from models.hooks import HookPoint
from models.longmem import LongMemory
from models.loss import (
    Selection,
    capped_logits,
    linear_cross_entropy,
    selected_cross_entropy,
    token_losses,
    whole,
)
from models.memory import ProductKeyMemory, UltraMemory
from models.moe import MoE

MLPKind = Literal["gelu", "swiglu", "relu2"]


def _opt(default, help: str):
    """A config field with its description (shown by every job's --help)."""
    return field(default=default, metadata={"help": help})


@dataclass
class DecoderConfig:
    name: str = _opt("decoder", "The registered model (models/__init__.py REGISTRY).")
    vocab_size: int = _opt(8192, "Vocabulary size (the dataset's tokenizer decides it).")
    max_seq_len: int = _opt(256, "Longest sequence the model takes (positions, RoPE tables).")
    n_layers: int = _opt(4, "Transformer blocks.")
    n_heads: int = _opt(4, "Query heads; must divide d_model.")
    n_kv_heads: int | None = _opt(None, "Key/value heads (GQA): null = n_heads (MHA), 1 = MQA; must divide n_heads.")
    d_model: int = _opt(256, "Residual stream width.")
    ffn_hidden: int | None = _opt(
        None, "MLP hidden size; null: 4·d_model (GELU) or 8/3·d_model rounded to 64 (SwiGLU)."
    )
    positions: Literal["learned", "rope"] = _opt("rope", "Learned absolute positions or rotary embeddings.")
    norm: Literal["layernorm", "rmsnorm"] = _opt("rmsnorm", "LayerNorm (no bias) or RMSNorm.")
    mlp: MLPKind = _opt("swiglu", "Dense MLP kind (relu2: relu(x)², not gated).")
    tie_embeddings: bool = _opt(False, "Share the input embedding with the output head.")
    bias: bool = _opt(
        False, "Biases in the attention and MLP projections and LayerNorms (GPT-2 checkpoints have them)."
    )
    rope_theta: float = _opt(10000.0, "RoPE base frequency.")
    norm_eps: float = _opt(1e-5, "Norm epsilon.")
    init_std: float = _opt(0.02, "Std of the normal init; residual output projections get std/sqrt(2·n_layers).")
    # recipe switches from the speedrun literature (benchmarks/learning_efficiency.py measures them)
    qk_norm: bool = _opt(False, "RMS-normalise each head's query and key before RoPE (GQA attention).")
    value_residual: bool = _opt(
        False, "Value residual learning (arXiv 2410.17897): every layer mixes in the first layer's values."
    )
    logit_softcap: float | None = _opt(None, "Soft-cap the logits: c·tanh(logits / c); null: off.")
    zero_init: bool = _opt(False, "Zero-initialise the residual output projections (and an untied head).")
    embed_skip: bool = _opt(
        False, "Every block's input mixes in the embedding: x <- a_i*x + b_i*x0 (learned; 1 and 0 at init; speedrun)."
    )
    unet_skips: bool = _opt(
        False, "U-net skips: block n-1-i adds w_i times block i's output, i < n/2 (learned w_i, 1 at init; speedrun)."
    )
    value_embeds: int = _opt(
        0,
        "Value embeddings (speedrun): k token tables of the values' width; layers i and n-k+i (i < k) mix table i "
        "into their values, v <- a*v + b*ve (learned, 0.5 each at init). 0: off.",
    )
    # attention
    attention: Literal["gqa", "mla"] = _opt(
        "gqa", "gqa: MHA/GQA/MQA by n_kv_heads; mla: DeepSeek multi-head latent attention."
    )
    window: int | None = _opt(None, "Sliding window of local layers; null: every layer is global.")
    global_every: int = _opt(0, "With a window: every N-th layer (N, 2N, ...) is global; 0: none.")
    kv_share_group: int = _opt(1, "Adjacent layers per group reusing the first one's K/V (cross-layer KV sharing).")
    kv_lora_rank: int = _opt(64, "MLA: KV latent size (what the cache stores).")
    q_lora_rank: int | None = _opt(None, "MLA: query bottleneck; null: a full query projection.")
    qk_rope_head_dim: int = _opt(16, "MLA: the decoupled RoPE part of each head's query/key.")
    qk_nope_head_dim: int | None = _opt(None, "MLA: the non-RoPE part of each query/key head; null: head_dim.")
    v_head_dim: int | None = _opt(None, "MLA: value head size; null: head_dim.")
    # memory beyond the window (models/longmem.py)
    long_memory: Literal["none", "compressive", "knn"] = _opt(
        "none",
        "What the long_memory_layers read of the positions that left their window: compressive (Infini-attention: "
        "one linear memory per head) or knn (Memorizing Transformers: the top-k past keys/values); none: off.",
    )
    long_memory_layers: tuple[int, ...] = _opt((), "Sliding-window blocks with a long memory, e.g. [2].")
    long_memory_top_k: int = _opt(32, "knn: past entries each query reads.")
    long_memory_size: int | None = _opt(
        None, "knn: past entries a decoding row keeps per layer, oldest dropped first; null: all its context can hold."
    )
    # mixture of experts (0 experts: dense MLP everywhere)
    moe_experts: int = _opt(0, "Routed experts per MoE layer; 0: dense MLP everywhere.")
    moe_top_k: int = _opt(2, "Experts each token is routed to.")
    moe_shared_experts: int = _opt(1, "Always-on shared experts.")
    moe_hidden: int | None = _opt(
        None, "Hidden size per expert; null: the dense hidden / 4 rounded to 64 (fine-grained)."
    )
    moe_first_dense: int = _opt(1, "The first K layers keep a dense MLP.")
    moe_score: Literal["softmax", "sigmoid"] = _opt("sigmoid", "Router score function.")
    moe_bias_update_rate: float = _opt(1e-3, "Aux-loss-free balancing: routing-bias step per optimizer step.")
    moe_aux_loss_weight: float = _opt(0.0, "Weight of the sequence-wise balance loss; 0: off.")
    # memory layers (none: every block keeps its MLP)
    memory_layers: tuple[int, ...] = _opt((), "Blocks whose MLP is a product-key memory layer, e.g. [2].")
    memory_kind: Literal["pkm", "peer", "ultramem"] = _opt(
        "pkm",
        "pkm: a table of value vectors (Lample 2019); peer: single-neuron experts (He 2024); ultramem: "
        "Tucker-decomposed keys and implicitly expanded values (Huang 2024).",
    )
    memory_keys: int = _opt(32, "Sub-keys per half: N = memory_keys² value slots (pkm) or experts (peer).")
    memory_heads: int = _opt(4, "Memory query heads, each retrieving memory_top_k of the N slots.")
    memory_top_k: int = _opt(16, "Slots each head retrieves (exact top-k over all N keys).")
    memory_key_dim: int = _opt(64, "Query/key size per head (two halves of key_dim / 2).")
    memory_rank: int = _opt(2, "ultramem: rank of the Tucker core scoring each pair of sub-keys.")
    memory_expansion: int = _opt(4, "ultramem: projectors E; the physical table holds N / E rows.")
    memory_value_dim: int | None = _opt(None, "ultramem: width of the physical value rows; null: d_model.")
    memory_core_loss_weight: float = _opt(0.1, "ultramem: weight of the loss that keeps each core near rank one.")
    # how the model decodes
    continuous_thoughts: int = _opt(
        0,
        "Coconut (continuous thought): after the prompt and <|start-latent|>, this many steps feed the last hidden "
        "state back as the next input, then <|end-latent|>, then the answer (set by jobs/coconut.py). 0: off.",
    )
    quiet_star_thoughts: int = _opt(
        0,
        "Quiet-STaR: the model thinks this many tokens after every token, and a mixing head weighs the prediction "
        "after the thought against the one without (set by jobs/quiet_star.py). 0: off.",
    )

    # pydantic (the platform's config tree) validates this dataclass; unknown keys are errors.
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "n_layers", "n_heads", "d_model"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got d_model/n_heads={self.head_dim}")
        if self.window is not None and self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.global_every < 0 or (self.global_every and self.window is None):
            raise ValueError(f"global_every={self.global_every} needs a window and must be >= 0")
        if self.continuous_thoughts < 0 or self.quiet_star_thoughts < 0:
            raise ValueError(
                f"continuous_thoughts and quiet_star_thoughts must be >= 0, got {self.continuous_thoughts}, "
                f"{self.quiet_star_thoughts}"
            )
        if self.kv_share_group <= 0 or self.n_layers % self.kv_share_group:
            raise ValueError(f"kv_share_group={self.kv_share_group} must divide n_layers={self.n_layers}")
        if (self.qk_norm or self.value_residual) and self.attention != "gqa":
            raise ValueError("qk_norm and value_residual are switches of GQA attention (attention='gqa')")
        if self.value_residual and self.kv_share_group != 1:
            raise ValueError("value_residual needs each layer's own values (kv_share_group must be 1)")
        if self.value_embeds and (self.attention != "gqa" or self.kv_share_group != 1):
            raise ValueError("value_embeds mixes into each layer's own GQA values (attention='gqa', kv_share_group=1)")
        if not 0 <= 2 * self.value_embeds <= self.n_layers:
            raise ValueError(
                f"value_embeds={self.value_embeds}: each table serves a first and a last layer, so "
                f"2 x value_embeds must be at most n_layers={self.n_layers}"
            )
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive or null, got {self.logit_softcap}")
        if self.bias and (self.attention == "mla" or self.moe_experts):
            raise ValueError("bias=true is for dense GQA/MHA models (GPT-2 checkpoints); MLA and MoE have none")
        if self.attention == "mla":
            if self.positions != "rope":
                raise ValueError("attention='mla' needs positions='rope' (its decoupled RoPE key)")
            if self.kv_share_group != 1:
                raise ValueError("attention='mla' does not share K/V across layers (kv_share_group must be 1)")
            if self.kv_lora_rank <= 0 or self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
                raise ValueError("MLA needs kv_lora_rank > 0 and an even qk_rope_head_dim > 0")
        if self.memory_layers:
            bad = [i for i in self.memory_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"memory_layers {bad} are not blocks of this model (0..{self.n_layers - 1})")
            clash = [i for i in self.memory_layers if self.is_moe(i)]
            if clash:
                raise ValueError(f"memory_layers {clash} are MoE layers too; a block has one feed-forward")
            if self.memory_key_dim <= 0 or self.memory_key_dim % 2 or self.memory_heads <= 0:
                raise ValueError("memory_key_dim must be even and positive, memory_heads positive")
            if not 0 < self.memory_top_k <= self.memory_keys:
                raise ValueError(f"memory_top_k={self.memory_top_k} must be in 1..memory_keys={self.memory_keys}")
        ultramem_only = ("memory_rank", "memory_expansion", "memory_value_dim", "memory_core_loss_weight")
        ultra = {f.name: f.default for f in fields(self) if f.name in ultramem_only}
        if self.memory_kind != "ultramem" and any(getattr(self, k) != v for k, v in ultra.items()):
            changed = ", ".join(f"{k}={getattr(self, k)}" for k, v in ultra.items() if getattr(self, k) != v)
            raise ValueError(f"{changed}: UltraMem's fields, but memory_kind is {self.memory_kind!r}")
        if self.memory_kind == "ultramem":
            if self.memory_rank < 1 or self.memory_expansion < 1 or self.memory_keys**2 % self.memory_expansion:
                raise ValueError(
                    f"memory_rank={self.memory_rank} and memory_expansion={self.memory_expansion} must be positive, "
                    f"and memory_expansion must divide memory_keys² = {self.memory_keys**2}"
                )
            if (self.memory_value_dim is not None and self.memory_value_dim <= 0) or self.memory_core_loss_weight < 0:
                raise ValueError("memory_value_dim must be positive (or null), memory_core_loss_weight >= 0")
        self._check_long_memory()
        if self.moe_experts:
            if self.moe_experts < 2 or not 0 < self.moe_top_k <= self.moe_experts:
                raise ValueError(f"moe_top_k={self.moe_top_k} must be in 1..moe_experts={self.moe_experts}")
            if not 0 <= self.moe_first_dense <= self.n_layers:
                raise ValueError(f"moe_first_dense={self.moe_first_dense} must be in 0..n_layers={self.n_layers}")

    def _check_long_memory(self) -> None:
        if self.long_memory == "none":
            if self.long_memory_layers:
                raise ValueError(
                    f"long_memory_layers={list(self.long_memory_layers)} needs long_memory: compressive or knn"
                )
            return
        if not self.long_memory_layers:
            raise ValueError(f"long_memory={self.long_memory!r} needs long_memory_layers (the blocks that read it)")
        if self.attention != "gqa" or self.kv_share_group != 1:
            raise ValueError(
                "long_memory is a switch of GQA layers with their own K/V (attention='gqa', kv_share_group=1)"
            )
        bad = [i for i in self.long_memory_layers if not 0 <= i < self.n_layers or self.is_global(i)]
        if bad:
            raise ValueError(
                f"long_memory_layers {bad} must be sliding-window blocks of this model (0..{self.n_layers - 1}, a "
                f"window set and not a global layer): the memory holds what leaves the window"
            )
        knn_only = {f.name: f.default for f in fields(self) if f.name in ("long_memory_top_k", "long_memory_size")}
        changed = [f"{k}={getattr(self, k)}" for k, v in knn_only.items() if getattr(self, k) != v]
        if self.long_memory == "compressive" and changed:
            raise ValueError(f"{', '.join(changed)}: the knn memory's fields, but long_memory is 'compressive'")
        if self.long_memory_top_k <= 0 or (self.long_memory_size is not None and self.long_memory_size <= 0):
            raise ValueError(
                f"long_memory_top_k={self.long_memory_top_k} and long_memory_size={self.long_memory_size} must be "
                f"positive (size may be null)"
            )

    def tied_keys(self) -> list[str]:
        """State-dict keys that are another key's tensor (a tied head: the embedding's weight),
        left out of exports and rebuilt by the model."""
        return ["head.weight"] if self.tie_embeddings else []

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden or max(64, 64 * round(self.hidden / 4 / 64))

    def is_global(self, layer: int) -> bool:
        return self.window is None or (self.global_every > 0 and (layer + 1) % self.global_every == 0)

    def is_moe(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer >= self.moe_first_dense

    def value_embed_table(self, layer: int) -> int | None:
        """The value-embedding table `layer` mixes into its values (value_embeds), or None."""
        k = self.value_embeds
        if layer < k:
            return layer
        if layer >= self.n_layers - k:
            return layer - (self.n_layers - k)
        return None


def unused_fields(cfg: DecoderConfig, names: tuple[str, ...]) -> list[str]:
    """`name=value` for each of the DecoderConfig fields `names` that `cfg` sets away from its
    default: fields a model family does not read, which its config refuses by name."""
    base = {f.name: f.default for f in fields(DecoderConfig)}
    return [f"{k}={getattr(cfg, k)!r}" for k in names if getattr(cfg, k) != base[k]]


def _gate_unfused(module, state_dict, prefix, *args) -> None:
    """Weights saved when SwiGLU's gate and value were one projection (`up`, rows [gate | value],
    twice the hidden width) load as `gate` and `up`."""
    if f"{prefix}gate.weight" in state_dict:
        return
    for kind in ("weight", "bias"):
        fused = state_dict.get(f"{prefix}up.{kind}")
        if fused is not None and fused.shape[0] == 2 * module.up.out_features:
            state_dict[f"{prefix}gate.{kind}"], state_dict[f"{prefix}up.{kind}"] = fused.chunk(2, dim=0)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, bias: bool):
        super().__init__()
        self.kind = cfg.mlp
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU's gate and value projections are separate matrices (tensor parallel splits each
        # by columns); the other kinds have `up` only.
        self.gate = nn.Linear(cfg.d_model, cfg.hidden, bias=bias) if self.swiglu else None
        self.up = nn.Linear(cfg.d_model, cfg.hidden, bias=bias)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=bias)
        if self.swiglu:
            self._register_load_state_dict_pre_hook(_gate_unfused, with_module=True)

    def init_weights(self, std: float, residual_std: float) -> None:
        if self.gate is not None:
            init_linear(self.gate, std)
        init_linear(self.up, std)
        init_linear(self.down, residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * h)
        if self.kind == "relu2":
            return self.down(F.relu(h).square())
        return self.down(F.gelu(h, approximate="tanh"))


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def make_attention(cfg: DecoderConfig, layer: int) -> nn.Module:
    window = None if cfg.is_global(layer) else cfg.window
    if cfg.attention == "mla":
        return MultiHeadLatentAttention(
            cfg.d_model,
            cfg.n_heads,
            layer,
            cfg.kv_lora_rank,
            cfg.q_lora_rank,
            cfg.qk_nope_head_dim or cfg.head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim or cfg.head_dim,
            cfg.norm_eps,
            window,
        )
    owns_kv = layer % cfg.kv_share_group == 0
    memory = None
    if layer in cfg.long_memory_layers:
        memory = LongMemory(
            cfg.long_memory, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.long_memory_top_k, cfg.long_memory_size
        )
    return GroupedQueryAttention(
        cfg.d_model,
        cfg.n_heads,
        cfg.kv_heads,
        layer,
        window,
        owns_kv,
        bias=cfg.bias,
        shares_kv=cfg.kv_share_group > 1,
        qk_norm=cfg.qk_norm,
        value_residual=cfg.value_residual,
        norm_eps=cfg.norm_eps,
        value_embed=cfg.value_embed_table(layer) is not None,
        memory=memory,
    )


class ThoughtMixer(nn.Module):
    """Quiet-STaR's mixing head: how much the prediction after a thought counts against the one
    without, from both hidden states, w = sigmoid(z), z = v · relu(W [h_thought; h_base]) + b. v = 0
    and b = −3 at init: the model starts out trusting its thought-free prediction (w ≈ 0.05)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.hidden = nn.Linear(2 * d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def reset_parameters(self, std: float) -> None:
        init_linear(self.hidden, std)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.bias, -3.0)

    def forward(self, with_thought: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(..., d) and (..., d) → z (...), the logit of the weight of the prediction after the thought."""
        joint = F.relu(self.hidden(torch.cat([with_thought, base], dim=-1)))
        return self.out(joint).squeeze(-1) + self.bias


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = make_attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        if layer in cfg.memory_layers and cfg.memory_kind == "ultramem":
            self.mlp = UltraMemory(
                cfg.d_model,
                cfg.memory_keys,
                cfg.memory_heads,
                cfg.memory_top_k,
                cfg.memory_key_dim,
                cfg.memory_rank,
                cfg.memory_expansion,
                cfg.memory_value_dim,
                cfg.memory_core_loss_weight,
                cfg.norm_eps,
            )
        elif layer in cfg.memory_layers:
            self.mlp = ProductKeyMemory(
                cfg.d_model,
                cfg.memory_keys,
                cfg.memory_heads,
                cfg.memory_top_k,
                cfg.memory_key_dim,
                cfg.memory_kind,
                cfg.norm_eps,
            )
        elif cfg.is_moe(layer):
            self.mlp = MoE(
                cfg.d_model,
                cfg.expert_hidden,
                cfg.moe_experts,
                cfg.moe_top_k,
                cfg.moe_shared_experts,
                cfg.moe_score,
                cfg.moe_bias_update_rate,
                cfg.moe_aux_loss_weight,
            )
        else:
            self.mlp = MLP(cfg, bias=cfg.bias)
        # The residual stream and what each sublayer writes into it, all (B, T, d) (models/hooks.py).
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def init_weights(self, std: float, residual_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.attn.init_weights(std, residual_std)
        self.mlp_norm.reset_parameters()
        self.mlp.init_weights(std, residual_std)

    def forward(self, x, rope=None, cache=None, shared_kv=None, pos=None, docs=None, ve=None):
        """Returns (x, kv): the K/V this block's attention used, for the next layers of its
        KV-sharing group. `ve`: this layer's value embeddings of the tokens (value_embeds)."""
        x = self.hook_resid_pre(x)
        extra = {} if ve is None else {"ve": ve}
        h, kv = self.attn(self.attn_norm(x), rope, cache, shared_kv, pos, docs, **extra)
        x = self.hook_resid_mid(x + self.hook_attn_out(h))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.mlp_norm(x)))), kv


def inactive_params(module: nn.Module) -> int:
    """The parameters of `module` one token does not use: every sparse part's `inactive_params()`
    (the experts an MoE does not route it to, the memory rows it does not retrieve)."""
    return sum(m.inactive_params() for m in module.modules() if hasattr(type(m), "inactive_params"))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = self.make_blocks(cfg)
        # Learned scalars of the speedrun's skips, 1-D (FSDP2 shards dim 0): per block (a_i, b_i),
        # and one weight per U-net pair.
        self.x0_mix = nn.Parameter(torch.empty(2 * cfg.n_layers)) if cfg.embed_skip else None
        self.skip_weights = nn.Parameter(torch.empty(cfg.n_layers // 2)) if cfg.unet_skips else None
        kv_width = cfg.kv_heads * cfg.head_dim
        self.value_embeds = (
            nn.ModuleList(nn.Embedding(cfg.vocab_size, kv_width) for _ in range(cfg.value_embeds))
            if cfg.value_embeds
            else None
        )
        self.final_norm = make_norm(cfg)
        self.mixer = ThoughtMixer(cfg.d_model) if cfg.quiet_star_thoughts else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if cfg.positions == "rope":
            self.reset_rope()
        self.init_weights()

    def make_blocks(self, cfg: DecoderConfig) -> nn.ModuleList:
        """The n_layers blocks, in order (a shared-layer model makes its own: models/moeut.py)."""
        return nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))

    def layer_modules(self) -> nn.Module:
        """The modules that own the blocks' parameters (the blocks themselves here; the optimizer
        takes their matrices): a shared-layer model's blocks own none."""
        return self.blocks

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables, buffers that checkpoints do not hold (a loader that builds
        the model on the meta device calls this once it is real)."""
        cfg = self.cfg
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        device = self.embed.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def init_weights(self) -> None:
        """GPT-2 init, module by module: weights N(0, init_std); the projections that write into
        the residual stream (attention output, MLP and expert down projections) N(0, init_std /
        sqrt(2·n_layers)), so the stream's variance does not grow with depth; norms one.
        (Parameters are drawn in registration order: the same seed gives the same weights.)"""
        std = self.cfg.init_std
        residual_std = 0.0 if self.cfg.zero_init else std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, mean=0.0, std=std)
        for block in self.blocks:
            block.init_weights(std, residual_std)
        if self.x0_mix is not None:
            with torch.no_grad():
                self.x0_mix.copy_(torch.tensor([1.0, 0.0]).repeat(self.cfg.n_layers))
        if self.skip_weights is not None:
            nn.init.ones_(self.skip_weights)
        for table in self.value_embeds or ():
            nn.init.normal_(table.weight, mean=0.0, std=std)
        self.final_norm.reset_parameters()
        if self.mixer is not None:
            self.mixer.reset_parameters(std)
        if not self.cfg.tie_embeddings:
            init_linear(self.head, 0.0 if self.cfg.zero_init else std)

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        loss_chunk: int = 0,
        docs: torch.Tensor | None = None,
        select: Selection | None = None,
        per_token: bool = False,
        thoughts: tuple[torch.Tensor, torch.Tensor] | None = None,
        hidden: bool = False,
        layout: Documents | None = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids → logits (B, T, vocab), or (B, 1, vocab) for the last position
        only, or (N, vocab) for the N positions a (B, T) boolean `keep` marks (the head, often
        the costliest matmul of a small model, runs only there). With a cache
        (models/cache.py), idx continues each of its rows at that row's own position; the caller
        keeps within its capacity (`cache.reserve`). With `targets` (B, T) (-100: not supervised):
        the summed cross-entropy instead of the logits (`lm_loss`), so that a compiled model
        compiles its loss too; with `select` too, only over the targets Rho-1's selection keeps
        (models/loss.py); with `per_token`, each target's cross-entropy (B, T) without a gradient
        (0 where not supervised: a reference model's scores). `docs` (B, T): the document id of
        each token of packed rows (models.attention.document_ids; no cache): each document
        attends only within itself and its positions start at 0, as if it were alone in its row.
        `thoughts` (where (B, T) bool, states (N, d)): the N marked positions take these vectors
        as their input in place of their tokens' embeddings, in row-major order (Coconut's
        continuous thoughts; positions and value embeddings still come from idx). `hidden`: the
        final norm's output (B, T, d) — what the head reads, the "last hidden state" — instead of
        logits (with last_only, the last position's). `layout` (models.attention.Explicit; no
        cache): each token's position and which tokens it sees, given outright."""
        B, T = idx.shape
        pos = documents = None
        if cache is not None:
            if docs is not None:
                raise ValueError("docs (document masks) are for whole packed rows, not decoding with a cache")
            pos = where = cache.positions(T)  # (B, T)
        else:
            if T > self.cfg.max_seq_len and layout is None:  # a layout's positions are its maker's to keep
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
            documents = layout if layout is not None else None if docs is None else self._documents(docs)
            where = None if documents is None else documents.pos  # None: 0..T-1 in every row
        x = self.embed(idx)  # (B, T, d)
        if thoughts is not None:
            where_thought, states = thoughts
            x = x.masked_scatter(where_thought.unsqueeze(-1), states.to(x.dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=idx.device) if where is None else where)
        rope = None
        if self.cfg.positions == "rope":
            rope = (
                (self.rope_cos[:T], self.rope_sin[:T])
                if where is None
                else (self.rope_cos[where], self.rope_sin[where])
            )
        ves = [table(idx) for table in self.value_embeds] if self.value_embeds is not None else []
        x = self.run_blocks(x, rope, cache, pos, documents, ves)
        if cache is not None:
            cache.advance(T)
        if targets is not None:
            if per_token:
                return self.token_losses(x, targets, loss_chunk)
            return self.lm_loss(x, targets, loss_chunk, select)
        if last_only:
            x = x[:, -1:]
        elif keep is not None:
            x = x[keep]
        return self.final_norm(x) if hidden else self.unembed(x)

    def run_blocks(self, x, rope, cache, pos, documents, ves=()) -> torch.Tensor:
        """The blocks in order, with the speedrun's pieces when switched on: every block's input
        mixed with the embedding (`embed_skip`), block n−1−i adding block i's output (`unet_skips`,
        for i < n/2: the first half's outputs taken back in reverse order), and `ves`, the value
        embeddings of the tokens, each given to its layers (`value_embeds`)."""
        x0, skips = x, []
        n = len(self.blocks)
        half = n // 2 if self.skip_weights is not None else 0
        kv = None  # a block that reuses K/V returns the ones it was given
        for i, block in enumerate(self.blocks):
            if self.x0_mix is not None:
                x = self.x0_mix[2 * i] * x + self.x0_mix[2 * i + 1] * x0
            if i >= n - half:
                x = x + self.skip_weights[i - (n - half)] * skips.pop()
            table = self.cfg.value_embed_table(i) if ves else None
            x, kv = block(x, rope, cache, kv, pos, documents, None if table is None else ves[table])
            if i < half:
                skips.append(x)
        return x

    def _documents(self, docs: torch.Tensor) -> Documents:
        """The rows' documents with every layer's mask made here, once a batch (one per window),
        not in each layer (nor inside a compiled block)."""
        documents = Documents.of(docs)
        for block in self.blocks:
            flex = getattr(block.attn, "flex", None)
            if flex is not None and flex[0] == docs.shape[1] and not block.attn.eager:
                documents.block_mask(block.attn.window)
            else:
                documents.mask(block.attn.window)
            if block.attn.memory is not None:
                documents.far_mask(block.attn.window)
        return documents

    def logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the final norm's output (what `hidden=True` returns): the head and soft-cap."""
        return capped_logits(hidden, whole(self.head.weight), self.cfg.logit_softcap)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream (..., d) → logits: final norm, head, and the soft-cap if configured,
        c·tanh(head(x)/c) with 1/c folded into the head's weight (one pass fewer over the logits)."""
        return capped_logits(self.final_norm(x), whole(self.head.weight), self.cfg.logit_softcap)

    def lm_loss(
        self, x: torch.Tensor, targets: torch.Tensor, chunk: int = 0, select: Selection | None = None
    ) -> torch.Tensor:
        """The residual stream (B, T, d) and targets (B, T) → the summed next-token cross-entropy
        over the supervised targets (or those `select` keeps): `unembed`'s computation with the
        loss after it, all positions at once or `chunk` positions at a time (models/loss.py).
        Regional compile compiles this too (generalmodel.train.parallelize)."""
        x = self.final_norm(x).flatten(0, -2)
        if select is not None:
            head = whole(self.head.weight)  # tensor parallel: gathered (only the plain loss is vocab-parallel)
            return selected_cross_entropy(x, head, targets.flatten(), select, self.cfg.logit_softcap, chunk)
        return linear_cross_entropy(x, self.head.weight, targets.flatten(), self.cfg.logit_softcap, chunk)

    def token_losses(self, x: torch.Tensor, targets: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """The residual stream (B, T, d) and targets (B, T) → each target's cross-entropy (B, T), no gradient."""
        flat = token_losses(
            self.final_norm(x).flatten(0, -2), whole(self.head.weight), targets.flatten(), self.cfg.logit_softcap, chunk
        )
        return flat.view(targets.shape)

    def moe_layers(self) -> list[MoE]:
        # Looked up once: the training step calls aux_loss and after_optimizer_step every step.
        if not hasattr(self, "_moe_layers"):
            self._moe_layers = [m for m in self.modules() if isinstance(m, MoE)]
        return self._moe_layers

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary losses of the last forward: the MoE layers' sequence-wise balance losses and
        the UltraMem cores' rank-one penalties (None if none is on)."""
        if not hasattr(self, "_aux_layers"):
            self._aux_layers = self.moe_layers() + [m for m in self.modules() if isinstance(m, UltraMemory)]
        losses = [m.aux_loss for m in self._aux_layers if m.aux_loss is not None]
        return sum(losses) if losses else None

    def after_optimizer_step(self, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Nudge the MoE routing biases toward balance (not after a skipped step: `keep` 0);
        returns the worst layer's load imbalance, a device tensor (read it at log steps)."""
        stats = [m.update_bias(keep) for m in self.moe_layers()]
        return {"moe_max_over_mean_load": torch.stack(stats).max()} if stats else {}

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters; `active`: those one token uses (top-k of the routed experts, the retrieved
        rows of memory tables)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            n -= inactive_params(self)
        if not embeddings:
            n -= self.embed.weight.numel() + (self.pos_embed.weight.numel() if self.pos_embed is not None else 0)
            n -= sum(table.weight.numel() for table in self.value_embeds or ())
            if self.cfg.tie_embeddings:  # the tied head is a matmul: count it back
                n += self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token over the active parameters (MFU stays honest for MoE)."""
        active = self.num_params(embeddings=False, active=True)
        return matmul_flops_per_token(active, self.cfg.n_layers, self.cfg.d_model, seq_len)
