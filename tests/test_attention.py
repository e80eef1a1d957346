"""Attention backends (train.attention, models/attention.set_backend): every SDPA backend the CPU
has gives the same logits and gradients as SDPA's own choice, and FlexAttention (block masks:
causal, sliding windows) the same logits — global and windowed layers, GQA, KV sharing; decoding
keeps SDPA. FlexAttention has no backward on CPU: its gradients are checked on a card
(benchmarks/gpu_train.py), and training with it on CPU is refused by name."""

import pytest
import torch
import torch.nn.functional as F

from generalmodel import UserError
from generalmodel.config import load_config
from generalmodel.train.parallelize import parallelize
from models import build_model
from models.attention import set_backend
from models.llama import LlamaConfig

T = 40  # not a multiple of FlexAttention's 128-token blocks


def hybrid(**overrides):
    """Windowed and global layers (window 8, every 2nd global), GQA, as the hybrid presets have."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, max_seq_len=64, n_layers=4, n_heads=4, n_kv_heads=2, d_model=32, window=8)
    return build_model(LlamaConfig(**{**cfg, "global_every": 2, **overrides}))


def logits_and_grads(model, tokens):
    model.zero_grad()
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


VARIANTS = [{}, {"kv_share_group": 2}, {"window": None, "global_every": 0}]


@pytest.mark.parametrize("backend", ["math", "flash"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_sdpa_backend_gives_the_same_logits_and_gradients(backend, variant):
    model = hybrid(**variant)
    tokens = torch.randint(0, 128, (3, T + 1))
    expected, grads = logits_and_grads(model, tokens)
    assert set_backend(model, backend, seq_len=T) == 0
    logits, got = logits_and_grads(model, tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_flex_gives_the_same_logits(variant):
    model = hybrid(**variant)
    tokens = torch.randint(0, 128, (3, T))
    expected = model(tokens)
    assert set_backend(model, "flex", seq_len=T) == 4
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    assert model(tokens[:, :-1]).shape[1] == T - 1  # another length: SDPA
    assert set_backend(model, "auto") == 0 and all(b.attn.flex is None for b in model.blocks)


def test_flex_block_masks_skip_what_a_window_cannot_see():
    model = hybrid(max_seq_len=1024)
    set_backend(model, "flex", seq_len=1024)
    local, global_ = model.blocks[0].attn.flex[1], model.blocks[1].attn.flex[1]
    # 8 × 8 blocks of 128: causal keeps 36, a window of 8 only the diagonal and the one before it
    assert global_.to_dense().sum().item() == 36 and local.to_dense().sum().item() == 8 + 7


def test_flex_decodes_with_the_cache_as_sdpa_does():
    from generalmodel.infer import SamplingParams, generate

    model = hybrid().eval()
    prompt = torch.randint(0, 128, (12,)).tolist()
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    expected = list(generate(model, prompt, greedy))
    set_backend(model, "flex", seq_len=T)
    assert list(generate(model, prompt, greedy)) == expected and len(expected) == 10


@torch.no_grad()
def test_the_flex_model_compiles_per_block():
    model = hybrid()
    tokens = torch.randint(0, 128, (2, T))
    expected = model(tokens)
    set_backend(model, "flex", seq_len=T)
    for block in model.blocks:
        block.compile()
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "backend, why", [("cudnn", "an SDPA backend of CUDA only"), ("flex", "FlexAttention has no backward on CPU")]
)
def test_a_backend_the_cpu_cannot_train_with_is_named(backend, why):
    cfg = load_config(overrides={"train.attention": backend})
    with pytest.raises(UserError, match=f"train.attention={backend}: {why}"):
        parallelize(hybrid(), cfg.train, torch.device("cpu"))
