"""fp8 on CPU: which linears the filter converts (on shapes, and through torchao's real
convert_to_float8_training), and the clear errors where fp8 cannot run. Throughput and loss
parity need a card: benchmarks/gpu_train.py --fp8."""

import sys

import pytest
import torch
from torch import nn

from generalmodel.config import ConfigError, load_config
from generalmodel.train.fp8 import Fp8Error, check_supported, convert, fp8_linears, module_filter
from models import build_model
from models.llama import LlamaConfig


@pytest.mark.parametrize(
    "shape, min_dim, expected",
    [
        ((4096, 4096), 2048, True),
        ((4096, 11008), 2048, True),
        ((768, 3072), 2048, False),  # a 124M model's linears: too small to gain
        ((768, 3072), 512, True),
        ((4096, 4100), 2048, False),  # not a multiple of 16
        ((4104, 4096), 2048, False),
        ((2048, 2048), 2048, True),
    ],
)
def test_filter_on_shapes(shape, min_dim, expected):
    assert module_filter(min_dim)(nn.Linear(*shape, bias=False), "blocks.0.mlp.up") is expected


def test_filter_never_converts_head_routers_or_non_linears():
    keep = module_filter(16)
    assert not keep(nn.Linear(4096, 50304, bias=False), "head")
    assert not keep(nn.Linear(4096, 64, bias=False), "blocks.3.mlp.router")
    assert not keep(nn.Embedding(50304, 4096), "embed")
    assert not keep(nn.LayerNorm(4096), "blocks.0.norm1")


def small_moe():
    return build_model(
        LlamaConfig(
            vocab_size=512,
            max_seq_len=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_model=256,
            moe_experts=4,
            moe_top_k=2,
            moe_first_dense=1,
            tie_embeddings=False,
        )
    )


def test_filter_on_a_model():
    names = fp8_linears(small_moe(), min_dim=256)
    assert names and all(n.startswith("blocks.") for n in names)
    assert not any(n.endswith(("head", "router")) for n in names)
    assert any(n.endswith("q_proj") for n in names) and any(n.endswith("out_proj") for n in names)
    assert fp8_linears(small_moe(), min_dim=4096) == []


def test_torchao_converts_exactly_the_filtered_linears():
    pytest.importorskip("torchao.float8")  # the `gpu` extra; `make install` installs it
    from torchao.float8.float8_linear import Float8Linear

    for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
        model = small_moe()
        names = convert(model, recipe, min_dim=256, fsdp=False)
        converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
        assert converted == names, recipe
        assert isinstance(model.head, nn.Linear) and not isinstance(model.head, Float8Linear)
        moe = model.blocks[1].mlp
        assert type(moe.router) is nn.Linear and moe.experts.w_up.dim() == 3  # experts: bf16 grouped GEMM


def test_fp8_needs_cuda_and_torchao(monkeypatch):
    with pytest.raises(ConfigError, match="fp8='tensorwise' needs a CUDA GPU.*device is 'cpu'"):
        load_config(overrides={"train.fp8": "tensorwise", "train.device": "cpu"})
    with pytest.raises(ConfigError, match="train.fp8 = 'fp4'"):
        load_config(overrides={"train.fp8": "fp4"})
    with pytest.raises(Fp8Error, match="fp8='rowwise' needs a CUDA GPU.*this run is on cpu"):
        check_supported("rowwise", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "torchao", None)  # as on a machine without the `gpu` extra
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(Fp8Error, match=r"needs torchao: pip install -e '.\[gpu\]'"):
        check_supported("tensorwise", torch.device("cpu"))


def test_the_loop_refuses_fp8_on_cpu(tmp_path):
    """device=auto on a machine without CUDA: the loop says so before building anything."""
    from generalmodel.train.loop import train

    cfg = load_config(
        overrides={"train.fp8": "tensorwise", "storage.root": str(tmp_path), "train.dataset": str(tmp_path / "none")}
    )
    with pytest.raises(Fp8Error, match="needs a CUDA GPU"):
        train(cfg)


def test_old_boolean_forms_still_parse():
    cfg = load_config(overrides={"train.compile": True, "train.activation_checkpointing": True})
    assert cfg.train.compile == "regional" and cfg.train.activation_checkpointing == "full"
    assert load_config(overrides={"train.compile": False}).train.compile == "none"
