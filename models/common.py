"""Pieces shared by the decoder models: RMSNorm, RoPE, the FLOP count (the KV cache: models/cache.py).

Single-device PyTorch; parallelism (FSDP2) is applied from outside (see models/__init__.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, each (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, n_heads, T, head_dim); cos/sin: (T, head_dim // 2), or (B, T, head_dim // 2) when each
    row is at its own position. Rotates pairs (x1, x2) of halves."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def matmul_flops_per_token(n_params_matmul: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention scores
    (PaLM appendix B: 6·N + 12·L·d·T, causal halving ignored as is customary)."""
    return 6 * n_params_matmul + 12 * n_layers * d_model * seq_len
