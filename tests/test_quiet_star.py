"""Quiet-STaR (generalmodel.post.quiet_star): the layout lets a thought at position t see only the
tokens ≤ t and its own thought, and computes what the plain causal forward of that one position's
sequence computes; the loss mixes the predictions with and without the thought and its REINFORCE
term reaches the thoughts; the loop resumes exactly and two FSDP2 ranks equal one."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_POST_RUN, rows_rank, run_rows_loop, seeded_model, spawn_ranks

from generalmodel.cluster import free_port
from generalmodel.config import load_config
from generalmodel.data.chat import add_chat_tokens, add_special_tokens
from generalmodel.data.tokenizer import train_bpe
from generalmodel.eval.reasoning import write_suite
from generalmodel.post.quiet_star import QuietStar, load_rows, quiet_star_train, thought_layout
from generalmodel.tokens import THOUGHT_TOKENS
from models.attention import Explicit

NO_AUTOCAST = torch.autocast("cpu", enabled=False)
START, END = 300, 301


@pytest.fixture(scope="module")
def chat_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet-star")
    write_suite(root, ["addition"], sft=8, train=0, test=2, seed=0)
    rows = [json.loads(line) for line in (root / "sft_cot.jsonl").read_text().splitlines()]
    tokenizer_json, _ = add_chat_tokens(train_bpe([m["content"] for r in rows for m in r["messages"]], 290).to_str())
    tokenizer_json, _ = add_special_tokens(tokenizer_json, THOUGHT_TOKENS.values())
    return root, tokenizer_json


def task_cfg(root, tmp, **overrides):
    return load_config(
        overrides={
            "data.source": str(root / "sft_cot.jsonl"),
            "storage.root": str(tmp),
            **TINY_POST_RUN,
            "model.vocab_size": 304,
            "model.quiet_star_thoughts": 3,
            "train.batch_size": 2,
            "quiet_star.thought_tokens": 3,
            "quiet_star.lookahead": 2,
            **overrides,
        }
    )


def test_a_thought_sees_the_tokens_up_to_its_position_and_its_own_thought():
    T, L, n = 5, 3, 2
    pos, allowed = thought_layout(T, L, n)
    blocks = L + n + 2
    assert pos.shape == (T * blocks,) and allowed.shape == (T * blocks, T * blocks)
    for q in range(T * blocks):
        qb, qt = divmod(q, T)
        for k in range(T * blocks):
            kb, kt = divmod(k, T)
            expect = kt <= qt if kb == 0 else (kt == qt and kb <= qb)
            assert bool(allowed[q, k]) == expect, (qb, qt, kb, kt)
    assert pos.view(blocks, T).tolist() == [[t + b for t in range(T)] for b in range(blocks)]


def test_the_layout_computes_each_positions_own_sequence(chat_task, tmp_path):
    cfg = task_cfg(chat_task[0], tmp_path)
    model = seeded_model(cfg)
    T, L, n = 6, 3, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randint(10, 290, (1, T), generator=g)
    thoughts = [torch.randint(10, 290, (1, T), generator=g) for _ in range(L)]
    ahead = [torch.nn.functional.pad(x[:, i:], (0, i), value=END) for i in range(1, n)]
    ids = torch.cat([x, torch.full_like(x, START), *thoughts, torch.full_like(x, END), *ahead], 1)
    pos, allowed = thought_layout(T, L, n)
    layout = Explicit(ids, pos[None], allowed=allowed[None])
    hidden = model(ids, layout=layout, hidden=True).view(1, L + n + 2, T, -1)
    for t in range(T - n + 1):
        own = [*x[0, : t + 1].tolist(), START, *[th[0, t].item() for th in thoughts], END]
        own += [x[0, t + i].item() for i in range(1, n)]
        plain = model(torch.tensor([own]), hidden=True)[0]  # one causal row: positions 0 … t+L+n+1
        assert torch.allclose(hidden[0, 0, : t + 1], plain[: t + 1], atol=1e-5)
        assert torch.allclose(hidden[0, 1:, t], plain[t + 1 :], atol=1e-5), t


def test_the_loss_mixes_and_reinforces_the_thoughts(chat_task, tmp_path):
    cfg = task_cfg(chat_task[0], tmp_path)
    tokens = torch.randint(10, 290, (2, 12))
    supervised = torch.zeros(2, 12, dtype=torch.bool)
    supervised[:, 6:] = True

    def run(policy_weight: float):
        c = cfg.model_copy(update={"quiet_star": cfg.quiet_star.model_copy(update={"policy_weight": policy_weight})})
        model = seeded_model(c)
        objective = QuietStar(model, c, START, END, NO_AUTOCAST)
        loss, stats = objective.loss(tokens, supervised, [torch.Generator().manual_seed(s) for s in range(4)])
        loss.backward()
        return model, loss, stats

    model, loss, stats = run(0.0)
    count = QuietStar.count(supervised, cfg)
    assert count == 2 * (6 + 6) * 2  # rows × pairs (t, i) with x_{t+i} supervised × two thoughts per position
    # at init the mixing head trusts the thought-free prediction: the mixed loss is near the base one
    assert math.isfinite(loss.item()) and abs(loss.item() - stats["base_nll"].item()) < 0.2 * count
    assert 0.04 < stats["mix_weight"].item() / count < 0.06
    assert model.mixer.bias.grad is not None and model.mixer.out.weight.grad.abs().sum() > 0
    plain_grad = model.embed.weight.grad.clone()
    reinforced, _, _ = run(1.0)
    assert not torch.allclose(reinforced.embed.weight.grad, plain_grad)  # the thoughts' tokens get the policy term


def one_rank_run(root, tokenizer_json, tmp):
    torch.set_num_threads(1)
    cfg = task_cfg(root, tmp)
    state = seeded_model(cfg).state_dict()
    data = load_rows(cfg, tokenizer_json)
    return cfg, state, data, run_rows_loop(quiet_star_train, cfg, state, data, tokenizer_json)


def test_the_loop_learns_and_resumes_exactly(chat_task, tmp_path):
    root, tokenizer_json = chat_task
    cfg, state, data, full = one_rank_run(root, tokenizer_json, tmp_path / "one")
    assert sorted(full) == [1, 2, 3, 4]
    assert all(math.isfinite(full[s]["loss"]) and full[s]["base_nll"] > 0 for s in full)
    killed = task_cfg(root, tmp_path / "two", **{"train.fail_at_step": 3})
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_rows_loop(quiet_star_train, killed, state, data, tokenizer_json)
    resumed = run_rows_loop(quiet_star_train, killed, state, data, tokenizer_json)
    assert min(resumed) == 3
    for step in (3, 4):
        for key in ("loss", "grad_norm", "base_nll", "mix_weight"):
            assert resumed[step][key] == full[step][key], (step, key)  # the same thoughts: bit-identical


def test_two_fsdp2_ranks_equal_one(chat_task, tmp_path):
    """Each rank thinks about half of the step's rows, each row's thoughts from its own seeds: the
    same thoughts as on one rank; the loss is normalised over both ranks: the same updates."""
    root, tokenizer_json = chat_task
    _, state, data, single = one_rank_run(root, tokenizer_json, tmp_path / "one")
    cfg = task_cfg(root, tmp_path / "two", **{"ray.num_workers": 2, "train.batch_size": 1})
    out = mp.Manager().dict()
    spawn_ranks(rows_rank, (free_port(), quiet_star_train, cfg, state, data, tokenizer_json, out), 2)
    ranks = dict(out)
    for step in (1, 2, 3, 4):
        # Step 1 from the same weights: the same thoughts and normalisation, to float precision. Later
        # steps start from weights that differ in the last bits (the two ranks' sums in another
        # order), which AdamW's first steps (≈ lr · sign(g)) and the thoughts' sampling amplify.
        tolerance = 1e-5 if step == 1 else 2e-3
        for key in ("loss", "grad_norm", "base_nll", "mix_weight"):
            assert math.isclose(ranks[step][key], single[step][key], rel_tol=tolerance), (step, key)
    assert list((tmp_path / "two").rglob("__1_0.distcp"))


def test_the_engine_thinks_before_every_token_as_training_computes(chat_task, tmp_path):
    """Greedy decoding with a thought before every token (sampled on the KV cache, then rolled
    back): each token is the argmax of the mixed prediction that a plain forward of the context,
    that thought and <|endofthought|> computes, and its log-prob is that mixture's."""
    from generalmodel.data.tokenizer import load_tokenizer
    from generalmodel.infer.engine import Engine, QuietThoughts, SamplingParams, generate_batch, thoughts_of

    root, tokenizer_json = chat_task
    cfg = task_cfg(root, tmp_path)
    model = seeded_model(cfg).eval()
    with torch.no_grad():
        model.mixer.out.weight.normal_(0, 0.5)  # a head that mixes: both predictions count
        model.mixer.bias.zero_()
    thoughts = thoughts_of(model, load_tokenizer(tokenizer_json, "test"))
    tok = load_tokenizer(tokenizer_json, "test")
    ids = [tok.token_to_id(t) for t in THOUGHT_TOKENS.values()]
    assert thoughts == QuietThoughts(3, *ids)
    with pytest.raises(ValueError, match="decodes with thoughts"):
        Engine(model, 1)
    prompts = [[5, 9, 17, 40], [6, 3]]
    params = SamplingParams(temperature=0, max_new_tokens=5)
    for prompt, request in zip(prompts, generate_batch(model, prompts, params, thoughts=thoughts), strict=True):
        assert len(request.tokens) == len(request.thoughts) == 5
        for k, (token, thought) in enumerate(zip(request.tokens, request.thoughts, strict=True)):
            context = prompt + request.tokens[:k]
            with torch.no_grad():
                h = model(torch.tensor([context + [thoughts.start, *thought, thoughts.end]]), hidden=True)[0]
                base, after = h[len(context) - 1], h[-1]
                z = model.mixer(after, base)
                mixed = torch.logaddexp(
                    torch.nn.functional.logsigmoid(z) + torch.log_softmax(model.logits_of(after), -1),
                    torch.nn.functional.logsigmoid(-z) + torch.log_softmax(model.logits_of(base), -1),
                )
            assert mixed.argmax().item() == token, k
            assert math.isclose(request.logprobs[k], mixed.max().item(), abs_tol=1e-4), k
