"""Memory beyond the sliding window (models/longmem.py): the compressive (Infini-attention) and kNN
(Memorizing Transformers) reads equal a written-out reference, query by query; a memory layer
carries a token's influence past every window's reach, and only within its own document; the
kNN memory of a decoding row is bounded, first in first out; the config refuses what cannot work.
(Decoding equals the full forward, and a row's memory is emptied for its next request:
tests/test_decode.py's variants; causality: tests/test_causality.py; training resumes exactly and
FSDP2 on two processes equals one: tests/test_train.py.)"""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from generalmodel.cli import parse_args
from generalmodel.config import ConfigError
from models import PRESETS, build_model
from models.cache import KVCache
from models.longmem import LongMemory, far_mask

KINDS = ("compressive", "knn")


def reference_read(kind, q, k, v, window, top_k):
    """The far read written out query by query: every earlier position outside the window."""
    B, H, T, d = q.shape
    repeat = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            keys, values = k[b, h // repeat], v[b, h // repeat]
            for t in range(T):
                far = range(t - window + 1)  # positions j <= t - window
                if not far:
                    continue
                kf, vf = keys[: t - window + 1], values[: t - window + 1]
                if kind == "compressive":
                    phi_q, phi_k = F.elu(q[b, h, t]) + 1, F.elu(kf) + 1
                    M = sum(torch.outer(phi_k[j], vf[j]) for j in far)
                    z = phi_k.sum(0)
                    out[b, h, t] = (phi_q @ M) / (phi_q @ z)
                else:
                    scores = kf @ q[b, h, t] / math.sqrt(d)
                    best = scores.topk(min(top_k, len(far))).indices
                    out[b, h, t] = scores[best].softmax(0) @ vf[best]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_the_far_read_equals_the_reference(kind):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    memory = LongMemory(kind, n_heads=4, n_kv_heads=2, head_dim=8, top_k=3, size=None)
    positions = torch.arange(20)[None]
    got = memory.read(q, k, v, far_mask(positions, positions, 5))
    torch.testing.assert_close(got, reference_read(kind, q, k, v, 5, 3), rtol=1e-5, atol=1e-5)
    assert got[:, :, :5].abs().max() == 0  # nothing has left the window yet


def model(kind, **changes):
    cfg = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=2, window=4, long_memory=kind, long_memory_layers=(1,))
    cfg.update(changes)
    torch.manual_seed(0)
    net = build_model(replace(PRESETS["llama-tiny"], **cfg)).eval()
    if kind != "none":
        with torch.no_grad():
            net.blocks[1].attn.memory.gate.fill_(2.0)  # lean on the memory
    return net


@pytest.mark.parametrize("kind", [*KINDS, "none"])
@torch.no_grad()
def test_a_token_reaches_past_every_window_only_through_the_memory_and_only_in_its_document(kind):
    net = model(kind, long_memory_layers=() if kind == "none" else (1,))
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 64
    far = (net(changed) - net(ids)).abs()[0].amax(-1)  # (T,)
    # two layers of window 4 see 6 positions back: position 30 hears token 0 only through a memory
    assert (far[30] > 1e-4) == (kind != "none")
    # packed documents 0..19 and 20..39: the second never hears the first
    docs = (torch.arange(40) >= 20).long()[None]
    across = (net(changed, docs=docs) - net(ids, docs=docs)).abs()[0, 20:].max()
    assert across == 0


@torch.no_grad()
def test_a_decoding_rows_knn_memory_is_bounded_and_keeps_the_newest():
    net = model("knn", long_memory_size=5)
    cache = KVCache(net, batch=1)
    state = cache.layers[1].memory
    before = cache.nbytes()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(2))
    cache.reserve(17)
    net(ids[:, :17], cache)
    for t in range(17, 40):
        cache.reserve(1)
        net(ids[:, t : t + 1], cache)
    assert cache.nbytes() == before  # preallocated, never grown
    kept = sorted(p for p in state.pos[0].tolist() if p >= 0)
    assert kept == [31, 32, 33, 34, 35]  # the 5 newest of the positions <= 39 - window
    cache.reset([0])
    assert (state.pos == -1).all()
    # compressive: one matrix per KV head, whatever the length
    assert KVCache(model("compressive"), batch=3).layers[1].memory.M.shape == (3, 2, 16, 16)


def test_the_gate_starts_at_one_half_and_bad_configs_are_clear_errors():
    gate = build_model(replace(PRESETS["memorizing-tiny"], vocab_size=64)).blocks[1].attn.memory.gate
    assert torch.equal(torch.sigmoid(gate), torch.full((4,), 0.5))
    cases = [
        (["--model.long_memory=knn"], "needs long_memory_layers"),
        (["--model.long_memory_layers=[1]"], "needs long_memory: compressive or knn"),
        (["--model.long_memory=knn", "--model.long_memory_layers=[1]"], "must be sliding-window blocks"),
        (["--model.preset=hybrid-tiny", "--model.long_memory=knn", "--model.long_memory_layers=[1]"], "[1]"),
        (
            [
                "--model.preset=mla-tiny",
                "--model.window=8",
                "--model.long_memory=knn",
                "--model.long_memory_layers=[0]",
            ],
            "a switch of GQA layers",
        ),
        (["--model.preset=memorizing-tiny", "--model.long_memory_top_k=0"], "must be positive"),
        (["--model.preset=infini-tiny", "--model.long_memory_size=64"], "the knn memory's fields"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError) as e:
            parse_args(args)
        assert message in str(e.value), (args, str(e.value))
