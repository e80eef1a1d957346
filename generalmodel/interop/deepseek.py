"""Our `deepseek` family (MLA + DeepSeekMoE) as transformers' `DeepseekV3ForCausalLM`, the class
vLLM, SGLang and llama.cpp (`deepseek2`) also read.

The layers map one to one: MLA's `q_proj` (or `q_a_proj`/`q_a_layernorm`/`q_b_proj` with a query
bottleneck), `kv_a_proj_with_mqa` (the latent and the one RoPE key), `kv_a_layernorm`,
`kv_b_proj`, `o_proj`; the MoE's router `gate.weight` and its balancing bias
`gate.e_score_correction_bias`, the routed experts one by one (`experts.E.{gate,up,down}_proj`,
the checkpoint layout DeepSeek's own files and vLLM use; transformers 5 fuses them when it loads)
and the shared experts; the first `first_k_dense_replace` layers dense.

Two things are not a renaming:
- **RoPE layout.** DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...
  (`rope_interleave: true`; vLLM's DeepSeek always does); our RoPE rotates halves (x_i, x_{i+d/2}).
  We write the RoPE rows of the query and key projections interleaved (row 2i ← i, 2i+1 ← i + d/2),
  so each pair the reader rotates is a pair we rotate, by the same frequency: the attention
  scores are the same; reading undoes it.
- **Routing.** Ours is DeepSeek-V3's with one group (`n_group = topk_group`: every expert
  eligible), normalised top-k gates (`norm_topk_prob`) and no extra scale
  (`routed_scaling_factor: 1.0`); a checkpoint with group-limited routing or another scale is
  refused by name on import.

The class's latent norms (`q_a_layernorm`, `kv_a_layernorm`) use eps 1e-6 whatever
`rms_norm_eps` says, ours use `norm_eps`: only a model with `norm_eps = 1e-6` (the `deepseek`
default, DeepSeek-V3's) is exported as this class; another goes out as remote code.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import HfAdapter, read_rope, rope_decoder_config

LATENT_EPS = 1e-6  # DeepseekV3RMSNorm's default, which its q_a/kv_a layernorms keep


def interleave_rows(rows: int) -> torch.Tensor:
    """The row order that lays a rotate-halves RoPE block out as interleaved pairs."""
    half = rows // 2
    return torch.tensor([i // 2 + (i % 2) * half for i in range(rows)])


def _permute_rope(weight: torch.Tensor, blocks: int, nope: int, rope: int, inverse: bool) -> torch.Tensor:
    """Reorder the last `rope` rows of each of the `blocks` (nope + rope)-row blocks of `weight`."""
    order = interleave_rows(rope)
    if inverse:
        order = order.argsort()
    w = weight.view(blocks, nope + rope, -1)
    return torch.cat([w[:, :nope], w[:, nope:][:, order]], dim=1).reshape(weight.shape)


class DeepseekV3Adapter(HfAdapter):
    model_type = "deepseek_v3"
    architecture: ClassVar[str] = "DeepseekV3ForCausalLM"
    shape = ("rope", "rmsnorm", "swiglu")
    described = "DeepseekV3 is rope+rmsnorm+swiglu with MLA and MoE"
    carries = frozenset({"attention", "moe_experts"})
    keep_fp32 = ("gate.e_score_correction_bias",)  # as DeepSeek's checkpoints: routing is decided in fp32

    def class_mismatches(self, cfg) -> list[str]:
        why = []
        if cfg.attention != "mla":
            why.append(f"attention={cfg.attention!r} (DeepseekV3 attends with MLA)")
        if not cfg.moe_experts:
            why.append("moe_experts=0 (DeepseekV3 has MoE layers)")
        else:
            if cfg.moe_score != "sigmoid":
                why.append(f"moe_score={cfg.moe_score!r} (DeepseekV3 routes by sigmoid scores)")
            if cfg.moe_shared_experts < 1:
                why.append("moe_shared_experts=0 (every DeepseekV3 MoE layer has shared experts)")
            if cfg.moe_experts < 2:
                why.append(f"moe_experts={cfg.moe_experts} (DeepseekV3's router takes the best 2 of a group)")
        if cfg.norm_eps != LATENT_EPS:
            why.append(f"norm_eps={cfg.norm_eps} (DeepseekV3's latent norms use {LATENT_EPS})")
        return why

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        return rope_decoder_config(self, cfg, special, dtype) | {
            "moe_intermediate_size": cfg.expert_hidden,
            "num_key_value_heads": cfg.n_heads,
            "n_routed_experts": cfg.moe_experts,
            "n_shared_experts": cfg.moe_shared_experts,
            "num_experts_per_tok": cfg.moe_top_k,
            "first_k_dense_replace": min(cfg.moe_first_dense, cfg.n_layers),
            "moe_layer_freq": 1,
            "n_group": 1,
            "topk_group": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "kv_lora_rank": cfg.kv_lora_rank,
            "q_lora_rank": cfg.q_lora_rank,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "qk_nope_head_dim": self._nope(cfg),
            "v_head_dim": cfg.v_head_dim or cfg.head_dim,
            "hidden_act": "silu",
            "rope_interleave": True,
            "num_nextn_predict_layers": 0,  # no multi-token-prediction module
        }

    @staticmethod
    def _nope(cfg) -> int:
        return cfg.qk_nope_head_dim or cfg.head_dim

    def _query_key(self, cfg, ours: dict[str, torch.Tensor], inverse: bool) -> dict[str, torch.Tensor]:
        """The query projection (the last one of its bottleneck: each head's rows are nope then
        rope) and the latent projection (the latent's rows, then the one RoPE key's) with their
        RoPE rows re-laid as interleaved pairs (`inverse`: back to ours)."""
        q, rope = ("q_up" if cfg.q_lora_rank else "q_proj"), cfg.qk_rope_head_dim
        return {
            q: _permute_rope(ours[q], cfg.n_heads, self._nope(cfg), rope, inverse),
            "kv_down": _permute_rope(ours["kv_down"], 1, cfg.kv_lora_rank, rope, inverse),
        }

    def to_hf(self, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": state["embed.weight"],
            "model.norm.weight": state["final_norm.weight"],
        }
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["head.weight"]
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            attn = {
                name: state[f"{ours}attn.{name}.weight"] for name in _ATTENTION if f"{ours}attn.{name}.weight" in state
            }
            attn |= self._query_key(cfg, attn, inverse=False)
            out |= {f"{theirs}self_attn.{_ATTENTION[name]}.weight": w for name, w in attn.items()}
            out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
            out[theirs + "post_attention_layernorm.weight"] = state[ours + "mlp_norm.weight"]
            mlp, hf = ours + "mlp.", theirs + "mlp."
            if not cfg.is_moe(i):  # the dense MLP: one tensor for one
                out |= {f"{hf}{part}_proj.weight": state[f"{mlp}{part}.weight"] for part in ("gate", "up", "down")}
                continue
            out[hf + "gate.weight"] = state[mlp + "router.weight"]
            out[hf + "gate.e_score_correction_bias"] = state[mlp + "expert_bias"]
            for e in range(cfg.moe_experts):  # ours: x @ experts.w_up[e] (d, 2h); theirs: Linear weights (out, in)
                up, down = state[mlp + "experts.w_up"][e].t(), state[mlp + "experts.w_down"][e].t()
                out |= _swiglu_to_hf(up, down, f"{hf}experts.{e}.")
            out |= _swiglu_to_hf(
                state[mlp + "shared.up.weight"], state[mlp + "shared.down.weight"], hf + "shared_experts."
            )
        return out

    def from_hf(self, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {"embed.weight": hf["model.embed_tokens.weight"]}
        state["final_norm.weight"] = hf["model.norm.weight"]
        state["head.weight"] = state["embed.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            attn = {
                name: hf[f"{theirs}self_attn.{their}.weight"]
                for name, their in _ATTENTION.items()
                if f"{theirs}self_attn.{their}.weight" in hf
            }
            attn |= self._query_key(cfg, attn, inverse=True)
            state |= {f"{ours}attn.{name}.weight": w for name, w in attn.items()}
            state[ours + "attn_norm.weight"] = hf[theirs + "input_layernorm.weight"]
            state[ours + "mlp_norm.weight"] = hf[theirs + "post_attention_layernorm.weight"]
            mlp, their = ours + "mlp.", theirs + "mlp."
            if not cfg.is_moe(i):
                state |= {f"{mlp}{part}.weight": hf[f"{their}{part}_proj.weight"] for part in ("gate", "up", "down")}
                continue
            state[mlp + "router.weight"] = hf[their + "gate.weight"]
            state[mlp + "expert_bias"] = hf[their + "gate.e_score_correction_bias"].float()
            experts = [_swiglu_from_hf(hf, f"{their}experts.{e}.") for e in range(cfg.moe_experts)]
            state[mlp + "experts.w_up"] = torch.stack([up.t() for up, _ in experts])
            state[mlp + "experts.w_down"] = torch.stack([down.t() for _, down in experts])
            state[mlp + "shared.up.weight"], state[mlp + "shared.down.weight"] = _swiglu_from_hf(
                hf, their + "shared_experts."
            )
        return state

    def model_config(self, config: dict[str, Any], where: str):
        from models.deepseek import DeepSeekConfig

        rope_type, rope_theta = read_rope(config)
        unsupported = {
            "hidden_act": (config.get("hidden_act", "silu"), "silu"),
            "attention_bias": (config.get("attention_bias", False), False),
            "rope type": (rope_type, "default"),
            "scoring_func": (config.get("scoring_func", "sigmoid"), "sigmoid"),
            "norm_topk_prob": (config.get("norm_topk_prob", True), True),
            "routed_scaling_factor": (float(config.get("routed_scaling_factor", 1.0)), 1.0),
            "moe_layer_freq": (config.get("moe_layer_freq", 1), 1),
            "topk_group (with n_group)": (config.get("topk_group", 1), config.get("n_group", 1)),
            "rms_norm_eps": (config.get("rms_norm_eps", LATENT_EPS), LATENT_EPS),
        }
        bad = [f"{k}={v!r} (supported: {ok!r})" for k, (v, ok) in unsupported.items() if v != ok]
        if bad:
            raise UserError(f"{where}: this {self.architecture} does not map onto our deepseek: {', '.join(bad)}")
        if config.get("n_shared_experts", 1) < 1 or config.get("n_routed_experts", 0) < 2:
            raise UserError(f"{where}: {self.architecture} without shared experts or with fewer than 2 routed experts")
        heads, d = config["num_attention_heads"], config["hidden_size"]
        return DeepSeekConfig(
            vocab_size=config["vocab_size"],
            max_seq_len=config["max_position_embeddings"],
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            d_model=d,
            ffn_hidden=config["intermediate_size"],
            tie_embeddings=config.get("tie_word_embeddings", False),
            rope_theta=rope_theta,
            norm_eps=config.get("rms_norm_eps", LATENT_EPS),
            init_std=config.get("initializer_range", 0.02),
            kv_lora_rank=config["kv_lora_rank"],
            q_lora_rank=config.get("q_lora_rank"),
            qk_rope_head_dim=config["qk_rope_head_dim"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            v_head_dim=config["v_head_dim"],
            moe_experts=config["n_routed_experts"],
            moe_top_k=config["num_experts_per_tok"],
            moe_shared_experts=config["n_shared_experts"],
            moe_hidden=config["moe_intermediate_size"],
            moe_first_dense=config.get("first_k_dense_replace", 0),
        )


# our MLA's projections → DeepseekV3Attention's
_ATTENTION = {
    "q_proj": "q_proj",
    "q_down": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "q_up": "q_b_proj",
    "kv_down": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "kv_up": "kv_b_proj",
    "out_proj": "o_proj",
}


def _swiglu_to_hf(up: torch.Tensor, down: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Our SwiGLU (`up` rows: gate then value) as gate_proj/up_proj/down_proj."""
    gate, value = up.chunk(2, dim=0)
    return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": value, prefix + "down_proj.weight": down}


def _swiglu_from_hf(hf: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.cat([hf[prefix + "gate_proj.weight"], hf[prefix + "up_proj.weight"]])
    return up, hf[prefix + "down_proj.weight"]
