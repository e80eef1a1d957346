"""`llama`: RoPE, RMSNorm, SwiGLU, grouped-query attention (`n_kv_heads`; 1 is MQA), optional
tied embeddings."""

from dataclasses import dataclass
from typing import Literal

from models.decoder import DecoderConfig, MLPKind


@dataclass
class LlamaConfig(DecoderConfig):
    name: Literal["llama"] = "llama"
    positions: Literal["learned", "rope"] = "rope"
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    mlp: MLPKind = "swiglu"
