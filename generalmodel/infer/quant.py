"""Post-training quantization of a loaded model with torchao (`--quant`).

Quantized: the attention and dense-MLP projections of every block (and the head when it is not
tied to the embedding). Kept in their dtype: the embedding, norms, the MoE router and the MoE
experts' stacked 3-D weights (torchao quantizes nn.Linear layers).

    none          the model as trained
    int8-weight   int8 weights, per channel; activations in the model dtype   (CPU and GPU)
    int8-dynamic  int8 weights and per-token dynamically quantized int8 activations (CPU and GPU)
    fp8-weight    float8 e4m3 weights                          (a CUDA card of compute capability ≥ 8.9)
    fp8-dynamic   float8 weights and activations, per row      (a CUDA card of compute capability ≥ 8.9)
    int4-weight   int4 weights in groups of 128 (tinygemm), bf16 activations (a CUDA card)

What each costs in quality is measured by `benchmarks/decode.py` (val loss and bits per byte on a
held-out split beside the speed).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from generalmodel import UserError

QUANT_KINDS = ("none", "int8-weight", "int8-dynamic", "fp8-weight", "fp8-dynamic", "int4-weight")
Quant = Literal["none", "int8-weight", "int8-dynamic", "fp8-weight", "fp8-dynamic", "int4-weight"]
INT4_GROUP = 128


def check_quant(kind: str, device: torch.device | str) -> None:
    """A UserError naming what is missing when `kind` cannot run on `device`."""
    device = torch.device(device)
    if kind not in QUANT_KINDS:
        raise UserError(f"unknown quantization {kind!r}; expected one of {', '.join(QUANT_KINDS)}")
    if kind.startswith("fp8") or kind == "int4-weight":
        if device.type != "cuda":
            raise UserError(
                f"--quant={kind} needs a CUDA card (torchao's {kind.split('-')[0]} kernels); on {device.type} "
                "use int8-weight or int8-dynamic"
            )
        if kind.startswith("fp8") and torch.cuda.get_device_capability(device) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise UserError(f"--quant={kind} needs compute capability 8.9 or newer (Ada, Hopper); {name} has less")


def _config(kind: str):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {
        "int8-weight": lambda: Int8WeightOnlyConfig(),
        "int8-dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
        "fp8-weight": lambda: Float8WeightOnlyConfig(),
        "fp8-dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "int4-weight": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP),
    }[kind]()


def quantizable(model: nn.Module):
    """torchao's filter: the blocks' nn.Linear layers (a shared-layer model's: its units') but the
    expert selections (MoE's router, SwitchHead's); an untied head."""
    tied = getattr(model.cfg, "tie_embeddings", False)

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if fqn == "head":
            return not tied
        return fqn.startswith(("blocks.", "units.")) and not fqn.endswith((".router", ".v_select", ".o_select"))

    return keep


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Quantize `model` in place (on the device it is on) and return it."""
    device = model.embed.weight.device
    check_quant(kind, device)
    if kind == "none":
        return model
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise UserError(f"--quant={kind} needs torchao: pip install torchao (or pip install -e '.[gpu]')") from None
    if kind == "int4-weight":
        if model.embed.weight.dtype != torch.bfloat16:
            model.to(torch.bfloat16)  # tinygemm's int4 kernel takes bf16 activations
        keep = quantizable(model)
        bad = [n for n, m in model.named_modules() if keep(m, n) and m.in_features % INT4_GROUP]
        if bad:
            raise UserError(
                f"--quant=int4-weight groups input features by {INT4_GROUP}; these layers have a number of "
                f"input features it does not divide: {bad}"
            )
    quantize_(model, _config(kind), filter_fn=quantizable(model))
    return model
