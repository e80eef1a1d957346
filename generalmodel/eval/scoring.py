"""What an evaluation computes, on one process: log-likelihoods of token windows (val loss and
bits per byte) and of multiple-choice continuations (accuracy). `generalmodel.eval.runner`
spreads the work over Ray tasks.

Bits per byte = Σ NLL (nats) / (ln 2 · Σ UTF-8 bytes of the predicted tokens): the same text
costs the same bytes whatever the tokenizer, so models with different vocabularies compare.
Special tokens (document separators) are neither scored nor counted.

Multiple choice follows lm-evaluation-harness' loglikelihood scoring (and llm.c's HellaSwag
evaluation): each choice is a continuation of the context; `acc` picks the highest summed
log-likelihood, `acc_norm` the highest log-likelihood per character of the choice (without
the delimiter, as the harness counts). The
continuation's tokens are those of encode(context + choice) after encode(context), the
harness' split.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import decoders

from generalmodel import UserError

BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; 0 for special tokens."""
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    vocab = tokenizer.get_vocab()
    sizes = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    for token, i in vocab.items():
        if token in special:
            continue
        if byte_level:
            sizes[i] = len(token)  # byte-level BPE: one printable stand-in character per byte
        elif BYTE_FALLBACK.fullmatch(token):  # SentencePiece's byte fallback, e.g. <0x0A>
            sizes[i] = 1
        else:  # SentencePiece-style: the token's text, '▁' for a space
            sizes[i] = len(token.replace("▁", " ").encode())
    return sizes


def corpus_windows(tokenizer, texts: list[str], seq_len: int, separator: int) -> list[np.ndarray]:
    """The documents as one token stream (each preceded by the separator, as in training's
    packing), cut into windows of seq_len + 1 tokens overlapping by one: every token after the
    first separator is predicted exactly once."""
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.append(separator)
        stream.extend(encoding.ids)
    ids = np.asarray(stream, dtype=np.int64)
    return [ids[i : i + seq_len + 1] for i in range(0, max(len(ids) - 1, 0), seq_len)]


@dataclass
class WindowScore:
    nats: float = 0.0  # Σ NLL of the scored tokens
    tokens: int = 0
    bytes: int = 0

    def add(self, other: WindowScore) -> WindowScore:
        return WindowScore(self.nats + other.nats, self.tokens + other.tokens, self.bytes + other.bytes)

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / max(self.bytes, 1)


@torch.no_grad()
def score_windows(model, windows: list[np.ndarray], sizes: np.ndarray, batch_size: int = 8) -> WindowScore:
    """NLL of every non-special target token of the windows (input window[:-1], targets window[1:])."""
    total = WindowScore()
    device = next(model.parameters()).device
    sizes_t = torch.as_tensor(sizes).to(device)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        width = max(len(w) for w in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        valid = torch.zeros(len(batch), width - 1, dtype=torch.bool)
        for row, w in enumerate(batch):
            ids[row, : len(w)] = torch.as_tensor(w)
            valid[row, : len(w) - 1] = True
        ids, valid = ids.to(device), valid.to(device)
        targets = ids[:, 1:]
        nll = F.cross_entropy(model(ids[:, :-1]).float().transpose(1, 2), targets, reduction="none")
        counted = valid & (sizes_t[targets] > 0)
        total = total.add(
            WindowScore(float(nll[counted].sum()), int(counted.sum()), int(sizes_t[targets][counted].sum()))
        )
    return total


@dataclass
class Example:
    context: str
    choices: list[str]  # without the delimiter
    label: int
    delimiter: str = " "  # between the context and each choice

    @property
    def continuations(self) -> list[str]:
        return [self.delimiter + c for c in self.choices]


def read_hellaswag(path: str, limit: int | None = None) -> list[Example]:
    """HellaSwag's jsonl (`ctx`, `endings`, `label`; `ctx_a`/`ctx_b` when `ctx` is absent), or the
    generic `{"context", "choices", "label"}`; choices follow the context after a space. Errors
    name the file and line."""
    examples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "endings" in row:
                    context = row.get("ctx") or f"{row['ctx_a']} {row['ctx_b'].capitalize()}".strip()
                    choices, label = [str(e) for e in row["endings"]], int(row["label"])
                else:
                    context, choices, label = str(row["context"]), [str(c) for c in row["choices"]], int(row["label"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(
                    f"{path}:{line_no}: not a multiple-choice example ({type(e).__name__}: {e}); expected "
                    f'{{"ctx", "endings", "label"}} (HellaSwag) or {{"context", "choices", "label"}}'
                ) from None
            if not 0 <= label < len(choices):
                raise UserError(f"{path}:{line_no}: label {label} is not an index of its {len(choices)} choices")
            examples.append(Example(context, choices, label))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the harness' way: a trailing space of the context moves to
    the continuation; the continuation is what encode(context + continuation) adds."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    head = tokenizer.encode(context, add_special_tokens=False).ids
    return whole[: len(head)], whole[len(head) :]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], prefix: int) -> list[tuple[float, bool]]:
    """For each (context, continuation): Σ log p(continuation tokens | context), and whether the
    continuation is the greedy one. `prefix`: the token the context follows (the separator).
    Sequences longer than the model's context keep their last max_seq_len tokens."""
    out = []
    limit = model.cfg.max_seq_len + 1
    for context, continuation in pairs:
        head, tail = split_pair(tokenizer, context, continuation)
        if not tail:
            raise UserError(f"empty continuation after context {context[-40:]!r}")
        ids = ([prefix] + head + tail)[-limit:]
        x = torch.tensor([ids[:-1]])
        logprobs = model(x).float().log_softmax(-1)[0, -len(tail) :]
        target = torch.tensor(tail)
        out.append((float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())))
    return out


def mc_accuracy(examples: list[Example], scores: list[list[float]]) -> dict[str, float]:
    """acc (summed log-likelihood) and acc_norm (per character of the choice) over the examples."""
    acc = acc_norm = 0
    for example, lls in zip(examples, scores, strict=True):
        acc += int(np.argmax(lls)) == example.label
        per_char = [ll / max(len(c), 1) for ll, c in zip(lls, example.choices, strict=True)]  # as the harness
        acc_norm += int(np.argmax(per_char)) == example.label
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": float(n)}
