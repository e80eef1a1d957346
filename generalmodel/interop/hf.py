"""Our models as Hugging Face `transformers` directories, and back.

`llama`-family dense models (RoPE, RMSNorm, SwiGLU, MHA/GQA/MQA, tied or not) become a
`LlamaForCausalLM` directory; `gpt2`-shaped ones (learned positions, LayerNorm, tanh-GELU MLP,
MHA) a `GPT2LMHeadModel` one. What transformers has no class for — MLA, MoE, sliding windows,
cross-layer KV sharing — is refused with the reason (`ExportError`).

The mapping is pure tensor bookkeeping: our fused `kv_proj` splits into `k_proj`/`v_proj`, the
SwiGLU `up` into `gate_proj`/`up_proj` (gate first, as our MLP chunks it), GPT-2's fused `c_attn`
is q|k|v in `Conv1D` layout (in × out, transposed). Our RoPE rotates halves, as transformers'
`rotate_half` does, so no query/key permutation is needed. `to_hf` then `from_hf` gives back
every tensor bit for bit (fp32).

Writing needs only `safetensors` and `tokenizers`; loading the result needs `transformers`
(`AutoModelForCausalLM.from_pretrained(directory)`, offline).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from typing import Any

import torch

from generalmodel import UserError

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ExportError(UserError):
    """The model has parts no transformers architecture has."""


def hf_architecture(cfg) -> str:
    """'llama' or 'gpt2': the transformers architecture `cfg` maps onto exactly; else ExportError
    naming every part that has no equivalent."""
    blockers = []
    if cfg.attention != "gqa":
        blockers.append(f"attention={cfg.attention!r} (multi-head latent attention)")
    if cfg.moe_experts:
        blockers.append(f"moe_experts={cfg.moe_experts} (mixture of experts)")
    if cfg.memory_layers:
        blockers.append(f"memory_layers={list(cfg.memory_layers)} (product-key memory layers)")
    if cfg.window is not None:
        blockers.append(f"window={cfg.window} (sliding-window layers)")
    if cfg.kv_share_group != 1:
        blockers.append(f"kv_share_group={cfg.kv_share_group} (cross-layer KV sharing)")
    if cfg.qk_norm:
        blockers.append("qk_norm=true (per-head query/key norms)")
    if cfg.value_residual:
        blockers.append("value_residual=true (first-layer value mixing)")
    if cfg.logit_softcap is not None:
        blockers.append(f"logit_softcap={cfg.logit_softcap} (logit soft-capping)")
    llama = (cfg.positions, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    gpt2 = (cfg.positions, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    if not (llama or gpt2):
        blockers.append(
            f"positions={cfg.positions!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r} (Llama is rope+rmsnorm+swiglu, "
            f"GPT-2 learned+layernorm+gelu)"
        )
    if llama and cfg.bias:
        blockers.append("bias=true with a Llama shape (transformers' Llama has one flag for attention biases only)")
    if gpt2 and cfg.kv_heads != cfg.n_heads:
        blockers.append(f"n_kv_heads={cfg.kv_heads} < n_heads={cfg.n_heads} (GPT-2 has no grouped-query attention)")
    if blockers:
        raise ExportError(
            f"model {cfg.name!r} has no transformers equivalent: {'; '.join(blockers)}. Its native export "
            f"(model.safetensors + model_config.json) works with this platform's jobs"
        )
    return "llama" if llama else "gpt2"


def hf_config(cfg, architecture: str, special: dict[str, int | None], dtype: str) -> dict[str, Any]:
    """config.json with every field that matters set explicitly (nothing left to defaults)."""
    ids = {f"{role}_token_id": special.get(role) for role in ("bos", "eos", "pad")}
    if architecture == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
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
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
            **ids,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
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
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
        **ids,
    }


def to_hf_state(cfg, state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Our state dict → transformers key names and layouts."""
    out: dict[str, torch.Tensor] = {}
    kv_dim = cfg.kv_heads * cfg.head_dim
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", ("model.layers." if architecture == "llama" else "transformer.h.") + f"{i}."
        k, v = state[ours + "attn.kv_proj.weight"].split(kv_dim, dim=0)
        if architecture == "llama":
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
            continue
        bias = _gpt2_biases(cfg, state, ours)
        qkv = torch.cat([state[ours + "attn.q_proj.weight"], k, v], dim=0)
        out |= {
            theirs + "ln_1.weight": state[ours + "attn_norm.weight"],
            theirs + "ln_1.bias": bias["attn_norm"],
            theirs + "attn.c_attn.weight": qkv.t(),  # Conv1D: (in, out)
            theirs + "attn.c_attn.bias": torch.cat([bias["attn.q_proj"], bias["attn.kv_proj"]]),
            theirs + "attn.c_proj.weight": state[ours + "attn.out_proj.weight"].t(),
            theirs + "attn.c_proj.bias": bias["attn.out_proj"],
            theirs + "ln_2.weight": state[ours + "mlp_norm.weight"],
            theirs + "ln_2.bias": bias["mlp_norm"],
            theirs + "mlp.c_fc.weight": state[ours + "mlp.up.weight"].t(),
            theirs + "mlp.c_fc.bias": bias["mlp.up"],
            theirs + "mlp.c_proj.weight": state[ours + "mlp.down.weight"].t(),
            theirs + "mlp.c_proj.bias": bias["mlp.down"],
        }
    if architecture == "llama":
        out["model.embed_tokens.weight"] = state["embed.weight"]
        out["model.norm.weight"] = state["final_norm.weight"]
    else:
        final_bias = state.get("final_norm.bias", torch.zeros_like(state["final_norm.weight"]))
        out |= {
            "transformer.wte.weight": state["embed.weight"],
            "transformer.wpe.weight": state["pos_embed.weight"],
            "transformer.ln_f.weight": state["final_norm.weight"],
            "transformer.ln_f.bias": final_bias,
        }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _gpt2_biases(cfg, state, prefix: str) -> dict[str, torch.Tensor]:
    """The layer's biases; zeros for a bias-free model (GPT-2 always has them)."""
    shapes = {
        "attn_norm": cfg.d_model,
        "attn.q_proj": cfg.d_model,
        "attn.kv_proj": 2 * cfg.d_model,
        "attn.out_proj": cfg.d_model,
        "mlp_norm": cfg.d_model,
        "mlp.up": cfg.hidden,
        "mlp.down": cfg.d_model,
    }
    dtype = state[prefix + "attn.q_proj.weight"].dtype
    return {name: state.get(f"{prefix}{name}.bias", torch.zeros(n, dtype=dtype)) for name, n in shapes.items()}


def from_hf_state(cfg, hf: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """transformers key names → our state dict (the inverse of `to_hf_state`)."""
    state: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        ours = f"blocks.{i}."
        if architecture == "llama":
            theirs = f"model.layers.{i}."
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
            continue
        theirs = f"transformer.h.{i}."
        q, kv = hf[theirs + "attn.c_attn.weight"].t().split([cfg.d_model, 2 * cfg.d_model])
        q_bias, kv_bias = hf[theirs + "attn.c_attn.bias"].split([cfg.d_model, 2 * cfg.d_model])
        state |= {
            ours + "attn_norm.weight": hf[theirs + "ln_1.weight"],
            ours + "attn.q_proj.weight": q,
            ours + "attn.kv_proj.weight": kv,
            ours + "attn.out_proj.weight": hf[theirs + "attn.c_proj.weight"].t(),
            ours + "mlp_norm.weight": hf[theirs + "ln_2.weight"],
            ours + "mlp.up.weight": hf[theirs + "mlp.c_fc.weight"].t(),
            ours + "mlp.down.weight": hf[theirs + "mlp.c_proj.weight"].t(),
        }
        if cfg.bias:
            state |= {
                ours + "attn_norm.bias": hf[theirs + "ln_1.bias"],
                ours + "attn.q_proj.bias": q_bias,
                ours + "attn.kv_proj.bias": kv_bias,
                ours + "attn.out_proj.bias": hf[theirs + "attn.c_proj.bias"],
                ours + "mlp_norm.bias": hf[theirs + "ln_2.bias"],
                ours + "mlp.up.bias": hf[theirs + "mlp.c_fc.bias"],
                ours + "mlp.down.bias": hf[theirs + "mlp.c_proj.bias"],
            }
    if architecture == "llama":
        state["embed.weight"] = hf["model.embed_tokens.weight"]
        state["final_norm.weight"] = hf["model.norm.weight"]
    else:
        state |= {
            "embed.weight": hf["transformer.wte.weight"],
            "pos_embed.weight": hf["transformer.wpe.weight"],
            "final_norm.weight": hf["transformer.ln_f.weight"],
        }
        if cfg.bias:
            state["final_norm.bias"] = hf["transformer.ln_f.bias"]
    state["head.weight"] = state["embed.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return {k: v.contiguous() for k, v in state.items()}


def gpt2_biases_are_zero(hf: dict[str, torch.Tensor]) -> bool:
    return all(not v.any() for k, v in hf.items() if k.endswith(".bias") and ".attn.bias" not in k)


def config_from_hf(config: dict[str, Any], where: str):
    """Our model config for a transformers config.json (llama or gpt2), or UserError naming what
    does not map."""
    from models.gpt2 import GPT2Config
    from models.llama import LlamaConfig

    kind = config.get("model_type")
    try:
        if kind == "llama":
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
        if kind == "gpt2":
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
    except KeyError as e:
        raise UserError(f"{where}: missing {e.args[0]!r}") from None
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None
    raise UserError(f"{where}: model_type={kind!r}; models that can be imported: llama, gpt2")


def write_hf(cfg, state: dict[str, torch.Tensor], tokenizer_json: str, directory: str, dtype: str = "float32") -> str:
    """Write a transformers directory for our model (`cfg`, `state`, tokenizer) into `directory`.
    Files are written under temporary names and renamed at the end, config.json last: a failure
    leaves no temporary files and no directory that looks complete."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from generalmodel.data.chat import CHAT_TEMPLATE, END, has_chat_tokens
    from generalmodel.data.tokenizer import special_ids
    from generalmodel.storage import StorageError, StorageFull

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    architecture = hf_architecture(cfg)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    special = special_ids(tokenizer)
    names = {role: tokenizer.id_to_token(i) if i is not None else None for role, i in special.items()}
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]) for k, v in to_hf_state(cfg, state, architecture).items()}
    chat: dict[str, Any] = {}
    stop: int | list[int] | None = special["eos"]
    if has_chat_tokens(tokenizer):  # the chat format: apply_chat_template renders what render() does
        chat = {"chat_template": CHAT_TEMPLATE}
        stop = [special["eos"], tokenizer.token_to_id(END)]  # generate() stops at the end of a turn too
    files = {
        "config.json": json.dumps(hf_config(cfg, architecture, special, dtype), indent=2),
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": names["bos"],
                "eos_token": names["eos"],
                "pad_token": names["pad"],
                "add_bos_token": False,
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": cfg.max_seq_len,
                **chat,
            },
            indent=2,
        ),
        "generation_config.json": json.dumps(
            {
                "bos_token_id": special["bos"],
                "eos_token_id": stop,
                "pad_token_id": special["pad"],
                "do_sample": True,
                "temperature": 0.8,
                "top_p": 0.95,
            },
            indent=2,
        ),
    }
    os.makedirs(directory, exist_ok=True)
    names = ["model.safetensors", *files]
    tmp = {name: os.path.join(directory, name + ".tmp") for name in names}
    try:
        save_file(tensors, tmp["model.safetensors"], metadata={"format": "pt"})
        for name, text in files.items():
            with open(tmp[name], "w") as f:
                f.write(text)
        for name in sorted(names, key=lambda n: n == "config.json"):  # config.json, which marks it, last
            os.replace(tmp[name], os.path.join(directory, name))
    except BaseException as e:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        if isinstance(e, OSError | SafetensorError):
            if "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
                raise StorageFull(f"{directory}: no space left on the device ({e})") from None
            raise StorageError(f"{directory}: cannot write the transformers export ({e})") from None
        raise
    return directory


def is_hf_directory(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        try:
            return "model_type" in json.load(f)
        except json.JSONDecodeError:
            return False


def read_hf(directory: str):
    """(our model config, our state dict, tokenizer JSON) from a transformers
    directory of a Llama or GPT-2 model (safetensors weights, one file or sharded)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    cfg = config_from_hf(config, f"{directory}/config.json")
    architecture = "llama" if config["model_type"] == "llama" else "gpt2"
    weights: dict[str, torch.Tensor] = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{directory}: no model.safetensors (or index); PyTorch .bin checkpoints are not read")
    for shard in shards:
        weights |= load_file(os.path.join(directory, shard))
    if architecture == "gpt2":
        weights = {
            k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v for k, v in weights.items()
        }
        if gpt2_biases_are_zero(weights):  # our own bias-free gpt2 came back: keep it bias-free
            cfg = dataclasses.replace(cfg, bias=False)
    try:
        state = from_hf_state(cfg, weights, architecture)
    except KeyError as e:
        raise UserError(f"{directory}: weight {e.args[0]!r} is missing") from None
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        raise UserError(f"{directory}: no tokenizer.json (a fast tokenizer is needed)")
    with open(tokenizer_path) as f:
        tokenizer_json = f.read()
    return cfg, state, tokenizer_json
