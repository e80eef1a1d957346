"""Interpretability on the zoo's own models: named hook points (models/hooks.py), caching and
rewriting activations, the logit lens, direct logit attribution, activation patching, the
entropy and varentropy along a sequence, and the figures `jobs/interp.py` logs to MLflow."""

from generalmodel.interp.analysis import (
    HEADS,
    Attribution,
    LogitLens,
    Patching,
    direct_logit_attribution,
    entropy_along,
    entropy_stats,
    logit_diff,
    logit_lens,
    patch,
)
from generalmodel.interp.hooks import (
    ActivationCache,
    block_point,
    eager_attention,
    hook_names,
    hooked,
    run_with_cache,
    run_with_hooks,
)

__all__ = [
    "HEADS",
    "ActivationCache",
    "Attribution",
    "LogitLens",
    "Patching",
    "block_point",
    "direct_logit_attribution",
    "eager_attention",
    "entropy_along",
    "entropy_stats",
    "hook_names",
    "hooked",
    "logit_diff",
    "logit_lens",
    "patch",
    "run_with_cache",
    "run_with_hooks",
]
