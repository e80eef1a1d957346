"""Our `gpt2`-shaped models (learned positions, LayerNorm, tanh-GELU MLP, MHA) as transformers'
`GPT2LMHeadModel`. GPT-2's fused `c_attn` is q|k|v in `Conv1D` layout (in × out, transposed); it
always has biases: a bias-free model of ours is written with zero biases and read back bias-free."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import HfAdapter, common_config


class GPT2Adapter(HfAdapter):
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    shape = ("learned", "layernorm", "gelu")
    described = "GPT-2 is learned+layernorm+gelu"

    def class_mismatches(self, cfg) -> list[str]:
        if cfg.kv_heads != cfg.n_heads:
            return [f"n_kv_heads={cfg.kv_heads} < n_heads={cfg.n_heads} (GPT-2 has no grouped-query attention)"]
        return []

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        return {
            "architectures": [self.architecture],
            "model_type": "gpt2",
            "n_embd": cfg.d_model,
            "n_inner": cfg.hidden,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_positions": cfg.max_seq_len,
            "n_ctx": cfg.max_seq_len,
            "activation_function": "gelu_new",  # tanh-approximate GELU, as our MLP
            "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            **common_config(cfg, special, dtype),
        }

    def to_hf(self, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            bias = _biases(cfg, state, ours)
            qkv = torch.cat([state[f"{ours}attn.{x}_proj.weight"] for x in "qkv"], dim=0)
            out |= {
                theirs + "ln_1.weight": state[ours + "attn_norm.weight"],
                theirs + "ln_1.bias": bias["attn_norm"],
                theirs + "attn.c_attn.weight": qkv.t(),  # Conv1D: (in, out)
                theirs + "attn.c_attn.bias": torch.cat([bias[f"attn.{x}_proj"] for x in "qkv"]),
                theirs + "attn.c_proj.weight": state[ours + "attn.out_proj.weight"].t(),
                theirs + "attn.c_proj.bias": bias["attn.out_proj"],
                theirs + "ln_2.weight": state[ours + "mlp_norm.weight"],
                theirs + "ln_2.bias": bias["mlp_norm"],
                theirs + "mlp.c_fc.weight": state[ours + "mlp.up.weight"].t(),
                theirs + "mlp.c_fc.bias": bias["mlp.up"],
                theirs + "mlp.c_proj.weight": state[ours + "mlp.down.weight"].t(),
                theirs + "mlp.c_proj.bias": bias["mlp.down"],
            }
        final_bias = state.get("final_norm.bias", torch.zeros_like(state["final_norm.weight"]))
        out |= {
            "transformer.wte.weight": state["embed.weight"],
            "transformer.wpe.weight": state["pos_embed.weight"],
            "transformer.ln_f.weight": state["final_norm.weight"],
            "transformer.ln_f.bias": final_bias,
        }
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["head.weight"]
        return out

    def from_hf(self, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            q, k, v = hf[theirs + "attn.c_attn.weight"].t().split(cfg.d_model)
            q_bias, k_bias, v_bias = hf[theirs + "attn.c_attn.bias"].split(cfg.d_model)
            state |= {
                ours + "attn_norm.weight": hf[theirs + "ln_1.weight"],
                ours + "attn.q_proj.weight": q,
                ours + "attn.k_proj.weight": k,
                ours + "attn.v_proj.weight": v,
                ours + "attn.out_proj.weight": hf[theirs + "attn.c_proj.weight"].t(),
                ours + "mlp_norm.weight": hf[theirs + "ln_2.weight"],
                ours + "mlp.up.weight": hf[theirs + "mlp.c_fc.weight"].t(),
                ours + "mlp.down.weight": hf[theirs + "mlp.c_proj.weight"].t(),
            }
            if cfg.bias:
                state |= {
                    ours + "attn_norm.bias": hf[theirs + "ln_1.bias"],
                    ours + "attn.q_proj.bias": q_bias,
                    ours + "attn.k_proj.bias": k_bias,
                    ours + "attn.v_proj.bias": v_bias,
                    ours + "attn.out_proj.bias": hf[theirs + "attn.c_proj.bias"],
                    ours + "mlp_norm.bias": hf[theirs + "ln_2.bias"],
                    ours + "mlp.up.bias": hf[theirs + "mlp.c_fc.bias"],
                    ours + "mlp.down.bias": hf[theirs + "mlp.c_proj.bias"],
                }
        state |= {
            "embed.weight": hf["transformer.wte.weight"],
            "pos_embed.weight": hf["transformer.wpe.weight"],
            "final_norm.weight": hf["transformer.ln_f.weight"],
        }
        if cfg.bias:
            state["final_norm.bias"] = hf["transformer.ln_f.bias"]
        state["head.weight"] = state["embed.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
        return state

    def model_config(self, config: dict[str, Any], where: str):
        from models.gpt2 import GPT2Config

        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"{where}: activation_function={config['activation_function']!r} (supported: gelu_new)")
        if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
            raise UserError(f"{where}: scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        return GPT2Config(
            vocab_size=config["vocab_size"],
            max_seq_len=config.get("n_positions") or config["n_ctx"],
            n_layers=config["n_layer"],
            n_heads=config["n_head"],
            d_model=config["n_embd"],
            ffn_hidden=config.get("n_inner") or 4 * config["n_embd"],
            tie_embeddings=config.get("tie_word_embeddings", True),
            norm_eps=config.get("layer_norm_epsilon", 1e-5),
            init_std=config.get("initializer_range", 0.02),
            bias=True,
        )

    def read_weights(self, cfg, weights: dict[str, torch.Tensor]):
        # Hub GPT-2 checkpoints name the body without the `transformer.` prefix.
        weights = {
            k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in weights.items()
        }
        if _biases_are_zero(weights):  # our own bias-free gpt2 came back: keep it bias-free
            cfg = dataclasses.replace(cfg, bias=False)
        return cfg, weights


def _biases(cfg, state, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's biases; zeros for a bias-free model (GPT-2 always has them)."""
    shapes = {
        "attn_norm": cfg.d_model,
        "attn.q_proj": cfg.d_model,
        "attn.k_proj": cfg.d_model,
        "attn.v_proj": cfg.d_model,
        "attn.out_proj": cfg.d_model,
        "mlp_norm": cfg.d_model,
        "mlp.up": cfg.hidden,
        "mlp.down": cfg.d_model,
    }
    dtype = state[prefix + "attn.q_proj.weight"].dtype
    return {name: state.get(f"{prefix}{name}.bias", torch.zeros(n, dtype=dtype)) for name, n in shapes.items()}


def _biases_are_zero(hf: dict[str, torch.Tensor]) -> bool:
    return all(not v.any() for k, v in hf.items() if k.endswith(".bias") and ".attn.bias" not in k)
