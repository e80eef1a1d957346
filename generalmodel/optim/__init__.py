"""Optimizers (`adamw`) and learning-rate schedules (`schedules`)."""

from generalmodel.optim.adamw import build_optimizer
from generalmodel.optim.schedules import lr_multiplier

__all__ = ["build_optimizer", "lr_multiplier"]
