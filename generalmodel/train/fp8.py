"""fp8 training with torchao's Float8Linear: which linears convert, the recipe's config, and the
once-per-step scale precompute for fp8 all-gather under FSDP2.

Applied to the built model before FSDP2 wrapping and compile (torchao's required order). Converted:
nn.Linear layers whose in and out features are both multiples of 16 and at least
`train.fp8_min_dim`: below that the casts cost more than the fp8 GEMM saves (torchao tensorwise
on every linear of a 124M model runs at 0.92x bf16 on an H200). Never converted: the output head
(its logits feed the loss at full precision) and MoE routers (tiny, and their scores pick experts).
MoE experts are 3-D parameters run by grouped GEMMs, not nn.Linear: they stay bf16 (torchao's fp8
grouped GEMM for training is a prototype), which the run's params state (fp8.experts).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from generalmodel import UserError

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# Module names (last fqn part) kept in bf16 whatever their size: the head, and the expert selections
# (MoE's router, SwitchHead's value/output selections), whose top-k a rounding can flip.
NEVER = ("head", "router", "v_select", "o_select")


class Fp8Error(UserError):
    """fp8 asked for where it cannot run."""


def module_filter(min_dim: int) -> Callable[[nn.Module, str], bool]:
    """torchao's module_filter_fn: True for the linears to run in fp8."""

    def convert(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or fqn.rsplit(".", 1)[-1] in NEVER:
            return False
        i, o = module.in_features, module.out_features
        return i % 16 == 0 and o % 16 == 0 and min(i, o) >= min_dim

    return convert


def fp8_linears(model: nn.Module, min_dim: int) -> list[str]:
    """The names of the linears `module_filter` converts."""
    keep = module_filter(min_dim)
    return [name for name, m in model.named_modules() if keep(m, name)]


def check_supported(recipe: str, device: torch.device) -> None:
    """A clear error instead of a silent bf16 run: torchao missing, CPU, or a card without fp8."""
    if recipe not in RECIPES:
        raise Fp8Error(f"train.fp8={recipe!r}: recipes are none, {', '.join(RECIPES)}")
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise Fp8Error(f"train.fp8={recipe!r} needs torchao: pip install -e '.[gpu]'") from None
    if device.type != "cuda":
        raise Fp8Error(
            f"train.fp8={recipe!r} needs a CUDA GPU with fp8 tensor cores (H100/H200/L4/...); "
            f"this run is on {device.type} (use --train.fp8=none)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise Fp8Error(
            f"train.fp8={recipe!r}: {torch.cuda.get_device_name(device)} (compute capability "
            f"{major}.{minor}) has no fp8 tensor cores; they start at 8.9 (L4, H100)"
        )


def convert(model: nn.Module, recipe: str, min_dim: int, fsdp: bool) -> list[str]:
    """Swap the chosen linears for Float8Linear; returns their names. With tensorwise scaling and
    FSDP2, weights are all-gathered in fp8 (half the bytes of bf16)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)
    else:
        config = Float8LinearConfig.from_recipe_name(recipe)
    names = fp8_linears(model, min_dim)
    convert_to_float8_training(model, config=config, module_filter_fn=module_filter(min_dim))
    return names


def scale_precompute(model: nn.Module, recipe: str, fsdp: bool) -> Callable[[], None]:
    """What to call after each optimizer step: with fp8 all-gather, one batched amax/scale
    computation for all weights instead of one per weight inside the next forward."""
    if recipe != "tensorwise" or not fsdp:
        return lambda: None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    return lambda: precompute_float8_dynamic_scale_for_fsdp(model)
