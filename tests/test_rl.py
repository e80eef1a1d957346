"""GRPO: the objective's arithmetic, the verifiers, the task data, the sampler's log-probs against
the learner's, the learner loop in one process (rollouts in-process) with exact resume, and the
learner on two gloo ranks equal to one. The Ray paths (rollout actors, a killed actor, Ray Train's
restart) are in test_rl_ray.py."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_POST_RUN, spawn_ranks

from generalmodel import UserError
from generalmodel.cluster import free_port
from generalmodel.config import load_config
from generalmodel.data.chat import ChatFormat
from generalmodel.data.tokenizer import train_bpe
from generalmodel.infer import SamplingParams
from generalmodel.infer.engine import generate_batch
from generalmodel.post import arithmetic
from generalmodel.post.rl.grpo import group_advantages, grpo_loss, token_logprobs, token_weights, units
from generalmodel.post.rl.learner import (
    gap_k,
    informative_first,
    pass_ks,
    rl_train,
    sampled_scores,
    spread_indices,
    train_in_process,
)
from generalmodel.post.rl.prime import process_advantages, sequence_sums
from generalmodel.post.rl.progress_plot import pass_report
from generalmodel.post.rl.rewards import Rewards, exact_number
from generalmodel.post.rl.rollout import Rollout, sample_seed, shards
from generalmodel.post.rl.tasks import PromptSchedule, load_prompts
from models import build_model


def digit_share(prompt: str, completion: str, **fields) -> float:
    """A verifier a random model scores on (`test_rl:digit_share`): the share of digits in its
    completion, so every group has a reward signal."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


SCORED: list[tuple[str, float]] = []


def timed_score(prompt: str, completion: str, **fields) -> float:
    """A verifier that says where and when it ran."""
    import threading
    import time

    SCORED.append((threading.current_thread().name, time.perf_counter()))
    return 0.0


def rl_cfg(**overrides):
    return load_config(overrides={"rl.group_size": 4, "rl.max_new_tokens": 6, **overrides}).rl


def test_group_advantages_are_centred_and_scaled_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    grpo = group_advantages(rewards, scale=True)
    assert torch.allclose(grpo.sum(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.equal(grpo[1], torch.zeros(4))  # no variance, no gradient
    assert math.isclose(grpo[0, 0].item(), 0.5 / (rewards[0].std().item() + 1e-4), rel_tol=1e-6)
    dr = group_advantages(rewards, scale=False)  # Dr. GRPO: centred only
    assert torch.allclose(dr[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_on_policy_gradient_is_the_policy_gradient_and_the_clip_stops_it():
    rl = rl_cfg()
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    ones = torch.ones(3)
    loss, stats = grpo_loss(logp, logp.detach(), adv, ones, torch.zeros(3), None, rl)
    assert abs(loss.item() + adv.sum().item()) < 1e-6  # ratio 1: the loss is -sum(A)
    loss.backward()
    assert torch.allclose(logp.grad, -adv)  # d/dlogp of -ratio*A at ratio 1
    assert stats["clip_fraction"] == 0 and stats["approx_kl"] == 0
    # A token whose ratio is past 1+eps with A>0 (or below 1-eps with A<0) gives no gradient.
    logp = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    old = torch.tensor([-0.5, 0.5, -0.1])  # ratios e^0.5 (clipped, A>0), e^-0.5 (clipped, A<0), e^0.1
    loss, stats = grpo_loss(logp, old, torch.tensor([1.0, -1.0, 1.0]), ones, torch.zeros(3), None, rl)
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] == 0 and logp.grad[2] != 0
    assert stats["clip_fraction"] == 2
    # The KL penalty (k3) is zero at the reference and positive away from it.
    kl_rl = rl_cfg(**{"rl.beta": 0.1})
    at_ref, s = grpo_loss(
        torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(2), kl_rl
    )
    assert at_ref == 0 and s["kl"] == 0
    _, s = grpo_loss(
        torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.ones(2), torch.zeros(2), torch.tensor([-1.0, 1.0]), kl_rl
    )
    assert s["kl"] > 0


def test_loss_normalisations():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    token, seq, dr = (rl_cfg(**{"rl.loss_type": t}) for t in ("token", "sequence", "dr_grpo"))
    assert units(mask, token) == 4 and units(mask, seq) == 2 and units(mask, dr) == 2 * 6
    w = token_weights(mask, seq)[mask]
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))  # each sequence weighs 1 in total
    assert torch.equal(token_weights(mask, token)[mask], torch.ones(4))


def test_prime_process_advantages_are_leave_one_out_returns_to_go():
    # one group of 3 completions, lengths 2, 3, 1 (T = 3); rewards off the mask are 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rewards = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])
    means = [2.0, 1.0, 2.0]  # per token
    baseline = [(means[1] + means[2]) / 2, (means[0] + means[2]) / 2, (means[0] + means[1]) / 2]
    want = torch.tensor(
        [
            [(1 - baseline[0]) + (3 - baseline[0]), 3 - baseline[0], 0.0],
            [3 * (0 - baseline[1]) + 3, 2 * (0 - baseline[1]) + 3, 3 - baseline[1]],
            [2 - baseline[2], 0.0, 0.0],
        ]
    )
    assert torch.allclose(process_advantages(rewards, mask, 3), want)
    # groups are separate: two copies of the group side by side give the same rows
    twice = process_advantages(torch.cat([rewards, rewards]), torch.cat([mask, mask]), 3)
    assert torch.equal(twice, torch.cat([want, want]))
    assert torch.equal(sequence_sums(torch.tensor([1.0, 3.0, 2.0]), mask[[0, 2]]), torch.tensor([4.0, 2.0]))


def test_dynamic_sampling_keeps_the_groups_with_a_signal_first():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    assert informative_first(rewards, 2) == [1, 3]
    assert informative_first(rewards, 3) == [0, 1, 3]  # filled up with uniform groups in the order drawn
    assert informative_first(rewards, 5) == [0, 1, 2, 3, 4]


def test_held_out_prompts_are_spread_over_the_set():
    # a suite sorted by task and level (10 problems per level here) is sampled across its length
    assert spread_indices(40, 4) == [0, 10, 20, 30]
    assert spread_indices(5, 8) == [0, 1, 2, 3, 4]
    assert spread_indices(7, 0) == []
    picked = spread_indices(500, 200)
    assert len(set(picked)) == 200 and max(picked) >= 497


def test_held_out_pass_at_k_and_the_gap_closed(capsys):
    def rollout(score):
        return Rollout(0, [1], [0.0], score, {"exact_number": score}, True, 0)

    # two prompts, each its greedy rollout then 3 samples: the first solved by 1 of 3, the second by
    # none (a partial score is not a solve)
    rollouts = [rollout(s) for s in (1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.5)]
    got = sampled_scores(rollouts, 3, "exact_number")
    assert got == pytest.approx({"heldout_pass1_sampled": (1 / 3 + 0) / 2, "heldout_pass3": 0.5})
    out = pass_report({0: 0.2, 5: 0.3, 10: 0.4}, {0: 0.25, 10: 0.3}, {3: {0: 0.6, 10: 0.62}}, 3)
    assert out["gap_closed"] == pytest.approx((0.4 - 0.2) / (0.6 - 0.2))  # from the first step's gap
    assert out["pass1_start"] == 0.2 and out["pass3_end"] == 0.62
    assert "gap closed: +0.50" in capsys.readouterr().out
    assert "gap_closed" not in pass_report({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.5}, {3: {0: 0.5, 1: 0.7}}, 3)

    # 32 samples a prompt: pass@8 is the unbiased estimate from them, pass@32 beside it; the gap is
    # measured against pass@8 (the goal's k)
    assert pass_ks(32) == [8, 32] and pass_ks(8) == [8] and pass_ks(3) == [3] and gap_k(32) == 8 == gap_k(8)
    rollouts = [rollout(1.0)] + [rollout(float(j < 2)) for j in range(32)]  # one prompt, 2 of 32 right
    got = sampled_scores(rollouts, 32, "exact_number")
    assert got["heldout_pass1_sampled"] == pytest.approx(2 / 32) and got["heldout_pass32"] == 1.0
    assert got["heldout_pass8"] == pytest.approx(
        1 - (30 * 29 * 28 * 27 * 26 * 25 * 24 * 23) / (32 * 31 * 30 * 29 * 28 * 27 * 26 * 25)
    )
    out = pass_report({0: 0.1, 9: 0.3}, {0: 0.1, 9: 0.2}, {8: {0: 0.5, 9: 0.5}, 32: {0: 0.8, 9: 0.7}}, 8)
    assert out["gap_closed"] == pytest.approx(0.5) and out["pass32_end"] == 0.7
    assert "pass@32" in capsys.readouterr().out


def test_verifiers():
    assert exact_number("q", "47 + 38 = 85. The answer is 85.", answer=85) == 1
    assert exact_number("q", "The answer is 1,024.", answer="1024") == 1
    assert exact_number("q", "85 or 86", answer=85) == 0  # the last number counts
    assert exact_number("q", "no number", answer=3) == 0
    rewards = Rewards({"exact_number": 1.0, "answer_format": 0.5})
    assert rewards("q", "The answer is 7.", {"answer": 7}) == (1.5, {"exact_number": 1.0, "answer_format": 1.0})
    assert rewards("q", "it is 7", {"answer": 7})[0] == 1.0
    plugin = Rewards({"generalmodel.post.rl.rewards:answer_format": 1.0})  # module:function
    assert plugin("q", "The answer is 7.", {})[0] == 1 and plugin("q", "7", {})[0] == 0
    with pytest.raises(UserError, match=r"verifier 'math:isfinite' failed .*TypeError"):
        Rewards({"math:isfinite": 1.0})("q", "x", {})
    with pytest.raises(UserError, match="unknown verifier 'nope'"):
        Rewards({"nope": 1.0})
    with pytest.raises(UserError, match="cannot import verifier 'no_such_module:f'"):
        Rewards({"no_such_module:f": 1.0})
    with pytest.raises(UserError, match="needs an `answer` field"):
        rewards("q", "1", {})
    worked = Rewards({"worked_format": 1.0})
    for text in (
        "5 + 9 = 14, write 4, carry 1. Bring down 1. The answer is 114.",
        "The answer is 12.5.",
        "8 * 7 = 56. 56 + 7 = 63. The answer is (8 * 7) + 7.",
    ):
        assert worked("q", text, {})[0] == 1, text
    for text in (
        "The answer is 3. The answer is 4.",
        "The answer is 3. Then more.",
        "So it is 3.",
        "The answer is 3",
        "1 + 2 = 3The answer is 3.",
    ):
        assert worked("q", text, {})[0] == 0, text


def test_arithmetic_task_is_deterministic_with_a_disjoint_held_out_split(tmp_path):
    counts = arithmetic.build(tmp_path / "a", sft=300, train=200, test=60, digits=2, seed=3)
    assert counts == {"sft": 300, "train": 200, "test": 60}
    arithmetic.build(tmp_path / "b", sft=300, train=200, test=60, digits=2, seed=3)
    for name in ("sft", "train", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_text() == (tmp_path / "b" / f"{name}.jsonl").read_text()

    def numbers(text):
        import re

        a, b = map(int, re.findall(r"\d+", text)[:2])
        return a, b

    test = [json.loads(line) for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held = {numbers(r["prompt"]) for r in test}
    for row in train:
        a, b = numbers(row["prompt"])
        assert row["answer"] in (a + b, a - b) and row["answer"] >= 0
        assert arithmetic.split_of(a, b, "+" if row["answer"] == a + b else "-") == "train"
    assert all(
        arithmetic.split_of(*numbers(r["prompt"]), "+" if r["answer"] == sum(numbers(r["prompt"])) else "-") == "test"
        for r in test
    )
    assert held  # the split is by numbers and operation: no phrasing of a held-out problem trains


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A 1-digit arithmetic task, a tokenizer trained on it and a random tiny model's config: a
    random model's completions are mostly digits, so some of them are right by chance."""
    root = tmp_path_factory.mktemp("rl")
    arithmetic.build(root, sft=400, train=64, test=16, digits=1, seed=1)
    texts = [line for name in ("sft", "train") for line in (root / f"{name}.jsonl").read_text().splitlines()]
    tokenizer_json = train_bpe(texts, 300).to_str()
    return root, tokenizer_json


def task_cfg(root, tmp, **overrides):
    return load_config(
        overrides={
            "data.source": str(root / "train.jsonl"),
            "rl.eval_source": str(root / "test.jsonl"),
            "storage.root": str(tmp),
            **TINY_POST_RUN,
            "model.vocab_size": 300,
            "train.batch_size": 8,
            "rl.prompts_per_step": 4,
            "rl.group_size": 4,
            "rl.max_new_tokens": 4,
            "rl.eval_every": 2,
            "rl.eval_prompts": 8,
            "rl.eval_samples": 2,
            "rl.rewards": {"test_rl:digit_share": 1.0, "exact_number": 0.5},
            **overrides,
        }
    )


def test_the_samplers_log_probs_are_the_learners(tiny_task, tmp_path):
    """At the same weights the ratio starts at 1: the engine's log-probs (batched KV-cache decode)
    equal the learner's (one full forward) for every sampled token."""
    root, tokenizer_json = tiny_task
    cfg = task_cfg(root, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    prompts = load_prompts(cfg, tokenizer_json)
    rows = [prompts.train[i].ids for i in range(6)]
    params = [SamplingParams(temperature=0.7, max_new_tokens=8, seed=s) for s in range(6)]
    end = ChatFormat.from_json(tokenizer_json).end_id
    for request in generate_batch(model, rows, params, {end}):
        completion = request.tokens + ([request.stop_id] if request.stop_id is not None else [])
        assert len(request.logprobs) == len(completion) > 0
        seq = torch.tensor([request.prompt_ids + completion])
        with torch.no_grad():
            logits = model(seq[:, :-1])[0, len(request.prompt_ids) - 1 :]
            keep = torch.zeros(seq[:, :-1].shape, dtype=torch.bool)
            keep[0, len(request.prompt_ids) - 1 :] = True
            assert torch.allclose(model(seq[:, :-1], keep=keep), logits, atol=1e-6)  # the head at `keep` only
        learner = token_logprobs(logits, torch.tensor(completion), 0.7)
        assert torch.allclose(learner, torch.tensor(request.logprobs), atol=1e-5), (learner, request.logprobs)


def test_one_update_moves_each_completion_the_way_its_advantage_says(tiny_task, tmp_path):
    from generalmodel.optim import build_optimizer
    from generalmodel.post.rl.grpo import token_entropy
    from generalmodel.post.rl.learner import _sequences
    from generalmodel.post.rl.rollout import RolloutWorker

    root, tokenizer_json = tiny_task
    cfg = task_cfg(root, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    prompts = load_prompts(cfg, tokenizer_json)
    worker = RolloutWorker(cfg, tokenizer_json, prompts)
    worker.load(0, model.state_dict())
    batch = worker.rollouts(0, [(j * 4 + g, j) for j in range(4) for g in range(4)])
    advantages = group_advantages(torch.tensor([r.reward for r in batch.rollouts]).view(-1, 4), True).view(-1)
    t = _sequences(prompts, batch.rollouts, advantages, "exact_number", "cpu")
    keep = t["mask"]

    def sequence_logps():
        with torch.no_grad():
            out = torch.zeros(keep.shape)
            out[keep] = token_logprobs(model(t["inputs"])[keep], t["targets"][keep], cfg.rl.temperature)
            return out.sum(1)

    before = sequence_logps()
    assert torch.allclose(before, (t["old_logp"] * keep).sum(1), atol=1e-4)  # the sampler's, summed
    optimizer = build_optimizer(model, cfg.optim.model_copy(update={"lr": 1e-3}), fused=False)
    logits = model(t["inputs"])[keep]
    loss, _ = grpo_loss(
        token_logprobs(logits, t["targets"][keep], cfg.rl.temperature),
        t["old_logp"][keep],
        advantages.unsqueeze(1).expand_as(keep)[keep],
        token_weights(keep, cfg.rl)[keep],
        token_entropy(logits, cfg.rl.temperature),
        None,
        cfg.rl,
    )
    (loss / units(keep, cfg.rl)).backward()
    optimizer.step()
    moved = sequence_logps() - before
    assert (advantages > 0).any() and (advantages < 0).any()
    assert moved[advantages > 0].mean() > 0 > moved[advantages < 0].mean()


def test_prompt_order_and_bad_rows(tiny_task, tmp_path):
    root, tokenizer_json = tiny_task
    prompts = load_prompts(task_cfg(root, tmp_path), tokenizer_json)
    assert len(prompts.train) == 64 and len(prompts.heldout) == 16
    epoch = [i for step in range(16) for i in prompts.step_prompts(step, 4, seed=0)]
    assert sorted(epoch) == list(range(64))  # every prompt once per epoch
    assert prompts.step_prompts(17, 4, seed=0) == prompts.step_prompts(17, 4, seed=0)
    assert prompts.step_prompts(0, 4, seed=1) != prompts.step_prompts(0, 4, seed=0)
    assert sample_seed(0, 3, 5) != sample_seed(0, 5, 3)
    assert shards(list(range(5)), 2) == [[0, 1, 2], [3, 4]] and shards([1], 3) == [[1]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 2?", "answer": 3}\n{"question": "x"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: no field 'prompt' \(rl.prompt_field\)"):
        load_prompts(task_cfg(root, tmp_path, **{"data.source": str(bad)}), tokenizer_json)
    with pytest.raises(UserError, match=r"rl.prompts_per_step=6 must divide among the learner's ranks .* not among 4"):
        rl_train(
            task_cfg(root, tmp_path, **{"rl.prompts_per_step": 6, "ray.num_workers": 4}),
            init=lambda: {},
            prompts=prompts,
            tokenizer_json=tokenizer_json,
            rollouts="local",
        )


def run_local(cfg, state, prompts, tokenizer_json):
    return train_in_process(cfg, state, prompts, tokenizer_json)


def one_rank_run(root, tokenizer_json, tmp, **overrides):
    """A 4-step run on one rank from a seeded random model: (its config, the model's state, the
    prompts, the metrics by step)."""
    torch.set_num_threads(1)
    cfg = task_cfg(root, tmp, **overrides)
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    prompts = load_prompts(cfg, tokenizer_json)
    return cfg, state, prompts, run_local(cfg, state, prompts, tokenizer_json)


def test_learner_learns_from_rewards_and_resumes_exactly(tiny_task, tmp_path):
    root, tokenizer_json = tiny_task
    cfg, state, prompts, full = one_rank_run(root, tokenizer_json, tmp_path / "one")
    assert set(full) == {0, 1, 2, 3, 4}
    assert {"heldout_accuracy", "heldout_reward", "heldout_exact_number"} <= set(full[0])
    assert full[4]["heldout_accuracy"] == full[4]["heldout_test_rl.digit_share"]  # the first verifier's
    # pass@1 sampled and pass@2 at the first and the last evaluation only (rl.eval_samples: 2)
    assert [s for s in sorted(full) if "heldout_pass2" in full[s]] == [0, 4]
    assert "heldout_accuracy" in full[2] and "heldout_pass1_sampled" not in full[2]
    assert 0 <= full[4]["heldout_pass1_sampled"] <= full[4]["heldout_pass2"] <= 1
    for step in range(1, 5):
        m = full[step]
        assert 0 <= m["reward_mean"] <= 1.5 and 0 <= m["zero_variance_groups"] <= 1 and m["policy_lag"] == 0
        assert m["entropy"] > 0 and m["completion_len"] > 0 and m["rollout_tokens_per_s"] > 0
    assert any(full[s]["zero_variance_groups"] < 1 for s in range(1, 5)), "no group had a reward signal"
    assert any(full[s]["grad_norm"] > 0 for s in range(1, 5))

    killed = task_cfg(root, tmp_path / "two", **{"train.fail_at_step": 3})
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_local(killed, state, prompts, tokenizer_json)
    resumed = run_local(killed, state, prompts, tokenizer_json)
    assert min(resumed) == 2  # from the step-2 checkpoint: its evaluation, then steps 3 and 4
    for step in (3, 4):
        for key in ("reward_mean", "loss", "grad_norm", "entropy", "heldout_accuracy", "heldout_pass2"):
            if key in full[step]:
                assert resumed[step][key] == full[step][key], (step, key)  # bit-identical on CPU


def _learner_rank(rank, port, cfg, state, prompts, tokenizer_json, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    seen = train_in_process(cfg, state, prompts, tokenizer_json)  # rank 0 samples, both ranks learn
    if rank == 0:
        out.update(seen)
    torch.distributed.destroy_process_group()


def test_prime_learns_process_rewards_and_resumes_exactly(tiny_task, tmp_path):
    """rl.prime: the implicit PRM updates on the outcomes every step and its process advantages
    change the policy's update; the PRM and its optimizer are in the checkpoint, so a killed and
    resumed run repeats the uninterrupted one."""
    root, tokenizer_json = tiny_task
    prime = {"rl.prime": True, "rl.prime_lr": 1e-2}
    _, state, prompts, plain = one_rank_run(root, tokenizer_json, tmp_path / "plain")
    _, _, _, full = one_rank_run(root, tokenizer_json, tmp_path / "full", **prime)
    assert full[1]["reward_mean"] == plain[1]["reward_mean"]  # the same start, the same first rollouts
    assert full[1]["grad_norm"] != plain[1]["grad_norm"]  # ... and another update: the process advantages
    for step in range(1, 5):
        assert full[step]["prm_loss"] > 0 and 0 <= full[step]["prm_accuracy"] <= 1
        assert full[step]["prm_skipped_steps"] == 0  # the PRM's own non-finite guard, read every step
    assert full[4]["prm_loss"] < full[1]["prm_loss"]  # it learns the outcomes
    killed = task_cfg(root, tmp_path / "killed", **prime, **{"train.fail_at_step": 3})
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_local(killed, state, prompts, tokenizer_json)
    resumed = run_local(killed, state, prompts, tokenizer_json)
    for step in (3, 4):
        for key in ("reward_mean", "loss", "grad_norm", "prm_loss", "prm_accuracy"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_a_two_rank_learner_equals_one_rank_on_the_same_rollouts(tiny_task, tmp_path):
    """Rank 0 samples the step's groups and sends them to every rank; each rank learns on half of
    them (whole groups); the loss is normalised over both ranks and FSDP2 averages the gradients:
    the same updates as one rank on all of them, so the same rollouts step after step. With
    rl.prime, whose reward model learns on the ranks' shares the same way."""
    root, tokenizer_json = tiny_task
    prime = {"rl.prime": True, "rl.prime_lr": 1e-2}
    _, state, prompts, single = one_rank_run(root, tokenizer_json, tmp_path / "one", **prime)
    two = task_cfg(root, tmp_path / "two", **prime, **{"ray.num_workers": 2})
    out = mp.Manager().dict()
    spawn_ranks(_learner_rank, (free_port(), two, state, prompts, tokenizer_json, out), 2)
    ranks = dict(out)
    assert set(ranks) == set(single) == {0, 1, 2, 3, 4}
    for step in range(1, 5):
        assert ranks[step]["reward_mean"] == single[step]["reward_mean"], step  # the same rollouts
        for key in ("loss", "grad_norm", "entropy", "prm_loss", "prm_accuracy"):
            assert math.isclose(ranks[step][key], single[step][key], rel_tol=1e-5, abs_tol=1e-7), (step, key)
    assert ranks[4]["heldout_accuracy"] == single[4]["heldout_accuracy"]
    assert list((tmp_path / "two").rglob("__1_0.distcp"))  # two ranks really learned: rank 1 wrote its shard


def test_the_prompt_schedule_skips_uniform_groups_for_a_while(tiny_task, tmp_path):
    root, tokenizer_json = tiny_task
    prompts = load_prompts(task_cfg(root, tmp_path), tokenizer_json)  # 64 training prompts: 4 steps an epoch
    plain = PromptSchedule(prompts, 16, seed=0)
    assert [plain.prompts_for(k) for k in range(6)] == [prompts.step_prompts(k, 16, 0) for k in range(6)]
    schedule = PromptSchedule(prompts, 16, seed=0, skip_for=5)
    first = schedule.prompts_for(0)
    assert first == prompts.step_prompts(0, 16, 0) and schedule.prompts_for(0) == first  # kept until trained
    uniform = set(first[:6])  # all right or all wrong: skipped for steps 1..5
    schedule.record(0, [(i, [1.0, 1.0] if i in uniform else [0.0, 1.0]) for i in first])
    assert schedule.skipped(1) == 6 and schedule.skipped(6) == 0
    taken = {}
    for step in range(1, 15):
        taken[step] = schedule.prompts_for(step)
        if step == 3:  # a checkpoint after step 3 was requested (on-policy) and before it trained
            saved = schedule.state_dict()
        schedule.record(step, [(i, [0.0, 1.0]) for i in taken[step]])
        assert len(taken[step]) == 16
    assert not uniform & {i for step in range(1, 6) for i in taken[step]}
    assert uniform <= {i for step in range(6, 15) for i in taken[step]}  # tried again (next time the stream has them)
    assert uniform & set(prompts.step_prompts(4, 16, 0))  # the plain order would have taken them at step 4
    resumed = PromptSchedule(prompts, 16, seed=0, skip_for=5)
    resumed.load_state_dict(json.loads(json.dumps(saved)))  # through the manifest's JSON
    for step in range(3, 15):
        assert resumed.prompts_for(step) == taken[step]
        resumed.record(step, [(i, [0.0, 1.0]) for i in taken[step]])
    stuck = PromptSchedule(prompts, 16, seed=0, skip_for=100)
    for step in range(6):  # every prompt uniform: after a whole epoch, the stream's next ones anyway
        ids = stuck.prompts_for(step)
        assert len(ids) == 16
        stuck.record(step, [(i, [0.0, 0.0]) for i in ids])


def test_a_run_that_skips_uniform_groups_resumes_exactly(tiny_task, tmp_path):
    root, tokenizer_json = tiny_task
    torch.set_num_threads(1)
    skip = {"rl.skip_uniform_for": 2, "rl.rewards": {"exact_number": 1.0}}  # a random model: mostly all wrong
    cfg = task_cfg(root, tmp_path / "one", **skip)
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    prompts = load_prompts(cfg, tokenizer_json)
    full = run_local(cfg, state, prompts, tokenizer_json)
    assert any(full[step]["prompts_skipped"] > 0 for step in range(1, 5))
    killed = task_cfg(root, tmp_path / "two", **skip, **{"train.fail_at_step": 3})
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_local(killed, state, prompts, tokenizer_json)
    resumed = run_local(killed, state, prompts, tokenizer_json)
    for step in (3, 4):
        for key in ("reward_mean", "loss", "prompts_skipped", "zero_variance_groups"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_dynamic_sampling_trains_on_the_informative_groups_of_more_prompts(tiny_task, tmp_path):
    root, tokenizer_json = tiny_task
    torch.set_num_threads(1)
    dynamic = {"rl.oversample": 2.0, "rl.rewards": {"exact_number": 1.0}, "train.steps": 2}
    cfg = task_cfg(root, tmp_path, **dynamic)
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    prompts = load_prompts(cfg, tokenizer_json)
    seen = run_local(cfg, state, prompts, tokenizer_json)
    for step in (1, 2):  # 8 prompts' groups sampled, the 4 trained on chosen for their signal
        drawn, trained = seen[step]["zero_variance_groups"], seen[step]["trained_zero_variance_groups"]
        assert trained == max(0.0, 1 - 2 * (1 - drawn)), (drawn, trained)


def test_off_policy_lags_one_step_and_reuses_batches(tiny_task, tmp_path):
    root, tokenizer_json = tiny_task
    cfg = task_cfg(
        root,
        tmp_path,
        **{"rl.mode": "off_policy", "rl.updates_per_batch": 2, "rl.beta": 0.05, "rl.eval_prompts": 0, "train.steps": 3},
    )
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    seen = run_local(cfg, state, load_prompts(cfg, tokenizer_json), tokenizer_json)
    assert seen[1]["policy_lag"] == 0  # step 0's rollouts: the starting weights, nothing older exists
    assert seen[2]["policy_lag"] == 1 and seen[3]["policy_lag"] == 1
    assert seen[3]["kl"] > 0 and seen[3]["approx_kl"] != 0  # two updates per batch: the ratio moved
    stale = task_cfg(root, tmp_path / "stale", **{"rl.mode": "off_policy", "rl.max_staleness": 2, "rl.eval_prompts": 0})
    seen = run_local(stale, state, load_prompts(stale, tokenizer_json), tokenizer_json)
    assert [seen[s]["policy_lag"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]  # steps 1, 2 and 3 asked for at step 0


def test_an_elastic_learner_must_split_its_prompts_at_every_size():
    from generalmodel.config import load_config
    from generalmodel.post.rl.learner import check_rl_config

    check_rl_config(load_config(overrides={"rl.prompts_per_step": 12, "ray.num_workers": 4, "ray.min_workers": 2}))
    elastic = {"rl.prompts_per_step": 8, "ray.num_workers": 4, "ray.min_workers": 2}
    with pytest.raises(UserError, match=r"prompts_per_step=8 must divide .*min_workers=2\); it does not among 3"):
        check_rl_config(load_config(overrides=elastic))


def _weight_rank(rank, port, size, state, out):
    from generalmodel.post.rl.weight_sync import Layout, WeightGroup, host_store

    layout = Layout.of(state)
    store = host_store(port) if rank == 0 else None
    group = WeightGroup(store, "127.0.0.1", port, rank, size, generation=1)
    buffers = layout.flatten(state) if rank == 0 else layout.empty()
    group.broadcast(buffers)
    out[rank] = layout.unflatten(buffers)
    if rank == 0:
        again = WeightGroup(store, "127.0.0.1", port, 0, size, generation=2)  # a new generation, same store
    else:
        again = WeightGroup(None, "127.0.0.1", port, rank, size, generation=2)
    again.broadcast(buffers)


def test_the_weight_group_broadcasts_a_state_bit_for_bit():
    state = {
        "b.weight": torch.randn(3, 5),
        "a.weight": torch.randn(7),
        "c.half": torch.randn(4, 2).to(torch.bfloat16),
        "d.steps": torch.arange(3),
    }
    from generalmodel.post.rl.weight_sync import Layout

    layout = Layout.of(state)
    assert layout.nbytes == sum(t.nbytes for t in state.values())
    assert all(torch.equal(layout.unflatten(layout.flatten(state))[k], v) for k, v in state.items())
    out = mp.Manager().dict()
    spawn_ranks(_weight_rank, (free_port(), 3, state, out), 3)
    for rank in (1, 2):
        got = out[rank]
        assert set(got) == set(state) and all(
            torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items()
        )


def test_verifiers_score_while_the_engine_decodes(tiny_task, tmp_path):
    import time

    from generalmodel.post.rl.rollout import RolloutWorker

    root, tokenizer_json = tiny_task
    cfg = task_cfg(root, tmp_path, **{"rl.rewards": {"test_rl:timed_score": 1.0}, "rl.rollout_slots": 4})
    torch.manual_seed(0)
    worker = RolloutWorker(cfg, tokenizer_json, load_prompts(cfg, tokenizer_json))
    worker.load(0, build_model(cfg.model).state_dict())
    SCORED.clear()
    started = time.perf_counter()
    batch = worker.rollouts(0, [(j, j % 8) for j in range(16)])  # 16 sequences through 4 slots
    assert len(batch.rollouts) == len(SCORED) == 16 and [r.prompt for r in batch.rollouts] == [j % 8 for j in range(16)]
    assert all(name.startswith("verifiers") for name, _ in SCORED)  # off the decoding thread
    assert min(t for _, t in SCORED) < started + batch.generate_s  # the first scored before decoding ended


def test_rl_on_svf_vectors_samples_the_adapted_policy_and_exports_only_them(tiny_task, tmp_path):
    """Transformer²'s way of training the vectors: the rollouts load the policy with the vectors
    folded in (their models are plain), so the learner scores what they sampled (approx_kl ~ 0)."""
    from safetensors.torch import load_file

    from generalmodel.storage import RunLayout

    root, tokenizer_json = tiny_task
    torch.set_num_threads(1)
    cfg = task_cfg(root, tmp_path, **{"train.adapter": "svf", "optim.lr": 0.05})
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    seen = run_local(cfg, state, load_prompts(cfg, tokenizer_json), tokenizer_json)
    # approx_kl sums old − new log-probs over the step's tokens: ~1e-8 here; the base's weights in the
    # rollouts instead (the vectors not folded in) give -4e-6, -3e-5, -6e-5 at steps 2-4.
    assert all(abs(seen[step]["approx_kl"]) < 1e-6 for step in range(2, 5)), [seen[s]["approx_kl"] for s in seen]
    export = RunLayout.of(cfg).export
    assert sorted(os.listdir(export)) == ["adapter.json", "adapter.safetensors", "model_config.json", "tokenizer.json"]
    assert any(not torch.all(z == 1) for z in load_file(os.path.join(export, "adapter.safetensors")).values())
