"""Reinforcement learning with verifiable rewards: GRPO with rollouts on Ray actors (jobs/rl.py)."""

from generalmodel.post.rl.grpo import group_advantages, grpo_loss
from generalmodel.post.rl.learner import rl_train
from generalmodel.post.rl.rewards import Rewards, verifier
from generalmodel.post.rl.rollout import LocalRollouts, RayRollouts, RolloutWorker
from generalmodel.post.rl.tasks import PromptSet, load_prompts

__all__ = [
    "LocalRollouts",
    "PromptSet",
    "RayRollouts",
    "Rewards",
    "RolloutWorker",
    "group_advantages",
    "grpo_loss",
    "load_prompts",
    "rl_train",
    "verifier",
]
