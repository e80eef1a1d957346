"""Product-key memory layers (models/memory.py): the product-key top-k is the brute-force top-k
over all N full keys; the output is the softmax-weighted sum of the retrieved values (PKM) or
single-neuron experts (PEER); UltraMem's Tucker retrieval is the brute-force top-k when its cores
are rank one and scores exactly otherwise, its output the projected sum of the retrieved rows, its
core loss the singular values' penalty; only retrieved rows get gradient; parameter accounting
separates total from active; bad configs are clear errors. (KV-cache decoding, causality, FSDP2
on two processes and the interpretability numerics run on the memory-tiny, peer-tiny and
ultramem-tiny presets with every other tiny preset: test_decode, test_causality, test_model_zoo,
test_interp.)"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import PRESETS, build_model
from models.memory import CORE_MARGIN, ProductKeyMemory, UltraMemory, rank_one


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
    for name in ("memory-tiny", "peer-tiny", "ultramem-tiny"):
        model = build_model(PRESETS[name])
        layer = model.blocks[1].mlp
        total, active = model.num_params(), model.num_params(active=True)
        if isinstance(layer, UltraMemory):  # 1024 physical rows of d_model, 64 of them read
            assert total - active == (layer.size // layer.expansion - layer.heads * layer.top_k) * model.cfg.d_model
            assert layer.values.shape == (1024, 192) and layer.size == 4096
        else:
            tables = 2 if layer.kind == "peer" else 1
            assert total - active == tables * (layer.size - layer.heads * layer.top_k) * model.cfg.d_model
        assert model.flops_per_token(256) < 6 * model.num_params(embeddings=False) + 12 * 4 * 192 * 256
    big = PRESETS["memory-124m"]
    with torch.device("meta"):
        model = build_model(big)
    assert model.num_params() - build_model_meta("llama-124m").num_params() > 190e6  # the 262K-slot table
    assert abs(model.num_params(active=True) - build_model_meta("llama-124m").num_params()) < 5e6
    ultra = build_model_meta("ultramem-124m")  # three layers of 65K physical rows
    assert ultra.num_params() - build_model_meta("llama-124m").num_params() > 140e6
    assert abs(ultra.num_params(active=True) - build_model_meta("llama-124m").num_params()) < 5e6


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
        (dict(memory_layers=(1,), memory_rank=3), r"memory_rank=3: UltraMem's fields, but memory_kind is 'pkm'"),
        (
            dict(memory_layers=(1,), memory_kind="ultramem", memory_keys=30, memory_expansion=8),
            r"memory_expansion must divide memory_keys² = 900",
        ),
        (dict(memory_layers=(1,), memory_kind="ultramem", memory_rank=0), "memory_rank=0 and memory_expansion=4"),
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


def ultramem(n_keys=12, heads=3, top_k=4, key_dim=8, d=16, rank=2, expansion=4):
    torch.manual_seed(0)
    return UltraMemory(d, n_keys, heads, top_k, key_dim, rank, expansion, value_dim=6)


def tucker_scores(m: UltraMemory, x: torch.Tensor) -> torch.Tensor:
    """(M, heads, N): every full key's Tucker score S_row[:, i]ᵀ · C · S_col[:, j], slot i·n + j."""
    sub = m.sub_scores(x)
    return torch.einsum("mhri,hrq,mhqj->mhij", sub[0], m.cores(), sub[1]).flatten(-2)


def random_cores(m: UltraMemory, rank_one: bool) -> None:
    """Cores of both signs: σ·u·vᵀ (rank one) or a full random matrix."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if rank_one:
            u, v = torch.randn(m.heads, m.rank, 1, generator=g), torch.randn(m.heads, 1, m.rank, generator=g)
            m.core.copy_((u @ v).flatten(1))
        else:
            m.core.copy_(torch.randn(m.heads, m.rank * m.rank, generator=g))


@pytest.mark.parametrize("top_k", [1, 3, 5, 6, 12])
def test_tucker_retrieval_is_the_brute_force_top_k_when_the_cores_are_rank_one(top_k):
    m = ultramem(top_k=top_k)  # 2k < 12 for k <= 5: the rank-one candidates; else every key
    random_cores(m, rank_one=True)
    x = torch.randn(60, 16)
    with torch.no_grad():
        scores, slots = m.scores(x)
        brute, brute_slots = tucker_scores(m, x).topk(top_k, dim=-1)
    torch.testing.assert_close(scores, brute, atol=1e-5, rtol=1e-5)
    assert torch.equal(slots.sort(-1).values, brute_slots.sort(-1).values)


def test_tucker_retrieval_scores_exactly_and_mostly_finds_the_top_k_for_any_core():
    m = ultramem(n_keys=16, top_k=4)
    random_cores(m, rank_one=False)
    x = torch.randn(200, 16)
    with torch.no_grad():
        scores, slots = m.scores(x)
        full = tucker_scores(m, x)
        brute_slots = full.topk(4, dim=-1).indices
    torch.testing.assert_close(scores, full.gather(-1, slots))  # the exact score of each retrieved slot
    assert torch.all(scores[..., :-1] >= scores[..., 1:])  # best first
    assert torch.all(slots.sort(-1).values.diff(dim=-1) > 0)  # no slot twice
    found = (slots[..., :, None] == brute_slots[..., None, :]).any(-1).float().mean()
    assert 0.3 < found < 1  # an approximation for a full-rank core (what the core loss is for)


def test_ultramem_output_is_the_projected_score_weighted_sum_of_the_retrieved_rows():
    m = ultramem()
    random_cores(m, rank_one=False)
    x = torch.randn(2, 5, 16)
    out = m(x)
    flat = x.view(-1, 16)
    with torch.no_grad():
        scores, slots = m.scores(flat)
        expected = torch.zeros_like(flat)
        for token in range(flat.shape[0]):
            for score, slot in zip(scores[token].flatten(), slots[token].flatten(), strict=True):
                row, projector = slot // m.expansion, slot % m.expansion
                expected[token] += score * (m.values[row] @ m.expand[projector])
    torch.testing.assert_close(out.view(-1, 16), expected, atol=1e-5, rtol=1e-4)


def test_ultramem_gradients_reach_only_the_retrieved_physical_rows():
    m = ultramem(n_keys=16, top_k=3, heads=2)
    x = torch.randn(1, 3, 16)
    m(x).pow(2).sum().backward()
    with torch.no_grad():
        rows = set((m.scores(x.view(-1, 16))[1] // m.expansion).flatten().tolist())
    touched = set(m.values.grad.abs().sum(-1).nonzero().flatten().tolist())
    assert touched == rows and len(rows) < m.values.shape[0]
    for p in (m.query.weight, m.sub_keys, m.core, m.expand):
        assert p.grad.abs().sum() > 0


@pytest.mark.parametrize("rank", [2, 3])
def test_the_core_loss_penalises_singular_values_beyond_the_first(rank):
    m = ultramem(rank=rank).train()
    random_cores(m, rank_one=True)
    m(torch.randn(1, 2, 16))
    assert m.aux_loss is not None and m.aux_loss.item() < 1e-8  # rank one: nothing to penalise
    random_cores(m, rank_one=False)
    singular = torch.linalg.svdvals(m.cores().detach())
    beyond = singular[:, 1:].square().sum(-1).sqrt()  # rank 2: σ₂ itself, the paper's
    expected = (beyond - CORE_MARGIN).clamp(min=0).square().sum() * m.core_loss_weight
    m(torch.randn(1, 2, 16))
    torch.testing.assert_close(m.aux_loss, expected, rtol=1e-4, atol=1e-6)
    m.aux_loss.backward()
    with torch.no_grad():
        m.core -= 0.5 * m.core.grad
    after = torch.linalg.svdvals(m.cores().detach())
    assert torch.all(after[:, 1:].square().sum(-1) < beyond.square())
    torch.testing.assert_close(after[:, 0], singular[:, 0], rtol=1e-3, atol=1e-3)  # σ₁ left alone
    assert m.eval()(torch.randn(1, 2, 16)) is not None and m.aux_loss is None  # training only


def test_power_iteration_finds_the_top_singular_vectors():
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(6, 3, 1, generator=g), torch.randn(6, 1, 3, generator=g)
    cores = 3 * (u @ v) / (u.norm(dim=1, keepdim=True) * v.norm(dim=2, keepdim=True)) + 0.2 * torch.randn(6, 3, 3)
    got_u, got_v = rank_one(cores)
    svd_u, _, svd_vh = torch.linalg.svd(cores)
    torch.testing.assert_close((got_u * svd_u[..., 0]).sum(-1).abs(), torch.ones(6), atol=1e-4, rtol=0)
    torch.testing.assert_close((got_v * svd_vh[..., 0, :]).sum(-1).abs(), torch.ones(6), atol=1e-4, rtol=0)
    rank1 = u @ v  # exact at once, whatever direction its columns point
    got_u, got_v = rank_one(rank1, iterations=0)
    sigma = torch.linalg.svdvals(rank1)[:, :1, None]
    torch.testing.assert_close(torch.einsum("hr,hq->hrq", got_u, got_v) * sigma, rank1)


def test_the_decoder_adds_the_cores_loss_to_its_auxiliary_loss():
    model = build_model(dataclasses.replace(PRESETS["ultramem-tiny"], n_layers=4, memory_layers=(1, 3)))
    random_cores(model.blocks[1].mlp, rank_one=False)
    idx = torch.randint(0, 8192, (1, 16))
    model.train()(idx)
    parts = [model.blocks[i].mlp.aux_loss for i in (1, 3)]
    assert parts[0].item() > 0 and parts[1].item() == 0  # block 3 starts rank one: C = e₁e₁ᵀ
    assert torch.equal(model.blocks[3].mlp.cores(), torch.eye(2)[:, :1].mul(torch.eye(2)[:1]).expand(4, 2, 2))
    torch.testing.assert_close(model.aux_loss(), parts[0] + parts[1])
