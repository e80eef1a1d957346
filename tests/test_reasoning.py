"""The reasoning suite (generalmodel.eval.reasoning) and its evaluation (generalmodel.eval.problems):
every worked solution's steps are right and verify; levels mean what they say; held-out problems
never reach training, whatever order their numbers are shown in; the verifier refuses wrong,
malformed and unsafe answers; pass@k is the exact chance over subsets; `jobs/eval.py --problems`
reports per task and level over Ray tasks, the same however the problems are cut."""

import itertools
import json
import random
import re

import pytest
import torch
from conftest import make_documents

from generalmodel.config import StorageConfig
from generalmodel.data.tokenizer import train_bpe
from generalmodel.eval.problems import Solved, pass_at_k, read_problems, summarize
from generalmodel.eval.reasoning import TASKS, countdown, countdown_value, draw, solved, write_suite
from generalmodel.post.rl.rewards import Rewards
from models import build_model
from models.llama import LlamaConfig

STEP = re.compile(r"(\d+) ([-+*/]) (\d+)(?: \+ (\d+))? = (\d+)")


def problems(task, level, n=150, seed=0):
    make, _ = TASKS[task]
    rng = random.Random(seed)
    return [make(rng, level) for _ in range(n)]


@pytest.mark.parametrize("task, level", [(t, lv) for t, (_, levels) in TASKS.items() for lv in levels])
def test_every_worked_solution_is_right_step_by_step_and_verifies(task, level):
    for p in problems(task, level):
        steps = STEP.findall(p.worked)
        assert steps, p.worked
        for a, op, b, carry, result in steps:
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}.get(op)
            if op == "/":
                assert int(a) % int(b) == 0
                value = int(a) // int(b)
            assert value + int(carry or 0) == int(result), (p.worked, a, op, b)
        assert solved(p.worked, p.row()) and solved(p.final, p.row())
        assert p.final == f"The answer is {p.worked.rsplit('The answer is ', 1)[1]}"


def test_levels_mean_what_they_say():
    for level in (1, 2, 3, 4):
        for p in problems("addition", level, 50):
            a, b = map(int, re.findall(r"\d+", p.question))
            assert len(str(a)) == len(str(b)) == level + 1 and p.answer == a + b
    for level in (1, 2, 3):
        for p in problems("expression", level, 50):
            assert all(int(n) < 10**level for n in re.findall(r"\d+", p.question)) and p.answer >= 0
        for p in problems("countdown", level, 50):
            assert len(p.fields["numbers"]) == level + 2 and 10 <= p.answer <= 999
            assert p.fields["numbers"] == sorted(p.fields["numbers"])


def test_held_out_problems_never_reach_training_whatever_the_order_of_their_numbers():
    drawn = draw(list(TASKS), {"sft": 60, "train": 30, "test": 20}, seed=3, test_fraction=0.2)
    assert {k: len(v) for k, v in drawn.items()} == {"sft": 600, "train": 300, "test": 200}
    keys = {split: {(p.task, p.key) for p in ps} for split, ps in drawn.items()}
    assert not keys["test"] & (keys["sft"] | keys["train"]) and not keys["sft"] & keys["train"]
    assert all(p.split(0.2) == "test" for p in drawn["test"])
    # A countdown problem is its numbers as a multiset and its target, shown sorted: the same
    # problem drawn in another order has the same question, key and split.
    p = countdown(random.Random(5), 2)
    assert p.key == ",".join(map(str, p.fields["numbers"])) + f"->{p.answer}"
    assert p.question.startswith("Use " + ", ".join(map(str, p.fields["numbers"][:-1])))


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is (25 + 3) * 2.", True),
        ("25 + 3 = 28. 28 × 2 = 56. The answer is (25 + 3) × 2.", True),
        ("The answer is 2 * (3 + 25)", True),  # no full stop
        ("The answer is 25 * 2 + 3 + 3.", False),  # 3 twice
        ("The answer is 25 * 2 + 6.", False),  # 6 was not given
        ("The answer is (25 + 3) * 2 * 1.", False),  # 1 was not given
        ("The answer is 25 + 3 + 2.", False),  # 30, not 56
        ("The answer is 56.", False),  # not an expression of the numbers
        ("The answer is __import__('os').getcwd().", False),
        ("The answer is 25 / (3 - 3) * 2.", False),
        ("(25 + 3) * 2", False),  # no "The answer is"
    ],
)
def test_the_countdown_verifier(completion, expected):
    row = {"task": "countdown", "answer": 56, "numbers": [2, 3, 25]}
    assert solved(completion, row) is expected
    assert Rewards({"solved": 1.0})("prompt", completion, row)[0] == float(expected)


def test_number_answers_and_fractions():
    row = {"task": "addition", "answer": 1039}
    assert solved("... The answer is 1039.", row) and solved("The answer is 1,039", row)
    assert not solved("The answer is 1038.", row) and not solved("1039", row)
    assert not solved("The answer is 1039. The answer is 7.", row)  # the last answer counts
    assert countdown_value("10 / 4 * 2", [10, 4, 2]) == 5


def test_pass_at_k_is_the_chance_over_every_subset():
    for n, c in [(8, 0), (8, 1), (8, 3), (8, 8), (5, 2)]:
        right = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(right, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match=r"pass@9 needs 1 <= k <= n = 8"):
        pass_at_k(8, 2, 9)


def test_summaries_per_task_and_level():
    results = [
        Solved("addition", 1, True, 4, 8),
        Solved("addition", 1, False, 0, 8),
        Solved("addition", 2, False, 2, 8),
        Solved("countdown", 1, True, 8, 8),
    ]
    m = summarize(results, [1, 8])
    assert m["problems.addition.L1.count"] == 2 and m["problems.count"] == 4
    assert m["problems.addition.L1.pass1_greedy"] == 0.5
    assert m["problems.addition.L1.pass1_sampled"] == pytest.approx((4 / 8 + 0) / 2)
    assert m["problems.addition.L1.pass1"] == m["problems.addition.L1.pass1_sampled"]
    assert m["problems.addition.L1.pass8"] == 0.5 and m["problems.addition.pass8"] == pytest.approx(2 / 3)
    assert m["problems.pass1_greedy"] == 0.5 and m["problems.countdown.L1.pass8"] == 1


def test_the_suite_files(tmp_path):
    counts = write_suite(tmp_path, ["addition", "countdown"], sft=5, train=4, test=3, seed=1)
    assert counts == {"sft_cot": 35, "sft_answer": 35, "sft_tools": 35, "train": 28, "test": 21}  # 4 + 3 levels
    read = {
        name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()] for name in counts
    }
    for cot, answer in zip(read["sft_cot"], read["sft_answer"], strict=True):
        assert cot["messages"][0] == answer["messages"][0]
        assert cot["messages"][1]["content"].endswith(answer["messages"][1]["content"])
        assert answer["messages"][1]["content"].startswith("The answer is ")
    for i, (tools, answer) in enumerate(zip(read["sft_tools"], read["sft_answer"], strict=True)):
        # every other problem declares the calculator and, for addition, answers through one call
        assert tools["messages"][0] == answer["messages"][0] and tools["messages"][-1] == answer["messages"][1]
        assert ("tools" in tools) == (i % 2 == 0)
        calls = [m for m in tools["messages"] if m.get("tool_calls")]
        addition = answer["messages"][0]["content"].startswith("What is")
        assert len(calls) == (1 if "tools" in tools and addition else 0)
        if calls:
            (made,) = calls[0]["tool_calls"]
            assert answer["messages"][0]["content"] == f"What is {made['arguments']['expression']}?"
            assert tools["messages"][2] == {"role": "tool", "content": answer["messages"][1]["content"][14:-1]}
    assert {r["task"] for r in read["test"]} == {"addition", "countdown"}
    assert all("numbers" in r for r in read["test"] if r["task"] == "countdown")
    assert not list(tmp_path.glob(".*.tmp"))
    again = tmp_path / "again"
    write_suite(again, ["addition", "countdown"], sft=5, train=4, test=3, seed=1)
    assert (again / "test.jsonl").read_text() == (tmp_path / "test.jsonl").read_text()  # seeded
    (tmp_path / "bad.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": 2}\n{"prompt": "x"}\n')
    with pytest.raises(Exception, match=r"bad.jsonl:2: a problem row needs a string `prompt` and an `answer`"):
        read_problems(str(tmp_path / "bad.jsonl"), StorageConfig().resolved())


def test_eval_job_reports_problems_per_task_and_level_however_they_are_cut(ray_cluster, tmp_path):
    from generalmodel.eval.runner import LoadedModel, evaluate
    from jobs.eval import EvalConfig

    write_suite(tmp_path, ["addition", "countdown"], sft=0, train=0, test=2, seed=0)
    cfg = LlamaConfig(vocab_size=320, max_seq_len=96, n_layers=2, n_heads=2, d_model=32)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokenizer = train_bpe(make_documents(30, seed=5), cfg.vocab_size)
    loaded = LoadedModel("x", cfg, model.state_dict(), tokenizer.to_str())
    runs = []
    for parallelism in (1, 2):
        eval_cfg = EvalConfig(
            models=["x"], problems=str(tmp_path / "test.jsonl"), samples=3, pass_k=[1, 3], parallelism=parallelism,
            sampling={"temperature": 1.0, "max_new_tokens": 6, "seed": 4},
        )  # fmt: skip
        runs.append(evaluate(loaded, eval_cfg, eval_cfg.storage.resolved()))
    assert runs[0] == runs[1]  # greedy and sampled answers do not depend on the chunks
    m = runs[0]
    assert m["problems.count"] == 14 and m["problems.addition.L4.count"] == 2 and m["problems.countdown.L3.count"] == 2
    for name in ("problems", "problems.addition", "problems.countdown.L1"):
        assert 0 <= m[f"{name}.pass1_sampled"] <= m[f"{name}.pass3"] <= 1
        assert m[f"{name}.pass1"] == pytest.approx(m[f"{name}.pass1_sampled"])
    with pytest.raises(ValueError, match=r"pass_k \[9\]: each k must be in 1..samples=8"):
        EvalConfig(models=["x"], problems="p.jsonl", pass_k=[9])
