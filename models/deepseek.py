"""`deepseek`: DeepSeek-V2/V3-style — MLA attention and a DeepSeekMoE feed-forward (fine-grained
routed experts, shared experts, sigmoid scores, auxiliary-loss-free balancing) after one dense
layer; RoPE and RMSNorm as in llama, with DeepSeek-V3's norm epsilon (1e-6): the family exports as
transformers' `DeepseekV3ForCausalLM` (generalmodel/interop/deepseek.py)."""

from dataclasses import dataclass
from typing import Literal

from models.decoder import DecoderConfig


@dataclass
class DeepSeekConfig(DecoderConfig):
    name: Literal["deepseek"] = "deepseek"
    attention: Literal["gqa", "mla"] = "mla"
    moe_experts: int = 8
    moe_top_k: int = 2
    norm_eps: float = 1e-6
