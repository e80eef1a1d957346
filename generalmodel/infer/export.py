"""The native export of a model and loading it: the one format every stage writes and reads.

An export directory holds model.safetensors (the full state dict; a tied head left out),
model_config.json (the model's config dataclass) and tokenizer.json. An adapter's export
(train.adapter) holds adapter.safetensors (its vectors) and adapter.json (its kind and the
reference of the base it adapts) instead of model.safetensors; `merge_adapter` makes the adapted
model's state from the base's (resolving the base reference is the registry's:
`generalmodel.tracking.registry.download_model` hands every reader the merged export). `export_files` makes those
bytes, `read_export` reads them back from a native export, an MLflow model saved by this platform
(its data/export/) or a transformers Llama/GPT-2 directory, and `load_model` builds the model from
any of them. Downloading a model by reference (`models:/`, `runs:/`, s3://) is
`generalmodel.tracking.registry.download_model`.
"""

from __future__ import annotations

import json
import os

import torch
from pydantic import TypeAdapter, ValidationError

from generalmodel.config import ModelConfig
from generalmodel.data.tokenizer import load_tokenizer
from generalmodel.errors import UserError
from generalmodel.storage import ADAPTER_FILES, EXPORT_FILES
from models import build_model, svf

# An MLflow model saved by this platform (generalmodel.tracking.pyfunc): the native export under
# data/export/ (where MLflow puts a loader_module flavor's data_path), transformers under hf/.
EXPORT_SUBDIR = "data/export"
HF_SUBDIR = "hf"


def export_files(cfg, state: dict[str, torch.Tensor], tokenizer_json: str) -> dict[str, bytes]:
    """The native export of a model (its config dataclass, full state dict, tokenizer JSON) as
    file name → bytes: model.safetensors, model_config.json, tokenizer.json."""
    import dataclasses

    from safetensors.torch import save

    tied = set(cfg.tied_keys())  # each the embedding's weight; the model rebuilds the tie
    state = {k: v for k, v in state.items() if k not in tied}
    return {
        "model.safetensors": save({k: v.detach().cpu().contiguous() for k, v in state.items()}),
        "tokenizer.json": tokenizer_json.encode(),
        "model_config.json": json.dumps(dataclasses.asdict(cfg), indent=2).encode(),
    }


def adapter_files(cfg, state: dict[str, torch.Tensor], tokenizer_json: str, base: str) -> dict[str, bytes]:
    """The export of an SVF adapter of the model `base` (a model reference) from the adapted model's
    full state: its vectors, adapter.json, the base's model config and the tokenizer."""
    from safetensors.torch import save

    vectors = svf.vectors(state)
    files = export_files(cfg, {}, tokenizer_json)
    del files["model.safetensors"]
    meta = {"kind": "svf", "base": base, "modules": sorted(vectors)}
    files["adapter.json"] = json.dumps(meta, indent=2).encode()
    files["adapter.safetensors"] = save({k: v.detach().cpu().float().contiguous() for k, v in vectors.items()})
    return files


def is_adapter(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, EXPORT_SUBDIR, "adapter.json")) or os.path.exists(
        os.path.join(directory, "adapter.json")
    )


def read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(adapter.json, vectors, tokenizer JSON) of a local adapter export (or an MLflow model of one)."""
    from safetensors.torch import load_file

    if not os.path.exists(os.path.join(directory, "adapter.json")):
        directory = os.path.join(directory, EXPORT_SUBDIR)
    missing = [name for name in ADAPTER_FILES if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise UserError(f"{directory} is an adapter export without {', '.join(missing)}")
    with open(os.path.join(directory, "adapter.json")) as f:
        meta = json.load(f)
    if meta.get("kind") != "svf" or not isinstance(meta.get("base"), str):
        raise UserError(f"{directory}/adapter.json: expected kind 'svf' and the base's reference, got {meta}")
    with open(os.path.join(directory, "tokenizer.json")) as f:
        tokenizer_json = f.read()
    return meta, load_file(os.path.join(directory, "adapter.safetensors")), tokenizer_json


def merge_adapter(directory: str, base: str) -> str:
    """A new local export directory: the adapter in `directory` merged into the base model exported
    in `base` (a local directory the adapter's base reference was downloaded to)."""
    import tempfile

    from generalmodel.data.tokenizer import tokenizer_hash

    meta, vectors, tokenizer_json = read_adapter(directory)
    cfg, state, base_tokenizer, where = read_export(base)
    if tokenizer_hash(base_tokenizer) != tokenizer_hash(tokenizer_json):
        raise UserError(f"the adapter in {directory} was trained with another tokenizer than its base {meta['base']}")
    try:
        merged = svf.merge(state, vectors)
    except ValueError as e:
        raise UserError(f"the adapter in {directory} does not fit its base {meta['base']} ({where}): {e}") from None
    out = tempfile.mkdtemp(prefix="gm-adapted-")
    for name, data in export_files(cfg, merged, tokenizer_json).items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return out


def export_dir(directory: str) -> str:
    """Where the native export files of a downloaded model directory are: its `data/export/` (an MLflow
    model saved by `generalmodel.tracking.pyfunc.save`) or the directory itself (a plain export)."""
    for candidate in (os.path.join(directory, EXPORT_SUBDIR), directory):
        if all(os.path.exists(os.path.join(candidate, name)) for name in EXPORT_FILES):
            return candidate
    if is_adapter(directory):
        raise UserError(
            f"{directory} is an adapter (adapter.json): load it by its reference (models:/NAME/N, runs:/ID or the "
            "directory given to a job), which merges it into the base model it names"
        )
    raise UserError(f"{directory} holds no exported model ({', '.join(EXPORT_FILES)}, or an MLflow model with them)")


def read_export(directory: str):
    """(model config, state dict, tokenizer JSON, where) of a local model directory: a native
    export, an MLflow model saved by this platform (its data/export/), or a transformers
    Llama/GPT-2 directory."""
    from safetensors.torch import load_file

    from generalmodel.interop.hf import is_hf_directory, read_hf

    if is_hf_directory(directory) and not os.path.exists(os.path.join(directory, "model_config.json")):
        return (*read_hf(directory), directory)
    directory = export_dir(directory)
    with open(os.path.join(directory, "model_config.json")) as f:
        try:
            cfg = TypeAdapter(ModelConfig).validate_python(json.load(f))
        except ValidationError as e:
            raise UserError(f"{directory}/model_config.json: {e}") from None
    with open(os.path.join(directory, "tokenizer.json")) as f:
        tokenizer_json = f.read()
    return cfg, load_file(os.path.join(directory, "model.safetensors")), tokenizer_json, directory


def load_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    """A full state dict into a freshly built (unsharded) model; a tied head may be absent (the
    export leaves it out: it is embed.weight). A UserError naming `where` when it does not fit."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in model.cfg.tied_keys()]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit the config (missing {missing}, unexpected {unexpected})")


def build_with_state(cfg, state: dict[str, torch.Tensor], tokenizer_json: str, where: str):
    """(model in eval mode, tokenizer) from a model config, its weights and its tokenizer JSON."""
    model = build_model(cfg)
    load_state(model, state, where)
    return model.eval(), load_tokenizer(tokenizer_json, f"{where}/tokenizer.json")


def load_model(directory: str, device: str = "cpu", quant: str = "none"):
    """(model, tokenizer) from a local model directory (see `read_export`), quantized by torchao unless
    `quant` is "none" (generalmodel.infer.quant)."""
    from generalmodel.infer.quant import check_quant, quantize

    check_quant(quant, device)  # before the download is read: an impossible combination fails first
    cfg, state, tokenizer_json, where = read_export(directory)
    model, tokenizer = build_with_state(cfg, state, tokenizer_json, where)
    return quantize(model.to(device), quant), tokenizer
