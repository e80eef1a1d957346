"""The OpenAI-compatible wire format: request bodies (validated: a bad field is an HTTP 400 naming
it), response and stream-chunk bodies, and the text side of a completion — decoding tokens as they
arrive and ending at stop strings."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's API does for fields it does not use here (user, ...);
    # fields it has that we cannot honour are refused below.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="One choice per request (send several requests for more).")
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    # not OpenAI's, but every OpenAI-compatible server (vLLM, SGLang) takes them
    top_k: int | None = Field(None, gt=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    # ours: entropy-aware sampling (generalmodel.infer.engine), its thresholds the engine's defaults
    strategy: Literal["sample", "entropy"] = "sample"

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def stops(self) -> list[str]:
        return self.stop or []


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, gt=0)  # OpenAI's default for completions
    logprobs: int | None = None  # not supported: refused by the route
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string)")
            return v[0]
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # None only for an assistant's turn that calls tools
    tool_calls: list[dict[str, Any]] | None = None  # checked by generalmodel.data.chat.messages
    tool_call_id: str | None = None


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class Retrieval(BaseModel):
    """Ours: retrieval-augmented generation from the server's index (`ServeConfig.index`): the
    last user message's `k` best passages go into the prompt as a system turn before it, each cut
    to `words` words, and come back in the answer's "retrieval" field."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(3, gt=0, le=20)
    words: int | None = Field(None, gt=0)


class ChatRequest(_Request):
    messages: list[Message] = Field(..., min_length=1)
    retrieval: Retrieval | None = None
    max_completion_tokens: int | None = Field(None, gt=0)
    tools: list[Tool] | None = None
    # "auto": the model may call the tools; "none": it is not told of them (answers from its weights)
    tool_choice: Literal["auto", "none"] | None = None

    @field_validator("tools")
    @classmethod
    def _distinct(cls, v):
        names = [t.function.name for t in v or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must differ (got {', '.join(names)})")
        return v

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_names(self) -> list[str] | None:
        """The tools the model is told of (None: none, or tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.function.name for t in self.tools]


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line from pydantic/FastAPI errors, naming the field: ("max_tokens: ...", "max_tokens")."""
    parts, param = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')} (got {json.dumps(e.get('input'), default=str)[:80]})")
    return "; ".join(parts), param


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    usage: dict | None,
    chat: bool,
    chunk: bool,
    calls: list[dict[str, Any]] | None = None,
):
    """A response (chunk=False) or a stream chunk of /v1/completions (chat=False) or
    /v1/chat/completions (chat=True); `calls` are a chat answer's tool calls in OpenAI's form
    (`tool_calls_body`)."""
    if chat:
        message: dict[str, Any] = {"content": text} if text or not chunk else {}
        if calls:
            message = {"content": text or None, "tool_calls": calls}
        if chunk:
            choice = {"index": 0, "delta": message, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        body["usage"] = usage
    return body


def tool_calls_body(calls: list[dict[str, Any]], chunk: bool) -> list[dict[str, Any]]:
    """Parsed calls ({name, arguments}) as OpenAI's `tool_calls` (arguments a JSON string; a
    stream chunk's entries carry their index)."""
    out = []
    for i, call in enumerate(calls):
        function = {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}
        out.append({**({"index": i} if chunk else {}), "id": new_id("call"), "type": "function", "function": function})
    return out


def sse(body: dict[str, Any] | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


class TextStream:
    """Tokens in, text out: waits for the rest of a multi-byte character, holds back text that may
    be the start of a stop string, and ends at the first stop string (which is not shown)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.shown = 0  # characters of the decoded text already given out
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that became certain with this token ('' while waiting)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # a multi-byte character continues in the next token
            return ""
        self.text = text
        found = [at for stop in self.stops if (at := text.find(stop, max(0, self.shown - len(stop) + 1))) >= 0]
        if found:  # the earliest stop string ends the text
            self.stopped = True
            self.text = text[: min(found)]
            return self._take(min(found))
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return self._take(len(text) - hold)

    def finish(self) -> str:
        """What is left when generation ends (held-back text that turned out not to be a stop)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.tokens)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece
