"""Verifiers: programs that score a completion. A verifier is `reward(prompt, completion, **fields)
-> float`, where `fields` are the prompt row's other columns (e.g. `answer`); `rl.rewards` maps
verifier names to weights and the reward is the weighted sum.

Built in:
    exact_number   1 when the completion's last number equals the row's `answer` (numerically:
                   "1,024", "1024.0" and "1024" are one number), else 0
    answer_format  1 when the completion is exactly "The answer is N." (N a number), else 0
    worked_format  1 when the completion ends with its one "The answer is X." sentence (X anything
                   but a sentence's end), worked steps or none before it — the format of a worked
                   solution, whether or not the answer is right (a separate reward for the format)
    math_verify    1 when math-verify finds the completion's final answer equal to `answer`
                   (the `math` extra: pip install 'generalmodel[math]')
    solved         1 when the completion solves a reasoning-suite row (generalmodel.eval.reasoning:
                   the number after "The answer is" equals `answer`; for countdown rows, the
                   expression there uses each of `numbers` once and equals `answer`), else 0
A name of the form `module:function` imports a verifier of your own.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from generalmodel import UserError
from generalmodel.eval import reasoning

Verifier = Callable[..., float]

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FORMAT = re.compile(r"^The answer is (-?\d[\d,]*(?:\.\d+)?)\.$")
WORKED = re.compile(r"^(?:.*[.!?] )?The answer is (?:(?!\. )[^\n])+\.$", re.DOTALL)  # nothing after it


def parse_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except (InvalidOperation, ValueError):
        return None


def last_number(text: str) -> Decimal | None:
    found = NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def exact_number(prompt: str, completion: str, answer=None, **fields) -> float:
    if answer is None:
        raise UserError("the exact_number verifier needs an `answer` field in every prompt row")
    expected = parse_number(str(answer))
    got = last_number(completion)
    return float(expected is not None and got is not None and got == expected)


def answer_format(prompt: str, completion: str, **fields) -> float:
    return float(FORMAT.match(completion.strip()) is not None)


def worked_format(prompt: str, completion: str, **fields) -> float:
    text = completion.strip()
    return float(text.count("The answer is") == 1 and WORKED.match(text) is not None)


def math_verify(prompt: str, completion: str, answer=None, **fields) -> float:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise UserError(
            "the math_verify verifier needs the math-verify package: pip install 'generalmodel[math]'"
        ) from None
    return float(verify(parse(str(answer)), parse(completion)))


def solved(prompt: str, completion: str, answer=None, **fields) -> float:
    if answer is None:
        raise UserError("the solved verifier needs an `answer` field in every prompt row")
    return float(reasoning.solved(completion, {"answer": answer, **fields}))


BUILT_IN: dict[str, Verifier] = {
    "exact_number": exact_number,
    "answer_format": answer_format,
    "worked_format": worked_format,
    "math_verify": math_verify,
    "solved": solved,
}


def verifier(name: str) -> Verifier:
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise UserError(f"rl.rewards: unknown verifier {name!r}; built in: {', '.join(BUILT_IN)}, or 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"rl.rewards: cannot import verifier {name!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"rl.rewards: {name!r} is not callable")
    return fn


class Rewards:
    """The weighted sum of `rl.rewards`' verifiers, and each one's score (for the metrics)."""

    def __init__(self, weights: dict[str, float]):
        if not weights:
            raise UserError("rl.rewards is empty: name at least one verifier")
        self.weights = dict(weights)
        self.verifiers = {name: verifier(name) for name in weights}

    def __call__(self, prompt: str, completion: str, fields: dict) -> tuple[float, dict[str, float]]:
        scores = {name: self._score(name, fn, prompt, completion, fields) for name, fn in self.verifiers.items()}
        return sum(self.weights[n] * s for n, s in scores.items()), scores

    @staticmethod
    def _score(name: str, fn: Verifier, prompt: str, completion: str, fields: dict) -> float:
        try:
            return float(fn(prompt, completion, **fields))
        except UserError:
            raise
        except Exception as e:  # a verifier of the user's: say which one, on what
            raise UserError(
                f"verifier {name!r} failed on a completion of {prompt[:60]!r}: {type(e).__name__}: {e}"
            ) from e
