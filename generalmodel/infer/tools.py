"""Tools a model can call, and conversations that call them.

    calculator   {"expression": "12 + 7 * 3"} → "33": + - * / ** and parentheses over numbers,
                 exact (fractions), a whole number when the result is one, else a decimal

`BUILTIN` holds the built-in tools (their OpenAI `tools` entries from `spec`); `call` runs one
call, answering a tool's error as its result ("error: division by zero") — what goes back to the
model, never an exception. `converse` runs conversations to their answers on the engine, batched:
each round generates every unfinished conversation's assistant turn, runs the calls it makes,
appends their results as tool turns, and goes on until a turn calls nothing (or `max_rounds`).
The chat format (tool turns, calls, strict parsing) is generalmodel.data.chat's.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from generalmodel.data.chat import ChatFormat
from generalmodel.infer.engine import Engine, Request, SamplingParams

MAX_EXPONENT = 64  # ** beyond this is an error, not a number with millions of digits
MAX_DIGITS = 1000


class ToolError(ValueError):
    """A call the tool cannot answer: its message is the result the model sees."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, exactly: "7 / 2" → "3.5", "1 / 3" → "0.3333333333"
    (ten significant digits when it does not end), "2 ** 10" → "1024"."""
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be a string, got {json.dumps(expression)[:40]}")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ToolError("division by zero")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base, exponent = value(node.left), value(node.right)
            if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
                raise ToolError(f"exponents are whole numbers up to {MAX_EXPONENT}")
            if abs(exponent) * max(len(str(base.numerator)), len(str(base.denominator))) > MAX_DIGITS:
                raise ToolError(f"the result has more than {MAX_DIGITS} digits")
            if base == 0 and exponent < 0:
                raise ToolError("division by zero")
            return base**exponent.numerator
        raise ToolError(f"not allowed in an expression: {ast.unparse(node)!r}")

    try:
        result = value(tree)
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
    if len(str(result.numerator)) > MAX_DIGITS:
        raise ToolError(f"the result has more than {MAX_DIGITS} digits")
    if result.denominator == 1:
        return str(result.numerator)
    try:
        decimal = Decimal(result.numerator) / Decimal(result.denominator)
        return f"{decimal:.10g}"
    except InvalidOperation as e:  # pragma: no cover - Decimal's context covers these sizes
        raise ToolError(str(e)) from None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the arguments
    run: Callable[..., str]

    @property
    def spec(self) -> dict[str, Any]:
        """The tool as an entry of an OpenAI request's `tools`."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


BUILTIN: dict[str, Tool] = {
    "calculator": Tool(
        "calculator",
        "Evaluate an arithmetic expression exactly (+ - * / ** and parentheses).",
        {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 12 + 7 * 3"}},
            "required": ["expression"],
        },
        calculate,
    ),
}


def call(name: str, arguments: dict[str, Any], tools: dict[str, Tool] | None = None) -> str:
    """A call's result as the text of its tool turn; a failing call answers "error: ..."."""
    tool = (tools or BUILTIN).get(name)
    if tool is None:
        return f"error: no tool {name!r}"
    required = tool.parameters.get("required", [])
    allowed = set(tool.parameters.get("properties", {}))
    missing = [k for k in required if k not in arguments]
    extra = [k for k in arguments if k not in allowed]
    if missing or extra:
        lacking = f"; missing {', '.join(missing)}" if missing else ""
        return f"error: {name} takes {', '.join(sorted(allowed))}{lacking}"
    try:
        return tool.run(**arguments)
    except (ToolError, TypeError) as e:
        return f"error: {e}"


@dataclass
class Conversation:
    """One conversation run by `converse`: its messages (the calls and results appended), the
    final answer's text, the calls made, and a parsing error that ended it."""

    messages: list[dict[str, Any]]
    answer: str = ""
    calls: int = 0
    error: str | None = None
    finished: bool = False  # ended with a turn that calls nothing (not by max_rounds or an error)
    turns: list[str] = field(default_factory=list)  # every generated turn, as text


def converse(
    model,
    fmt: ChatFormat,
    conversations: list[list[dict[str, Any]]],
    tools: list[str] | None,
    params: SamplingParams | list[SamplingParams],
    stop_ids: set[int],
    max_rounds: int = 3,
    available: dict[str, Tool] | None = None,
    slots: int = 32,
    thoughts=None,
) -> list[Conversation]:
    """Run each conversation (messages ending with the user's) to an answer, `slots` sequences
    decoding at once, calling `tools` (names declared to the model; None: no tools) from
    `available` (default: the built-ins). `params`: one for all, or one per conversation.
    Each turn is re-rendered from the messages, calls in their canonical JSON — what a client of
    the served API sends back; RL's rollouts (post/rl/rollout.py) keep the sampled ids instead,
    which the learner must score exactly."""
    per_row = params if isinstance(params, list) else [params] * len(conversations)
    out = [Conversation([dict(m) for m in c]) for c in conversations]
    stop = frozenset(stop_ids | {fmt.end_id})
    reserved = thoughts.positions if thoughts is not None else 0
    for _ in range(max_rounds):
        open_, prompts = [], []
        for i, c in enumerate(out):
            if c.finished or c.error is not None:
                continue
            ids = fmt.prompt_ids(c.messages, tools=tools)
            if len(ids) + reserved >= model.cfg.max_seq_len:  # the tools' results filled the context
                c.error = f"the conversation has {len(ids)} tokens: no room left in the model's {model.cfg.max_seq_len}"
                continue
            open_.append(i)
            prompts.append(ids)
        if not open_:
            break
        longest = max(len(p) + per_row[i].max_new_tokens for p, i in zip(prompts, open_, strict=True))
        capacity = min(model.cfg.max_seq_len, longest + reserved)
        engine = Engine(model, min(slots, len(open_)), capacity=capacity, thoughts=thoughts)
        requests = [engine.add(Request(p, per_row[i], stop)) for p, i in zip(prompts, open_, strict=True)]
        while not engine.idle():
            engine.step()
        for i, request in zip(open_, requests, strict=True):
            c = out[i]
            reply = fmt.reply(request.tokens, tools)
            c.turns.append(fmt.tokenizer.decode(request.tokens, skip_special_tokens=False))
            c.answer = reply.content
            if reply.error is not None:
                c.error = reply.error
                continue
            if not reply.calls:
                c.finished = True
                continue
            c.calls += len(reply.calls)
            c.messages.append({"role": "assistant", "content": reply.content, "tool_calls": reply.calls})
            for made in reply.calls:
                c.messages.append({"role": "tool", "content": call(made["name"], made["arguments"], available)})
    return out
