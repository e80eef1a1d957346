"""PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards"): dense per-token rewards
from an implicit process reward model that learns from the outcome labels alone (rl.prime).

The PRM π_φ is a language model — a copy of the starting model, trained beside the policy — and the
frozen starting model is its reference π_ref. Its reward for token t of a completion y is

        r_t = β · (log π_φ(y_t | y_<t) − log π_ref(y_t | y_<t))            (β: rl.prime_beta)

and the completion's summed reward, read as a logit, learns the outcome o (the first verifier's
score, 1 solved, 0 not; clamped to [0, 1]) by cross-entropy:

        L_φ = BCE(σ(Σ_t r_t), o)

so the per-token rewards are those of a process reward model no step-level label ever taught
(the paper's result: a PRM trained this way is an implicit one). Each RL step first updates π_φ
on the step's rollouts, then scores them with the updated model. The process advantage of token t of
completion i is its return-to-go (γ = 1) of rewards centred on the group's other completions:

        A^p_t = Σ_{s ≥ t} (r_s^i − b^i),    b^i = mean over j ≠ i of (mean_s r_s^j)     (leave-one-out)

and it is added, × rl.prime_weight, to the outcome advantage every token of the completion has
(the group advantage of the run without PRIME; the paper's RLOO equals the rl.scale_rewards=false
one up to G/(G−1)). The PRM and its optimizer are checkpointed with the policy (exact resume); the
registered model is the policy alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generalmodel.config import Config
from generalmodel.post.rl.grpo import token_logprobs
from generalmodel.train.core import Dist, Init, sum_across_ranks, trained_copy
from generalmodel.train.step import NonFiniteGuard, optimizer_step


def implicit_prm(cfg: Config, env: Dist, init: Init) -> tuple:
    """The PRM and its optimizer (at rl.prime_lr, default optim.lr): a companion of the training run."""
    return trained_copy(cfg, env, init, cfg.rl.prime_lr or cfg.optim.lr)


def sequence_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(rows,) sums over each row's masked positions of `values` given at those positions only."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def process_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, T) per-token process rewards (0 off the mask), rows grouped by consecutive
    `group_size` -> (rows, T) return-to-go of the leave-one-out-centred rewards (module doc)."""
    mask = mask.float()
    means = rewards.sum(1) / mask.sum(1).clamp(min=1)  # each completion's mean reward per token
    groups = means.view(-1, group_size)
    baseline = ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).reshape(-1, 1)
    centred = (rewards - baseline) * mask
    return centred.flip(1).cumsum(1).flip(1) * mask


class ImplicitPRM:
    """The PRM's step on the learner: update on the step's outcomes, then per-token process advantages."""

    def __init__(self, cfg: Config, env: Dist, prm, optimizer, autocast):
        self.rl, self.grad_clip, self.env = cfg.rl, cfg.optim.grad_clip, env
        self.prm, self.optimizer, self.autocast = prm, optimizer, autocast
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps, env.device)

    def rewards(self, chunk: dict[str, torch.Tensor]) -> torch.Tensor:
        """β · (log π_φ − log π_ref) at the chunk's completion tokens (flat, the mask's order)."""
        keep = chunk["mask"]
        with self.autocast:
            logits = self.prm(chunk["inputs"], keep=keep)
        logp = token_logprobs(logits, chunk["targets"][keep], self.rl.temperature)
        return self.rl.prime_beta * (logp - chunk["ref_logp"][keep])

    def step(self, chunks: list[dict[str, torch.Tensor]], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """One PRM update on this rank's rollouts (the chunks carry the reference's log-probs; the
        loss is averaged over every rank's completions), then (the rows' process advantages, (rows,
        T) like the mask; the PRM's loss and accuracy before its update, over all ranks)."""
        rows = sum_across_ranks(torch.tensor(float(sum(c["mask"].shape[0] for c in chunks)), device=self.env.device))
        sums = torch.zeros(2, device=self.env.device)
        for chunk in chunks:
            logit = sequence_sums(self.rewards(chunk), chunk["mask"])
            loss = F.binary_cross_entropy_with_logits(logit, chunk["outcomes"], reduction="sum")
            (loss * self.env.world_size / rows).backward()
            right = ((logit.detach() > 0) == (chunk["outcomes"] > 0.5)).float().sum()
            sums += torch.stack([loss.detach(), right])
        sums = sum_across_ranks(sums)
        optimizer_step(self.prm, self.optimizer, sums[0], self.grad_clip, self.guard, step)
        dense = []
        with torch.no_grad():
            for chunk in chunks:
                dense.append(torch.zeros(chunk["mask"].shape, device=self.env.device))
                dense[-1][chunk["mask"]] = self.rewards(chunk).float()
        mask = torch.cat([c["mask"] for c in chunks])  # whole groups: a chunk may split one
        loss, right = (sums / rows).tolist()
        # RL reads the host every step anyway: a skipped PRM update warns, too many in a row raise
        metrics = {"prm_loss": loss, "prm_accuracy": right, "prm_skipped_steps": self.guard.read()}
        return process_advantages(torch.cat(dense), mask, self.rl.group_size), metrics
