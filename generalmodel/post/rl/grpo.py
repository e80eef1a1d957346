"""The GRPO objective (Shao et al. 2024, DeepSeekMath), with the variants practice has settled on.

For a group of G completions o_1..o_G of one prompt with rewards r_i, the advantage of every token
of o_i is the group-normalised reward
        A_i = (r_i − mean(r)) / (std(r) + ε)            (rl.scale_rewards; Dr. GRPO drops the std)
and each completion token t is scored with the clipped importance ratio against the policy that
sampled it (π_old, whose log-probs come with the rollout):
        ρ_t = π(o_t | ·) / π_old(o_t | ·)
        ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε_high) A_i) + β · KL_t
with KL_t the k3 estimator exp(q − p) − (q − p) − 1 of KL(π‖π_ref) (p = log π, q = log π_ref),
present only when β > 0 (TRL's and DAPO's default is β = 0: no reference model at all).

Normalisation (rl.loss_type), over every completion of the step on every rank:
        token     Σ_t ℓ_t / (number of completion tokens)           DAPO; long answers weigh by length
        sequence  mean_i (Σ_{t∈o_i} ℓ_t / |o_i|)                    the GRPO paper; biased to short wrong answers
        dr_grpo   Σ_t ℓ_t / (number of completions · max_new_tokens) Dr. GRPO: no length bias

The loss itself says little: with centred advantages and ρ = 1 (on-policy, first update) it is ~0
by construction, and its gradient is the policy gradient. Watch the reward, the held-out accuracy,
the fraction of groups whose rewards are all equal (they give no gradient), the entropy and the
clip fraction instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generalmodel.config import RlConfig

STATS = ("clip_fraction", "entropy", "approx_kl", "kl")


def group_advantages(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """(groups, G) rewards -> advantages of the same shape (see the module doc)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π of each target under π = softmax(logits / T) (fused: no (…, vocab) log-prob tensor)."""
    flat = (logits.float() / temperature).flatten(0, -2)
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The entropy of π at each position (a statistic: no gradient)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_weights(mask: torch.Tensor, rl: RlConfig) -> torch.Tensor:
    """Each completion token's weight in the loss numerator: 1, or 1/|o_i| for loss_type=sequence."""
    mask = mask.float()
    if rl.loss_type == "sequence":
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return mask


def units(mask: torch.Tensor, rl: RlConfig) -> torch.Tensor:
    """The loss's denominator contributed by these rows (summed over the step's rows and ranks)."""
    if rl.loss_type == "token":
        return mask.float().sum()
    if rl.loss_type == "sequence":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    return torch.tensor(float(mask.shape[0] * rl.max_new_tokens), device=mask.device)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    entropy: torch.Tensor,
    ref_logp: torch.Tensor | None,
    rl: RlConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted *sum* of the per-token losses (the caller divides by the step's units) and
    sums for the statistics (divided by the step's completion tokens). Every argument is one value
    per completion token: its log-prob now and under the sampler, its sequence's advantage, its
    weight (`token_weights`), the policy's entropy there, the reference's log-prob (or None)."""
    high = rl.clip_eps_high if rl.clip_eps_high is not None else rl.clip_eps
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - rl.clip_eps, 1 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and rl.beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + rl.beta * kl
    loss = (per_token * weights).sum()
    with torch.no_grad():
        was_clipped = ((ratio < 1 - rl.clip_eps) & (advantages < 0)) | ((ratio > 1 + high) & (advantages > 0))
        stats = {
            "clip_fraction": was_clipped.float().sum(),
            "entropy": entropy.sum(),
            "approx_kl": (old_logp - logp).sum(),
            "kl": kl.detach().sum(),
        }
    return loss, stats
