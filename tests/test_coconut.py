"""Coconut (generalmodel.post.coconut): a continuous thought's input is the previous position's last
hidden state; rows with different numbers of thoughts batch as each alone; the gradient flows
through the thoughts; the stages render what the curriculum says; bad rows are named; the engine
decodes the thoughts as training computes them; the loop resumes exactly and two FSDP2 ranks equal
one; jobs/coconut.py trains on Ray, registers, and the evaluation decodes with the thoughts."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_POST_RUN, rows_rank, run_rows_loop, seeded_model, spawn_ranks

from generalmodel import UserError
from generalmodel.cluster import free_port
from generalmodel.config import load_config
from generalmodel.data.chat import ChatFormat, add_chat_tokens, add_special_tokens
from generalmodel.data.tokenizer import load_tokenizer, train_bpe
from generalmodel.eval.reasoning import write_suite
from generalmodel.infer.engine import Engine, Request, SamplingParams, Thoughts, generate_batch, thoughts_of
from generalmodel.interop.adapter import ExportError
from generalmodel.interop.hf import adapter_for
from generalmodel.post.coconut import (
    LatentIds,
    Worked,
    batch,
    coconut_loss,
    coconut_train,
    load_worked,
    render,
    stage_of,
    thought_states,
)
from generalmodel.tokens import LATENT_TOKENS
from models.loss import IGNORE

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def worked_task(tmp_path_factory):
    """The reasoning suite's additions (worked, with their steps), a tokenizer trained on
    them with the chat and latent tokens, and the same without the latent tokens."""
    root = tmp_path_factory.mktemp("coconut")
    write_suite(root, ["addition"], sft=24, train=0, test=8, seed=0)
    rows = [json.loads(line) for line in (root / "sft_cot.jsonl").read_text().splitlines()]
    texts = [m["content"] for r in rows for m in r["messages"]]
    chat_json, _ = add_chat_tokens(train_bpe(texts, 300).to_str())
    tokenizer_json, added = add_special_tokens(chat_json, LATENT_TOKENS.values())
    assert added == list(LATENT_TOKENS.values())
    return root, tokenizer_json, chat_json


def task_cfg(root, tmp, **overrides):
    return load_config(
        overrides={
            "data.source": str(root / "sft_cot.jsonl"),
            "storage.root": str(tmp),
            **TINY_POST_RUN,
            "model.vocab_size": 320,
            "train.batch_size": 4,
            "coconut.stages": 2,
            "coconut.thoughts_per_step": 2,
            **overrides,
        }
    )


def marked(rows: int, width: int, thoughts: list[tuple[int, int]], seed=0):
    """Random token rows with the latent id at `thoughts` [(start, count) per row]."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(10, 200, (rows, width), generator=g)
    for r, (start, count) in enumerate(thoughts):
        inputs[r, start : start + count] = 300
    return inputs, inputs == 300


def test_a_thought_is_the_previous_positions_last_hidden_state(worked_task, tmp_path):
    cfg = task_cfg(*worked_task[:1], tmp_path)
    model = seeded_model(cfg)
    inputs, where = marked(3, 20, [(5, 2), (3, 4), (9, 0)])
    states = thought_states(model, inputs, where, NO_AUTOCAST)
    assert states.shape == (6, 32)
    hidden = model(inputs, thoughts=(where, states), hidden=True)
    rows, cols = where.nonzero().unbind(1)
    # the fixed point the passes build: each thought's input is the hidden state one position earlier
    assert torch.allclose(states, hidden[rows, cols - 1], atol=1e-6)
    assert not torch.allclose(states, model.embed(inputs)[where], atol=1e-3)  # not the token's embedding
    # the hidden state is what the head reads: the logits are the head of it
    assert torch.allclose(model.head(hidden), model(inputs, thoughts=(where, states)), atol=1e-5)
    # and the thoughts change what follows them (not what precedes them: causal)
    plain = model(inputs, hidden=True)
    assert torch.allclose(plain[1, :3], hidden[1, :3], atol=1e-6)
    assert not torch.allclose(plain[1, 7:], hidden[1, 7:], atol=1e-3)


def test_rows_with_different_numbers_of_thoughts_batch_like_each_alone(worked_task, tmp_path):
    cfg = task_cfg(*worked_task[:1], tmp_path)
    model = seeded_model(cfg)
    inputs, where = marked(3, 24, [(4, 4), (6, 2), (2, 6)], seed=1)
    targets = torch.roll(inputs, -1, 1).masked_fill(where, IGNORE)
    together = coconut_loss(model, {"inputs": inputs, "targets": targets}, 300, NO_AUTOCAST)
    alone = sum(
        coconut_loss(model, {"inputs": inputs[r : r + 1], "targets": targets[r : r + 1]}, 300, NO_AUTOCAST)
        for r in range(3)
    )
    assert math.isclose(together.item(), alone.item(), rel_tol=1e-5)


def test_the_gradient_flows_through_the_thoughts(worked_task, tmp_path):
    cfg = task_cfg(*worked_task[:1], tmp_path)
    inputs, where = marked(2, 16, [(3, 3), (5, 2)])
    targets = torch.roll(inputs, -1, 1).masked_fill(where, IGNORE)

    def grads(detach: bool):
        model = seeded_model(cfg)
        states = thought_states(model, inputs, where, NO_AUTOCAST)
        states = states.detach() if detach else states
        model(inputs, targets=targets, thoughts=(where, states)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert not torch.allclose(grads(False), grads(True), atol=1e-7)  # the passes are in the graph


def test_the_stages_render_the_curriculum(worked_task, tmp_path):
    cfg = task_cfg(*worked_task[:1], tmp_path, **{"coconut.stages": 3})
    ids = LatentIds(1000, 1001, 1002)
    row = Worked("x:1", [7, 8], [[11, 12], [13], [14, 15], [16]], [20, 21])
    expect = {1: [13, 14, 15, 16], 2: [14, 15, 16], 3: []}  # the last stage drops what is left
    for stage in (1, 2, 3):
        tokens, mask = render(row, stage, cfg, ids)
        head = [7, 8, 1000, *[1001] * (2 * stage), 1002]
        assert tokens == head + expect[stage] + [20, 21]
        assert mask == [0] * len(head) + [1] * (len(expect[stage]) + 2)
    keep = task_cfg(*worked_task[:1], tmp_path, **{"coconut.stages": 3, "coconut.drop_remaining": False})
    assert render(row, 3, keep, ids)[0][-3:] == [16, 20, 21]
    short = Worked("x:2", [7], [[11]], [20])  # fewer steps than the stage: still k·c thoughts
    assert render(short, 2, keep, ids)[0] == [7, 1000, 1001, 1001, 1001, 1001, 1002, 20]
    assert [stage_of(s, 10, 3) for s in range(10)] == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    b = batch([row, short], 1, cfg, ids, pad=0)
    assert b["inputs"].shape == (2, 11) and b["targets"][1, 4] == 20 and (b["targets"][1, 5:] == IGNORE).all()


def test_worked_rows_are_split_into_steps_and_bad_rows_are_named(worked_task, tmp_path):
    root, tokenizer_json, _ = worked_task
    cfg = task_cfg(root, tmp_path)
    data = load_worked(cfg, tokenizer_json)
    fmt = ChatFormat.from_json(tokenizer_json)
    first = json.loads((root / "sft_cot.jsonl").read_text().splitlines()[0])
    row = data.rows[0]
    assert len(data.rows) == 96 and len(row.steps) == len(first["steps"])
    # the pieces are the answer's tokens: joined, they render the worked conversation as SFT does
    assert row.prompt + [t for s in row.steps for t in s] + row.answer == fmt.render(first["messages"]).ids
    bad = tmp_path / "bad.jsonl"
    cases = {
        "needs `messages` and `steps`": {"messages": first["messages"]},
        "is not where the assistant's answer continues": {**first, "steps": ["not there."]},
        "nothing follows the steps": {
            "messages": [first["messages"][0], {"role": "assistant", "content": "1 + 1 = 2."}],
            "steps": ["1 + 1 = 2."],
        },
        "must be a list of non-empty strings": {**first, "steps": "1 + 1 = 2."},
    }
    bad_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(bad)})})
    for message, case in cases.items():
        bad.write_text(json.dumps(first) + "\n" + json.dumps(case) + "\n")
        with pytest.raises(UserError, match=re.escape(message)) as e:
            load_worked(bad_cfg, tokenizer_json)
        assert "bad.jsonl:2" in str(e.value)


def test_a_run_shorter_than_its_stages_is_refused(worked_task, tmp_path):
    from jobs import coconut

    with pytest.raises(UserError, match="fewer than coconut.stages=3"):
        coconut.main(task_cfg(worked_task[0], tmp_path, **{"train.steps": 2, "coconut.stages": 3}))


def test_the_engine_decodes_the_thoughts_as_training_computes_them(worked_task, tmp_path):
    root, tokenizer_json, _ = worked_task
    cfg = task_cfg(root, tmp_path, **{"model.continuous_thoughts": 3})
    model = seeded_model(cfg).eval()
    tokenizer = load_tokenizer(tokenizer_json, "test")
    thoughts = thoughts_of(model, tokenizer)
    ids = LatentIds.of(tokenizer_json)
    assert thoughts == Thoughts(3, ids.start, ids.thought, ids.end)
    with pytest.raises(ValueError, match="continuous thoughts"):
        Engine(model, 2)  # a Coconut model without its thoughts would answer without thinking
    prompts = [[5, 9, 17, 40], [6, 3]]
    requests = generate_batch(model, prompts, SamplingParams(temperature=0, max_new_tokens=6), thoughts=thoughts)
    for prompt, request in zip(prompts, requests, strict=True):
        assert len(request.tokens) == 6
        seq = torch.tensor([[*prompt, ids.start, *[ids.thought] * 3, ids.end, *request.tokens]])
        where = seq == ids.thought
        with torch.no_grad():
            states = thought_states(model, seq, where, NO_AUTOCAST)
            logits = model(seq, thoughts=(where, states))
        answer_from = len(prompt) + 4  # the logits at <|end-latent|> give the first answer token
        assert logits[0, answer_from : answer_from + 6].argmax(-1).tolist() == request.tokens
    engine = Engine(model, 1, capacity=10, thoughts=thoughts)
    with pytest.raises(ValueError, match="and 5 for its thoughts"):
        engine.add(Request([1, 2, 3, 4, 5]))
    with pytest.raises(ExportError, match="continuous_thoughts=3"):
        adapter_for(cfg.model)  # transformers' generate would answer without the thoughts


def one_rank_run(root, tokenizer_json, tmp):
    torch.set_num_threads(1)
    cfg = task_cfg(root, tmp)
    state = seeded_model(cfg).state_dict()
    data = load_worked(cfg, tokenizer_json)
    return cfg, state, data, run_rows_loop(coconut_train, cfg, state, data, tokenizer_json)


def test_the_loop_runs_the_stages_and_resumes_exactly(worked_task, tmp_path):
    root, tokenizer_json, _ = worked_task
    cfg, state, data, full = one_rank_run(root, tokenizer_json, tmp_path / "one")
    assert sorted(full) == [1, 2, 3, 4]
    assert [full[s]["stage"] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [full[s]["thoughts"] for s in (1, 2, 3, 4)] == [2, 2, 4, 4]
    assert all(full[s]["loss"] > 0 and full[s]["grad_norm"] > 0 for s in full)
    killed = task_cfg(root, tmp_path / "two", **{"train.fail_at_step": 3})
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_rows_loop(coconut_train, killed, state, data, tokenizer_json)
    resumed = run_rows_loop(coconut_train, killed, state, data, tokenizer_json)
    assert min(resumed) == 3  # from the step-2 checkpoint, after the stage switch's optimizer reset
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == full[step][key], (step, key)  # bit-identical on CPU


def test_two_fsdp2_ranks_equal_one(worked_task, tmp_path):
    """Each rank takes half of the step's rows; the several forwards of the thoughts run under FSDP2
    before one backward; the loss is normalised over both ranks: the same updates as one rank."""
    root, tokenizer_json, _ = worked_task
    _, state, data, single = one_rank_run(root, tokenizer_json, tmp_path / "one")
    two = task_cfg(root, tmp_path / "two", **{"ray.num_workers": 2, "train.batch_size": 2})
    out = mp.Manager().dict()
    spawn_ranks(rows_rank, (free_port(), coconut_train, two, state, data, tokenizer_json, out), 2)
    ranks = dict(out)
    for step in (1, 2, 3, 4):
        for key in ("loss", "grad_norm"):
            assert math.isclose(ranks[step][key], single[step][key], rel_tol=1e-5), (step, key)
    assert list((tmp_path / "two").rglob("__1_0.distcp"))  # rank 1 wrote its shard


@pytest.mark.e2e
def test_the_job_trains_on_ray_registers_and_evaluates_with_thoughts(worked_task, ray_cluster, mlflow_server, tmp_path):
    from generalmodel.eval.problems import read_problems, solve
    from generalmodel.infer.export import export_files, load_model
    from generalmodel.tracking.registry import download_model
    from jobs import coconut

    base = tmp_path / "base"
    base.mkdir()
    root, _, plain_tokenizer = worked_task  # the base has no latent tokens: the job adds them
    cfg = task_cfg(root, tmp_path / "store")
    for name, blob in export_files(cfg.model, seeded_model(cfg).state_dict(), plain_tokenizer).items():
        (base / name).write_bytes(blob)
    job = task_cfg(
        root,
        tmp_path / "store",
        **{
            "train.init_from": str(base),
            "tracking.uri": mlflow_server.uri,
            "tracking.registered_model": "coconut-test",
            "train.run_name": "coconut-test",
        },
    )
    out = coconut.main(job)
    assert out["model_uri"].startswith("models:/coconut-test/") and out["metrics"]["stage"] == 2
    directory = download_model(out["model_uri"], mlflow_server.uri, job.storage.resolved())
    model, tokenizer = load_model(directory, "cpu")
    assert model.cfg.continuous_thoughts == 4 and tokenizer.token_to_id("<|latent|>") is not None
    rows = read_problems(str(root / "test.jsonl"), job.storage.resolved(), limit=4)
    results = solve(model, tokenizer.to_str(), rows, 2, SamplingParams(temperature=0.8, max_new_tokens=12))
    assert len(results) == 4 and all(r.samples == 2 for r in results)
