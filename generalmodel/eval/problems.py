"""Solving problems with checkable answers (the reasoning suite, generalmodel.eval.reasoning, or any
jsonl of its shape): for one model, each problem's greedy answer and `samples` sampled answers,
verified; summed up per task and level as pass@1 greedy, pass@1 sampled (the mean share of correct
samples) and pass@k by the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
Models Trained on Code"): 1 − C(n − c, k) / C(n, k) for c correct of n samples.

A problem row: `prompt` (the user's message), `answer`, and `task`, `level` and what its verifier
reads (countdown: `numbers`). Each sample's seed is a function of the sampling seed, the prompt
and the sample's number, so results do not depend on how the problems are cut into Ray tasks.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from generalmodel import UserError
from generalmodel.eval.reasoning import solved
from generalmodel.infer.engine import Engine, Request, SamplingParams, thoughts_of


@dataclass
class Solved:
    task: str
    level: int
    greedy: bool  # the greedy answer is right
    correct: int  # right answers among the samples
    samples: int
    example: str = ""  # the greedy completion (for the report)
    calls: int | None = None  # with tools: the tool calls the greedy answer made
    call_error: bool = False  # with tools: the greedy answer wrote a call that does not parse


def read_problems(source: str, storage, limit: int | None = None) -> list[dict[str, Any]]:
    """The problem rows of a jsonl/parquet source (local, s3://); a UserError names the file and
    line of a row without `prompt` or `answer`."""
    from generalmodel.config import DataConfig
    from generalmodel.data.sources import RowError, list_pieces, read_rows

    rows: list[dict[str, Any]] = []
    for piece in list_pieces(DataConfig(source=source, format="chat"), storage):
        for where, row in read_rows(piece, storage):
            if isinstance(row, RowError):
                raise row
            missing = [k for k in ("prompt", "answer") if k not in row]
            if missing or not isinstance(row["prompt"], str):
                raise UserError(f"{where}: a problem row needs a string `prompt` and an `answer`; missing {missing}")
            rows.append(row)
            if limit and len(rows) >= limit:
                return rows
    if not rows:
        raise UserError(f"no problems in {source!r}")
    return rows


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n (c right) is right."""
    if not 0 < k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def seed_of(*parts) -> int:
    """A 63-bit sampling seed named by its parts ("seed/…/…" hashed): the same parts, the same seed,
    wherever it is computed (RL's rollouts use it too)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@torch.no_grad()
def solve(
    model,
    tokenizer_json: str,
    rows: list[dict[str, Any]],
    samples: int,
    params: SamplingParams,
    slots: int = 32,
    tools: list[str] | None = None,
) -> list[Solved]:
    """Greedy and `samples` sampled chat answers (params' temperature, filters and max_new_tokens)
    to every row, `slots` sequences decoding at once, each verified. With `tools` (built-in
    tools' names, generalmodel.infer.tools) the model is told of them and its calls are run: the
    answer verified is the turn after the last call."""
    from generalmodel.data.chat import ChatFormat
    from generalmodel.data.tokenizer import eos_id

    fmt = ChatFormat.from_json(tokenizer_json)
    stop = frozenset({fmt.end_id, eos_id(fmt.tokenizer)})
    conversations = [[{"role": "user", "content": row["prompt"]}] for row in rows]
    prompts = [fmt.prompt_ids(c, tools=tools) for c in conversations]  # a ChatFormatError before any work
    greedy = params.model_copy(update={"temperature": 0.0, "strategy": "sample"})
    wanted = []  # (row, params) of every sequence: the greedy one, then the samples
    for i, row in enumerate(rows):
        wanted.append((i, greedy))
        wanted += [
            (i, params.model_copy(update={"seed": seed_of(params.seed, row["prompt"], s)})) for s in range(samples)
        ]
    thoughts = thoughts_of(model, fmt.tokenizer)  # a model that thinks (Coconut, Quiet-STaR)
    calls: list[int | None] = [None] * len(wanted)
    errors = [False] * len(wanted)
    if tools:
        from generalmodel.infer.tools import converse

        asked = [conversations[i] for i, _ in wanted]
        talks = converse(model, fmt, asked, tools, [p for _, p in wanted], stop, slots=slots, thoughts=thoughts)
        texts = [t.answer for t in talks]
        calls = [t.calls for t in talks]
        errors = [t.error is not None for t in talks]
        shown = [" | ".join(t.turns) for t in talks]
    else:
        reserved = thoughts.positions if thoughts is not None else 0
        capacity = min(model.cfg.max_seq_len, max(map(len, prompts)) + reserved + params.max_new_tokens)
        engine = Engine(model, min(slots, len(wanted)), capacity=capacity, thoughts=thoughts)
        requests = [engine.add(Request(list(prompts[i]), p, stop)) for i, p in wanted]
        while not engine.idle():
            engine.step()
        texts = shown = [fmt.tokenizer.decode(r.tokens) for r in requests]
    out = []
    per_row = 1 + samples
    for i, row in enumerate(rows):
        first = i * per_row
        right = [solved(text, row) for text in texts[first : first + per_row]]
        task, level = str(row.get("task", "problems")), int(row.get("level", 0))
        out.append(Solved(task, level, right[0], sum(right[1:]), samples, shown[first], calls[first], errors[first]))
    return out


def summarize(results: list[Solved], ks: list[int]) -> dict[str, float]:
    """problems.{TASK}.L{LEVEL}.{metric}, problems.{TASK}.{metric} and problems.{metric}, metric:
    pass1_greedy, pass1_sampled, pass{k} for each k, and count (the problems); with tools,
    tool_use (the share of greedy answers that called one) and tool_call_errors (that wrote a
    call that does not parse)."""
    groups: dict[str, list[Solved]] = defaultdict(list)
    for r in results:
        for name in (f"problems.{r.task}.L{r.level}", f"problems.{r.task}", "problems"):
            groups[name].append(r)
    metrics: dict[str, float] = {}
    for name, group in sorted(groups.items()):
        metrics[f"{name}.count"] = float(len(group))
        metrics[f"{name}.pass1_greedy"] = sum(r.greedy for r in group) / len(group)
        if group[0].calls is not None:  # answered with tools: how often the greedy answer called one
            metrics[f"{name}.tool_use"] = sum(bool(r.calls) for r in group) / len(group)
            metrics[f"{name}.tool_call_errors"] = sum(r.call_error for r in group) / len(group)
        if group[0].samples:
            metrics[f"{name}.pass1_sampled"] = sum(r.correct / r.samples for r in group) / len(group)
            for k in ks:
                metrics[f"{name}.pass{k}"] = sum(pass_at_k(r.samples, r.correct, k) for r in group) / len(group)
    return metrics
