"""The chat format: role tokens, an end-of-turn token, one template, and `render` with a loss mask.

A conversation is a list of messages `{"role": system|user|assistant, "content": str}` (the
ShareGPT spelling `{"from": human|gpt|system, "value": str}` is read too). It renders as

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

with no separators (the role tokens are special tokens, so every message's content is tokenized on
its own, exactly as the whole string would be). The supervised tokens — the loss mask — are the
content and the end-of-turn token of the assistant's messages: a model learns to answer and to stop.
Generation starts after `<|assistant|>` and stops at `<|end|>`.

`CHAT_TEMPLATE` is the same format as a Jinja chat template: the Hugging Face export puts it in
`tokenizer_config.json`, so `apply_chat_template` in transformers gives the same ids as `render`
(tested). Message content is tokenized with special tokens *as text*: a user who types `<|end|>`
cannot end a turn (transformers' template path would read it as the token; our render never does).

Tokenizers trained here reserve the chat tokens (generalmodel.tokens.CHAT_TOKENS). A model whose
tokenizer lacks them gets them with `add_chat_tokens` and `resize_embeddings` (the SFT job does
this): new rows at the end of the vocabulary, initialised to the mean embedding plus a little noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from generalmodel import UserError
from generalmodel.tokens import CHAT_TOKENS

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
END = CHAT_TOKENS["end"]

# The Jinja form of `render` (transformers' `apply_chat_template`, the HF export, serving).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatFormatError(UserError):
    """A conversation, pair or tokenizer the chat format cannot render."""


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 where ids[i] is a supervised token (an assistant's content or end-of-turn)
    truncated: bool = False

    @property
    def supervised(self) -> int:
        return sum(self.mask)


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in CHAT_TOKENS.values())


def add_chat_tokens(tokenizer_json: str) -> tuple[str, list[str]]:
    """The tokenizer with the chat tokens it lacks added as special tokens (new ids at the end of
    its vocabulary), and the names added."""
    return add_special_tokens(tokenizer_json, CHAT_TOKENS.values())


def add_special_tokens(tokenizer_json: str, tokens) -> tuple[str, list[str]]:
    """The tokenizer with those of `tokens` it lacks added as special tokens, and the names added."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    missing = [t for t in tokens if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer.to_str(), missing


def resize_embeddings(state: dict[str, torch.Tensor], vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`state` with its token embedding (and an untied head) grown to `vocab_size` rows; new rows
    are the mean of the existing ones plus N(0, (0.1·std)²) noise, so that the new tokens start as
    an average token and still differ from each other (HF's mean resizing does the same)."""
    out = dict(state)
    generator = torch.Generator().manual_seed(seed)
    for key in ("embed.weight", "head.weight"):
        weight = state.get(key)
        if weight is None or weight.shape[0] >= vocab_size:
            continue
        old = weight.float()
        extra = vocab_size - weight.shape[0]
        noise = torch.randn(extra, weight.shape[1], generator=generator) * old.std() * 0.1
        rows = old.mean(dim=0, keepdim=True) + noise
        out[key] = torch.cat([old, rows]).to(weight.dtype)
    return out


class ChatFormat:
    """A tokenizer's view of the chat format: `render` conversations and preference pairs."""

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in CHAT_TOKENS.values() if tokenizer.token_to_id(t) is None]
        if missing:
            raise ChatFormatError(
                f"the tokenizer has no chat tokens {', '.join(missing)}: a model trained here reserves them; for "
                "another model the SFT job adds them (add_chat_tokens + resize_embeddings)"
            )
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.token_to_id(CHAT_TOKENS[role]) for role in ROLES}
        self.end_id = tokenizer.token_to_id(END)
        # Content is text: special-token strings in it are encoded as the characters they are.
        self._content = Tokenizer.from_str(tokenizer.to_str())
        self._content.encode_special_tokens = True

    @classmethod
    def from_json(cls, tokenizer_json: str) -> ChatFormat:
        return _cached_format(tokenizer_json)

    def encode(self, text: str) -> list[int]:
        return self._content.encode(text, add_special_tokens=False).ids

    def render(
        self,
        messages: list[dict[str, str]],
        max_len: int | None = None,
        generation_prompt: bool = False,
        supervise_from: int = 0,
    ) -> Rendered:
        """ids and loss mask of a conversation (messages already checked by `messages`); the
        assistant messages from index `supervise_from` on are supervised. `max_len` cuts the end;
        `generation_prompt` appends `<|assistant|>` (what a model answers after)."""
        ids: list[int] = []
        mask: list[int] = []
        for i, message in enumerate(messages):
            content = self.encode(message["content"])
            learn = int(message["role"] == "assistant" and i >= supervise_from)
            ids += [self.role_ids[message["role"]], *content, self.end_id]
            mask += [0] + [learn] * (len(content) + 1)
        if generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        if max_len is not None and len(ids) > max_len:
            return Rendered(ids[:max_len], mask[:max_len], truncated=True)
        return Rendered(ids, mask)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """What a model continues to answer the conversation: its ids and `<|assistant|>`."""
        return self.render(messages, generation_prompt=True).ids


@functools.lru_cache(maxsize=4)
def _cached_format(tokenizer_json: str) -> ChatFormat:
    from generalmodel.data.tokenizer import load_tokenizer

    return ChatFormat(load_tokenizer(tokenizer_json, "tokenizer"))


def apply_template(messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """The rendered string (what CHAT_TEMPLATE gives), for display and for cross-checks."""
    text = "".join(f"{CHAT_TOKENS[m['role']]}{m['content']}{END}" for m in messages)
    return text + (CHAT_TOKENS["assistant"] if generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# Reading rows: conversations and preference pairs, checked, with errors naming the row


def messages(value: Any, where: str, require_assistant: bool = True) -> list[dict[str, str]]:
    """A row's messages as [{role, content}], checked: a list of objects with a known role and
    string content (ShareGPT's from/value spelling read too); `where` names the row in errors."""
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{where}: expected a non-empty list of messages, got {_show(value)}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ChatFormatError(f"{where}: message {i} is {_show(message)}, expected {{role, content}}")
        if "role" in message:
            role, content = message.get("role"), message.get("content")
            roles = ROLES
        elif "from" in message:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(message.get("from"), message.get("from")), message.get("value")
            roles = tuple(SHAREGPT_ROLES)
        else:
            raise ChatFormatError(f"{where}: message {i} has no 'role' (keys: {', '.join(map(str, message))})")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: message {i} has role {role!r}; roles: {', '.join(roles)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}: message {i} ({role}) has content {_show(content)}, expected a string")
        out.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        # The known pitfall: a conversation that would train on nothing. Never a silent zero loss.
        raise ChatFormatError(f"{where}: no assistant message, so no token to learn from (roles: {_roles(out)})")
    return out


@dataclass
class Pair:
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]


def preference_pair(row: dict[str, Any], where: str) -> Pair:
    """A preference row: `prompt` (a string: one user message, or messages) with `chosen` and
    `rejected` (a string: one assistant message, or messages); without `prompt`, chosen and
    rejected are whole conversations whose common first messages are the prompt."""
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise ChatFormatError(f"{where}: no {key!r} field (fields: {', '.join(map(str, row))})")
    if row.get("prompt") is None:
        chosen = messages(row["chosen"], f"{where} 'chosen'")
        rejected = messages(row["rejected"], f"{where} 'rejected'")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        pair = Pair(chosen[:n], chosen[n:], rejected[n:])
        if not pair.prompt:
            raise ChatFormatError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no first message")
    else:
        prompt = row["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        pair = Pair(messages(prompt, f"{where} 'prompt'", require_assistant=False), [], [])
        for key in ("chosen", "rejected"):
            value = row[key]
            value = [{"role": "assistant", "content": value}] if isinstance(value, str) else value
            setattr(pair, key, messages(value, f"{where} {key!r}"))
    for key in ("chosen", "rejected"):
        if getattr(pair, key)[0]["role"] != "assistant":
            raise ChatFormatError(
                f"{where}: {key!r} must start with the assistant's answer (roles: {_roles(getattr(pair, key))})"
            )
    return pair


def _roles(msgs: list[dict[str, str]]) -> str:
    return ", ".join(m["role"] for m in msgs)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
