"""Loading exported models and sampling from them with a KV cache.

A model reference is `models:/NAME/VERSION` (or `/latest`), `models:/NAME@ALIAS`, `runs:/RUN_ID`, the URI of an
export directory (model.safetensors + model_config.json + tokenizer.json), local or s3://, or a
local transformers Llama/GPT-2 directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from pydantic import Field, TypeAdapter, ValidationError

from generalmodel import UserError
from generalmodel.config import ModelConfig, Section, StorageConfig
from generalmodel.data.tokenizer import eos_id, load_tokenizer
from generalmodel.storage import download_export
from models import build_model


class SamplingParams(Section):
    """How to sample: temperature, then top-k / top-p / min-p filtering."""

    temperature: float = Field(0.8, ge=0, description="Softmax temperature; 0 is greedy.")
    top_k: int | None = Field(None, gt=0, description="Keep the k most likely tokens (null: all).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus: the smallest set holding this much probability.")
    min_p: float = Field(0.0, ge=0, lt=1, description="Drop tokens below min_p × the top token's probability.")
    max_new_tokens: int = Field(100, gt=0, description="Tokens to generate per prompt (at most).")
    seed: int = Field(0, description="Seeds the sampling.")


def fetch(reference: str, tracking_uri: str | None, storage: StorageConfig) -> str:
    """A local directory holding the model of `reference` (see `read_model` for what it holds).
    From MLflow only the native export is downloaded (not the transformers copy beside it)."""
    if reference.startswith(("models:/", "runs:/")):
        import mlflow

        from generalmodel.infer.pyfunc import EXPORT_SUBDIR

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        uri = resolve(reference, tracking_uri)
        try:
            return mlflow.artifacts.download_artifacts(f"{uri}/{EXPORT_SUBDIR}")
        except Exception:  # a model registered before the MLflow flavor: the export files at its root
            pass
        try:
            return mlflow.artifacts.download_artifacts(uri)
        except Exception as e:
            raise UserError(f"cannot load {reference} from MLflow ({tracking_uri}): {e}") from None
    if os.path.isdir(reference):
        from generalmodel.interop.hf import is_hf_directory

        if is_hf_directory(reference):
            return reference
    return download_export(reference, storage)


def resolve(reference: str, tracking_uri: str | None) -> str:
    """The artifact URI of a `models:/` or `runs:/` reference; a UserError when MLflow has no such model."""
    try:
        return model_artifact_uri(reference, tracking_uri)
    except Exception as e:
        raise UserError(f"cannot find {reference} in MLflow ({tracking_uri}): {e}") from None


def model_artifact_uri(reference: str, tracking_uri: str | None) -> str:
    """The artifact URI of a `models:/NAME/VERSION`, `models:/NAME@ALIAS` or `runs:/ID` model."""
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking.runs import model_version

    if reference.startswith("runs:/"):
        return reference.rstrip("/") + "/model"
    client = MlflowClient(tracking_uri)
    mv = model_version(client, reference)
    return client.get_model_version_download_uri(mv.name, mv.version)


def export_files(cfg, state: dict[str, torch.Tensor], tokenizer_json: str) -> dict[str, bytes]:
    """The native export of a model (its config dataclass, full state dict, tokenizer JSON) as
    file name → bytes: model.safetensors, model_config.json, tokenizer.json."""
    import dataclasses

    from safetensors.torch import save

    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "head.weight"}  # embed.weight; rebuilt by the model
    return {
        "model.safetensors": save({k: v.detach().cpu().contiguous() for k, v in state.items()}),
        "tokenizer.json": tokenizer_json.encode(),
        "model_config.json": json.dumps(dataclasses.asdict(cfg), indent=2).encode(),
    }


def read_export(directory: str):
    """(model config, state dict, tokenizer JSON) of a native export directory."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "model_config.json")) as f:
        try:
            cfg = TypeAdapter(ModelConfig).validate_python(json.load(f))
        except ValidationError as e:
            raise UserError(f"{directory}/model_config.json: {e}") from None
    with open(os.path.join(directory, "tokenizer.json")) as f:
        tokenizer_json = f.read()
    return cfg, load_file(os.path.join(directory, "model.safetensors")), tokenizer_json


def read_model(directory: str):
    """(model config, state dict, tokenizer JSON, where) of a downloaded model: a native export,
    an MLflow model saved by this platform (its export/), or a transformers Llama/GPT-2 directory."""
    from generalmodel.infer.pyfunc import export_dir
    from generalmodel.interop.hf import is_hf_directory, read_hf

    if is_hf_directory(directory) and not os.path.exists(os.path.join(directory, "model_config.json")):
        return (*read_hf(directory), directory)
    directory = export_dir(directory)
    return (*read_export(directory), directory)


def load_state(model, state: dict[str, torch.Tensor], where: str) -> None:
    """A full state dict into a freshly built (unsharded) model; a tied head may be absent (the
    export leaves it out: it is embed.weight). A UserError naming `where` when it does not fit."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit the config (missing {missing}, unexpected {unexpected})")


def build_with_state(cfg, state: dict[str, torch.Tensor], tokenizer_json: str, where: str):
    """(model in eval mode, tokenizer) from a model config, its weights and its tokenizer JSON."""
    model = build_model(cfg)
    load_state(model, state, where)
    return model.eval(), load_tokenizer(tokenizer_json, f"{where}/tokenizer.json")


def load_model(directory: str, device: str = "cpu", quant: str = "none"):
    """(model, tokenizer) from a model directory (see `read_model`), quantized by torchao unless
    `quant` is "none" (generalmodel.infer.quant)."""
    from generalmodel.infer.quant import check_quant, quantize

    check_quant(quant, device)  # before the download is read: an impossible combination fails first
    cfg, state, tokenizer_json, where = read_model(directory)
    model, tokenizer = build_with_state(cfg, state, tokenizer_json, where)
    return quantize(model.to(device), quant), tokenizer


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p on (B, vocab) logits."""
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.min_p > 0:
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    if p.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model, prompt_ids: list[int], params: SamplingParams, eos_id: int | set[int] | None = None
) -> Iterator[int]:
    """Yields new token ids one at a time (a batch of one on `generalmodel.infer.engine`): prefill
    the prompt, then decode with the static KV cache; stops before `eos_id` (one id, or a set: a
    chat model's end-of-turn and EOS) or when the sequence reaches the model's max_seq_len. A
    longer prompt keeps its last max_seq_len - 1 tokens; an empty one starts from the stop id."""
    from generalmodel.infer.engine import Engine, Request

    stop = eos_id if isinstance(eos_id, set) else {eos_id} if eos_id is not None else set()
    limit = model.cfg.max_seq_len
    ids = list(prompt_ids[-limit + 1 :]) or [min(stop, default=0)]
    engine = Engine(model, 1, capacity=min(limit, len(ids) + params.max_new_tokens))
    request = engine.add(Request(ids, params, frozenset(stop)))
    while not request.done:
        for event in engine.step():
            if event.token is not None:
                yield event.token


def sample_text(model, tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yields decoded text pieces as tokens arrive (streaming), stopping at EOS; the pieces join
    to the decoded completion."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return _decoded(tokenizer, generate(model, prompt_ids, params, eos_id(tokenizer)))


def sample_chat(model, tokenizer, messages: list[dict[str, str]], params: SamplingParams) -> Iterator[str]:
    """The assistant's reply to a conversation (the chat format, generalmodel.data.chat), streamed
    like sample_text; stops at the end of its turn (or EOS)."""
    from generalmodel.data.chat import ChatFormat

    fmt = ChatFormat.from_json(tokenizer.to_str())
    stop = {fmt.end_id, eos_id(tokenizer)}
    return _decoded(tokenizer, generate(model, fmt.prompt_ids(messages), params, stop))


def _decoded(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    produced: list[int] = []
    shown = ""
    for token in tokens:
        produced.append(token)
        text = tokenizer.decode(produced)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown) :]
            shown = text
    text = tokenizer.decode(produced)
    if len(text) > len(shown):  # generation ended inside a multi-byte character: show what there is
        yield text[len(shown) :]
