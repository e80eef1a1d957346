"""Look inside a model: attention maps, activation patching, the logit lens, direct logit
attribution and MoE routing on prompts from a YAML file — figures and tables saved locally and
logged to an MLflow run tagged with the model version (which gets the run as its `interp_run` tag).

    python -m jobs.interp --model=models:/llama-tiny-arith-sft/latest --prompts=configs/prompts/interp-arithmetic.yaml
    python -m jobs.interp --model=models:/llama-tiny/1 --prompts=my-prompts.yaml --patch='[resid_pre, attn.hook_z]'
    make interp      # the arithmetic SFT model (trained first when the registry lacks it)

The prompts file is described in generalmodel/interp/prompts.py: raw text or chat turns, an
optional token-aligned corrupted twin (activation patching), the answer and wrong tokens. The
library behind it (generalmodel/interp) works on any model of the zoo from Python too.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import shutil

import torch
from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section, StorageConfig, Strings, TrackingConfig
from generalmodel.infer.export import build_with_state, read_export
from generalmodel.interp import (
    HEADS,
    block_point,
    direct_logit_attribution,
    logit_diff,
    logit_lens,
    patch,
    run_with_cache,
)
from generalmodel.interp.prompts import Prompt, read_prompts, token_labels
from generalmodel.tracking import check_reachable, model_tags, tracking_uri
from generalmodel.tracking.registry import download_model


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
    check_points(model, cfg.patch)  # before any work
    out = cfg.out or os.path.join(".generalmodel", "interp", re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model).strip("-"))
    out = out.rstrip("/")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "interp.md")):
        from generalmodel import UserError

        raise UserError(f"--out={out} holds files of something else; the job replaces its folder whole: give another")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    metrics, summary = {}, [f"# Interpretability: {cfg.model}\n"]
    for prompt in prompts:
        folder = os.path.join(partial, prompt.name)
        os.makedirs(folder)
        found, lines = analyse(model, tokenizer, prompt, cfg, folder)
        metrics.update({f"{prompt.name}.{k}": v for k, v in found.items()})
        summary += lines
    with open(os.path.join(partial, "interp.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the new figures replace the last run's, whole
    os.rename(partial, out)
    run_id = log_run(cfg, uri, out, metrics)
    print("\n".join(summary))
    print(f"figures: {out}/; MLflow: run {run_id} ({uri}, experiment {cfg.tracking.experiment!r})")
    return {"run_id": run_id, "out": out, "metrics": metrics}


def check_points(model, points: list[str]) -> None:
    """Patched points must be per-position activations (B, T, ...) that every block has."""
    from generalmodel import UserError
    from generalmodel.interp import hook_names

    names = set(hook_names(model))
    in_block = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")})
    patchable = [
        p for p in in_block
        if not p.endswith("hook_pattern") and all(block_point(i, p) in names for i in range(model.cfg.n_layers))
    ]  # fmt: skip
    for point in points:
        if block_point(0, point).split(".", 2)[2] not in patchable:
            raise UserError(
                f"--patch: {point!r} is not a per-position hook point of every block; choose from {patchable}"
            )


class Report:
    """One prompt's folder of figures and tables, its metrics and its lines of interp.md."""

    def __init__(self, folder: str, tokenizer, prompt: Prompt):
        self.folder, self.tokenizer = folder, tokenizer
        self.labels = token_labels(tokenizer, prompt.ids)
        self.metrics: dict[str, float] = {}
        self.lines = [f"## {prompt.name}", "", f"tokens ({len(self.labels)}): {' '.join(self.labels)}"]

    def text(self, token: int) -> str:
        return token_labels(self.tokenizer, [token])[0]

    def figure(self, fig, name: str) -> None:
        from generalmodel.interp.plots import plt

        fig.savefig(os.path.join(self.folder, name), dpi=110, bbox_inches="tight")
        plt.close(fig)

    def table(self, name: str, header: list[str], rows) -> None:
        with open(os.path.join(self.folder, name), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


@torch.no_grad()
def analyse(model, tokenizer, prompt: Prompt, cfg: InterpConfig, folder: str) -> tuple[dict[str, float], list[str]]:
    """Every figure and table of one prompt into `folder`; returns its metrics and summary lines."""
    from generalmodel.interp import plots

    report = Report(folder, tokenizer, prompt)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    routing = ["blocks.*.mlp.hook_expert_ids"] if model.cfg.moe_experts else []
    logits, cache = run_with_cache(model, ids, ["blocks.*.attn.hook_pattern", *routing])
    last = logits[0, -1].float()
    answer = prompt.answer if prompt.answer is not None else int(last.argmax())
    wrong = prompt.wrong
    corrupted = torch.tensor([prompt.corrupted], device=device) if prompt.corrupted else None
    if wrong is None and prompt.answer is None and corrupted is not None:  # the corrupted run's own prediction
        theirs = int(model(corrupted)[0, -1].argmax())
        wrong = theirs if theirs != answer else None
    what = repr(report.text(answer)) + (f" - {report.text(wrong)!r}" if wrong is not None else "")
    report.metrics |= {
        "answer_prob": float(last.softmax(-1)[answer]),
        "answer_rank": float((last > last[answer]).sum()),
    }
    report.lines += [f"metric: logit {what}", ""]

    patterns = cache.layers("attn.hook_pattern")[:, 0].cpu()
    report.figure(plots.attention_figure(patterns, report.labels, prompt.name), "attention.png")
    lens_section(report, model, ids, answer, cfg.lens_positions, prompt.name)
    attribution_section(report, model, ids, answer, wrong, what, prompt.name)
    if corrupted is not None:
        patching_section(report, model, ids, corrupted, logit_diff(answer, wrong), cfg, prompt.name)
    moe = {
        layer: cache[block_point(layer, "mlp.hook_expert_ids")].cpu()
        for layer in range(model.cfg.n_layers)
        if block_point(layer, "mlp.hook_expert_ids") in cache
    }
    if moe:
        report.figure(plots.routing_figure(moe, model.cfg.moe_experts, prompt.name), "routing.png")
    report.lines.append("")
    return report.metrics, report.lines


def lens_section(report: Report, model, ids, answer: int, positions: int, title: str) -> None:
    from generalmodel.interp import plots

    lens = logit_lens(model, ids)
    lens = type(lens)(lens.labels, lens.logits.cpu())
    report.figure(plots.logit_lens_figure(lens, report.labels, report.text, title, positions), "logit_lens.png")
    top1 = lens.top(1)[1][:, 0, -1, 0]
    first = next((i for i in range(len(top1)) if top1[i:].eq(answer).all()), None)
    report.metrics["answer_top1_from_stage"] = float(first) if first is not None else -1.0
    by_stage = ", ".join(f"{s} {p:.2f}" for s, p in zip(lens.labels, lens.prob(answer)[:, 0, -1].tolist(), strict=True))
    stage = lens.labels[first] if first is not None else "never"
    report.lines += [
        _lens_table(lens, report.labels, report.text, positions),
        "",
        f"logit lens: the answer is the top token from stage **{stage}** on; its probability: {by_stage}",
    ]


def attribution_section(report: Report, model, ids, answer: int, wrong: int | None, what: str, title: str) -> None:
    from generalmodel.interp import plots

    attribution = direct_logit_attribution(model, ids, answer, wrong)
    report.figure(plots.attribution_figure(attribution, title, what), "dla.png")
    components = list(zip(attribution.names, attribution.values[:, 0].tolist(), strict=True))
    report.table("dla.csv", ["component", "direct_effect"], [(n, f"{v:.6g}") for n, v in components])
    ranked = sorted(components, key=lambda c: -abs(c[1]))
    report.lines += ["", "direct logit attribution (largest): " + ", ".join(f"{n} {v:+.2f}" for n, v in ranked[:6])]


def patching_section(report: Report, model, ids, corrupted, metric, cfg: InterpConfig, title: str) -> None:
    from generalmodel.interp import plots

    result = patch(model, ids, corrupted, metric, cfg.patch, heads=cfg.patch_heads)
    report.metrics |= {"logit_diff_clean": result.clean, "logit_diff_corrupted": result.corrupted}
    report.figure(plots.patching_figure(result, report.labels, title), "patching.png")
    rows = []
    for point, grid in result.results.items():
        normalized = result.normalized(point)
        for layer, column in itertools.product(range(grid.shape[0]), range(grid.shape[1])):
            label = f"head {column}" if point == HEADS else report.labels[column]
            value, recovered = float(grid[layer, column]), float(normalized[layer, column])
            rows.append((point, layer, column, label, f"{value:.6g}", f"{recovered:.4f}"))
    report.table("patching.csv", ["point", "layer", "position_or_head", "token_or_head", "metric", "recovered"], rows)
    best = sorted(rows, key=lambda r: -abs(float(r[5])) if r[5] != "nan" else 0)[:6]
    report.lines += [
        "",
        f"activation patching: clean {result.clean:.2f}, corrupted {result.corrupted:.2f}; most recovered: "
        + ", ".join(f"{p} L{layer} @{pos} {label!r} {rec}" for p, layer, pos, label, _, rec in best),
    ]


def _lens_table(lens, labels: list[str], decode, last: int) -> str:
    """Markdown: the top token (probability) at each stage × the last positions of row 0."""
    probs, top = lens.top(1)
    shown = range(max(0, len(labels) - last), len(labels))
    head = "| stage | " + " | ".join(f"`{labels[p]}`" for p in shown) + " |"
    rows = [head, "|---" * (len(shown) + 1) + "|"]
    for stage, label in enumerate(lens.labels):
        cells = (f"`{decode(int(top[stage, 0, p, 0]))}` {float(probs[stage, 0, p, 0]):.2f}" for p in shown)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
