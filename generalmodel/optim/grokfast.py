"""Grokfast (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow Gradients", arXiv
2405.20233), the EMA filter: the slow component of each parameter's gradient, an exponential moving
average, is added back amplified before the optimizer uses it —

    h ← α·h + (1 − α)·g      (h starts at 0)
    g ← g + λ·h

— on top of AdamW or Muon (optim.grad_filter: ema; α = optim.grad_filter_alpha, λ =
optim.grad_filter_lambda). It is attached to the optimizer as step hooks, so every loop that steps
an optimizer gets it, after the gradient norm is measured and clipped (the norm and the
non-finite check see the gradient itself). h lives in the optimizer's per-parameter state
(`grokfast_ema`, sharded like the parameter under FSDP2), so checkpoints save it and a resumed run
continues exactly. A step the training loop skips (`optimizer.found_inf`) leaves h as it was,
without a host sync.
"""

from __future__ import annotations

import torch

KEY = "grokfast_ema"


def attach_grokfast(optimizer: torch.optim.Optimizer, alpha: float, lamb: float) -> None:
    """Amplify the slow gradients of every parameter `optimizer` steps (see the module doc)."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def amplify(opt, args, kwargs) -> None:
        pending.clear()
        found_inf = getattr(opt, "found_inf", None)
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                old = opt.state[p].get(KEY)
                h = (1 - alpha) * p.grad if old is None else torch.lerp(p.grad, old, alpha)
                if found_inf is not None:  # a skipped step keeps h (where() drops a NaN gradient)
                    h = torch.where(found_inf > 0, torch.zeros_like(h) if old is None else old, h)
                p.grad.add_(h, alpha=lamb)
                pending.append((p, h))

    def store(opt, args, kwargs) -> None:
        # After the step: the optimizer's own state exists by now (AdamW and Muon create it on
        # their first step when it is empty, so h must not be there before).
        for p, h in pending:
            opt.state[p][KEY] = h
        pending.clear()

    optimizer.register_step_pre_hook(amplify)
    optimizer.register_step_post_hook(store)
