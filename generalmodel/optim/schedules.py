"""Learning-rate schedules as a multiplier of the peak LR: linear warmup, then cosine, WSD
(warmup-stable-decay), linear or constant."""

from __future__ import annotations

import math

from generalmodel.config import OptimConfig


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The LR of optimizer step `step` (0-based) as a fraction of cfg.lr."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - decay_start + 1) / decay_steps
    progress = (step - cfg.warmup_steps + 1) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
