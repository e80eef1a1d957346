"""Evaluation: val loss and bits per byte, multiple-choice tasks, lm-evaluation-harness
(`scoring` on one process, `runner` over Ray tasks and into MLflow, `harness` the lm-eval adapter)."""
