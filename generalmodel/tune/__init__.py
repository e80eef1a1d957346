"""Ray Tune sweeps: sweep files (`spec`) and running them (`runner`)."""

from generalmodel.tune.runner import SweepResult, run_sweep

__all__ = ["SweepResult", "run_sweep"]
