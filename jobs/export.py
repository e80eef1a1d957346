"""Export a trained model as a Hugging Face `transformers` directory, loadable offline with
`AutoModelForCausalLM.from_pretrained(DIR)`: a native class where one reproduces the model
exactly (Llama, Qwen3, Arcee, GPT-2), else remote code (`trust_remote_code=True`).

    python -m jobs.export --model=models:/llama-tiny/1 --out=exports/llama-tiny-hf
    python -m jobs.export --model=runs:/<run_id> --out=exports/x --dtype=bfloat16
    python -m jobs.export --model=models:/llama-tiny/1 --format=gguf --out=exports/llama-tiny.gguf
Registered versions already carry this directory as their `hf/` artifact; this job makes one
from any model reference, e.g. an export URI.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from generalmodel import UserError
from generalmodel.cli import run_job
from generalmodel.config import Section, StorageConfig, TrackingConfig
from generalmodel.infer.export import read_export
from generalmodel.interop.hf import adapter_for, is_remote_code, write_hf
from generalmodel.tracking import tracking_uri
from generalmodel.tracking.registry import download_model


class ExportConfig(Section):
    """What to export, and where."""

    model: str = Field(..., description="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID or an export URI.")
    out: str = Field(..., description="The local directory to write (created; must not hold another model).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype: float32 or bfloat16 (hf), float32 or float16 (gguf)."
    )
    format: Literal["hf", "gguf"] = Field(
        "hf", description="hf: a transformers directory; gguf: one llama.cpp file at `out` (Llama, Qwen3, Arcee)."
    )
    remote_code: bool = Field(
        True, description="Export a model no native transformers class reproduces as remote code; false: refuse it."
    )
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()


def main(cfg: ExportConfig) -> str:
    if cfg.format == "gguf":
        return export_gguf(cfg)
    if os.path.exists(os.path.join(cfg.out, "config.json")):
        raise UserError(f"out {cfg.out!r} already holds a model (config.json): pick another directory")
    model, state, tokenizer_json, _ = read_export(download_model(cfg.model, tracking_uri(cfg), cfg.storage.resolved()))
    write_hf(model, state, tokenizer_json, cfg.out, cfg.dtype, cfg.remote_code)
    out = os.path.abspath(cfg.out)
    architecture = adapter_for(model, cfg.remote_code).architecture
    print(f"exported {cfg.model} to {out} as {architecture} ({', '.join(sorted(os.listdir(out)))})")
    trust = ", trust_remote_code=True" if is_remote_code(out) else ""
    print(f"load it: transformers.AutoModelForCausalLM.from_pretrained({out!r}{trust})")
    return cfg.out


def export_gguf(cfg: ExportConfig) -> str:
    from generalmodel.interop.llamacpp import write_gguf

    if os.path.exists(cfg.out):
        raise UserError(f"out {cfg.out!r} exists: GGUF is one new file")
    if cfg.dtype == "bfloat16":
        raise UserError("dtype bfloat16: GGUF is written in float32 or float16 (--dtype=float16)")
    model, state, tokenizer_json, _ = read_export(download_model(cfg.model, tracking_uri(cfg), cfg.storage.resolved()))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    write_gguf(model, state, tokenizer_json, cfg.out, cfg.dtype)
    print(f"exported {cfg.model} to {os.path.abspath(cfg.out)} (GGUF for llama.cpp, {cfg.dtype})")
    return cfg.out


def cli() -> None:
    run_job(main, ExportConfig, __doc__)


if __name__ == "__main__":
    cli()
