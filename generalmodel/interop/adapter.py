"""What every transformers adapter shares: the parts of our zoo no dense transformers class has,
and the interface an adapter implements (`HfAdapter`). One adapter per target class lives beside
this module (`llama.py`: Llama, Qwen3, Arcee; `gpt2.py`); `generalmodel.interop.hf` picks one."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from generalmodel.errors import UserError


class ExportError(UserError):
    """The model has parts no transformers architecture has."""


def research_parts(cfg) -> dict[str, str]:
    """The parts of `cfg` beyond a plain dense decoder, by config field, each described with its value."""
    parts = {
        "name": {
            "moeut": "model.name='moeut' (shared layers, SwitchHead attention, σ-MoE)",
            "blt": "model.name='blt' (a byte latent model: patches, byte encoder and decoder)",
        }.get(cfg.name, False),
        "attention": cfg.attention != "gqa" and f"attention={cfg.attention!r} (multi-head latent attention)",
        "moe_experts": cfg.moe_experts and f"moe_experts={cfg.moe_experts} (mixture of experts)",
        "memory_layers": cfg.memory_layers and f"memory_layers={list(cfg.memory_layers)} (product-key memory layers)",
        "window": cfg.window is not None and f"window={cfg.window} (sliding-window layers)",
        "kv_share_group": cfg.kv_share_group != 1 and f"kv_share_group={cfg.kv_share_group} (cross-layer KV sharing)",
        "long_memory": cfg.long_memory != "none" and f"long_memory={cfg.long_memory!r} (memory beyond the window)",
        "qk_norm": cfg.qk_norm and "qk_norm=true (per-head query/key norms)",
        "value_residual": cfg.value_residual and "value_residual=true (first-layer value mixing)",
        "logit_softcap": cfg.logit_softcap is not None and f"logit_softcap={cfg.logit_softcap} (logit soft-capping)",
        "embed_skip": cfg.embed_skip and "embed_skip=true (every block mixes in the embedding)",
        "unet_skips": cfg.unet_skips and "unet_skips=true (U-net skips between blocks)",
        "value_embeds": cfg.value_embeds and f"value_embeds={cfg.value_embeds} (value embeddings)",
        "quiet_star_thoughts": cfg.quiet_star_thoughts
        and f"quiet_star_thoughts={cfg.quiet_star_thoughts} (Quiet-STaR's thoughts at every token)",
        "continuous_thoughts": cfg.continuous_thoughts
        and f"continuous_thoughts={cfg.continuous_thoughts} (Coconut decoding: hidden states fed back as inputs)",
    }
    return {field: text for field, text in parts.items() if text}


class HfAdapter:
    """One transformers class: which of our models it reproduces exactly, and the mapping of
    config and weights both ways. `to_hf` then `from_hf` gives back every tensor bit for bit."""

    model_type: ClassVar[str]  # config.json's model_type
    architecture: ClassVar[str]  # the transformers class
    carries: ClassVar[frozenset[str]] = frozenset()  # the fields of `research_parts` the class has
    shape: ClassVar[tuple[str, str, str]]  # (positions, norm, mlp) of the class
    described: ClassVar[str]  # the shape in words, for error messages
    keep_fp32: ClassVar[tuple[str, ...]] = ()  # tensors (by key suffix) written in fp32 whatever the dtype

    def mismatches(self, cfg) -> list[str]:
        """Why this class cannot reproduce `cfg` (empty: it can)."""
        parts = [text for field, text in research_parts(cfg).items() if field not in self.carries]
        if (cfg.positions, cfg.norm, cfg.mlp) != self.shape:
            parts.append(f"positions={cfg.positions!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r} ({self.described})")
        return parts + self.class_mismatches(cfg)

    def class_mismatches(self, cfg) -> list[str]:
        return []

    def config(self, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
        """config.json with every field that matters set explicitly (nothing left to defaults)."""
        raise NotImplementedError

    def code_files(self) -> dict[str, str]:
        """Python files the directory carries (remote code), by name; none for a native class."""
        return {}

    def to_hf(self, cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def from_hf(self, cfg, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def model_config(self, config: dict[str, Any], where: str):
        """Our model config for the class's config.json; a UserError naming what does not map."""
        raise NotImplementedError

    def read_weights(self, cfg, weights: dict[str, torch.Tensor]):
        """(cfg, weights) as read from a directory, before `from_hf` (key prefixes, detected options)."""
        return cfg, weights


def common_config(cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
    """The config.json fields every class spells the same way: vocabulary, tying, init, dtype and
    the special token ids."""
    return {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        **{f"{role}_token_id": special.get(role) for role in ("bos", "eos", "pad")},
    }


def rope_decoder_config(adapter: HfAdapter, cfg, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
    """The config.json fields the RoPE + RMSNorm decoder classes (Llama's family, DeepseekV3) spell
    the same, `common_config`'s included."""
    return {
        "architectures": [adapter.architecture],
        "model_type": adapter.model_type,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        **common_config(cfg, special, dtype),
    }


def read_rope(config: dict[str, Any]) -> tuple[str, float]:
    """(RoPE type, theta) of a config.json, in transformers 5's spelling or 4's."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    return rope_type, float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
