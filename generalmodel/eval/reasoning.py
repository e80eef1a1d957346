"""The reasoning task suite: problems whose answer takes steps, in difficulty levels, each with a
worked (chain-of-thought) solution, a verifier and a held-out split by problem.

    addition    multi-digit addition with carries, worked column by column:
                "What is 487 + 356?" → "7 + 6 = 13, write 3, carry 1. 8 + 5 + 1 = 14, write 4,
                carry 1. 4 + 3 + 1 = 8, write 8. The answer is 843."
                level L: two operands of L + 1 digits (levels 1–4)
    expression  two operations with precedence and, from level 2, parentheses:
                "What is 12 + 7 * 3?" → "7 * 3 = 21. 12 + 21 = 33. The answer is 33."
                level L: operands of up to L digits (levels 1–3); every result is a whole number ≥ 0
    countdown   reach a target with + - * /, using each given number exactly once (TinyZero's):
                "Use 2, 3 and 25 to make 56." → "25 + 3 = 28. 28 * 2 = 56. The answer is (25 + 3) * 2."
                level L: L + 2 numbers (levels 1–3); every problem is solvable (the target is built
                from the numbers), intermediate results are positive whole numbers

A problem's split is decided by the hash of what defines it (the operands and operations; for
countdown the sorted numbers and the target), so a held-out problem never appears in training,
whatever order its numbers are shown in. Answers end with "The answer is X." — the answer-only SFT
data is just that sentence. `solved` (generalmodel.post.rl.rewards' `solved` verifier) checks a
completion against a row: the last number for addition and expression, the final expression for
countdown.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from generalmodel import UserError
from generalmodel.infer.tools import BUILTIN

CALCULATOR = BUILTIN["calculator"]

ANSWER = re.compile(r"The answer is\s+(.+?)\.?\s*$", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    task: str
    level: int
    question: str
    answer: int  # the number asked for (countdown: the target)
    steps: tuple[str, ...]  # the worked solution's steps, each a sentence
    final: str  # "The answer is X.": the answer-only response
    key: str  # what defines the problem, for the split
    fields: dict[str, Any] = field(default_factory=dict)  # what the verifier reads besides `answer`
    calculation: str | None = None  # what a calculator answers it with (addition, expression)

    @property
    def worked(self) -> str:
        """The worked solution: the steps, then the answer."""
        return " ".join((*self.steps, self.final))

    def split(self, test_fraction: float) -> str:
        h = int.from_bytes(hashlib.sha256(f"{self.task}:{self.key}".encode()).digest()[:8], "big")
        return "test" if h / 2**64 < test_fraction else "train"

    def row(self) -> dict[str, Any]:
        """A prompt row (RL and evaluation): the question, the answer and what the verifier reads."""
        return {"prompt": self.question, "answer": self.answer, "task": self.task, "level": self.level, **self.fields}


def addition(rng: random.Random, level: int) -> Problem:
    digits = level + 1
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    steps, carry = [], 0
    for x, y in zip(reversed(str(a)), reversed(str(b)), strict=True):
        total = int(x) + int(y) + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry = total // 10
        steps.append(f"{terms} = {total}, write {total % 10}" + (f", carry {carry}." if carry else "."))
    if carry:
        steps.append(f"Bring down {carry}.")
    answer = a + b
    return Problem(
        "addition",
        level,
        f"What is {a} + {b}?",
        answer,
        tuple(steps),
        f"The answer is {answer}.",
        f"{a}+{b}",
        calculation=f"{a} + {b}",
    )


OPS: dict[str, Callable[[int, int], int | None]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b if a - b >= 0 else None,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b if b > 1 and a % b == 0 else None,
}


def expression(rng: random.Random, level: int) -> Problem:
    """a op1 b op2 c, evaluated with precedence (or, parenthesised, the bracket first)."""
    high = 10**level - 1
    while True:
        a, b, c = (rng.randint(1, high) for _ in range(3))
        op1, op2 = rng.choice("+-*/"), rng.choice("+-*/")
        parens = level >= 2 and rng.random() < 0.5
        # Which pair goes first: the bracket, else the higher-precedence operator (left on a tie).
        first = "left" if parens or op1 in "*/" or op2 in "+-" else "right"
        if first == "left":
            inner = OPS[op1](a, b)
            result = None if inner is None else OPS[op2](inner, c)
            steps = (f"{a} {op1} {b} = {inner}", f"{inner} {op2} {c} = {result}")
        else:
            inner = OPS[op2](b, c)
            result = None if inner is None else OPS[op1](a, inner)
            steps = (f"{b} {op2} {c} = {inner}", f"{a} {op1} {inner} = {result}")
        if result is not None:
            break
    text = f"({a} {op1} {b}) {op2} {c}" if parens else f"{a} {op1} {b} {op2} {c}"
    sentences = tuple(f"{s}." for s in steps)
    return Problem(
        "expression", level, f"What is {text}?", result, sentences, f"The answer is {result}.", text, calculation=text
    )


def countdown(rng: random.Random, level: int) -> Problem:
    """L + 2 numbers (small ones 1–10, sometimes one of 25, 50, 75, 100), combined pairwise in a
    random order into the target; retried until the target is in 10..999 and no step is trivial."""
    count = level + 2
    while True:
        numbers = [rng.randint(1, 10) for _ in range(count)]
        if rng.random() < 0.5:
            numbers[0] = rng.choice((25, 50, 75, 100))
        pool = [(n, str(n)) for n in numbers]  # value, expression
        steps = []
        while len(pool) > 1:
            (x, ex), (y, ey) = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
            if x < y:
                (x, ex), (y, ey) = (y, ey), (x, ex)
            op = rng.choice("+-*/")
            value = OPS[op](x, y)
            if value is None or value == 0 or (op in "*/" and y == 1):
                break
            steps.append(f"{x} {op} {y} = {value}")
            pool.append((value, f"{_wrap(ex)} {op} {_wrap(ey)}"))
        if len(steps) == count - 1 and 10 <= pool[0][0] <= 999:
            break
    target, solution = pool[0]
    shown = sorted(numbers)
    listed = ", ".join(map(str, shown[:-1])) + f" and {shown[-1]}"
    question = f"Use {listed} to make {target}. Each number once; + - * / allowed."
    key = f"{','.join(map(str, shown))}->{target}"
    sentences = tuple(f"{s}." for s in steps)
    return Problem(
        "countdown", level, question, target, sentences, f"The answer is {solution}.", key, {"numbers": shown}
    )


def _wrap(expr: str) -> str:
    """A compound sub-expression in parentheses (a plain number as it is)."""
    return f"({expr})" if " " in expr else expr


TASKS: dict[str, tuple[Callable[[random.Random, int], Problem], tuple[int, ...]]] = {
    "addition": (addition, (1, 2, 3, 4)),
    "expression": (expression, (1, 2, 3)),
    "countdown": (countdown, (1, 2, 3)),
}


# ---- verifying an answer


def final_answer(completion: str) -> str | None:
    """What follows the last "The answer is" (without its final full stop), or None."""
    at = completion.rfind("The answer is")
    if at < 0:
        return None
    match = ANSWER.match(completion[at:].strip())
    return match.group(1).strip() if match else None


def countdown_value(expression_text: str, numbers: list[int]) -> Fraction | None:
    """The value of an arithmetic expression (+ - * / × ÷ and parentheses over whole numbers) that
    uses exactly the given numbers, each once; None when it is not one."""
    text = expression_text.replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if right == 0:
                raise ZeroDivisionError
            return left / right
        raise ValueError(f"not allowed: {ast.dump(node)[:40]}")

    try:
        result = value(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return result if sorted(used) == sorted(numbers) else None


def solved(completion: str, row: dict[str, Any]) -> bool:
    """Whether `completion` answers the problem `row` (a row of the suite: task, answer, numbers)."""
    answer = final_answer(completion)
    if answer is None or "answer" not in row:
        return False
    if row.get("task") == "countdown":
        if "numbers" not in row:
            raise UserError("a countdown row needs its `numbers`")
        got = countdown_value(answer, [int(n) for n in row["numbers"]])
        return got is not None and got == int(row["answer"])
    try:
        return Fraction(answer.replace(",", "")) == Fraction(str(row["answer"]))
    except (ValueError, ZeroDivisionError):
        return False


# ---- writing the suite


def draw(tasks: list[str], per_level: dict[str, int], seed: int, test_fraction: float) -> dict[str, list[Problem]]:
    """`per_level[split]` distinct problems of every task and level for each of the splits sft,
    train (both from the training problems, disjoint) and test (held out)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown reasoning task(s) {unknown}; the suite has {', '.join(TASKS)}")
    out: dict[str, list[Problem]] = {"sft": [], "train": [], "test": []}
    for task in tasks:
        make, levels = TASKS[task]
        for level in levels:
            rng = random.Random(f"{seed}:{task}:{level}")
            got = {split: 0 for split in out}
            seen: set[str] = set()
            tries = 0
            while any(got[s] < per_level[s] for s in out):
                tries += 1
                if tries > 200 * sum(per_level.values()) + 1000:
                    raise UserError(f"cannot draw {per_level} distinct {task} problems of level {level}")
                p = make(rng, level)
                if p.key in seen:
                    continue
                seen.add(p.key)
                split = p.split(test_fraction)
                if split == "train":
                    split = "sft" if got["sft"] < per_level["sft"] else "train"
                if got[split] < per_level[split]:
                    out[split].append(p)
                    got[split] += 1
    return out


def tool_conversation(p: Problem, declared: bool) -> dict:
    """A problem as SFT data for tool use: with the calculator `declared`, a problem it answers
    (addition, expression) is one call, its result, then "The answer is X."; otherwise (no tools,
    or countdown, whose search a calculator does not do) the answer at once. The same model thus
    learns to call the calculator when it has one and to answer without it when not."""
    row: dict[str, Any] = {"messages": [{"role": "user", "content": p.question}]}
    if declared:
        row["tools"] = [CALCULATOR.spec]
        if p.calculation is not None:
            arguments = {"expression": p.calculation}
            row["messages"] += [
                {"role": "assistant", "content": "", "tool_calls": [{"name": "calculator", "arguments": arguments}]},
                {"role": "tool", "content": CALCULATOR.run(**arguments)},
            ]
    row["messages"].append({"role": "assistant", "content": p.final})
    return row


def write_suite(
    out_dir: str | Path, tasks: list[str], sft: int, train: int, test: int, seed: int = 0, test_fraction: float = 0.2
) -> dict[str, int]:
    """Write the suite's files (row counts returned):

    sft_cot.jsonl     conversations answered with the worked solution (training problems), and
                      its `steps` (what jobs/coconut.py replaces with continuous thoughts)
    sft_answer.jsonl  the same conversations answered with "The answer is X." only
    sft_tools.jsonl   the same problems for tool use (`tool_conversation`): every other one
                      declares the calculator, and is answered through it where it helps
    train.jsonl       RL prompts of other training problems: prompt, answer, task, level (numbers)
    test.jsonl        held-out prompts, the same shape
    """
    drawn = draw(tasks, {"sft": sft, "train": train, "test": test}, seed, test_fraction)

    def chat(p: Problem, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": answer}]}

    files = {
        "sft_cot": [{**chat(p, p.worked), "steps": list(p.steps)} for p in drawn["sft"]],
        "sft_answer": [chat(p, p.final) for p in drawn["sft"]],
        "sft_tools": [tool_conversation(p, declared=i % 2 == 0) for i, p in enumerate(drawn["sft"])],
        "train": [p.row() for p in drawn["train"]],
        "test": [p.row() for p in drawn["test"]],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():  # each file whole or not at all
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(out / f"{name}.jsonl")
    return {name: len(rows) for name, rows in files.items()}
