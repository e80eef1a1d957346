"""Coconut — chain of continuous thought (Hao et al. 2024, arXiv 2412.06769): the model's last
hidden state is fed back as the next input embedding ("continuous thoughts"), trained by a
curriculum that replaces the written reasoning steps with thoughts, stage by stage.

A row is a worked conversation (`messages`, its last message the assistant's) and its reasoning
steps (`coconut.steps_field`: strings the assistant's answer starts with, in order; what follows
them is the answer). Stage k of K (train.steps / K steps each) renders it as

    prompt <|assistant|> <|start-latent|> <|latent|> × k·c <|end-latent|> steps[k:] answer <|end|>

with c = coconut.thoughts_per_step: the first k steps become k·c thoughts (always k·c, also for a
row with fewer steps: decoding runs a fixed number); with coconut.drop_remaining the last stage
drops the steps left too, so the answer follows the thoughts. The loss is on the remaining steps,
the answer and <|end|> (not on the prompt, the thoughts or their delimiters). The stages start
from a chain-of-thought SFT model (the paper's stage 0); with coconut.reset_optimizer the
optimizer's state is cleared at each stage's start, as the paper does.

The forward with thoughts (`thought_states`) runs the model once per thought index: pass i reads
the final norm's output (what the head reads; transformers' last hidden state) at the position
before every row's i-th thought and writes it as that thought's input, so rows with different
numbers of thoughts share a batch; each pass runs only as far as the furthest thought it fills,
and the gradient flows through every pass (backpropagation through the thoughts). The loss then
comes from one more forward over the whole rows. Decoding (generalmodel.infer.engine) prefills the
prompt and <|start-latent|>, runs model.continuous_thoughts thought steps on the KV cache, then
<|end-latent|>, then samples the answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.data.chat import ChatFormat, messages
from generalmodel.data.tokenizer import eos_id, load_tokenizer
from generalmodel.post.rows import RowSet, RowsStep, read_source, train_rows
from generalmodel.storage import RunLayout
from generalmodel.tokens import LATENT_TOKENS
from generalmodel.train.core import Init, Report, TrainingRun
from models.loss import IGNORE


@dataclass
class Worked:
    """One worked conversation, tokenized in pieces the stages recombine."""

    where: str  # file:line
    prompt: list[int]  # the conversation before the answer, and <|assistant|>
    steps: list[list[int]]  # each reasoning step's ids (with the whitespace before it)
    answer: list[int]  # what follows the steps, and <|end|>


@dataclass(frozen=True)
class LatentIds:
    start: int
    thought: int
    end: int

    @classmethod
    def of(cls, tokenizer_json: str) -> LatentIds:
        tokenizer = load_tokenizer(tokenizer_json, "tokenizer")
        ids = {name: tokenizer.token_to_id(token) for name, token in LATENT_TOKENS.items()}
        missing = [LATENT_TOKENS[name] for name, i in ids.items() if i is None]
        if missing:
            raise UserError(
                f"the tokenizer has no {' '.join(missing)}: jobs/coconut.py adds them to the model it trains"
            )
        return cls(**ids)


def load_worked(cfg: Config, tokenizer_json: str) -> RowSet:
    """data.source's worked conversations, tokenized; a UserError names the file and line of a row
    without messages or steps, or whose steps are not where its answer starts, or that is too long."""
    fmt = ChatFormat.from_json(tokenizer_json)
    digest = hashlib.sha256()
    rows = read_source(cfg, cfg.data.source, cfg.storage.resolved(), digest)
    worked = [_worked(cfg, fmt, where, row) for where, row in rows]
    if not worked:
        raise UserError(f"data.source {cfg.data.source!r} has no rows")
    longest = max(worked, key=lambda w: rendered_length(w, cfg))
    if rendered_length(longest, cfg) > cfg.model.max_seq_len:
        raise UserError(
            f"{longest.where}: the row renders to {rendered_length(longest, cfg)} tokens with its thoughts (the "
            f"longest of data.source), above model.max_seq_len={cfg.model.max_seq_len}"
        )
    return RowSet(cfg.data.source, worked, digest.hexdigest())


def _worked(cfg: Config, fmt: ChatFormat, where: str, row: dict[str, Any]) -> Worked:
    name = cfg.coconut.steps_field
    if "messages" not in row or name not in row:
        raise UserError(
            f"{where}: a Coconut row needs `messages` and `{name}` (coconut.steps_field); it has {sorted(row)}"
        )
    conversation = messages(row["messages"], where)
    if conversation[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's worked answer")
    steps = row[name]
    if not isinstance(steps, list) or not all(isinstance(s, str) and s.strip() for s in steps):
        raise UserError(f"{where}: `{name}` must be a list of non-empty strings, got {str(steps)[:80]!r}")
    content, pieces, at = conversation[-1]["content"], [], 0
    for i, step in enumerate(steps):
        start = content.find(step, at)
        if start < 0 or content[at:start].strip():
            raise UserError(
                f"{where}: step {i} {step!r} is not where the assistant's answer continues "
                f"(after {content[:at][-40:]!r}); the steps must be the answer's start, in order"
            )
        pieces.append(fmt.encode(content[at : start + len(step)]))
        at = start + len(step)
    if not content[at:].strip():
        raise UserError(f"{where}: nothing follows the steps: the assistant's answer must end with the answer itself")
    prompt = fmt.render(conversation[:-1], generation_prompt=True).ids
    return Worked(where, prompt, pieces, fmt.encode(content[at:]) + [fmt.end_id])


def stage_of(step: int, steps: int, stages: int) -> int:
    """The curriculum stage (1..stages) of a 0-based training step."""
    return min(stages, 1 + step * stages // steps)


def render(row: Worked, stage: int, cfg: Config, ids: LatentIds) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a row at `stage` (module doc); mask 1 marks a supervised token."""
    co = cfg.coconut
    replaced = len(row.steps) if co.drop_remaining and stage == co.stages else min(stage, len(row.steps))
    head = [*row.prompt, ids.start, *[ids.thought] * (stage * co.thoughts_per_step), ids.end]
    tail = [t for step in row.steps[replaced:] for t in step] + row.answer
    return head + tail, [0] * len(head) + [1] * len(tail)


def rendered_length(row: Worked, cfg: Config) -> int:
    """The longest a row renders over the stages (more thoughts replace steps, but may outgrow them)."""
    return max(len(render(row, k, cfg, LatentIds(0, 0, 0))[0]) for k in range(1, cfg.coconut.stages + 1))


def batch(rows: list[Worked], stage: int, cfg: Config, ids: LatentIds, pad: int) -> dict[str, torch.Tensor]:
    """Rows at `stage`, right-padded: inputs, targets (IGNORE where not supervised)."""
    rendered = [render(r, stage, cfg, ids) for r in rows]
    width = max(len(t) for t, _ in rendered)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (t, m) in enumerate(rendered):
        tokens[i, : len(t)] = torch.tensor(t)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE)}


def thought_states(model, inputs: torch.Tensor, where: torch.Tensor, autocast) -> torch.Tensor:
    """The continuous thoughts of rows `inputs` (B, T) at the positions `where` (B, T) marks:
    (N, d), in row-major order (what the model's `thoughts=` takes). Thought i of a row is the
    hidden state at the position before it, with thoughts < i in place (module doc)."""
    positions = where.nonzero()  # (N, 2), row-major
    if not len(positions):
        return torch.zeros(0, model.cfg.d_model, device=inputs.device)
    which = (where.cumsum(1) - 1)[where]  # each thought's index in its row
    rows, cols = positions.unbind(1)
    states = torch.zeros(len(positions), model.cfg.d_model, device=inputs.device)
    for i in range(int(which.max()) + 1):
        this = (which == i).nonzero().squeeze(1)
        upto = int(cols[this].max())  # the pass reads positions < upto: it needs no more
        before = cols < upto  # the thoughts inside the pass's window (a row-major prefix of each row)
        with autocast:
            hidden = model(inputs[:, :upto], thoughts=(where[:, :upto], states[before]), hidden=True)
        states = states.index_put((this,), hidden[rows[this], cols[this] - 1].to(states.dtype))
    return states


def coconut_loss(model, chunk: dict[str, torch.Tensor], thought_id: int, autocast, loss_chunk: int = 0):
    """The summed cross-entropy of a chunk's supervised targets, with its continuous thoughts."""
    where = chunk["inputs"] == thought_id
    states = thought_states(model, chunk["inputs"], where, autocast)
    with autocast:
        return model(chunk["inputs"], targets=chunk["targets"], loss_chunk=loss_chunk, thoughts=(where, states))


class CoconutStep(RowsStep):
    """One optimizer step (generalmodel.post.rows) at the step's stage: the loss is the mean over
    every supervised token of the step; the optimizer's state is cleared when a stage starts."""

    def __init__(self, run: TrainingRun, data: RowSet, tokenizer_json: str):
        super().__init__(run, data.rows)
        self.ids = LatentIds.of(tokenizer_json)
        # Padding follows a row's end: never attended to by its tokens, never a target.
        self.pad = eos_id(load_tokenizer(tokenizer_json, "tokenizer"))

    def stage(self, step: int) -> int:
        return stage_of(step, self.run.steps, self.run.cfg.coconut.stages)

    def before(self, step: int) -> dict[str, Any]:
        co, stage = self.run.cfg.coconut, self.stage(step)
        if co.reset_optimizer and step > 0 and stage != self.stage(step - 1):
            self.run.optimizer.state.clear()
        return {"stage": stage, "thoughts": stage * co.thoughts_per_step}

    def batch(self, rows: list[Worked], step: int, first: int) -> dict[str, torch.Tensor]:
        return batch(rows, self.stage(step), self.run.cfg, self.ids, self.pad)

    def count(self, chunk: dict[str, torch.Tensor]) -> float:
        return float((chunk["targets"] != IGNORE).sum())

    def loss(self, chunk: dict[str, torch.Tensor], step: int):
        run = self.run
        return coconut_loss(run.model, chunk, self.ids.thought, run.autocast, run.cfg.train.loss_chunk), {}


def coconut_train(
    cfg: Config,
    report: Report | None = None,
    layout: RunLayout | None = None,
    init: Init | None = None,
    data: RowSet | None = None,
    tokenizer_json: str | None = None,
) -> dict[str, Any]:
    """The per-worker Coconut loop (generalmodel.post.rows.train_rows); returns the last metrics."""
    return train_rows(cfg, report, layout, init, data, tokenizer_json, CoconutStep)
