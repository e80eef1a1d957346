"""Look inside a model: attention maps, activation patching, the logit lens, direct logit
attribution and MoE routing on prompts from a YAML file — figures and tables saved locally and
logged to an MLflow run tagged with the model version (which gets the run as its `interp_run` tag).
With --generate=true, each prompt is continued (--sampling: entropy-aware sampling by default, up to
--sampling.max_new_tokens) and the entropy and varentropy of every step are plotted with the
sampler's decisions.

    python -m jobs.interp --model=models:/llama-tiny-arith-sft/latest --prompts=configs/prompts/interp-arithmetic.yaml
    python -m jobs.interp --model=models:/llama-tiny/1 --prompts=my-prompts.yaml --patch='[resid_pre, attn.hook_z]'
    python -m jobs.interp --model=models:/llama-tiny-reason-cot/latest --prompts=P.yaml --generate=true
    make interp      # the arithmetic SFT model (trained first when the registry lacks it)

The prompts file is described in generalmodel/interp/prompts.py: raw text or chat turns, an
optional token-aligned corrupted twin (activation patching), the answer and wrong tokens. The
library behind it (generalmodel/interp) works on any model of the zoo from Python too.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section, StorageConfig, Strings, TrackingConfig
from generalmodel.infer import SamplingParams
from generalmodel.infer.export import build_with_state, read_export
from generalmodel.interp.prompts import read_prompts
from generalmodel.interp.report import Options, write_report
from generalmodel.tracking import check_reachable, model_tags, tracking_uri
from generalmodel.tracking.registry import download_model


class InterpSampling(SamplingParams):
    """How --generate continues each prompt: entropy-aware sampling by default (its decisions are plotted)."""

    strategy: Literal["sample", "entropy"] = Field(
        "entropy", description="entropy: per step, argmax, sample or explore by the entropy and varentropy."
    )


class InterpConfig(Section):
    """Which model, which prompts, what to patch."""

    model: str = Field(..., description="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID or an export URI.")
    prompts: str = Field(..., description="A YAML file of prompts (generalmodel/interp/prompts.py).")
    out: str | None = Field(None, description="Where the figures go (default .generalmodel/interp/<model>).")
    patch: Strings = Field(
        ["resid_pre", "attn_out", "mlp_out"],
        description="Per-block hook points to patch by layer x position (resid_pre, resid_mid, resid_post, "
        "attn_out, mlp_out, attn.hook_z, ...).",
    )
    patch_heads: bool = Field(True, description="Also patch each attention head's output (layer x head).")
    lens_positions: int = Field(16, gt=0, description="The logit lens shows this many last positions.")
    device: str = Field("cpu", description="cpu or cuda (fp32 either way).")
    generate: bool = Field(False, description="Continue each prompt (--sampling) and plot the entropy along it.")
    sampling: InterpSampling = InterpSampling()
    name: str | None = Field(None, description="The MLflow run's name (default: interp: <model>).")
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()


def main(cfg: InterpConfig) -> dict:
    uri = tracking_uri(cfg)
    check_reachable(uri)
    model_cfg, state, tokenizer_json, where = read_export(download_model(cfg.model, uri, cfg.storage.resolved()))
    model, tokenizer = build_with_state(model_cfg, state, tokenizer_json, where)
    model = model.to(cfg.device).float()
    prompts = read_prompts(cfg.prompts, tokenizer_json, model.cfg.max_seq_len)
    out = cfg.out or os.path.join(".generalmodel", "interp", re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model).strip("-"))
    continuation = continuer(model, tokenizer, cfg) if cfg.generate else None
    options = Options(tuple(cfg.patch), cfg.patch_heads, cfg.lens_positions, continuation)
    metrics, summary = write_report(model, tokenizer, prompts, options, out.rstrip("/"), cfg.model)
    run_id = log_run(cfg, uri, out.rstrip("/"), metrics)
    print("\n".join(summary))
    print(f"figures: {out}/; MLflow: run {run_id} ({uri}, experiment {cfg.tracking.experiment!r})")
    return {"run_id": run_id, "out": out.rstrip("/"), "metrics": metrics}


def continuer(model, tokenizer, cfg: InterpConfig):
    """prompt ids → (the tokens continuing them, the sampler's decisions): the engine with
    cfg.sampling, stopping at EOS or, for a chat model, at the end of its turn."""
    from generalmodel.data.chat import ChatFormat, has_chat_tokens
    from generalmodel.data.tokenizer import eos_id
    from generalmodel.infer.engine import generate_batch, thoughts_of

    stop = {eos_id(tokenizer)} | ({ChatFormat(tokenizer).end_id} if has_chat_tokens(tokenizer) else set())
    params, thoughts = cfg.sampling, thoughts_of(model, tokenizer)

    def continue_prompt(ids: list[int]) -> tuple[list[int], list[str]]:
        (request,) = generate_batch(model, [ids], params, stop, thoughts=thoughts)
        return request.tokens, request.decisions

    return continue_prompt


def log_run(cfg: InterpConfig, uri: str, out: str, metrics: dict[str, float]) -> str:
    """One MLflow run with every figure and table, tagged with the model version and the run that
    produced it; a registered version gets the run's id as its `interp_run` tag."""
    import time

    import yaml
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking import ensure_experiment

    client = MlflowClient(uri)
    tags = model_tags(cfg.model, uri)
    run_id = client.create_run(
        ensure_experiment(uri, cfg.tracking.experiment),
        run_name=cfg.name or f"interp: {cfg.model}",
        tags={"generalmodel.kind": "interp", "interpreted_model": cfg.model, **tags},
    ).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    client.log_artifacts(run_id, out)
    client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json")), "interp_config.yaml")
    with open(cfg.prompts) as f:
        client.log_text(run_id, f.read(), "prompts.yaml")
    client.set_terminated(run_id)
    if "model_version" in tags:
        client.set_model_version_tag(tags["model_name"], tags["model_version"], "interp_run", run_id)
    return run_id


def cli() -> None:
    run_job(main, InterpConfig, __doc__)


if __name__ == "__main__":
    cli()
