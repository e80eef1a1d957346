"""Interpretability numerics (generalmodel/interp), on CPU in fp32, for every attention variant of
the decode tests (MHA/GQA/MQA, windows that wrap, all-local, MLA with windows, cross-layer KV
sharing, learned positions, MoE): caching leaves the logits bit-identical; the eager attention
path equals SDPA (whole sequences and KV-cache decoding); attention rows sum to 1 and see only
what the causal/window mask lets them; patching every activation from the clean run reproduces the
clean logits exactly; the logit lens's last stage is the model's logits; direct logit attribution
sums to the logit difference; batched patching equals patching one activation at a time; our
residual stream equals transformers' hidden states on the Hugging Face export."""

from dataclasses import replace

import pytest
import torch
from test_decode import VARIANTS, model_for

from generalmodel.errors import UserError
from generalmodel.interp import (
    HEADS,
    block_point,
    direct_logit_attribution,
    eager_attention,
    hook_names,
    hooked,
    logit_diff,
    logit_lens,
    patch,
    run_with_cache,
    run_with_hooks,
)
from models import PRESETS, build_model
from models.cache import new_cache

T = 40  # longer than the windows (8) of the wrapping variants
ALL = {
    **VARIANTS,
    "gpt2-bias": dict(base="gpt2-tiny", bias=True),  # LayerNorm + biases (DLA's bias terms)
    "llama-softcap": dict(base="llama-tiny", logit_softcap=2.0),  # DLA adds up before the cap
}
# One residual stream through every block (a byte model's blocks hold a byte and a patch stream:
# hooks and patching work, the stream's tools refuse it — tests/test_blt.py)
STREAM = [v for v in ALL if not v.startswith("blt")]


def any_model(variant):
    if variant in VARIANTS:
        return model_for(variant)
    spec = dict(ALL[variant])
    return model_for(spec.pop("base"), **spec)


def ids(batch=2, length=T, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturbed(variant):
    """Weights off their init (norm gains and biases too), so that every term of DLA matters."""
    model = any_model(variant)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("variant", STREAM)
@torch.no_grad()
def test_caching_leaves_the_logits_bit_identical(variant):
    model = perturbed(variant)
    x = ids()
    logits, cache = run_with_cache(model, x)
    assert torch.equal(logits, model(x))
    L, d = model.cfg.n_layers, model.cfg.d_model
    for point in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        assert cache.layers(point).shape == (L, 2, T, d)
    assert not any(n.endswith("hook_pattern") for n in cache)  # patterns only when asked for
    # the residual stream adds up: resid_post = resid_pre + attn_out + mlp_out
    torch.testing.assert_close(
        cache.layers("resid_post"), cache.layers("resid_pre") + cache.layers("attn_out") + cache.layers("mlp_out")
    )


@pytest.mark.parametrize("variant", ALL)
@torch.no_grad()
def test_eager_attention_equals_sdpa_for_whole_sequences_and_cached_decoding(variant):
    model = perturbed(variant)
    x = ids()
    fused = model(x)
    with eager_attention(model):
        eager = model(x)
    assert (eager - fused).abs().max() <= 1e-5
    assert not any(getattr(m, "eager", False) for m in model.modules())  # switched back

    def decode(m):
        cache = new_cache(m, batch=2)
        cache.reserve(T)
        out = [m(x[:, :13], cache)]
        for t in range(13, T):
            out.append(m(x[:, t : t + 1], cache))
        return torch.cat(out, 1)

    fused_steps = decode(model)
    with eager_attention(model):
        eager_steps = decode(model)
    assert (eager_steps - fused_steps).abs().max() <= 1e-5
    assert (fused_steps - fused).abs().max() <= 1e-4  # the cache decodes what the full forward computes


@pytest.mark.parametrize("variant", STREAM)
@torch.no_grad()
def test_attention_rows_sum_to_one_and_see_only_what_the_mask_allows(variant):
    model = perturbed(variant)
    _, cache = run_with_cache(model, ids(), ["*hook_pattern"])
    assert len(cache) == model.cfg.n_layers
    query, key = torch.arange(T)[:, None], torch.arange(T)[None]
    for layer, block in enumerate(model.blocks):
        pattern = cache[block_point(layer, "attn.hook_pattern")]
        assert pattern.shape == (2, model.cfg.n_heads, T, T)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, model.cfg.n_heads, T), atol=1e-5, rtol=0)
        window = block.attn.window
        hidden = (key > query) | ((query - key >= window) if window else torch.zeros(T, T, dtype=torch.bool))
        assert pattern[..., hidden].abs().max() == 0
        assert (pattern[..., ~hidden] > 0).all()


@pytest.mark.parametrize("variant", ALL)
@torch.no_grad()
def test_patching_every_activation_from_the_clean_run_reproduces_the_clean_logits(variant):
    model = perturbed(variant)
    clean, corrupted = ids(1, seed=1), ids(1, seed=2)
    clean_logits, cache = run_with_cache(model, clean, ["*"])  # every hook point, patterns included
    assert len(cache) == len(hook_names(model))
    patched = run_with_hooks(model, corrupted, [(name, lambda x, name: cache[name]) for name in cache])
    assert torch.equal(patched, clean_logits)
    assert not torch.equal(model(corrupted), model(clean))


@pytest.mark.parametrize("variant", STREAM)
@torch.no_grad()
def test_the_logit_lens_ends_at_the_models_logits(variant):
    model = perturbed(variant)
    x = ids()
    lens = logit_lens(model, x)
    assert lens.labels == ["embed"] + [f"block {i}" for i in range(model.cfg.n_layers)]
    assert torch.equal(lens.logits[-1], model(x))
    probs, top = lens.top(3)
    assert probs.shape == top.shape == (model.cfg.n_layers + 1, 2, T, 3)
    torch.testing.assert_close(lens.prob(7)[-1], model(x).softmax(-1)[..., 7])


@pytest.mark.parametrize("variant", STREAM)
def test_direct_logit_attribution_sums_to_the_logit_difference(variant):
    model = perturbed(variant)
    x = ids()
    if model.cfg.embed_skip or model.cfg.unet_skips:  # the stream is not the components' plain sum
        with pytest.raises(UserError, match="not supported"):
            direct_logit_attribution(model, x, answer=3, wrong=11)
        return
    for position in (-1, 5):
        attribution = direct_logit_attribution(model, x, answer=3, wrong=11, position=position)
        logits = model(x)[:, position].detach()
        if model.cfg.logit_softcap:  # the pre-cap logits: what the components add up to
            logits = model.cfg.logit_softcap * torch.atanh(logits / model.cfg.logit_softcap)
        torch.testing.assert_close(attribution.logit, logits[:, 3] - logits[:, 11])
        torch.testing.assert_close(
            attribution.values.sum(0) + attribution.constant, attribution.logit, atol=1e-4, rtol=0
        )
    heads = attribution.heads()
    assert heads.shape == (model.cfg.n_layers, model.cfg.n_heads, 2)
    assert len(attribution.names) == len(set(attribution.names)) == attribution.values.shape[0]


@torch.no_grad()
def test_patching_grid_equals_patching_one_activation_at_a_time():
    model = perturbed("moe-tiny")
    clean = ids(1, 12, seed=3)
    corrupted = clean.clone()
    corrupted[0, 4] = (clean[0, 4] + 1) % 256  # one token differs
    metric = logit_diff(answer=3, wrong=11)
    result = patch(
        model, clean, corrupted, metric, points=("resid_pre", "attn_out", "mlp_out", "attn.hook_z"), heads=True
    )
    assert result.clean == pytest.approx(float(metric(model(clean))[0]))
    assert result.corrupted == pytest.approx(float(metric(model(corrupted))[0]))
    _, cache = run_with_cache(model, clean)
    for point in ("resid_pre", "mlp_out", "attn.hook_z"):
        for layer in (0, 2):
            for position in (0, 4, 11):
                name = block_point(layer, point)

                def one(x, _, name=name, position=position):
                    x = x.clone()
                    x[:, position] = cache[name][:, position]
                    return x

                alone = float(metric(run_with_hooks(model, corrupted, [(name, one)]))[0])
                assert result.results[point][layer, position] == pytest.approx(alone, abs=1e-5)
    for layer, head in ((0, 0), (3, 2)):  # one head's output at every position, alone
        name = block_point(layer, "attn.hook_z")

        def one_head(x, _, name=name, head=head):
            x = x.clone()
            x[:, :, head] = cache[name][:, :, head]
            return x

        alone = float(metric(run_with_hooks(model, corrupted, [(name, one_head)]))[0])
        assert result.results[HEADS][layer, head] == pytest.approx(alone, abs=1e-5)
    assert result.results[HEADS].shape == (model.cfg.n_layers, model.cfg.n_heads)
    # the token that differs, patched where it enters, restores the clean run; elsewhere nothing
    normalized = result.normalized("resid_pre")
    assert normalized[0, 4] == pytest.approx(1.0, abs=1e-4)
    assert normalized[0, [0, 1, 2, 3, 5, 11]].abs().max() <= 1e-4
    assert normalized[:, :4].abs().max() <= 1e-4  # positions before the change never see it


def test_patching_refuses_prompts_of_different_lengths():
    model = model_for("llama-tiny")
    with pytest.raises(ValueError, match="12 tokens, the corrupted one 13"):
        patch(model, ids(1, 12), ids(1, 13), logit_diff(1))


@torch.no_grad()
def test_hooks_rewrite_activations_and_leave_the_model_as_found():
    model = perturbed("hybrid-wrapping")
    x = ids()
    before = model(x)
    zeroed = run_with_hooks(model, x, [("blocks.*.hook_attn_out", lambda a, name: torch.zeros_like(a))])
    assert not torch.allclose(zeroed, before)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(model, [("blocks.1.attn.hook_pattern", lambda a, name: None)]):
            assert model.blocks[1].attn.eager and not model.blocks[0].attn.eager
            raise RuntimeError("boom")
    assert not any(getattr(m, "eager", False) for m in model.modules())
    assert not any(p._forward_hooks for p in model.modules())
    assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match=r"no hook point 'blocks.9.hook_resid_pre'.*blocks.N.hook_resid_post"):
        run_with_cache(model, x, ["blocks.9.hook_resid_pre"])


def test_hook_points_are_stable_across_variants_and_hold_no_weights():
    per_block = {"hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"}
    per_block |= {"attn.hook_z", "attn.hook_pattern"}
    for variant in ALL:
        model = any_model(variant)
        names = hook_names(model)
        for layer in range(model.cfg.n_layers):
            assert {block_point(layer, p) for p in per_block} <= set(names), variant
        assert ("blocks.0.attn.hook_latent" in names) == (model.cfg.attention == "mla")
        assert any(n.endswith("mlp.hook_expert_ids") for n in names) == bool(model.cfg.moe_experts)
        assert not any("hook" in key for key in model.state_dict())


@torch.no_grad()
def test_moe_routing_hooks_show_and_steer_the_experts_each_token_takes():
    model = perturbed("moe-tiny")
    x = ids()
    _, cache = run_with_cache(model, x, ["blocks.1.mlp.*"])
    moe = model.blocks[1].mlp
    logits, chosen = cache["blocks.1.mlp.hook_router_logits"], cache["blocks.1.mlp.hook_expert_ids"]
    assert logits.shape == (2, T, moe.n_experts) and chosen.shape == (2, T, moe.top_k)
    assert torch.equal(chosen, torch.topk(logits.sigmoid() + moe.expert_bias, moe.top_k, dim=-1).indices)
    steered = run_with_hooks(model, x, [("blocks.1.mlp.hook_expert_ids", lambda e, name: (e + 1) % moe.n_experts)])
    assert not torch.allclose(steered, model(x))


def test_the_residual_stream_equals_transformers_hidden_states(tmp_path):
    """For the dense models with a Hugging Face export: transformers' hidden_states[i] (the stream
    entering layer i) is our blocks.i.hook_resid_pre."""
    transformers = pytest.importorskip("transformers")
    from conftest import make_documents

    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.interop.hf import write_hf

    tokenizer = train_bpe(make_documents(30, seed=5), 384)
    for name in ("llama-tiny", "gpt2-tiny"):
        torch.manual_seed(0)
        model = build_model(replace(PRESETS[name], vocab_size=384, n_layers=3, d_model=64)).eval()
        directory = write_hf(model.cfg, model.state_dict(), tokenizer.to_str(), str(tmp_path / name))
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        x = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            hidden = hf(x, output_hidden_states=True).hidden_states
            _, cache = run_with_cache(model, x, ["blocks.*.hook_resid_pre"])
        stream = cache.layers("resid_pre")
        assert len(hidden) == model.cfg.n_layers + 1
        for layer in range(model.cfg.n_layers):
            torch.testing.assert_close(stream[layer], hidden[layer], atol=1e-5, rtol=0)
