"""How well a chat model answers: generated answers against the held-out rows' own answers (exact
match), and held-out preference accuracy under a DPO reference.

The held-out rows are the val split of the chat/preference source, decided by the same hash as
the dataset's (generalmodel.data.conversations.split_of), so they are the rows training never saw.
A row's question is its conversation up to the last assistant message (for a pair: the prompt),
its answer that message (the chosen one). Answers match after case folding, collapsing white
space and dropping trailing punctuation ("Abraham Lincoln." == "abraham lincoln").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch

from generalmodel.config import Config
from generalmodel.data.chat import ChatFormat, ChatFormatError, messages, preference_pair
from generalmodel.data.conversations import split_of
from generalmodel.data.sources import RowError, list_pieces, read_rows
from generalmodel.infer import SamplingParams, sample_chat

log = logging.getLogger(__name__)


@dataclass
class Question:
    where: str
    prompt: list[dict[str, str]]
    answer: str


def heldout_questions(cfg: Config, limit: int) -> list[Question]:
    """Up to `limit` questions of the val split of cfg.data.source, in source order (malformed rows
    are left out: the dataset's preparation has reported them; so are conversations with tools,
    which `jobs/eval.py --problems --tools` measures by running their calls)."""
    data, storage = cfg.data, cfg.storage.resolved()
    out: list[Question] = []
    for piece in list_pieces(data, storage):
        for where, row in read_rows(piece, storage):
            if len(out) >= limit:
                return out
            try:
                if isinstance(row, RowError) or split_of(row, data, where) != "val":
                    continue
                if data.format == "preference":
                    pair = preference_pair(row, where)
                    out.append(Question(where, pair.prompt, pair.chosen[0]["content"]))
                    continue
                conversation = messages(row.get(data.messages_field), where)
            except ChatFormatError:
                continue
            if row.get("tools") or any(m["role"] == "tool" or m.get("tool_calls") for m in conversation):
                continue
            last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
            out.append(Question(where, conversation[:last], conversation[last]["content"]))
    return out


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".!?;,:").strip().casefold()


@dataclass
class AnswerScore:
    accuracy: float
    examples: list[tuple[str, str, str]]  # (question's last message, expected, generated), a few


def answer_accuracy(model, tokenizer_json: str, questions: list[Question], max_new_tokens: int = 48) -> AnswerScore:
    """Greedy answers (up to the end-of-turn token) compared with the expected ones."""
    tokenizer = ChatFormat.from_json(tokenizer_json).tokenizer
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    right, examples = 0, []
    for q in questions:
        got = "".join(sample_chat(model, tokenizer, q.prompt, params))
        right += normalize_answer(got) == normalize_answer(q.answer)
        if len(examples) < 5:
            examples.append((q.prompt[-1]["content"], q.answer, got))
    return AnswerScore(right / max(len(questions), 1), examples)


@torch.no_grad()
def preference_accuracy(policy, reference, ds, split: str = "val") -> tuple[float, int]:
    """(fraction of `split`'s pairs whose implicit DPO reward prefers the chosen answer, pairs):
    log π/π_ref of the chosen response above that of the rejected one. The reference's log-probs
    are the ones attached to `ds` when it has them (the precomputed pass), else `reference` scores."""
    from generalmodel.train.reference import score_pairs

    right = total = 0
    device = next(policy.parameters()).device
    for shard in ds.split_shards(split):
        columns = ds.read_columns(shard)
        p = score_pairs(policy, columns, device)
        r = columns if "ref_chosen" in columns else score_pairs(reference, columns, device)
        margin = (p["ref_chosen"] - r["ref_chosen"]) - (p["ref_rejected"] - r["ref_rejected"])
        right += int(np.sum(margin > 0))
        total += len(margin)
    return right / max(total, 1), total
