"""The chat format: role tokens, an end-of-turn token, one template, and `render` with a loss mask.

A conversation is a list of messages `{"role": system|user|assistant, "content": str}` (the
ShareGPT spelling `{"from": human|gpt|system, "value": str}` is read too). It renders as

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

with no separators (the role tokens are special tokens, so every message's content is tokenized on
its own, exactly as the whole string would be). The supervised tokens — the loss mask — are the
content and the end-of-turn token of the assistant's messages: a model learns to answer and to stop.
Generation starts after `<|assistant|>` and stops at `<|end|>`.

Tools (OpenAI's `tools`/`tool_calls`): a conversation that declares tools starts with a system turn
naming them (`<|system|>tools: calculator<|end|>`: names only, a small model's context is short; it
learns each tool's arguments from its SFT data); an assistant's call is `<|tool_call|>` and the call
as JSON, `{"name": ..., "arguments": {...}}`, inside its turn (several calls, several of them); a
tool's result is a turn of its own, `<|tool|>85<|end|>`, not supervised:

    <|system|>tools: calculator<|end|><|user|>What is 47 + 38?<|end|>
    <|assistant|><|tool_call|>{"name": "calculator", "arguments": {"expression": "47 + 38"}}<|end|>
    <|tool|>85<|end|><|assistant|>The answer is 85.<|end|>

`Reply` parses what a model generated back into content and calls, strictly: a call that is not
that JSON, or names a tool the conversation did not declare, is an error naming the call.
The tool tokens are not reserved: the SFT job adds them when its data use tools (`data.tools`).

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
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

from generalmodel import UserError
from generalmodel.tokens import CHAT_TOKENS, TOOL_TOKENS

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
END = CHAT_TOKENS["end"]
TOOLS_PREFIX = "tools: "  # the system turn that declares a conversation's tools

# The Jinja form of `render` (transformers' `apply_chat_template`, the HF export, serving). Tools
# are OpenAI's/transformers' `{"type": "function", "function": {"name", ...}}`, a call's arguments
# an object (transformers' convention; its `tojson` is json.dumps, as `render`'s).
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>" + TOOLS_PREFIX + "' }}"
    "{% for tool in tools %}{{ (', ' if not loop.first else '') + tool['function']['name'] }}{% endfor %}"
    "{{ '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + (message['content'] or '') }}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{{ '<|tool_call|>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
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


def has_tool_tokens(tokenizer: Tokenizer) -> bool:
    return all(tokenizer.token_to_id(t) is not None for t in TOOL_TOKENS.values())


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
        self.role_ids = {role: tokenizer.token_to_id(CHAT_TOKENS[role]) for role in ROLES if role in CHAT_TOKENS}
        self.end_id = tokenizer.token_to_id(END)
        self.tools = has_tool_tokens(tokenizer)  # whether it can render tool turns and calls
        if self.tools:
            self.role_ids["tool"] = tokenizer.token_to_id(TOOL_TOKENS["tool"])
            self.call_id = tokenizer.token_to_id(TOOL_TOKENS["call"])
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
        messages: list[dict[str, Any]],
        max_len: int | None = None,
        generation_prompt: bool = False,
        supervise_from: int = 0,
        tools: list[str] | None = None,
    ) -> Rendered:
        """ids and loss mask of a conversation (messages already checked by `messages`); the
        assistant messages from index `supervise_from` on are supervised. `max_len` cuts the end;
        `generation_prompt` appends `<|assistant|>` (what a model answers after); `tools` (names,
        `tool_names`) are declared in a first system turn."""
        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses_tools and not self.tools:
            raise ChatFormatError(
                f"tools and tool turns need the tool tokens {' '.join(TOOL_TOKENS.values())}, which this tokenizer "
                "lacks: fine-tune the model on conversations with tools with data.tools=true (the SFT job adds them)"
            )
        ids: list[int] = []
        mask: list[int] = []
        if tools:
            declared = self.encode(TOOLS_PREFIX + ", ".join(tools))
            ids += [self.role_ids["system"], *declared, self.end_id]
            mask += [0] * (len(declared) + 2)
        for i, message in enumerate(messages):
            content = self.encode(message["content"])
            for call in message.get("tool_calls", ()):
                content += [self.call_id, *self.encode(call_json(call))]
            learn = int(message["role"] == "assistant" and i >= supervise_from)
            ids += [self.role_ids[message["role"]], *content, self.end_id]
            mask += [0] + [learn] * (len(content) + 1)
        if generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        if max_len is not None and len(ids) > max_len:
            return Rendered(ids[:max_len], mask[:max_len], truncated=True)
        return Rendered(ids, mask)

    def prompt_ids(self, messages: list[dict[str, Any]], tools: list[str] | None = None) -> list[int]:
        """What a model continues to answer the conversation: its ids and `<|assistant|>`."""
        return self.render(messages, generation_prompt=True, tools=tools).ids

    def tool_results(self, results: list[str]) -> list[int]:
        """What follows an assistant's calls until it answers: a tool turn per result, then
        `<|assistant|>` (what `prompt_ids` of the conversation with those turns ends with)."""
        ids = [i for r in results for i in (self.role_ids["tool"], *self.encode(r), self.end_id)]
        return ids + [self.role_ids["assistant"]]

    def reply(self, ids: list[int], tools: list[str] | None = None) -> Reply:
        """What a model generated after `<|assistant|>` (without the end-of-turn token) as content
        and tool calls. Strict: each call must be `{"name": ..., "arguments": {...}}` naming one of
        `tools`; the first that is not makes `error` (naming it), and the reply has no calls."""
        if not self.tools or self.call_id not in ids:
            return Reply(self.tokenizer.decode(ids))
        at = ids.index(self.call_id)
        content, calls, pieces = self.tokenizer.decode(ids[:at]), [], []
        while at < len(ids):
            end = ids.index(self.call_id, at + 1) if self.call_id in ids[at + 1 :] else len(ids)
            pieces.append(self.tokenizer.decode(ids[at + 1 : end]))
            at = end
        raw = "".join(f"{TOOL_TOKENS['call']}{p}" for p in pieces)
        for n, text in enumerate(pieces, 1):
            try:
                calls.append(parse_call(text, tools))
            except ChatFormatError as e:
                return Reply(content + raw, error=f"tool call {n} of {len(pieces)}: {e}")
        return Reply(content, calls)


@dataclass
class Reply:
    """A generated assistant turn: its text, its tool calls ({"name", "arguments"}), and, when a
    call could not be parsed, why (the text then holds the calls as generated)."""

    content: str
    calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def call_json(call: dict[str, Any]) -> str:
    """A call as the model writes it (json.dumps, as transformers' `tojson`)."""
    return json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def parse_call(text: str, tools: list[str] | None) -> dict[str, Any]:
    """`{"name": ..., "arguments": {...}}` (nothing else) naming one of `tools`; else a
    ChatFormatError saying what is wrong."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatFormatError(f"not JSON ({e.msg} at character {e.pos}): {_show(text)}") from None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        raise ChatFormatError(f'expected {{"name": ..., "arguments": {{...}}}}, got {_show(text)}')
    if not isinstance(call["name"], str) or not isinstance(call["arguments"], dict):
        raise ChatFormatError(f"expected a string name and an object of arguments, got {_show(text)}")
    if not tools:
        raise ChatFormatError(f"calls {call['name']!r}, but the conversation declares no tools")
    if call["name"] not in tools:
        raise ChatFormatError(f"calls {call['name']!r}, which is not a declared tool ({', '.join(tools)})")
    return call


@functools.lru_cache(maxsize=4)
def _cached_format(tokenizer_json: str) -> ChatFormat:
    from generalmodel.data.tokenizer import load_tokenizer

    return ChatFormat(load_tokenizer(tokenizer_json, "tokenizer"))


def apply_template(
    messages: list[dict[str, Any]], generation_prompt: bool = False, tools: list[str] | None = None
) -> str:
    """The rendered string (what CHAT_TEMPLATE gives), for display and for cross-checks."""
    roles = {**CHAT_TOKENS, **TOOL_TOKENS}
    text = f"{CHAT_TOKENS['system']}{TOOLS_PREFIX}{', '.join(tools)}{END}" if tools else ""
    for m in messages:
        calls = "".join(TOOL_TOKENS["call"] + call_json(c) for c in m.get("tool_calls", ()))
        text += f"{roles[m['role']]}{m['content']}{calls}{END}"
    return text + (CHAT_TOKENS["assistant"] if generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# Reading rows: conversations and preference pairs, checked, with errors naming the row


def messages(value: Any, where: str, require_assistant: bool = True) -> list[dict[str, Any]]:
    """A row's messages as [{role, content}], checked: a list of objects with a known role and
    string content (ShareGPT's from/value spelling read too); an assistant's `tool_calls`
    (OpenAI's `{"function": {"name", "arguments"}}`, arguments an object or its JSON) become
    [{name, arguments}] and its content may then be empty; `where` names the row in errors."""
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
        calls = message.get("tool_calls") or None  # [] (some clients send it): no calls
        if calls is not None and role != "assistant":
            raise ChatFormatError(f"{where}: message {i} ({role}) has tool_calls: only an assistant calls tools")
        if calls is not None and content is None:
            content = ""
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}: message {i} ({role}) has content {_show(content)}, expected a string")
        out.append({"role": role, "content": content})
        if calls is not None:
            out[-1]["tool_calls"] = tool_calls(calls, f"{where}: message {i}")
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        # The known pitfall: a conversation that would train on nothing. Never a silent zero loss.
        raise ChatFormatError(f"{where}: no assistant message, so no token to learn from (roles: {_roles(out)})")
    return out


def tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's tool calls as [{name, arguments}] (OpenAI's `{"id", "type": "function",
    "function": {"name", "arguments": JSON}}` or `{"name", "arguments"}`), checked."""
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{where}: tool_calls is {_show(value)}, expected a non-empty list")
    out = []
    for j, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            expected = "{function: {name, arguments}}"
            raise ChatFormatError(f"{where}: tool call {j} is {_show(call)}, expected {expected}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"{where}: tool call {j} ({name}): arguments are not JSON ({e.msg})") from None
        if not isinstance(arguments, dict):
            raise ChatFormatError(f"{where}: tool call {j} ({name}): arguments {_show(arguments)}, expected an object")
        out.append({"name": name, "arguments": arguments})
    return out


def tool_names(value: Any, where: str) -> list[str]:
    """The names of a conversation's declared tools: OpenAI's `[{"type": "function", "function":
    {"name", ...}}]`, or `[{"name"}]`, or names; [] for none."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ChatFormatError(f"{where}: tools is {_show(value)}, expected a list of tools")
    names = []
    for j, tool in enumerate(value):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        name = tool if isinstance(tool, str) else spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name or "," in name:
            raise ChatFormatError(f"{where}: tool {j} is {_show(tool)}, expected a name or {{function: {{name}}}}")
        names.append(name)
    if len(set(names)) != len(names):
        raise ChatFormatError(f"{where}: tools name {', '.join(names)}: each tool once")
    return names


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
