"""Entropy-aware sampling (generalmodel.infer.engine, `strategy: entropy`): entropy and varentropy
are those of the softmax; each step's decision follows the thresholds on the distribution the model
predicted there (checked against a teacher-forced forward); at the thresholds' extremes it is
greedy, plain sampling or sampling at the explore temperature, token for token; rows decide on
their own in a batch; the evaluation's greedy answer stays greedy; the served API takes it."""

import math

import pytest
import torch
from pydantic import ValidationError

from generalmodel.infer.engine import SamplingParams, generate_batch
from generalmodel.interp.analysis import entropy_along, entropy_stats
from generalmodel.serve.protocol import ChatRequest
from models import PRESETS, build_model

VOCAB = 64


def model():
    torch.manual_seed(0)
    return build_model(
        PRESETS["llama-tiny"].__class__(vocab_size=VOCAB, max_seq_len=64, n_layers=2, n_heads=2, d_model=32)
    ).eval()


PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [5]]


def run(m, **params):
    sampling = SamplingParams(max_new_tokens=20, seed=3, **params)
    return generate_batch(m, PROMPTS, sampling)


def test_entropy_and_varentropy_of_a_softmax():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.5, -1.0]])
    stats = entropy_stats(logits)
    torch.testing.assert_close(stats[0], torch.tensor([math.log(4), 0.0]))
    torch.testing.assert_close(stats[1], torch.tensor([0.0, 0.0]), atol=1e-12, rtol=0)
    p = logits[2].softmax(-1).double()
    surprise = -p.log()
    h = float((p * surprise).sum())
    assert stats[2, 0].item() == pytest.approx(h, rel=1e-5)
    assert stats[2, 1].item() == pytest.approx(float((p * (surprise - h) ** 2).sum()), rel=1e-5)


def thresholds(m) -> dict[str, float]:
    """Thresholds that cut this model's range: its entropy's thirds, and the median varentropy of
    the positions in the top third, along greedy continuations of the prompts."""
    stats = torch.cat([entropy_along(m, torch.tensor(r.prompt_ids + r.tokens)) for r in run(m, temperature=0)])
    low, high = stats[:, 0].quantile(torch.tensor([0.33, 0.66])).tolist()
    unsure = stats[stats[:, 0] > high, 1]  # a near-uniform model's high entropy has low varentropy
    return dict(entropy_low=low, entropy_high=high, varentropy_high=unsure.median().item())


def test_each_decision_follows_the_thresholds_on_the_distribution_of_that_step():
    m = model()
    cut = thresholds(m)
    requests = run(m, strategy="entropy", temperature=0.9, **cut)
    for request in requests:
        assert len(request.decisions) == len(request.tokens) + (request.finish_reason == "stop")
        ids = request.prompt_ids + request.tokens
        stats = entropy_along(m, torch.tensor(ids))[len(request.prompt_ids) - 1 :]
        for decision, (h, v) in zip(request.decisions, stats.tolist(), strict=False):
            if min(abs(h - cut["entropy_low"]), abs(h - cut["entropy_high"]), abs(v - cut["varentropy_high"])) < 1e-4:
                continue  # too close to a threshold to tell cached decoding from the full forward
            explore = h > cut["entropy_high"] and v > cut["varentropy_high"]
            assert decision == ("argmax" if h < cut["entropy_low"] else "explore" if explore else "sample")
    assert {d for r in requests for d in r.decisions} == {"argmax", "sample", "explore"}


def test_at_the_extremes_it_is_greedy_plain_sampling_or_sampling_hotter():
    m = model()
    tokens = lambda requests: [r.tokens for r in requests]  # noqa: E731
    always = dict(strategy="entropy", entropy_low=100.0)
    assert tokens(run(m, **always)) == tokens(run(m, temperature=0))
    cold = dict(strategy="entropy", temperature=0, entropy_low=0.0, entropy_high=0.0, varentropy_high=0.0)
    assert tokens(run(m, **cold)) == tokens(run(m, temperature=0))  # temperature 0 is greedy whatever H says
    never = dict(strategy="entropy", entropy_low=0.0, entropy_high=100.0)
    assert tokens(run(m, **never)) == tokens(run(m))
    hot = dict(strategy="entropy", entropy_low=0.0, entropy_high=0.0, varentropy_high=0.0, explore_temperature=1.7)
    requests = run(m, **hot)
    assert tokens(requests) == tokens(run(m, temperature=1.7)) and {d for r in requests for d in r.decisions} == {
        "explore"
    }


def test_rows_decide_on_their_own_in_a_batch():
    m = model()
    mixed = [
        SamplingParams(max_new_tokens=12, seed=1, strategy="entropy", **thresholds(m)),
        SamplingParams(max_new_tokens=12, seed=2),
        SamplingParams(max_new_tokens=12, temperature=0),
    ]
    together = generate_batch(m, PROMPTS, mixed)
    for prompt, params, request in zip(PROMPTS, mixed, together, strict=True):
        (alone,) = generate_batch(m, [prompt], params)
        assert alone.tokens == request.tokens and alone.decisions == request.decisions


def test_the_served_api_takes_the_strategy():
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], strategy="entropy")
    assert body.strategy == "entropy"
    assert ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]).strategy == "sample"
    with pytest.raises(ValidationError, match="strategy"):
        ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], strategy="beam")


def test_the_interp_report_plots_a_continuation_that_stopped(tmp_path):
    """A continuation that ended at a stop token has one more decision than tokens (the stop's)."""
    import csv

    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.interp.prompts import Prompt
    from generalmodel.interp.report import Report, entropy_section

    m = model()
    tokenizer = train_bpe(["one two three four five six seven"] * 4, VOCAB)
    prompt = Prompt("p", [1, 2, 3], None, None, None)
    (request,) = generate_batch(m, [prompt.ids], SamplingParams(max_new_tokens=5, strategy="entropy"))
    stopped = (request.tokens, [*request.decisions, "argmax"])  # as if a stop token came next
    report = Report(str(tmp_path), tokenizer, prompt)
    entropy_section(report, m, prompt, lambda ids: stopped, "p")
    rows = list(csv.DictReader(open(tmp_path / "answer_entropy.csv")))
    assert [r["decision"] for r in rows] == request.decisions and (tmp_path / "answer_entropy.png").exists()
    expected = entropy_along(m, torch.tensor(prompt.ids + request.tokens))[2:-1, 0]
    assert [float(r["entropy"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-4)
