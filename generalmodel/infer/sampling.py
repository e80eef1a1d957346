"""Sampling from a loaded model with a KV cache: token ids (`generate`), streamed text
(`sample_text`) and chat replies (`sample_chat`), each a batch of one on `generalmodel.infer.engine`.
Loading a model is `generalmodel.infer.export.load_model`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from generalmodel.data.tokenizer import eos_id
from generalmodel.infer.engine import Engine, QuietThoughts, Request, SamplingParams, Thoughts, thoughts_of


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_id: int | set[int] | None = None,
    thoughts: Thoughts | QuietThoughts | None = None,
) -> Iterator[int]:
    """Yields new token ids one at a time (a batch of one on `generalmodel.infer.engine`): prefill
    the prompt, then decode with the static KV cache; stops before `eos_id` (one id, or a set: a
    chat model's end-of-turn and EOS) or when the sequence reaches the model's max_seq_len. A
    longer prompt keeps its last max_seq_len - 1 tokens (fewer by a Coconut model's `thoughts`); an
    empty one starts from the stop id."""
    stop = eos_id if isinstance(eos_id, set) else {eos_id} if eos_id is not None else set()
    reserved = thoughts.positions if thoughts is not None else 0
    limit = model.cfg.max_seq_len - reserved
    ids = list(prompt_ids[-limit + 1 :]) or [min(stop, default=0)]
    capacity = min(model.cfg.max_seq_len, len(ids) + reserved + params.max_new_tokens)
    engine = Engine(model, 1, capacity=capacity, thoughts=thoughts)
    request = engine.add(Request(ids, params, frozenset(stop)))
    while not request.done:
        for event in engine.step():
            if event.token is not None:
                yield event.token


def sample_text(model, tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yields decoded text pieces as tokens arrive (streaming), stopping at EOS; the pieces join
    to the decoded completion."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return _decoded(tokenizer, generate(model, prompt_ids, params, eos_id(tokenizer), thoughts_of(model, tokenizer)))


def sample_chat(model, tokenizer, messages: list[dict[str, str]], params: SamplingParams) -> Iterator[str]:
    """The assistant's reply to a conversation (the chat format, generalmodel.data.chat), streamed
    like sample_text; stops at the end of its turn (or EOS)."""
    from generalmodel.data.chat import ChatFormat

    fmt = ChatFormat.from_json(tokenizer.to_str())
    stop = {fmt.end_id, eos_id(tokenizer)}
    return _decoded(tokenizer, generate(model, fmt.prompt_ids(messages), params, stop, thoughts_of(model, tokenizer)))


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
