"""The recipe switches of the model (models/decoder.py, models/attention.py): QK-norm, ReLU² MLP,
value residual learning, logit soft-capping, zero-initialised output projections, the speedrun's
embedding and U-net skips — each checked
against what it claims, against the same weights with the switch off, and refused by the HF export.
(KV-cache decoding and causality with the switches on: test_decode.py, test_causality.py.)"""

from dataclasses import replace

import pytest
import torch

from generalmodel.interop.hf import ExportError, hf_architecture
from models import PRESETS, build_model

VOCAB = 256


def pair(**switch):
    """(model with the switch, the same weights without it)."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["llama-tiny"], vocab_size=VOCAB, n_layers=3, d_model=64, **switch)
    on = build_model(cfg).eval()
    off_cfg = replace(cfg, **{k: PRESETS["llama-tiny"].__dict__[k] for k in switch})
    off = build_model(off_cfg).eval()
    off.load_state_dict(on.state_dict(), strict=False)
    return on, off


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def test_logit_softcap():
    on, off = pair(logit_softcap=0.5)
    with torch.no_grad():
        capped, raw = on(IDS), off(IDS)
    assert capped.abs().max() < 0.5 < raw.abs().max()
    torch.testing.assert_close(capped, 0.5 * torch.tanh(raw / 0.5))


def test_relu2_mlp():
    torch.manual_seed(0)
    model = build_model(replace(PRESETS["llama-tiny"], vocab_size=VOCAB, d_model=64, mlp="relu2"))
    mlp = model.blocks[0].mlp
    assert mlp.up.weight.shape == (4 * 64, 64)  # not gated: 4·d hidden
    x = torch.randn(3, 64)
    torch.testing.assert_close(mlp(x), mlp.down(torch.relu(mlp.up(x)) ** 2))


def test_qk_norm_normalises_each_head():
    on, off = pair(qk_norm=True)
    attn = on.blocks[1].attn
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.update(q=o))
    attn.k_norm.register_forward_hook(lambda m, i, o: seen.update(k=o))
    with torch.no_grad():
        on(IDS)
    for t in seen.values():  # (B, heads, T, head_dim), unit RMS over head_dim (norm weights are one)
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), atol=1e-2, rtol=0)  # eps
    with torch.no_grad():  # with the norms the logits change: the switch does something
        assert not torch.allclose(on(IDS), off(IDS))


def test_value_residual():
    on, off = pair(value_residual=True)
    mixes = [b.attn.v_mix for b in on.blocks]
    assert mixes[0] is None and all(m.item() == 0.5 for m in mixes[1:])
    with torch.no_grad():
        assert not torch.allclose(on(IDS), off(IDS))
        for m in mixes[1:]:
            m.fill_(0.0)  # λ = 0: each layer keeps its own values, i.e. the model without the switch
        torch.testing.assert_close(on(IDS), off(IDS))
        for m in mixes[1:]:
            m.fill_(1.0)  # λ = 1: layers 1, 2 use layer 0's values; their own value weights are unused
        before = on(IDS)
        for block in on.blocks[1:]:
            block.attn.v_proj.weight.normal_()
        torch.testing.assert_close(on(IDS), before)
    loss = torch.nn.functional.cross_entropy(on(IDS).flatten(0, 1), IDS.flatten())
    loss.backward()
    assert all(m.grad is not None and m.grad != 0 for m in mixes[1:])


def test_zero_init():
    torch.manual_seed(0)
    model = build_model(
        replace(PRESETS["llama-tiny"], vocab_size=VOCAB, d_model=64, zero_init=True, tie_embeddings=False)
    )
    zero = [model.head.weight] + [w for b in model.blocks for w in (b.attn.out_proj.weight, b.mlp.down.weight)]
    assert all(torch.count_nonzero(w) == 0 for w in zero)
    assert torch.count_nonzero(model.blocks[0].attn.q_proj.weight) > 0
    torch.nn.functional.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten()).backward()
    assert model.head.weight.grad.abs().sum() > 0  # the zero head is where learning starts


def test_embedding_and_unet_skips():
    """embed_skip: block i's input is a_i·x + b_i·x0 (a = 1, b = 0 at init); unet_skips: the last
    block adds w × the first block's output (3 blocks: one pair; w = 1 at init). With w = 0 and
    b = 0 the model is the one without the switches."""
    on, off = pair(embed_skip=True, unet_skips=True)
    assert on.x0_mix.tolist() == [1.0, 0.0] * 3 and on.skip_weights.tolist() == [1.0]
    seen = {}
    for i, block in enumerate(on.blocks):
        block.hook_resid_pre.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("in", i), o))
        block.hook_resid_post.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("out", i), o))
    with torch.no_grad():
        assert not torch.allclose(on(IDS), off(IDS))  # the U-net skip is on at init
        torch.testing.assert_close(seen[("in", 2)], seen[("out", 1)] + seen[("out", 0)])
        on.skip_weights.zero_()
        torch.testing.assert_close(on(IDS), off(IDS))
        on.x0_mix[2:4] = torch.tensor([0.75, 0.5])  # block 1: 0.75·x + 0.5·embedding
        on(IDS)
        torch.testing.assert_close(seen[("in", 1)], 0.75 * seen[("out", 0)] + 0.5 * on.embed(IDS))
    torch.nn.functional.cross_entropy(on(IDS).flatten(0, 1), IDS.flatten()).backward()
    assert on.x0_mix.grad.abs().sum() > 0 and on.skip_weights.grad is not None


def test_value_embeddings():
    """value_embeds=1 on 3 layers: layers 0 and 2 share one table and mix it into their values,
    v ← a·v + b·ve; with b = 0 and a = 1 the model is the one without it; the table is an
    embedding (AdamW's embed group, not counted as a matmul)."""
    from generalmodel.config import OptimConfig
    from generalmodel.optim import param_groups

    on, off = pair(value_embeds=1)
    assert [b.attn.ve_mix is not None for b in on.blocks] == [True, False, True]
    assert on.value_embeds[0].weight.shape == (VOCAB, on.cfg.kv_heads * on.cfg.head_dim)
    with torch.no_grad():
        assert not torch.allclose(on(IDS), off(IDS))
        for block in (on.blocks[0], on.blocks[2]):
            block.attn.ve_mix.copy_(torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(on(IDS), off(IDS))
    assert on.num_params(embeddings=False) == off.num_params(embeddings=False) + 4  # the two (a, b) pairs
    embed = next(g for g in param_groups(on, OptimConfig(name="muon")) if g["name"] == "embed")
    assert any(p is on.value_embeds[0].weight for p in embed["params"])
    with pytest.raises(ValueError, match="at most n_layers"):
        replace(PRESETS["llama-tiny"], n_layers=3, value_embeds=2)
    with pytest.raises(ValueError, match="attention='gqa'"):
        replace(PRESETS["mla-tiny"], value_embeds=1)


@pytest.mark.parametrize(
    "switch, named",
    [
        (dict(value_embeds=1), "value_embeds"),
        (dict(embed_skip=True), "embed_skip"),
        (dict(unet_skips=True), "unet_skips"),
        (dict(value_residual=True), "value_residual"),
        (dict(logit_softcap=30.0), "logit_softcap"),
        (dict(qk_norm=True, mlp="relu2"), "mlp='relu2'"),
    ],
)
def test_the_switches_no_native_class_has_are_named_or_go_to_remote_code(switch, named):
    with pytest.raises(ExportError, match=named):
        hf_architecture(replace(PRESETS["llama-tiny"], **switch), remote_code=False)
    assert hf_architecture(replace(PRESETS["llama-tiny"], **switch)) == "generalmodel"


def test_hf_export_picks_the_class_that_has_the_switches():
    llama = PRESETS["llama-tiny"]
    assert hf_architecture(replace(llama, zero_init=True)) == "llama"  # an init, not a shape
    assert hf_architecture(replace(llama, qk_norm=True)) == "qwen3"
    assert hf_architecture(replace(llama, qk_norm=True, window=64, global_every=2)) == "qwen3"
    assert hf_architecture(replace(llama, mlp="relu2")) == "arcee"


def test_bad_switch_combinations_are_named():
    with pytest.raises(ValueError, match="kv_share_group"):
        replace(PRESETS["kvshare-tiny"], value_residual=True)
    with pytest.raises(ValueError, match="attention='gqa'"):
        replace(PRESETS["mla-tiny"], qk_norm=True)
    with pytest.raises(ValueError, match="logit_softcap"):
        replace(PRESETS["llama-tiny"], logit_softcap=0.0)
