"""Our `llama`-family dense models (RoPE, RMSNorm, SwiGLU, MHA/GQA/MQA, tied or not) as
transformers' `LlamaForCausalLM`. Our fused `kv_proj` splits into `k_proj`/`v_proj`, the SwiGLU `up`
into `gate_proj`/`up_proj` (gate first, as our MLP chunks it); our RoPE rotates halves, as
transformers' `rotate_half` does, so no query/key permutation is needed."""

from __future__ import annotations

from typing import Any

import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import HfAdapter, common_config


class LlamaAdapter(HfAdapter):
    model_type = "llama"
    shape = ("rope", "rmsnorm", "swiglu")
    described = "Llama is rope+rmsnorm+swiglu"

    def class_mismatches(self, cfg) -> list[str]:
        if cfg.bias:
            return ["bias=true with a Llama shape (transformers' Llama has one flag for attention biases only)"]
        return []

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.hidden,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            **common_config(cfg, special, dtype),
        }

    def to_hf(self, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        kv_dim = cfg.kv_heads * cfg.head_dim
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            k, v = state[ours + "attn.kv_proj.weight"].split(kv_dim, dim=0)
            gate, up = state[ours + "mlp.up.weight"].chunk(2, dim=0)
            out |= {
                theirs + "input_layernorm.weight": state[ours + "attn_norm.weight"],
                theirs + "self_attn.q_proj.weight": state[ours + "attn.q_proj.weight"],
                theirs + "self_attn.k_proj.weight": k,
                theirs + "self_attn.v_proj.weight": v,
                theirs + "self_attn.o_proj.weight": state[ours + "attn.out_proj.weight"],
                theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
                theirs + "mlp.gate_proj.weight": gate,
                theirs + "mlp.up_proj.weight": up,
                theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
            }
        out["model.embed_tokens.weight"] = state["embed.weight"]
        out["model.norm.weight"] = state["final_norm.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["head.weight"]
        return out

    def from_hf(self, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            state |= {
                ours + "attn_norm.weight": hf[theirs + "input_layernorm.weight"],
                ours + "attn.q_proj.weight": hf[theirs + "self_attn.q_proj.weight"],
                ours + "attn.kv_proj.weight": torch.cat(
                    [hf[theirs + "self_attn.k_proj.weight"], hf[theirs + "self_attn.v_proj.weight"]]
                ),
                ours + "attn.out_proj.weight": hf[theirs + "self_attn.o_proj.weight"],
                ours + "mlp_norm.weight": hf[theirs + "post_attention_layernorm.weight"],
                ours + "mlp.up.weight": torch.cat(
                    [hf[theirs + "mlp.gate_proj.weight"], hf[theirs + "mlp.up_proj.weight"]]
                ),
                ours + "mlp.down.weight": hf[theirs + "mlp.down_proj.weight"],
            }
        state["embed.weight"] = hf["model.embed_tokens.weight"]
        state["final_norm.weight"] = hf["model.norm.weight"]
        state["head.weight"] = state["embed.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
        return state

    def model_config(self, config: dict[str, Any], where: str):
        from models.llama import LlamaConfig

        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        unsupported = {
            "hidden_act": (config.get("hidden_act", "silu"), "silu"),
            "attention_bias": (config.get("attention_bias", False), False),
            "mlp_bias": (config.get("mlp_bias", False), False),
            "rope type": (rope_type, "default"),
        }
        bad = [f"{k}={v!r} (supported: {ok!r})" for k, (v, ok) in unsupported.items() if v != ok]
        if bad:
            raise UserError(f"{where}: this Llama variant does not map onto our llama: {', '.join(bad)}")
        heads = config["num_attention_heads"]
        if config.get("head_dim") not in (None, config["hidden_size"] // heads):
            raise UserError(f"{where}: head_dim={config['head_dim']} != hidden_size/num_attention_heads")
        return LlamaConfig(
            vocab_size=config["vocab_size"],
            max_seq_len=config["max_position_embeddings"],
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=None if config.get("num_key_value_heads", heads) == heads else config["num_key_value_heads"],
            d_model=config["hidden_size"],
            ffn_hidden=config["intermediate_size"],
            tie_embeddings=config.get("tie_word_embeddings", False),
            rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            norm_eps=config.get("rms_norm_eps", 1e-6),
            init_std=config.get("initializer_range", 0.02),
        )
