"""`gpt2`: the nanoGPT recipe — learned positions, LayerNorm without bias, GELU MLP 4×, tied
embeddings, SDPA causal attention. The reference every benchmark measures against."""

from dataclasses import dataclass
from typing import Literal

from models.decoder import DecoderConfig, MLPKind


@dataclass
class GPT2Config(DecoderConfig):
    name: Literal["gpt2"] = "gpt2"
    positions: Literal["learned", "rope"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: MLPKind = "gelu"
    tie_embeddings: bool = True
