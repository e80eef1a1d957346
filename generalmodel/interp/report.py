"""The interpretability report of a model on a set of prompts: for each prompt a folder of figures
and tables (attention maps, the logit lens, direct logit attribution, activation patching, MoE
routing; with a continuation, the entropy and varentropy along it) and its lines of interp.md,
published whole (`write_report`). `jobs/interp.py` logs it to MLflow."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from generalmodel.errors import UserError
from generalmodel.interp import plots
from generalmodel.interp.analysis import HEADS, direct_logit_attribution, entropy_along, logit_diff, logit_lens, patch
from generalmodel.interp.hooks import block_point, hook_names, run_with_cache
from generalmodel.interp.plots import plt
from generalmodel.interp.prompts import Prompt, token_labels


@dataclass(frozen=True)
class Options:
    """What to patch (per-block hook points, and each head) and how many positions the lens shows."""

    patch: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
    patch_heads: bool = True
    lens_positions: int = 16
    # prompt ids → (the tokens that continue it, entropy-aware sampling's decision at each step, or
    # none): jobs/interp.py's engine. With it, the entropy and varentropy along the continuation.
    continue_prompt: Callable[[list[int]], tuple[list[int], list[str]]] | None = None


def write_report(model, tokenizer, prompts: list[Prompt], options: Options, out: str, title: str):
    """Every prompt's figures and tables under `out` (replaced whole: written to `out`.partial
    first) and `out`/interp.md; returns (metrics, the lines of interp.md). `out` may hold only an
    earlier report."""
    check_points(model, list(options.patch))  # before any work
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "interp.md")):
        raise UserError(f"--out={out} holds files of something else; the job replaces its folder whole: give another")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    metrics, summary = {}, [f"# Interpretability: {title}\n"]
    for prompt in prompts:
        folder = os.path.join(partial, prompt.name)
        os.makedirs(folder)
        found, lines = analyse(model, tokenizer, prompt, options, folder)
        metrics.update({f"{prompt.name}.{k}": v for k, v in found.items()})
        summary += lines
    with open(os.path.join(partial, "interp.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the new figures replace the last run's, whole
    os.rename(partial, out)
    return metrics, summary


def check_points(model, points: list[str]) -> None:
    """Patched points must be per-position activations (B, T, ...) that every block has."""
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
        fig.savefig(os.path.join(self.folder, name), dpi=110, bbox_inches="tight")
        plt.close(fig)

    def table(self, name: str, header: list[str], rows) -> None:
        with open(os.path.join(self.folder, name), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)


@torch.no_grad()
def analyse(model, tokenizer, prompt: Prompt, options: Options, folder: str) -> tuple[dict[str, float], list[str]]:
    """Every figure and table of one prompt into `folder`; returns its metrics and summary lines."""
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
    lens_section(report, model, ids, answer, options.lens_positions, prompt.name)
    attribution_section(report, model, ids, answer, wrong, what, prompt.name)
    if corrupted is not None:
        patching_section(report, model, ids, corrupted, logit_diff(answer, wrong), options, prompt.name)
    moe = {
        layer: cache[block_point(layer, "mlp.hook_expert_ids")].cpu()
        for layer in range(model.cfg.n_layers)
        if block_point(layer, "mlp.hook_expert_ids") in cache
    }
    if moe:
        report.figure(plots.routing_figure(moe, model.cfg.moe_experts, prompt.name), "routing.png")
    if options.continue_prompt is not None:
        entropy_section(report, model, prompt, options.continue_prompt, prompt.name)
    report.lines.append("")
    return report.metrics, report.lines


def entropy_section(report: Report, model, prompt: Prompt, continue_prompt, title: str) -> None:
    """The entropy and varentropy of every step of the prompt's continuation (answer_entropy.png,
    answer_entropy.csv), with entropy-aware sampling's decisions when it made them."""
    tokens, decisions = continue_prompt(list(prompt.ids))
    decisions = decisions[: len(tokens)]  # the stop token's step is not plotted
    if not tokens:
        report.lines.append("continuation: none (the model stopped at once)")
        return
    device = next(model.parameters()).device
    stats = entropy_along(model, torch.tensor(list(prompt.ids) + tokens, device=device))[len(prompt.ids) - 1 : -1]
    stats = stats.cpu()
    labels = [report.text(t) for t in tokens]
    report.figure(plots.entropy_figure(stats, labels, title, decisions or None), "answer_entropy.png")
    rows = [
        (i, label, f"{h:.4f}", f"{v:.4f}", decisions[i] if decisions else "")
        for i, (label, (h, v)) in enumerate(zip(labels, stats.tolist(), strict=True))
    ]
    report.table("answer_entropy.csv", ["step", "token", "entropy", "varentropy", "decision"], rows)
    report.metrics |= {
        "answer_mean_entropy": float(stats[:, 0].mean()),
        "answer_mean_varentropy": float(stats[:, 1].mean()),
    }
    counts = ", ".join(f"{k} {n}" for k, n in Counter(decisions).most_common()) or "none (strategy: sample)"
    report.lines.append(
        f"continuation ({len(tokens)} tokens): {report.tokenizer.decode(tokens)!r}; decisions: {counts}"
    )


def lens_section(report: Report, model, ids, answer: int, positions: int, title: str) -> None:
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
    attribution = direct_logit_attribution(model, ids, answer, wrong)
    report.figure(plots.attribution_figure(attribution, title, what), "dla.png")
    components = list(zip(attribution.names, attribution.values[:, 0].tolist(), strict=True))
    report.table("dla.csv", ["component", "direct_effect"], [(n, f"{v:.6g}") for n, v in components])
    ranked = sorted(components, key=lambda c: -abs(c[1]))
    report.lines += ["", "direct logit attribution (largest): " + ", ".join(f"{n} {v:+.2f}" for n, v in ranked[:6])]


def patching_section(report: Report, model, ids, corrupted, metric, options: Options, title: str) -> None:
    result = patch(model, ids, corrupted, metric, options.patch, heads=options.patch_heads)
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
