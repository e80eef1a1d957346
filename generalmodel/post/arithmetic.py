"""The offline RL demo's task: arithmetic word problems, generated deterministically.

    "Maya has 47 shells. She finds 38 more. How many shells does Maya have now?"   -> 85
Additions and subtractions of `digits`-digit numbers (a subtraction's result is never negative),
in a few phrasings. A problem's split is decided by the hash of its numbers and operation, so a
held-out problem never appears in training under another phrasing. Files written:

    sft.jsonl    conversations with a worked answer ("4 7 + 3 8 = 8 5. The answer is 85.") for the
                 SFT stage that teaches the format (training problems only)
    train.jsonl  RL prompts: {"prompt": question, "answer": N} (training problems)
    test.jsonl   held-out prompts, the same shape
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ("Maya", "Omar", "Lena", "Ravi", "Sofia", "Kwame", "Iris", "Tomas", "Aiko", "Nadia")
THINGS = ("shells", "stamps", "marbles", "books", "coins", "stickers", "apples", "cards")
ADD = (
    "{name} has {a} {things}. {pronoun} finds {b} more. How many {things} does {name} have now?",
    "A box holds {a} {things} and another holds {b}. How many {things} are there in all?",
    "What is {a} plus {b}?",
)
SUB = (
    "{name} has {a} {things}. {pronoun} gives away {b}. How many {things} does {name} have left?",
    "There were {a} {things} on a shelf and {b} were taken. How many are still there?",
    "What is {a} minus {b}?",
)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str  # "+" or "-"
    question: str

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def worked(self) -> str:
        """The sum digit by digit, then the answer: "4 7 + 3 8 = 8 5. The answer is 85." Spelled
        out, every digit is a token of its own whatever the tokenizer merges ("47", " 13"), so
        what a model learns about one sum carries over to the others."""
        a, b, c = (" ".join(str(n)) for n in (self.a, self.b, self.answer))
        return f"{a} {self.op} {b} = {c}. The answer is {self.answer}."

    @property
    def split(self) -> str:
        return split_of(self.a, self.b, self.op)


def split_of(a: int, b: int, op: str, test_fraction: float = 0.1) -> str:
    h = int.from_bytes(hashlib.sha256(f"{a}{op}{b}".encode()).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


def problem(rng: random.Random, digits: int) -> Problem:
    low, high = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    template = rng.choice(ADD if op == "+" else SUB)
    name = rng.choice(NAMES)
    question = template.format(
        name=name, a=a, b=b, things=rng.choice(THINGS), pronoun="She" if NAMES.index(name) % 2 == 0 else "He"
    )
    return Problem(a, b, op, question)


def build(out_dir: str | Path, sft: int, train: int, test: int, digits: int = 2, seed: int = 0) -> dict[str, int]:
    """Write sft.jsonl, train.jsonl and test.jsonl (see the module doc); returns the row counts."""
    rng = random.Random(seed)
    rows: dict[str, list[dict]] = {"sft": [], "train": [], "test": []}
    seen: set[str] = set()
    wanted = {"sft": sft, "train": train, "test": test}
    tries = 0
    while any(len(rows[k]) < wanted[k] for k in rows):
        tries += 1
        if tries > 100 * (sft + train + test) + 1000:
            raise ValueError(f"cannot draw {wanted} distinct problems of {digits} digits")
        p = problem(rng, digits)
        if p.question in seen:
            continue
        seen.add(p.question)
        if p.split == "test":
            if len(rows["test"]) < test:
                rows["test"].append({"prompt": p.question, "answer": p.answer})
        elif len(rows["sft"]) < sft:
            rows["sft"].append(
                {"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.worked}]}
            )
        elif len(rows["train"]) < train:
            rows["train"].append({"prompt": p.question, "answer": p.answer})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, items in rows.items():
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in items))
        tmp.replace(out / f"{name}.jsonl")
    return {k: len(v) for k, v in rows.items()}
