"""Product-key memory layers (models/memory.py): the product-key top-k is the brute-force top-k
over all N full keys; the output is the softmax-weighted sum of the retrieved values (PKM) or
single-neuron experts (PEER); only retrieved rows get gradient; parameter accounting separates
total from active; bad configs are clear errors. (KV-cache decoding, causality, FSDP2 on two
processes and the interpretability numerics run on the memory-tiny and peer-tiny presets with
every other tiny preset: test_decode, test_causality, test_model_zoo, test_interp.)"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import PRESETS, build_model
from models.memory import ProductKeyMemory


def memory(kind="pkm", n_keys=12, heads=3, top_k=5, key_dim=8, d=16):
    torch.manual_seed(0)
    return ProductKeyMemory(d, n_keys, heads, top_k, key_dim, kind)


def full_scores(m: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """(M, heads, N): every full key's score, a full key being a pair of sub-keys (i, j) → i·n + j."""
    q = m.query_norm(m.query(x).view(x.shape[0], m.heads, 2, m.key_dim // 2))
    first = torch.einsum("mhd,hnd->mhn", q[:, :, 0], m.sub_keys[0])
    second = torch.einsum("mhd,hnd->mhn", q[:, :, 1], m.sub_keys[1])
    return (first[..., :, None] + second[..., None, :]).flatten(-2)


@pytest.mark.parametrize("top_k", [1, 5, 12])
def test_product_key_top_k_is_the_brute_force_top_k_over_all_keys(top_k):
    m = memory(top_k=top_k)
    x = torch.randn(50, 16)
    with torch.no_grad():
        scores, slots = m.scores(x)
        brute, brute_slots = full_scores(m, x).topk(top_k, dim=-1)
    torch.testing.assert_close(scores, brute)
    assert torch.equal(slots.sort(-1).values, brute_slots.sort(-1).values)
    assert m.size == 144 and int(slots.max()) < m.size


@pytest.mark.parametrize("kind", ["pkm", "peer"])
def test_the_output_is_the_gated_sum_of_the_retrieved_rows(kind):
    m = memory(kind)
    x = torch.randn(2, 7, 16)
    out = m(x)
    flat = x.view(-1, 16)
    with torch.no_grad():
        scores, slots = full_scores(m, flat).topk(m.top_k, dim=-1)
        expected = torch.zeros_like(flat)
        for token in range(flat.shape[0]):
            for head in range(m.heads):
                gates = scores[token, head].softmax(-1)
                for gate, slot in zip(gates, slots[token, head], strict=True):
                    weight = gate
                    if kind == "peer":
                        weight = gate * F.gelu(flat[token] @ m.down[slot], approximate="tanh")
                    expected[token] += weight * m.values[slot]
    torch.testing.assert_close(out.view(-1, 16), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["pkm", "peer"])
def test_gradients_reach_only_the_retrieved_rows(kind):
    m = memory(kind, n_keys=16, top_k=3, heads=2)
    x = torch.randn(1, 4, 16)
    m(x).pow(2).sum().backward()
    with torch.no_grad():
        retrieved = set(m.scores(x.view(-1, 16))[1].flatten().tolist())
    tables = [m.values] + ([m.down] if kind == "peer" else [])
    for table in tables:
        touched = set(table.grad.abs().sum(-1).nonzero().flatten().tolist())
        assert touched == retrieved and len(retrieved) < m.size
    assert m.query.weight.grad.abs().sum() > 0 and m.sub_keys.grad.abs().sum() > 0


def test_total_and_active_parameters_are_counted_apart():
    for name in ("memory-tiny", "peer-tiny"):
        model = build_model(PRESETS[name])
        layer = model.blocks[1].mlp
        assert isinstance(layer, ProductKeyMemory)
        tables = 2 if layer.kind == "peer" else 1
        total, active = model.num_params(), model.num_params(active=True)
        assert total - active == tables * (layer.size - layer.heads * layer.top_k) * model.cfg.d_model
        assert model.flops_per_token(256) < 6 * model.num_params(embeddings=False) + 12 * 4 * 192 * 256
    big = PRESETS["memory-124m"]
    with torch.device("meta"):
        model = build_model(big)
    assert model.num_params() - build_model_meta("llama-124m").num_params() > 190e6  # the 262K-slot table
    assert abs(model.num_params(active=True) - build_model_meta("llama-124m").num_params()) < 5e6


def build_model_meta(name):
    with torch.device("meta"):
        return build_model(PRESETS[name])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(memory_layers=(4,)), r"memory_layers \[4\] are not blocks of this model \(0..3\)"),
        (dict(memory_layers=(1,), moe_experts=4, moe_first_dense=1), r"memory_layers \[1\] are MoE layers too"),
        (dict(memory_layers=(1,), memory_top_k=40), "memory_top_k=40 must be in 1..memory_keys=32"),
        (dict(memory_layers=(1,), memory_key_dim=7), "memory_key_dim must be even"),
    ],
)
def test_bad_memory_configs_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PRESETS["llama-tiny"], **changes)


def test_memory_models_have_no_native_transformers_class():
    from generalmodel.interop.hf import ExportError, hf_architecture

    with pytest.raises(ExportError, match=r"memory_layers=\[1\] \(product-key memory layers\)"):
        hf_architecture(PRESETS["memory-tiny"], remote_code=False)
    assert hf_architecture(PRESETS["memory-tiny"]) == "generalmodel"  # remote code (tests/test_hf.py)
