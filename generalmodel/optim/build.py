"""The optimizer of a run (`optim.name`): AdamW for every parameter, or Muon for the hidden matrices
and AdamW for the rest — with parameter groups for the embedding, the head, the matrices and the
vectors, each with its own LR — optionally with Grokfast's gradient filter. `set_lr` applies the
schedule to every group's own peak LR."""

from __future__ import annotations

import torch
from torch import nn

from generalmodel.config import OptimConfig
from generalmodel.optim.grokfast import attach_grokfast
from generalmodel.optim.muon import Muon


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """embed (and learned positions, value embeddings), head (when untied), matrices (the blocks' linear weights and
    MoE expert stacks: Muon's under optim.name=muon), other (everything else: norms, biases, memory
    tables, gates — AdamW; decayed only if 2-D or more). Empty groups are dropped."""
    embed = [model.embed.weight] + ([model.pos_embed.weight] if getattr(model, "pos_embed", None) is not None else [])
    embed += [table.weight for table in getattr(model, "value_embeds", None) or ()]
    head = [] if model.head.weight is model.embed.weight else [model.head.weight]
    embed, head = [p for p in embed if p.requires_grad], [p for p in head if p.requires_grad]
    taken = {id(p) for p in embed + head}
    matrices = []
    for module in model.layer_modules().modules():
        candidates = [module.weight] if isinstance(module, nn.Linear) else []
        candidates += [p for p in module.parameters(recurse=False) if p.dim() == 3]  # MoE expert stacks
        matrices += [p for p in candidates if p.requires_grad and id(p) not in taken]
        taken.update(id(p) for p in candidates)
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    wd, muon = cfg.weight_decay, cfg.name == "muon"

    def group(name, params, lr, weight_decay, is_muon=False):
        return {"name": name, "params": params, "lr": lr, "weight_decay": weight_decay, "muon": is_muon}

    muon_wd = cfg.muon_weight_decay if cfg.muon_weight_decay is not None else wd
    groups = [
        group("embed", embed, cfg.embed_lr or cfg.lr, wd),
        group("head", head, cfg.head_lr or cfg.lr, wd),
        group("matrices", matrices, cfg.muon_lr, muon_wd, True) if muon else group("matrices", matrices, cfg.lr, wd),
        group("decayed", [p for p in other if p.dim() >= 2], cfg.lr, wd),
        group("other", [p for p in other if p.dim() < 2], cfg.lr, 0.0),
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW, over `param_groups`. `fused`: torch's fused AdamW kernel (CPU and CUDA),
    the one that honours `optimizer.found_inf` — the training step's skip without a host sync
    (generalmodel.train.step) needs it. optim.grad_filter=ema: with Grokfast's gradient filter
    (generalmodel.optim.grokfast). optim.embed_head_every=N: `group_every` names the groups the
    training step updates every N steps."""
    optimizer = _optimizer(model, cfg, fused)
    if cfg.embed_head_every > 1:  # generalmodel.train.step holds their gradients in between
        optimizer.group_every = {"embed": cfg.embed_head_every, "head": cfg.embed_head_every}
    if cfg.grad_filter == "ema":
        attach_grokfast(optimizer, cfg.grad_filter_alpha, cfg.grad_filter_lambda)
    return optimizer


def _optimizer(model: nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "muon":
        return Muon(
            groups,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=getattr(torch, cfg.muon_ns_dtype),
            scaling=cfg.muon_scaling,
            orthogonalizer=cfg.muon_orthogonalizer,
            betas=betas,
            eps=cfg.eps,
            fused=fused or None,
        )
    for g in groups:
        del g["muon"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=fused or None)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    """Every group at `multiplier` times its own peak LR (the schedule's value for this step)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier
