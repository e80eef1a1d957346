"""Sweep architectures and schedules with Ray Tune: one Ray Train pretraining run per trial, ASHA
stopping bad trials early, MLflow parent/child runs, the best trial's model registered.

    python -m jobs.sweep sweeps/lr-attention.yaml                 # or --config sweeps/lr-attention.yaml
    python -m jobs.sweep sweeps/lr-attention.yaml --num_samples=8 --train.steps=400
    ray job submit --working-dir . -- python jobs/sweep.py sweeps/lr-attention.yaml
Options after the file: dotted sweep options (num_samples, searcher, scheduler.grace_period,
resources.num_workers, name, resume, ...; listed below) and dotted run-config keys (train.*,
tracking.*, storage.*, ray.*, ...; see `python -m jobs.pretrain --help`) that go over the sweep's
base config. Run it again after an interruption (driver killed, cluster restarted): the sweep
continues where it stopped (Tuner.restore).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from generalmodel.cli import clean_exit, exit_on_help, setup_logging, split_args
from generalmodel.cluster import ray_session, refuse_ephemeral_paths
from generalmodel.config import dump_config
from generalmodel.tracking import check_reachable, tracking_uri
from generalmodel.tune import SweepResult, run_sweep
from generalmodel.tune.spec import Sweep, SweepError, load_sweep

POSITIONAL = ("config",)  # the sweep file


def main(sweep_file: str, overrides: dict[str, Any] | None = None) -> SweepResult:
    sweep, base = load_sweep(sweep_file, overrides)
    refuse_ephemeral_paths(base)
    check_reachable(tracking_uri(base))
    with ray_session(base.ray):
        result = run_sweep(sweep, base, Path(sweep_file).read_text())
    print(f"\nsweep {sweep.name!r}: trials ranked by {sweep.metric} ({sweep.mode})\n")
    print(result.markdown)
    print(f"best model: {result.best_model_uri}")
    print(
        f"MLflow: open experiment {base.tracking.experiment!r} at {tracking_uri(base)} (for a sqlite store: "
        f"`mlflow ui --backend-store-uri {tracking_uri(base)}`), expand run {sweep.name!r} "
        f"(id {result.parent_run_id}) for its trials; the comparison is in its artifacts "
        f"({sweep.metric}_curves.png, trials.md)."
    )
    print(f"Tune state and trial checkpoints: {result.experiment_dir}")
    return result


def cli(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    exit_on_help(argv, Sweep, __doc__, POSITIONAL)
    with clean_exit():
        line = split_args(argv, POSITIONAL)
        if line.preset is None:
            raise SweepError("name the sweep file: python -m jobs.sweep sweeps/NAME.yaml [--option=value ...]")
        if line.print_config:
            sweep, base = load_sweep(line.preset, line.overrides)
            print(yaml.safe_dump({"sweep": sweep.model_dump(mode="json"), "base": dump_config(base)}, sort_keys=False))
            raise SystemExit(0)
        main(line.preset, line.overrides)


if __name__ == "__main__":
    cli()
