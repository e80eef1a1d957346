"""A decoder-only transformer assembled from parts chosen in its config: positions (learned or
RoPE), norm (LayerNorm without bias or RMSNorm), MLP (GELU 4× or SwiGLU), grouped KV heads,
tied or separate embeddings. `gpt2` and `llama` (models/gpt2.py, models/llama.py) are presets
of it. Single-device PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.common import CausalSelfAttention, KVCache, RMSNorm, matmul_flops_per_token, rope_tables


@dataclass
class DecoderConfig:
    name: str = "decoder"
    vocab_size: int = 8192
    max_seq_len: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA
    d_model: int = 256
    ffn_hidden: int | None = None  # None: 4·d (GELU) or the SwiGLU size 8/3·d rounded to 64
    positions: Literal["learned", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    # pydantic (the platform's config tree) validates this dataclass; unknown keys are errors.
    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        for field in ("vocab_size", "max_seq_len", "n_layers", "n_heads", "d_model"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={kv} must divide n_heads={self.n_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got d_model/n_heads={self.head_dim}")

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
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, bias: bool):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.hidden, bias=bias)
        self.down = nn.Linear(cfg.hidden, cfg.d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * value)
        return self.down(F.gelu(h, approximate="tanh"))


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, bias=False, layer=layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg, bias=False)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if cfg.positions == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("out_proj.weight", "down.weight")) else 1
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) token ids → logits (B, T, vocab). With a cache, idx continues it."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + T, device=idx.device))
        rope = None
        if self.cfg.positions == "rope":
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        for block in self.blocks:
            x = block(x, rope, cache)
        return self.head(self.final_norm(x))

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.embed.weight.numel() + (self.pos_embed.weight.numel() if self.pos_embed is not None else 0)
            if self.cfg.tie_embeddings:  # the tied head is a matmul: count it back
                n += self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        return matmul_flops_per_token(self.num_params(embeddings=False), self.cfg.n_layers, self.cfg.d_model, seq_len)
