"""Singular-value fine-tuning (SVF; Transformer², arXiv 2501.06252): a frozen weight W = U·diag(s)·Vᵀ
is adapted by a trained vector z that scales its singular values, W' = U·diag(s·z)·Vᵀ. One vector per
adapted matrix (min(in, out) numbers) is the whole adapter, and z = 1 is the base model.

    names = attach(model, ["blocks.*"])   # every nn.Linear under blocks: SVF; everything else frozen
    vectors(model.state_dict())           # {"blocks.0.attn.wq": z, ...}: what an adapter stores
    merge(base_state, vectors)            # the base's state dict with W' in place of each W
    merged(model.state_dict())            # the same from an SVF model's own state (its U, s, Vᵀ)

The layer computes W' as W + U·diag(s·(z − 1))·Vᵀ, so z = 1 gives W bit for bit and the base
weight keeps its name (`NAME.weight`), its dtype and its place in every state dict; U, s, Vᵀ are
frozen parameters beside it (sharded by FSDP2 like the weight), z the only trained one. The
decomposition is fp32 and made where the layer is attached (each rank the same: same weight,
same routine); `merge` decomposes the base weight again, so an adapter needs only its vectors.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn


def decompose(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, s, Vᵀ) of a weight, fp32 and contiguous (FSDP2 shards only contiguous tensors)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return u.contiguous(), s, vh.contiguous()


def scaled(weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """W + U·diag(s·(z − 1))·Vᵀ: `weight` (= U·diag(s)·Vᵀ) with its singular values scaled by z, in
    its own dtype; exactly `weight` where z = 1."""
    return weight + ((u * (s * (z.to(s.dtype) - 1))) @ vh).to(weight.dtype)


UNADAPTABLE = frozenset({"head"})  # the decoder's loss and logits read head.weight directly


class SVFLinear(nn.Linear):
    """An nn.Linear whose frozen weight is adapted by singular-value scales `z` (see the module doc)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a weight of its own
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        u, s, vh = decompose(linear.weight.detach())
        self.u = nn.Parameter(u, requires_grad=False)
        self.s = nn.Parameter(s, requires_grad=False)
        self.vh = nn.Parameter(vh, requires_grad=False)
        self.z = nn.Parameter(torch.ones_like(s))

    def adapted_weight(self) -> torch.Tensor:
        return scaled(self.weight, self.u, self.s, self.vh, self.z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.adapted_weight(), self.bias)


def attach(model: nn.Module, patterns: list[str]) -> list[str]:
    """Replace every nn.Linear of `model` (but the head) whose name matches one of the fnmatch
    `patterns` by an SVFLinear of it, and freeze every other parameter: the vectors z are all that trains. Returns
    the adapted modules' names; a ValueError when no linear matches."""
    linears = [name for name, module in model.named_modules() if type(module) is nn.Linear and name not in UNADAPTABLE]
    names = [name for name in linears if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    if not names:
        raise ValueError(
            f"no linear layer matches {patterns} (the model's: {', '.join(linears[:6])}, ...; not the head: the "
            "loss reads its weight, not its forward)"
        )
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, SVFLinear(getattr(owner, leaf)))
    return names


def vectors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter in a state dict of an SVF model: module name -> its z."""
    return {key.removesuffix(".z"): v for key, v in state.items() if key.endswith(".z") and key[:-2] + ".u" in state}


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of an SVF model without the SVF parameters: the base's keys and weights."""
    adapted = vectors(state)
    extra = {f"{name}.{p}" for name in adapted for p in ("u", "s", "vh", "z")}
    return {key: v for key, v in state.items() if key not in extra}


def merged(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of an SVF model as the plain model's: each adapted weight replaced by the
    layer's forward weight (its own U, s, Vᵀ, z), the SVF parameters dropped — what a model
    without the layers (an RL rollout's) loads."""
    plain = base_state(state)
    for name, z in vectors(state).items():
        plain[f"{name}.weight"] = scaled(*(state[f"{name}.{p}"] for p in ("weight", "u", "s", "vh")), z)
    return plain


def merge(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a base's full state dict) with each adapted weight replaced by W + U·diag(s·(z−1))·Vᵀ,
    the SVFLinear's forward weight. A ValueError naming the module when a vector does not fit."""
    merged = dict(state)
    for name, z in adapter.items():
        weight = state.get(f"{name}.weight")
        if weight is None or weight.dim() != 2:
            raise ValueError(f"the adapter scales {name!r}, which is not a matrix of the base model")
        if z.shape != (min(weight.shape),):
            raise ValueError(
                f"the adapter's vector for {name!r} has shape {tuple(z.shape)}; its {tuple(weight.shape)} weight has "
                f"{min(weight.shape)} singular values"
            )
        merged[f"{name}.weight"] = scaled(weight, *decompose(weight), z)
    return merged
