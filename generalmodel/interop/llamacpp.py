"""Our models as GGUF files (llama.cpp), for the native classes whose llama.cpp architecture takes
them as they are: Llama (`llama`), Qwen3 without sliding windows (`qwen3`) and Arcee (`arcee`).

Written with the `gguf` package (llama.cpp's own writer): the tensors are the transformers
adapter's (`generalmodel.interop.llama`), renamed by `gguf`'s tensor name map; Llama and Arcee
queries/keys are permuted into llama.cpp's rotary layout as its converter does (Qwen3's rotate
halves, as ours do: no permutation). The vocabulary is ours, byte-level BPE (`tokenizer.ggml.model`
`gpt2`, pre-tokenizer `gpt-2`: GPT-2's split, what `ByteLevel` runs), with its merges and special
tokens. Anything else — GPT-2 (fused, transposed projections), windows, remote-code models — is
refused by name. The file is written to a temporary name and renamed when complete.

Checked here by reading the file back (`gguf.GGUFReader`: every tensor and key); llama.cpp itself
does not install from the package registries this platform's CI reaches, so it is not run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil

import numpy as np
import torch

from generalmodel.errors import UserError
from generalmodel.interop.adapter import ExportError
from generalmodel.interop.hf import adapter_for
from generalmodel.storage import StorageError, StorageFull

# Our exported class (its adapter's model_type) → (llama.cpp architecture, queries/keys permuted).
ARCHITECTURES = {"llama": ("llama", True), "qwen3": ("qwen3", False), "arcee": ("arcee", True)}
DTYPES = {"float32": (np.float32, 0), "float16": (np.float16, 1)}  # numpy type, llama.cpp file type


def gguf_architecture(cfg) -> str:
    """The llama.cpp architecture `cfg` is written as; an ExportError naming why not."""
    return _target(cfg)[0]


def _target(cfg):
    """(llama.cpp architecture, queries/keys permuted, the transformers adapter) of `cfg`."""
    adapter = adapter_for(cfg)
    if adapter.model_type not in ARCHITECTURES:
        raise ExportError(
            f"model {cfg.name!r} exports as {adapter.model_type!r}; GGUF is written for "
            f"{', '.join(ARCHITECTURES)} (the native classes llama.cpp runs as they are)"
        )
    if cfg.window is not None:
        raise ExportError(f"window={cfg.window}: llama.cpp's qwen3 has no sliding-window layers")
    return (*ARCHITECTURES[adapter.model_type], adapter)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (transformers, ours) into llama.cpp's interleaved
    rotary order: (heads, 2, d/2, in) → (heads, d/2, 2, in)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def vocabulary(tokenizer_json: str, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp token types, merges as 'a b') of our byte-level BPE, padded
    to the model's vocabulary with unused tokens."""
    import gguf

    spec = json.loads(tokenizer_json)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export: a {model.get('type')!r} tokenizer; byte-level BPE is written")
    by_id = {i: token for token, i in model["vocab"].items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    if max(by_id) >= vocab_size:
        raise UserError(f"GGUF export: the tokenizer has id {max(by_id)}, over the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf(cfg, state: dict[str, torch.Tensor], tokenizer_json: str, path: str, dtype: str = "float32") -> str:
    """Write our model (`cfg`, `state`, tokenizer) as a GGUF file at `path`."""
    import gguf
    from tokenizers import Tokenizer

    from generalmodel.data.tokenizer import special_ids

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    arch, permute, adapter = _target(cfg)
    numpy_type, file_type = DTYPES[dtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        hyperparameters = (
            (writer.add_name, cfg.name),
            (writer.add_context_length, cfg.max_seq_len),
            (writer.add_embedding_length, cfg.d_model),
            (writer.add_block_count, cfg.n_layers),
            (writer.add_feed_forward_length, cfg.hidden),
            (writer.add_head_count, cfg.n_heads),
            (writer.add_head_count_kv, cfg.kv_heads),
            (writer.add_key_length, cfg.head_dim),
            (writer.add_value_length, cfg.head_dim),
            (writer.add_rope_dimension_count, cfg.head_dim),
            (writer.add_rope_freq_base, cfg.rope_theta),
            (writer.add_layer_norm_rms_eps, cfg.norm_eps),
            (writer.add_vocab_size, cfg.vocab_size),
            (writer.add_file_type, file_type),
        )
        for add, value in hyperparameters:
            add(value)
        tokens, types, merges = vocabulary(tokenizer_json, cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        special = special_ids(Tokenizer.from_str(tokenizer_json))
        for role, add in (
            ("bos", writer.add_bos_token_id),
            ("eos", writer.add_eos_token_id),
            ("pad", writer.add_pad_token_id),
        ):
            if special.get(role) is not None:
                add(special[role])
        writer.add_add_bos_token(False)
        for hf_name, tensor in adapter.to_hf(cfg, state).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise RuntimeError(f"gguf has no name for {hf_name!r} in {arch}")
            if permute and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                heads = cfg.n_heads if "q_proj" in hf_name else cfg.kv_heads
                tensor = permute_rotary(tensor, heads)
            # norms stay fp32 (llama.cpp's converters keep 1-D tensors in f32)
            kind = np.float32 if tensor.dim() == 1 else numpy_type
            writer.add_tensor(name, tensor.detach().to("cpu", torch.float32).numpy().astype(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(Exception):
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # as write_hf: a full disk named as such, nothing left behind
            # numpy's short writes say "N requested and M written", without an errno
            full = (
                getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(os.path.dirname(tmp) or ".").free < 2**16
            )
            if full:
                raise StorageFull(f"{path}: no space left on the device ({e})") from None
            raise StorageError(f"{path}: cannot write the GGUF file ({e})") from None
        raise
    return path
