"""Our `llama`-family dense models as the transformers classes of that family, one adapter per class:
`LlamaForCausalLM` (RoPE, RMSNorm, SwiGLU, MHA/GQA/MQA, tied or not), `Qwen3ForCausalLM` (the same
with per-head query/key RMSNorm before RoPE, and sliding-window layers by `layer_types`) and
`ArceeForCausalLM` (Llama with a non-gated ReLU² MLP: `up_proj`/`down_proj`). They share the tensor
mapping, one tensor for one tensor (`k_proj`, `v_proj`; SwiGLU's `gate` → `gate_proj`, `up` →
`up_proj`); our RoPE rotates halves, as transformers' `rotate_half` does, so no query/key
permutation is needed."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import HfAdapter, read_rope, rope_decoder_config


class LlamaAdapter(HfAdapter):
    model_type = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"
    shape = ("rope", "rmsnorm", "swiglu")
    described = "Llama is rope+rmsnorm+swiglu"
    hidden_act: ClassVar[str] = "silu"

    def class_mismatches(self, cfg) -> list[str]:
        if cfg.bias:
            return [f"bias=true with a {self.architecture} shape (attention and MLP biases are not mapped)"]
        return []

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        return rope_decoder_config(self, cfg, special, dtype) | {
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": self.hidden_act,
            "mlp_bias": False,
        }

    def to_hf(self, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            out |= {
                theirs + "input_layernorm.weight": state[ours + "attn_norm.weight"],
                theirs + "self_attn.q_proj.weight": state[ours + "attn.q_proj.weight"],
                theirs + "self_attn.k_proj.weight": state[ours + "attn.k_proj.weight"],
                theirs + "self_attn.v_proj.weight": state[ours + "attn.v_proj.weight"],
                theirs + "mlp.up_proj.weight": state[ours + "mlp.up.weight"],
                theirs + "self_attn.o_proj.weight": state[ours + "attn.out_proj.weight"],
                theirs + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
                theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
            }
            if cfg.qk_norm:
                out[theirs + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
                out[theirs + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
            if cfg.mlp == "swiglu":
                out[theirs + "mlp.gate_proj.weight"] = state[ours + "mlp.gate.weight"]
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
                ours + "attn.k_proj.weight": hf[theirs + "self_attn.k_proj.weight"],
                ours + "attn.v_proj.weight": hf[theirs + "self_attn.v_proj.weight"],
                ours + "mlp.up.weight": hf[theirs + "mlp.up_proj.weight"],
                ours + "attn.out_proj.weight": hf[theirs + "self_attn.o_proj.weight"],
                ours + "mlp_norm.weight": hf[theirs + "post_attention_layernorm.weight"],
                ours + "mlp.down.weight": hf[theirs + "mlp.down_proj.weight"],
            }
            if cfg.qk_norm:
                state[ours + "attn.q_norm.weight"] = hf[theirs + "self_attn.q_norm.weight"]
                state[ours + "attn.k_norm.weight"] = hf[theirs + "self_attn.k_norm.weight"]
            if cfg.mlp == "swiglu":
                state[ours + "mlp.gate.weight"] = hf[theirs + "mlp.gate_proj.weight"]
        state["embed.weight"] = hf["model.embed_tokens.weight"]
        state["final_norm.weight"] = hf["model.norm.weight"]
        state["head.weight"] = state["embed.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
        return state

    def model_config(self, config: dict[str, Any], where: str):
        from models.llama import LlamaConfig

        rope_type, rope_theta = read_rope(config)
        unsupported = {
            "hidden_act": (config.get("hidden_act", self.hidden_act), self.hidden_act),
            "attention_bias": (config.get("attention_bias", False), False),
            "mlp_bias": (config.get("mlp_bias", False), False),
            "rope type": (rope_type, "default"),
        }
        bad = [f"{k}={v!r} (supported: {ok!r})" for k, (v, ok) in unsupported.items() if v != ok]
        if bad:
            raise UserError(f"{where}: this {self.architecture} does not map onto our llama: {', '.join(bad)}")
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
            mlp=self.shape[2],
            tie_embeddings=config.get("tie_word_embeddings", False),
            rope_theta=rope_theta,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            init_std=config.get("initializer_range", 0.02),
            **self.switches(config, where),
        )

    def switches(self, config: dict[str, Any], where: str) -> dict[str, Any]:
        """The model switches the class's config.json implies beyond Llama's."""
        return {}


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: query/key RMSNorm per head (before RoPE) in every layer, sliding-window layers by
    `layer_types` (our `window`, with `global_every`'s layers full)."""

    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    described = "Qwen3 is rope+rmsnorm+swiglu with qk_norm"
    carries = frozenset({"qk_norm", "window"})

    def class_mismatches(self, cfg) -> list[str]:
        missing = [] if cfg.qk_norm else ["qk_norm=false (Qwen3 normalises every query and key)"]
        return super().class_mismatches(cfg) + missing

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        layers = ["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.n_layers)]
        return super().config(cfg, special, dtype) | {
            "use_sliding_window": cfg.window is not None,
            "sliding_window": cfg.window,
            "max_window_layers": cfg.n_layers,
            "layer_types": layers,
        }

    def switches(self, config: dict[str, Any], where: str) -> dict[str, Any]:
        n = config["num_hidden_layers"]
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        kinds = config.get("layer_types") or ["full_attention"] * n
        local = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        if window is None or not local:
            return {"qk_norm": True}
        full = [i for i in range(n) if i not in local]
        every = full[0] + 1 if full else 0
        pattern = list(range(every - 1, n, every)) if every else []
        if full != pattern:
            raise UserError(
                f"{where}: layer_types has full-attention layers {full}; ours are every N-th layer "
                "(N-1, 2N-1, ...: model.global_every) or none"
            )
        return {"qk_norm": True, "window": window, "global_every": every}


class ArceeAdapter(LlamaAdapter):
    """Arcee (AFM): Llama with a non-gated ReLU² MLP."""

    model_type = "arcee"
    architecture = "ArceeForCausalLM"
    shape = ("rope", "rmsnorm", "relu2")
    described = "Arcee is rope+rmsnorm+relu2"
    hidden_act = "relu2"
