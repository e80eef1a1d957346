"""Our models as Hugging Face `transformers` directories, and back.

One adapter per transformers class (an `HfAdapter`): in `llama.py` `LlamaForCausalLM` (RoPE,
RMSNorm, SwiGLU, MHA/GQA/MQA, tied or not), `Qwen3ForCausalLM` (+ per-head query/key norms and
sliding-window layers) and `ArceeForCausalLM` (a ReLU² MLP); in `deepseek.py`
`DeepseekV3ForCausalLM` (MLA + DeepSeekMoE); in `gpt2.py` `GPT2LMHeadModel` (learned positions,
LayerNorm, tanh-GELU MLP, MHA). `adapter_for` picks the one that reproduces a model exactly.
`to_hf` then `from_hf` gives back every tensor bit for bit (fp32).

Writing needs only `safetensors` and `tokenizers`; loading the result needs `transformers`
(`AutoModelForCausalLM.from_pretrained(directory)`, offline).

What no native class has — MLA or MoE outside the DeepSeek-V3 shape, cross-layer KV sharing,
value residual, soft-capped logits, memory layers — is exported as remote code (`remote.py`: the
zoo's own modules and a transformers wrapper written into the directory; `trust_remote_code=True`
to load), or, with `remote_code=False`, refused with the reasons the closest native class gives (`ExportError`).

To add a target class: an `HfAdapter` subclass in its own module, added to `NATIVE`.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import ExportError, HfAdapter
from generalmodel.interop.deepseek import DeepseekV3Adapter
from generalmodel.interop.gpt2 import GPT2Adapter
from generalmodel.interop.llama import ArceeAdapter, LlamaAdapter, Qwen3Adapter
from generalmodel.interop.remote import RemoteCodeAdapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NATIVE: dict[str, HfAdapter] = {
    a.model_type: a for a in (LlamaAdapter(), Qwen3Adapter(), ArceeAdapter(), DeepseekV3Adapter(), GPT2Adapter())
}
REMOTE = RemoteCodeAdapter()
ADAPTERS: dict[str, HfAdapter] = {**NATIVE, REMOTE.model_type: REMOTE}

__all__ = [
    "ADAPTERS",
    "DTYPES",
    "ExportError",
    "adapter_for",
    "hf_architecture",
    "is_remote_code",
    "read_hf",
    "write_hf",
]


def adapter_for(cfg, remote_code: bool = True) -> HfAdapter:
    """The native class that reproduces `cfg` exactly; else remote code (`remote_code`), or an
    ExportError naming every part of `cfg` that the closest native class lacks (or that remote
    code cannot run either)."""
    reasons = {name: adapter.mismatches(cfg) for name, adapter in NATIVE.items()}
    fits = [name for name, why in reasons.items() if not why]
    if fits:
        return NATIVE[fits[0]]
    beyond = REMOTE.mismatches(cfg)
    if beyond:  # what no transformers class runs, remote code included
        raise ExportError(
            f"model {cfg.name!r} cannot be exported for transformers: {'; '.join(beyond)}. Use its native "
            "export (model.safetensors + model_config.json) with this platform's jobs"
        )
    if remote_code:
        return REMOTE
    closest = min(reasons.values(), key=len)
    shape = [r for why in reasons.values() for r in why if r.startswith("positions=")]
    if len(shape) == len(reasons):  # no class has the shape: say what each one's is
        closest = [r for r in closest if not r.startswith("positions=")]
        described = ", ".join(a.described for a in NATIVE.values())
        closest.append(f"positions={cfg.positions!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r} ({described})")
    raise ExportError(
        f"model {cfg.name!r} has no native transformers class: {'; '.join(closest)}. Export it as remote "
        f"code (trust_remote_code=True to load), or use its native export (model.safetensors + "
        f"model_config.json) with this platform's jobs"
    )


def hf_architecture(cfg, remote_code: bool = True) -> str:
    """The model_type of the transformers class that reproduces `cfg` (see `adapter_for`):
    `generalmodel` for remote code."""
    return adapter_for(cfg, remote_code).model_type


def write_hf(
    cfg,
    state: dict[str, torch.Tensor],
    tokenizer_json: str,
    directory: str,
    dtype: str = "float32",
    remote_code: bool = True,
) -> str:
    """Write a transformers directory for our model (`cfg`, `state`, tokenizer) into `directory`:
    a native class where one fits, else remote code (unless `remote_code` is off: ExportError).
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
    adapter = adapter_for(cfg, remote_code)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    special = special_ids(tokenizer)
    names = {role: tokenizer.id_to_token(i) if i is not None else None for role, i in special.items()}
    tensors = {
        k: v.detach().to("cpu", torch.float32 if k.endswith(adapter.keep_fp32) else DTYPES[dtype]).contiguous()
        for k, v in adapter.to_hf(cfg, state).items()
    }
    chat: dict[str, Any] = {}
    stop: int | list[int] | None = special["eos"]
    if has_chat_tokens(tokenizer):  # the chat format: apply_chat_template renders what render() does
        chat = {"chat_template": CHAT_TEMPLATE}
        stop = [special["eos"], tokenizer.token_to_id(END)]  # generate() stops at the end of a turn too
    files = {
        "config.json": json.dumps(adapter.config(cfg, special, dtype), indent=2),
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
        **adapter.code_files(),
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


def is_remote_code(directory: str) -> bool:
    """Whether the transformers directory loads through remote code (`trust_remote_code=True`)."""
    with open(os.path.join(directory, "config.json")) as f:
        return "auto_map" in json.load(f)


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
    directory of a Llama, Qwen3, Arcee or GPT-2 model, or of our remote-code export (safetensors
    weights, one file or sharded)."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    where = f"{directory}/config.json"
    adapter = ADAPTERS.get(config.get("model_type"))
    if adapter is None:
        known = ", ".join(ADAPTERS)
        raise UserError(f"{where}: model_type={config.get('model_type')!r}; models that can be imported: {known}")
    try:
        cfg = adapter.model_config(config, where)
    except KeyError as e:
        raise UserError(f"{where}: missing {e.args[0]!r}") from None
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{where}: {e}") from None
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
    cfg, weights = adapter.read_weights(cfg, weights)
    try:
        state = {k: v.contiguous() for k, v in adapter.from_hf(cfg, weights).items()}
    except KeyError as e:
        raise UserError(f"{directory}: weight {e.args[0]!r} is missing") from None
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        raise UserError(f"{directory}: no tokenizer.json (a fast tokenizer is needed)")
    with open(tokenizer_path) as f:
        tokenizer_json = f.read()
    return cfg, state, tokenizer_json
