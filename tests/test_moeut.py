"""MoEUT (models/moeut.py): layers share their units' parameters (each held once), SwitchHead and
σ-MoE equal their definitions, unpicked experts get no gradient, active parameters and FLOPs
count each use, per-layer hook points and KV cache slots, one compiled graph for every layer,
FSDP2 on 2 ranks equals one process, bad configs are clear errors. (The zoo's gates — causal
leaks in every compile mode, decoding, documents, interp, export — run on `moeut-tiny` with the
other presets.)"""

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from conftest import spawn_ranks

from generalmodel.cli import parse_args
from generalmodel.config import ConfigError
from generalmodel.interp import run_with_cache
from models import PRESETS, build_model
from models.moeut import MoEUT, SharedLayer, pick

VOCAB = 128


def tiny(**changes) -> MoEUT:
    torch.manual_seed(0)
    changes = {"vocab_size": VOCAB, "max_seq_len": 32, "d_model": 64, **changes}
    cfg = replace(PRESETS["moeut-tiny"], **changes)
    return build_model(cfg)


def ids(batch=2, T=16, seed=1):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_layers_share_their_units_parameters_once():
    model = tiny(n_layers=6, layer_group=2)
    assert len(model.units) == 2 and len(model.blocks) == 6
    assert not any(True for _ in model.blocks.parameters())  # the layers own nothing
    assert all(not k.startswith("blocks.") for k in model.state_dict())
    two = tiny(n_layers=2, layer_group=2)
    assert model.num_params() == two.num_params()  # three uses of a group cost no parameters
    # Each layer computes with its unit: layers 0, 2, 4 with unit 0 (one parameter, three uses).
    assert [b.attn._shared[0] for b in model.blocks] == [u.attn for u in model.units] * 3
    _, cache = run_with_cache(model.eval(), ids(), ["blocks.*.hook_resid_post"])
    stream = cache.layers("resid_post")
    assert stream.shape[0] == 6 and all(not torch.equal(stream[i], stream[i + 1]) for i in range(5))


def test_sigma_moe_grouped_path_equals_its_definition():
    model = tiny()
    layer = model.blocks[1].mlp
    x = torch.randn(2, 16, 64)
    got = layer(x)
    want = layer._shared[0].forward_reference(x, layer)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _switchhead_by_definition(attn, x):
    """Per token and head: v = Σ_e g_v[e]·x W_v[h,e] over the picked experts, causal softmax
    attention with RoPE, out = Σ_h Σ_e g_o[e]·z_h W_o[h,e] — written as loops."""
    from models.common import apply_rope, rope_tables

    B, T, d = x.shape
    H, E, hd, k = attn.n_heads, attn.n_experts, attn.head_dim, attn.top_k
    xn = attn.norm(x)
    cos, sin = rope_tables(hd, T, 10000.0)
    q = apply_rope(attn.q_proj(xn).view(B, T, H, hd).transpose(1, 2), cos, sin)
    key = apply_rope(attn.k_proj(xn).view(B, T, H, hd).transpose(1, 2), cos, sin)
    sv = attn.v_select(xn).sigmoid().view(B, T, H, E)
    so = attn.o_select(xn).sigmoid().view(B, T, H, E)
    v = torch.zeros(B, H, T, hd)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for e in torch.topk(sv[b, t, h], k).indices.tolist():
                    v[b, h, t] += sv[b, t, h, e] * (x[b, t] @ attn.v_experts[h * E + e])
    scores = (q @ key.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    z = scores.softmax(-1) @ v  # (B, H, T, hd)
    out = torch.zeros(B, T, d)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for e in torch.topk(so[b, t, h], k).indices.tolist():
                    out[b, t] += so[b, t, h, e] * (z[b, h, t] @ attn.o_experts[h * E + e])
    return out


@torch.no_grad()
def test_switchhead_equals_its_definition():
    model = tiny(att_top_k=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the residual-scaled experts off their tiny init
    layer = model.blocks[0].attn
    x = torch.randn(2, 8, 64)
    rope = (model.rope_cos[:8], model.rope_sin[:8])
    torch.testing.assert_close(layer(x, rope), _switchhead_by_definition(layer._shared[0], x), atol=1e-5, rtol=1e-4)


def test_experts_no_token_picked_get_no_gradient():
    model = tiny(n_layers=2, layer_group=2, att_experts=4, att_top_k=1)
    x = ids(1, 4)
    _, cache = run_with_cache(model, x, ["blocks.0.attn.hook_v_gates", "blocks.0.mlp.hook_expert_ids"])
    model(x, targets=x).backward()
    attn, mlp = model.units[0].attn, model.units[0].mlp
    picked_v = cache["blocks.0.attn.hook_v_gates"][0].ne(0).any(0)  # (H, E): picked by some token
    grads = attn.v_experts.grad.view(*picked_v.shape, -1).abs().sum(-1)
    assert (grads[~picked_v] == 0).all() and (grads[picked_v] > 0).all()
    routed = torch.zeros(mlp.n_experts, dtype=torch.bool)
    routed[cache["blocks.0.mlp.hook_expert_ids"].flatten()] = True
    up = mlp.experts.w_up.grad.abs().sum((1, 2))
    assert (up[~routed] == 0).all() and (up[routed] > 0).all()


def test_active_parameters_and_flops_count_each_use():
    model = tiny(n_layers=4, layer_group=2)
    cfg = model.cfg
    unit = model.units[0]
    d, H, E, hd = cfg.d_model, cfg.n_heads, cfg.att_experts, cfg.head_dim
    inactive = 2 * (H * (E - cfg.att_top_k) * 2 * d * hd + (cfg.moe_experts - cfg.moe_top_k) * 2 * d * cfg.moe_hidden)
    assert model.num_params() - model.num_params(active=True) == inactive
    unit_active = sum(p.numel() for p in unit.parameters()) - inactive // 2
    # Each unit runs in n_layers / G = 2 layers: its active parameters count twice in the FLOPs.
    active_per_token = model.num_params(embeddings=False, active=True) + unit_active * 2
    assert model.flops_per_token(32) == 6 * active_per_token + 12 * cfg.n_layers * d * 32


def test_each_layer_decodes_from_its_own_cache_slots():
    from models.cache import KVCache

    model = tiny(n_layers=4, layer_group=2).eval()
    cache = KVCache(model, 2)
    assert sorted(cache.layers) == [0, 1, 2, 3]  # one per layer, not one per unit
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x)
        cache.reserve(8)
        steps = [model(x[:, :8], cache=cache)]
        for t in range(8, 12):
            cache.reserve(1)
            steps.append(model(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_one_compiled_graph_serves_every_layer():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(n_layers=6, layer_group=2, moe_experts=4, moe_top_k=2)
    x = ids()
    eager = model(x, targets=x)
    for block in model.blocks:
        block.compile(backend="eager")  # dynamo's graphs only (the zoo's leak test runs inductor on it)
    compiled = model(x, targets=x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    # The layers' index is not compiled in: the layer's code is compiled twice (the regulariser's
    # first use, then the later ones), not once per layer.
    layer_code = SharedLayer.forward.__code__
    compiled_layers = [e for e in torch._dynamo.eval_frame._debug_get_cache_entry_list(layer_code)]
    assert len(compiled_layers) == 2, counters["stats"]
    torch._dynamo.reset()


def _fsdp_worker(rank, port, out):
    from models import get_spec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = get_spec("moeut").shard(tiny(n_layers=4, layer_group=2, moe_entropy_weight=0.0))
    out[rank] = _train(model, ids(4, 17, seed=3)[2 * rank : 2 * rank + 2])
    torch.distributed.destroy_process_group()


def _train(model, batch) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        loss = model(batch[:, :-1], targets=batch[:, 1:]) / batch[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_fsdp2_on_two_ranks_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    spawn_ranks(_fsdp_worker, (port, out), 2)
    one = _train(tiny(n_layers=4, layer_group=2, moe_entropy_weight=0.0), ids(4, 17, seed=3))
    # Each rank's loss is its half's mean; FSDP2 averages the gradients: the union batch's mean.
    # (Without the regulariser, a statistic of each rank's own batch.)
    sharded = [(a + b) / 2 for a, b in zip(out[0], out[1], strict=True)]
    assert sharded == pytest.approx(one, rel=1e-5)
    assert one[-1] < one[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.n_layers=3"], "layer_group=2 must divide n_layers=3"),
        (["--model.window=8"], "model.name='moeut' does not use window=8"),
        (["--model.att_top_k=5"], "att_top_k=5 must be in 1..att_experts=4"),
        (["--parallel.expert=2"], "moeut"),
        (["--parallel.tensor=2"], "MoEUT"),
    ],
)
def test_bad_moeut_configs_are_clear_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--model.preset=moeut-tiny", "--model.vocab_size=256", *args])


def test_pick_keeps_the_top_k_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert torch.equal(pick(scores, 2), torch.tensor([[0.0, 0.9, 0.0, 0.7]]))


def test_quantization_and_fp8_take_the_units_linears_but_not_the_selections():
    from generalmodel.infer.quant import quantizable
    from generalmodel.train.fp8 import fp8_linears

    model = tiny(d_model=128)
    keep = quantizable(model)
    chosen = {n for n, m in model.named_modules() if keep(m, n)}
    assert chosen == {f"units.{u}.attn.{p}" for u in (0, 1) for p in ("q_proj", "k_proj")}
    assert set(fp8_linears(model, 16)) == chosen


def test_an_sdpa_backend_reaches_the_shared_attention():
    from models.attention import set_backend

    model = tiny().eval()
    x = ids()
    with torch.no_grad():
        auto = model(x)
        assert set_backend(model, "math") == 0 and all(u.attn.backend == "math" for u in model.units)
        torch.testing.assert_close(model(x), auto, atol=1e-5, rtol=0)
        assert set_backend(model, "flex", 16) == 0 and all(u.attn.backend == "auto" for u in model.units)


def test_a_preset_names_the_family_whose_fields_the_other_keys_are_in_any_order():
    cfg = parse_args(["--model.att_top_k=2", "--model.preset=moeut-tiny", "--model.vocab_size=256"])
    assert cfg.model.name == "moeut" and cfg.model.att_top_k == 2 and cfg.model.layer_group == 2
    with pytest.raises(ConfigError, match="unknown key 'model.att_top_k'"):
        parse_args(["--model.preset=llama-tiny", "--model.att_top_k=2"])
