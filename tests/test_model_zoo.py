"""The model zoo's numerics on CPU: every attention kind decodes with its KV cache exactly as the
full forward; sliding windows hold; MLA caches only its latent; KV sharing == explicit reuse;
MoE grouped path == reference, top-k respected, bias balancing works; every tiny preset trains
and wraps with FSDP2 on 2 processes."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import spawn_ranks

from generalmodel.cli import parse_args
from generalmodel.config import ConfigError
from models import PRESETS, build_model, get_spec
from models.attention import causal_mask
from models.cache import KVCache, attention_mask, new_cache
from models.moe import MoE

TINY = [name for name in PRESETS if name.endswith("-tiny")]


def small(name, **changes):
    from dataclasses import replace

    if PRESETS[name].long_memory != "none":  # a window short enough for the memory to be read
        changes.setdefault("window", 8)
    return replace(PRESETS[name], vocab_size=256, **changes)


ATTENTION_VARIANTS = {**{name: {} for name in TINY}, "llama-mha": {"n_kv_heads": None}, "llama-mqa": {"n_kv_heads": 1}}


@pytest.mark.parametrize("variant", ATTENTION_VARIANTS)
def test_kv_cache_decoding_reproduces_full_forward(variant):
    torch.manual_seed(0)
    name = variant if variant in PRESETS else "llama-tiny"
    model = build_model(small(name, **ATTENTION_VARIANTS[variant])).eval()
    idx = torch.randint(0, 256, (2, 90))
    with torch.no_grad():
        full = model(idx)
        cache = new_cache(model, batch=2)
        steps = [model(idx[:, :25], cache)] + [model(idx[:, t : t + 1], cache) for t in range(25, 90)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_window_mask_pattern():
    # queries at positions 4, 5, 6 over keys 0..6, as a cache's slots hold them
    mask = attention_mask(torch.tensor([[4, 5, 6]]), torch.arange(7)[None], window=3)[0, 0]
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert torch.equal(causal_mask(T=7, window=3, device="cpu")[4:], expected)  # the same without a cache
    assert causal_mask(T=5, window=None, device="cpu") is None  # plain causal: SDPA is_causal


def test_local_layers_never_see_outside_their_window():
    torch.manual_seed(0)
    window = 6
    model = build_model(small("hybrid-tiny", window=window, global_every=0, n_layers=1)).eval()
    idx = torch.randint(0, 256, (1, 40))
    t = 30
    with torch.no_grad():
        base = model(idx)[0, t]
        outside, inside = idx.clone(), idx.clone()
        outside[0, t - window] = (idx[0, t - window] + 1) % 256  # just outside the window
        inside[0, t - window + 1] = (idx[0, t - window + 1] + 1) % 256  # its oldest visible position
        assert torch.equal(model(outside)[0, t], base)
        assert not torch.allclose(model(inside)[0, t], base)


def test_hybrid_layer_pattern():
    cfg = small("hybrid-tiny")  # window 64, a global layer every 2
    model = build_model(cfg)
    assert [b.attn.window for b in model.blocks] == [64, None, 64, None]


def test_mla_cache_holds_only_the_latent_and_rope_key():
    cfg = small("mla-tiny")
    model = build_model(cfg).eval()
    cache = KVCache(model, batch=3, capacity=10)
    latent, k_rope = cache.layers[0].tensors
    assert latent.shape == (3, 1, 10, cfg.kv_lora_rank)  # not n_heads × head_dim
    assert k_rope.shape == (3, 1, 10, cfg.qk_rope_head_dim)
    per_token = sum(t.shape[-1] for t in (latent, k_rope))
    assert per_token < 2 * cfg.d_model / 4  # vs. MHA's 2·d per token and layer


def test_kv_shared_layers_equal_an_explicit_copy():
    torch.manual_seed(0)
    model = build_model(small("kvshare-tiny", n_layers=2)).eval()
    second = model.blocks[1].attn
    assert second.k_proj is None and second.v_proj is None  # the second layer of the group has no K/V weights
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        out = model(idx)
        x = model.embed(idx)
        rope = (model.rope_cos[:20], model.rope_sin[:20])
        x, (k, v, key_pos) = model.blocks[0](x, rope)
        assert key_pos is None  # no cache: plain causal
        x, _ = model.blocks[1](x, rope, shared_kv=(k.clone(), v.clone(), None))
        manual = model.head(model.final_norm(x))
        torch.testing.assert_close(out, manual)
    assert sorted(KVCache(model, batch=2).layers) == [0]  # the cache holds one K/V per group


def make_moe(**kw):
    torch.manual_seed(0)
    return MoE(d_model=32, hidden=16, n_experts=8, top_k=2, n_shared=1, **kw)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_moe_grouped_path_equals_reference(score):
    moe = make_moe(score=score)
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_moe_experts_without_rows_still_get_a_gradient_and_old_exports_load():
    """An expert that no token chose gets a zero gradient (not none: expert-parallel ranks run the
    same collectives whatever the routing); weights saved before the experts had their own
    module (`w_up`, `w_down` on the layer) load into `experts.w_up`, `experts.w_down`."""
    moe = make_moe()
    with torch.no_grad():
        moe.expert_bias[2:] = -100.0  # only experts 0 and 1 are ever chosen
    moe(torch.randn(2, 5, 32)).sum().backward()
    grad = moe.experts.w_up.grad
    assert grad[:2].abs().sum() > 0 and torch.equal(grad[2:], torch.zeros_like(grad[2:]))
    old = {k.replace("experts.", ""): v.clone() for k, v in moe.state_dict().items()}
    assert "w_up" in old and "experts.w_up" not in old
    fresh = make_moe()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.experts.w_down, moe.experts.w_down)


def test_weights_saved_with_fused_projections_load_into_the_split_ones():
    """Exports written when K and V were one `kv_proj` (rows [k | v]) and SwiGLU's gate and value
    one `up` (rows [gate | value]) load into `k_proj`/`v_proj` and `gate`/`up`: the same logits."""
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = replace(PRESETS["llama-tiny"], vocab_size=64, max_seq_len=16, n_layers=2, d_model=64, bias=True)
    model = build_model(cfg).eval()
    old = {}
    for key, value in model.state_dict().items():
        if ".attn.v_proj." in key or ".mlp.gate." in key:
            continue  # folded into the fused tensor below
        if ".attn.k_proj." in key:
            key, value = (
                key.replace("k_proj", "kv_proj"),
                torch.cat([value, model.state_dict()[key.replace("k_", "v_")]]),
            )
        elif ".mlp.up." in key:
            value = torch.cat([model.state_dict()[key.replace("up", "gate")], value])
        old[key] = value.clone()
    assert "blocks.0.attn.kv_proj.weight" in old and old["blocks.0.mlp.up.weight"].shape[0] == 2 * cfg.hidden
    fresh = build_model(replace(cfg, init_std=0.5)).eval()
    fresh.load_state_dict(old)
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_moe_top_k_is_respected():
    moe = make_moe()
    idx, gates, _ = moe.route(torch.randn(50, 32))
    assert idx.shape == (50, 2)
    assert all(len(set(row.tolist())) == 2 for row in idx)
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    assert moe.tokens_per_expert.sum() == 100


def test_bias_balancing_reduces_imbalance_of_a_skewed_router():
    moe = make_moe(bias_update_rate=0.01)
    with torch.no_grad():
        moe.router.weight[:2] += 0.1  # with inputs of positive mean, experts 0 and 1 win almost every token
    x = torch.randn(512, 32) + 0.5
    with torch.no_grad():
        moe.route(x)
        before = float(moe.update_bias())
        for _ in range(300):
            moe.route(x)
            after = float(moe.update_bias())
    assert before > 2.5 and after < 1.5, (before, after)
    assert moe.expert_bias[:2].max() < 0 < moe.expert_bias[2:].max()


def test_active_parameters_and_flops():
    model = build_model(small("deepseek-tiny"))
    total, active = model.num_params(), model.num_params(active=True)
    per_expert = model.cfg.d_model * 3 * model.cfg.expert_hidden
    moe_layers = model.cfg.n_layers - model.cfg.moe_first_dense
    assert total - active == moe_layers * (model.cfg.moe_experts - model.cfg.moe_top_k) * per_expert
    dense_equivalent = 6 * model.num_params(embeddings=False)
    assert model.flops_per_token(256) < dense_equivalent + 12 * model.cfg.n_layers * model.cfg.d_model * 256


@pytest.mark.parametrize("name", TINY)
def test_each_tiny_preset_learns_on_cpu(name):
    torch.manual_seed(0)
    model = build_model(small(name, n_layers=2, max_seq_len=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(15):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.after_optimizer_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


def _fsdp_worker(rank, port, names, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for name in names:
        torch.manual_seed(0)
        cfg = small(name, n_layers=2, max_seq_len=64)
        model = get_spec(cfg.name).shard(build_model(cfg))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(1 + rank)
        batch = torch.randint(0, 256, (2, 33))
        for _ in range(2):
            loss = F.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            model.after_optimizer_step()
        if rank == 0:
            out[name] = loss.item()
    torch.distributed.destroy_process_group()


def test_each_tiny_preset_wraps_with_fsdp2_on_two_processes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    spawn_ranks(_fsdp_worker, (port, TINY, out), 2)
    assert sorted(out.keys()) == sorted(TINY)
    assert all(loss == loss and loss < 10 for loss in out.values())  # finite


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.d_model=30", "--model.n_heads=4"], "n_heads=4 does not divide d_model=30"),
        (["--model.n_kv_heads=3"], "n_kv_heads=3 must divide n_heads=4"),
        (["--model.n_layers=0"], "n_layers must be positive"),
        (["--model.name=gpt2", "--model.mlp=relu"], "model.gpt2.mlp = 'relu'"),
        (["--model.window=0"], "window must be positive"),
        (["--model.kv_share_group=3"], "kv_share_group=3 must divide n_layers=4"),
        (["--model.moe_experts=4", "--model.moe_top_k=5"], "moe_top_k=5 must be in 1..moe_experts=4"),
        (["--model.global_every=2"], "global_every=2 needs a window"),
        (["--model.attention=mla", "--model.positions=learned"], "attention='mla' needs positions='rope'"),
        (["--model.preset=mla-tiny", "--model.kv_share_group=2"], "does not share K/V across layers"),
        (["--model.preset=moe-large"], "unknown model preset 'moe-large'"),
        (["--model.preset=deepseek-tiny", "--model.name=gpt2"], "is a 'deepseek' model, but model.name is 'gpt2'"),
    ],
)
def test_bad_model_configs_are_clear_errors(args, message):
    with pytest.raises(ConfigError) as e:
        parse_args(args)
    assert message in str(e.value)
