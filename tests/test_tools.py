"""Tool use (generalmodel.data.chat's tool turns and calls, generalmodel.infer.tools): the rendering
equals transformers' template with tools; the mask supervises calls, not results; parsing a reply
is strict and names the call at fault; the calculator is exact and refuses what is not
arithmetic; a model that learned to call the calculator is run through a conversation (its call
parsed and run, the result fed back, the answer after it) by `converse` and by the evaluation's
`solve`, batched with conversations that answer at once."""

import json
import re

import pytest
import torch
from conftest import make_documents, tool_conversations, train_on_conversations

from generalmodel.data.chat import (
    CHAT_TEMPLATE,
    ChatFormat,
    ChatFormatError,
    add_special_tokens,
    apply_template,
    messages,
    tool_names,
)
from generalmodel.data.tokenizer import eos_id, train_bpe
from generalmodel.eval.problems import solve, summarize
from generalmodel.infer import SamplingParams
from generalmodel.infer.tools import BUILTIN, ToolError, calculate, call, converse
from generalmodel.tokens import TOOL_TOKENS
from models import build_model
from models.llama import LlamaConfig


@pytest.fixture(scope="module")
def tokenizer_json():
    plain = train_bpe(make_documents(30, seed=5), 320)  # reserves the chat tokens, not the tool tokens
    return add_special_tokens(plain.to_str(), TOOL_TOKENS.values())[0]


@pytest.fixture(scope="module")
def fmt(tokenizer_json):
    return ChatFormat.from_json(tokenizer_json)


@pytest.fixture(scope="module")
def caller(tokenizer_json):
    """A tiny model that learned the three conversations of `tool_conversations` by heart."""
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=322, max_seq_len=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=128))
    loss = train_on_conversations(model, tokenizer_json, tool_conversations(), steps=120)
    assert loss < 0.05
    return model


def openai_form(row: dict) -> list[dict]:
    """A row's messages as transformers' templates take them (calls under `function`)."""
    out = []
    for m in row["messages"]:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{"type": "function", "function": c} for c in m["tool_calls"]]
        out.append(m)
    return out


def test_the_template_renders_tools_calls_and_results_as_transformers_does(fmt):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=fmt.tokenizer, chat_template=CHAT_TEMPLATE)
    row = tool_conversations()[0]
    second = {"name": "calculator", "arguments": {"expression": "1 / 3"}}
    row["messages"][1]["tool_calls"].append(second)  # two calls in one turn
    row["messages"].insert(3, {"role": "tool", "content": "0.3333333333"})
    names = tool_names(row["tools"], "row")
    assert names == ["calculator"]
    rendered = fmt.render(messages(row["messages"], "row"), tools=names)
    ids = hf.apply_chat_template(openai_form(row), tools=row["tools"], tokenize=True, return_dict=True)["input_ids"]
    assert list(ids) == rendered.ids
    text = fmt.tokenizer.decode(rendered.ids, skip_special_tokens=False)
    assert text == apply_template(messages(row["messages"], "row"), tools=names)
    assert text.startswith("<|system|>tools: calculator<|end|><|user|>What is 12 + 7?<|end|><|assistant|><|tool_call|>")
    assert text.count("<|tool_call|>") == 2 and text.count("<|tool|>") == 2
    prompt = hf.apply_chat_template(
        openai_form(row)[:1], tools=row["tools"], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert list(prompt["input_ids"]) == fmt.prompt_ids(messages(row["messages"][:1], "row", False), tools=names)


def test_calls_are_supervised_and_tool_results_and_declarations_are_not(fmt):
    row = tool_conversations()[1]
    rendered = fmt.render(messages(row["messages"], "row"), tools=tool_names(row["tools"], "row"))
    learned = fmt.tokenizer.decode([i for i, m in zip(rendered.ids, rendered.mask, strict=True) if m], False)
    call_json = '{"name": "calculator", "arguments": {"expression": "345 + 78"}}'
    assert learned == f"<|tool_call|>{call_json}<|end|>The answer is 423.<|end|>"


def test_a_reply_is_parsed_strictly_and_a_bad_call_is_named(fmt):
    call_id = fmt.call_id
    good = '{"name": "calculator", "arguments": {"expression": "1 + 2"}}'
    reply = fmt.reply(
        fmt.encode("Let me see.") + [call_id] + fmt.encode(good) + [call_id] + fmt.encode(good), ["calculator"]
    )
    assert reply.error is None and reply.content == "Let me see."
    assert reply.calls == [{"name": "calculator", "arguments": {"expression": "1 + 2"}}] * 2
    assert fmt.reply(fmt.encode("The answer is 3."), ["calculator"]).calls == []
    cases = {
        '{"name": "calculator", "arguments": {"expression": "1 +': "tool call 2 of 2: not JSON",
        '{"name": "calculator"}': 'tool call 2 of 2: expected {"name": ..., "arguments": {...}}',
        '{"name": "calculator", "arguments": "1 + 2"}': "a string name and an object of arguments",
        '{"name": "search", "arguments": {}}': r"calls 'search', which is not a declared tool \(calculator\)",
    }
    for bad, message in cases.items():
        ids = [call_id] + fmt.encode(good) + [call_id] + fmt.encode(bad)
        reply = fmt.reply(ids, ["calculator"])
        assert reply.calls == [] and reply.error is not None, bad
        assert re.search(message, reply.error), (bad, reply.error)
        assert reply.content.endswith(bad)  # the text as generated, for the client to see
    assert "declares no tools" in fmt.reply([call_id] + fmt.encode(good), None).error


def test_bad_tool_messages_and_declarations_are_named_errors(tokenizer_json):
    with pytest.raises(ChatFormatError, match=r"here: message 0 \(user\) has tool_calls: only an assistant"):
        messages([{"role": "user", "content": "a", "tool_calls": [{"name": "x"}]}], "here")
    bad_json = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]
    with pytest.raises(ChatFormatError, match=r"here: message 0: tool call 0 \(f\): arguments are not JSON"):
        messages(bad_json, "here")
    with pytest.raises(ChatFormatError, match=r"tool call 0 is \[1\], expected"):
        messages([{"role": "assistant", "content": "", "tool_calls": [[1]]}], "here")
    with pytest.raises(ChatFormatError, match="each tool once"):
        tool_names(["calculator", {"name": "calculator"}], "here")
    # OpenAI's form (arguments as JSON text, content None) is read as {name, arguments}
    openai = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    read = messages([{"role": "assistant", "content": None, "tool_calls": [openai]}], "here")
    assert read == [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}]
    assert messages([{"role": "assistant", "content": "hi", "tool_calls": []}], "here") == [
        {"role": "assistant", "content": "hi"}
    ]
    # a tokenizer without the tool tokens cannot render them: the error says how to get them
    plain = ChatFormat.from_json(train_bpe(make_documents(10, seed=1), 300).to_str())
    with pytest.raises(ChatFormatError, match="lacks: fine-tune .* data.tools=true"):
        plain.render([{"role": "user", "content": "hi"}], tools=["calculator"])


def test_the_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculate("12 + 7 * 3") == "33" and calculate("(12 + 7) * 3") == "57"
    assert calculate("7 / 2") == "3.5" and calculate("1 / 3") == "0.3333333333" and calculate("-3 * -2") == "6"
    assert calculate("0.1 + 0.2") == "0.3" and calculate("2 ** 10") == "1024" and calculate("1,000 + 1") == "1001"
    for bad, message in {
        "1 / 0": "division by zero",
        "__import__('os').system('true')": "not allowed",
        "(1 + 2": "not an arithmetic expression",
        "2 ** 0.5": "exponents are whole numbers",
        "((2 ** 64) ** 64) ** 64": "more than 1000 digits",
    }.items():
        with pytest.raises(ToolError, match=message):
            calculate(bad)
    assert call("calculator", {"expression": "1 / 0"}) == "error: division by zero"
    assert call("calculator", {"expr": "1"}) == "error: calculator takes expression; missing expression"
    assert call("search", {}) == "error: no tool 'search'"
    assert call("calculator", {"expression": 12}) == "error: the expression must be a string, got 12"
    assert BUILTIN["calculator"].spec["function"]["parameters"]["required"] == ["expression"]


def test_a_conversation_runs_its_calls_and_answers_after_the_result(caller, fmt):
    stop = {eos_id(fmt.tokenizer)}
    greedy = SamplingParams(temperature=0, max_new_tokens=100)
    rows = tool_conversations()
    asked = [r["messages"][:1] for r in rows]
    talks = converse(caller, fmt, asked, ["calculator"], greedy, stop)
    for talk, row in zip(talks, rows, strict=True):
        assert talk.finished and talk.error is None and talk.calls == 1
        assert talk.messages[1]["tool_calls"] == row["messages"][1]["tool_calls"]
        result = calculate(row["messages"][1]["tool_calls"][0]["arguments"]["expression"])
        assert talk.messages[2] == {"role": "tool", "content": result}  # the calculator ran, its result went back
        assert talk.answer == f"The answer is {result}."
    # a conversation the context cannot hold ends with an error, not an exception, beside the others
    crowded = [{"role": "user", "content": "What is 12 + 7?" + " 1" * 300}]
    talks = converse(caller, fmt, [crowded, asked[0]], ["calculator"], greedy, stop)
    assert "no room left in the model's 256" in talks[0].error and talks[1].finished
    # without tools declared nothing is run: a call the model writes anyway ends it as an error
    untold = converse(caller, fmt, asked[:2], None, greedy, stop, slots=1)
    assert all(t.calls == 0 and len(t.messages) == 1 for t in untold)
    assert all(t.finished or "declares no tools" in t.error for t in untold)


def test_evaluation_with_tools_reports_their_use(caller, tokenizer_json):
    rows = [
        {
            "prompt": r["messages"][0]["content"],
            "answer": int(r["messages"][2]["content"]),
            "task": "addition",
            "level": 1,
        }
        for r in tool_conversations()
    ]
    params = SamplingParams(temperature=0.8, max_new_tokens=100, seed=3)
    with_tools = summarize(solve(caller, tokenizer_json, rows, 2, params, slots=4, tools=["calculator"]), [2])
    assert with_tools["problems.pass1_greedy"] == 1.0 and with_tools["problems.tool_use"] == 1.0
    assert with_tools["problems.tool_call_errors"] == 0.0
    without = summarize(solve(caller, tokenizer_json, rows, 0, params), [])
    assert "problems.tool_use" not in without
    assert without["problems.pass1_greedy"] < 1.0  # the calculator's results made the difference


def test_rl_rollouts_call_the_calculator_and_the_learner_leaves_the_results_out(caller, tokenizer_json, tmp_path):
    """rl.tools: the prompts declare the calculator; a rollout is the policy's call, the result's
    tool turn (not sampled: logprob 0, out of the learner's mask), then its answer, which the
    verifiers score."""
    from generalmodel.config import load_config
    from generalmodel.post.rl.learner import _sequences
    from generalmodel.post.rl.rollout import RolloutWorker
    from generalmodel.post.rl.tasks import load_prompts

    source = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": r["messages"][0]["content"], "answer": int(r["messages"][2]["content"])}
        for r in tool_conversations()
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = {"vocab_size": 322, "max_seq_len": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 128}
    cfg = load_config(
        overrides={
            **{f"model.{k}": v for k, v in tiny.items()},
            "data.source": str(source),
            "rl.eval_source": str(source),
            "rl.tools": ["calculator"],
            "rl.max_new_tokens": 100,
            "rl.rewards": {"exact_number": 1.0},
            "storage.root": str(tmp_path),
        }
    )
    fmt = ChatFormat.from_json(tokenizer_json)
    prompts = load_prompts(cfg, tokenizer_json)
    assert fmt.tokenizer.decode(prompts.train[0].ids, False).startswith("<|system|>tools: calculator<|end|><|user|>")
    worker = RolloutWorker(cfg, tokenizer_json, prompts)
    worker.load(0, caller.state_dict())
    batch = worker.evaluate([0, 1, 2])
    for rollout, row in zip(batch.rollouts, rows, strict=True):
        results = fmt.tool_results([str(row["answer"])])
        assert rollout.reward == 1.0 and rollout.stopped and rollout.text == f"The answer is {row['answer']}."
        assert len(rollout.logprobs) == len(rollout.completion) == len(rollout.policy)
        at = rollout.policy.index(False)
        assert rollout.completion[at : at + len(results)] == results  # the tool turn and <|assistant|>
        assert rollout.policy.count(False) == len(results) and rollout.completion[at - 1] == fmt.end_id  # the call's
        assert all(lp == 0 for lp, p in zip(rollout.logprobs, rollout.policy, strict=True) if not p)
    assert batch.generated_tokens == sum(r.sampled for r in batch.rollouts)
    tensors = _sequences(prompts, batch.rollouts, torch.zeros(3), next(iter(cfg.rl.rewards)), "cpu")
    assert int(tensors["mask"].sum()) == batch.generated_tokens  # the results are not trained on
    first = batch.rollouts[0]
    start = len(prompts.train[0].ids) - 1 + first.policy.index(False)
    assert not tensors["mask"][0, start : start + first.policy.count(False)].any()
