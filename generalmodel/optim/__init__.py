"""Optimizers (`build`: AdamW, or Muon + AdamW, `muon`) and learning-rate schedules (`schedules`)."""

from generalmodel.optim.build import build_optimizer, param_groups, set_lr
from generalmodel.optim.schedules import lr_multiplier

__all__ = ["build_optimizer", "lr_multiplier", "param_groups", "set_lr"]
