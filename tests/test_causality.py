"""No information flows backwards or across rows: for every tiny preset (and windows that wrap,
and the MoE layers' bf16 grouped path), changing the tokens after position t of one row and every
token of the other row leaves that row's logits — and per-token losses, with the loss compiled
into the model's graph — at positions ≤ t exactly as they were: eager, each block compiled,
the model and the loss in one compiled graph (generalmodel/train/leak.py; that graph's logits are
compared too, so the logits-only `full` mode would repeat it and is left to the GPU benchmark);
each case compiled in one of the two modes, the bf16 MoE paths and the recipe switches in both. The MoE layer is
dropless, so routing, sorting and the balancing counts see the batch without letting one token
decide another's output; in bf16 it compiles to one graph, backward included."""

import dataclasses

import pytest
import torch

from generalmodel.train.leak import MODES, check
from models import PRESETS, build_model

VOCAB = 128
# (the long-memory presets with a window of 8: their memory layers read the positions it leaves)
TINY = {
    name: dict(window=8) if PRESETS[name].long_memory != "none" else {} for name in PRESETS if name.endswith("-tiny")
}
CASES = {
    **TINY,
    "hybrid-wrapping": dict(base="hybrid-tiny", window=8),  # the window bites inside the 32 positions
    "moe-tiny-bf16": dict(base="moe-tiny", autocast=torch.bfloat16),  # the grouped-GEMM path
    "deepseek-tiny-bf16": dict(base="deepseek-tiny", autocast=torch.bfloat16),
    "llama-recipe-switches": dict(base="llama-tiny", qk_norm=True, value_residual=True, mlp="relu2", logit_softcap=5.0),
    "llama-speedrun-pieces": dict(base="llama-tiny", embed_skip=True, unet_skips=True, value_embeds=1),
}


def build(case: str):
    spec = dict(CASES[case])
    base, autocast = spec.pop("base", case), spec.pop("autocast", None)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS[base], vocab_size=VOCAB, d_model=64, n_layers=2, max_seq_len=40, **spec)
    return build_model(cfg), autocast


# "full" (the logits of a compiled model) is covered by "full+loss", whose graph outputs the logits too.
# Every case runs eager and compiled in one of the two modes (alternating down the list, so each
# mode sees half the zoo); the bf16 MoE paths and the recipe's switches, whose graphs differ most
# between the modes, run in both.
COMPILED = ("regional", "full+loss")
BOTH = {"moe-tiny-bf16", "deepseek-tiny-bf16", "llama-recipe-switches"}
PAIRS = [(case, "eager") for case in CASES] + [
    (case, mode) for i, case in enumerate(CASES) for mode in COMPILED if case in BOTH or mode == COMPILED[i % 2]
]
assert {m for _, m in PAIRS} == {m for m in MODES if m != "full"}


@pytest.mark.parametrize("case, mode", PAIRS)
def test_no_position_sees_a_later_token_or_another_row(case, mode):
    torch._dynamo.reset()
    model, autocast = build(case)
    leak = check(model, mode, VOCAB, batch=2, seq=32, cut=13, autocast=autocast)
    assert leak.later > 0.01, "the check changed nothing it could see"
    assert leak.earlier == 0.0, f"{case} {mode}: positions <= 13 changed by {leak.earlier}"


def test_the_check_finds_a_leak():
    """A model that peeks one token ahead is caught (the check can fail)."""
    model, _ = build("llama-tiny")
    forward = model.forward

    def peeking(idx, *args, **kwargs):
        return forward(torch.roll(idx, -1, dims=1), *args, **kwargs)

    model.forward = peeking
    leak = check(model, "eager", VOCAB, batch=2, seq=32, cut=13)
    assert leak.earlier > 0.01


def test_the_moe_layer_compiles_to_one_graph_in_bf16():
    """Routing, the scatter-add counts, sorting, the grouped GEMM and the scatter back trace into
    one graph (fullgraph=True fails on any graph break or host sync), forward and backward, and
    give the reference loop's outputs."""
    from models.moe import MoE

    torch.manual_seed(0)
    moe = MoE(64, 64, 8, 2, 1)
    x = torch.randn(2, 24, 64, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        reference = moe.forward_reference(x)
    torch.testing.assert_close(out.float(), reference.float(), atol=2e-2, rtol=2e-2)
    out.float().pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and moe.experts.w_up.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_training_on_fresh_random_tokens_never_beats_ln_vocab():
    """The probe that tells memorisation from a leak (benchmarks/gpu_train.py --leak runs it on a
    card, with the loss in and out of the compiled graph): on one fixed batch a model memorises
    (the loss falls well below ln(vocab)); on a fresh batch every step nothing can be learned, so
    a loss below ln(vocab) means the model sees the tokens it predicts. deepseek-tiny (MLA + MoE),
    eager: the compiled graphs are held to exactly zero leak by the test above."""
    import math

    import torch.nn.functional as F

    def train(fresh: bool) -> float:
        model, _ = build("deepseek-tiny")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(0, VOCAB, (8, 33), generator=g)

        def loss_of(ids):
            return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

        for _ in range(20):
            if fresh:
                batch = torch.randint(0, VOCAB, (8, 33), generator=g)
            loss = loss_of(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return loss.item()

    floor = math.log(VOCAB)
    assert train(fresh=False) < floor - 1.0  # memorised
    assert train(fresh=True) > floor - 0.3  # nothing to learn, nothing leaked
