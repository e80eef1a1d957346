"""Sweep architectures and schedules with Ray Tune: one Ray Train pretraining run per trial, ASHA
stopping bad trials early, MLflow parent/child runs, the best trial's model registered.

    python jobs/sweep.py sweeps/lr-attention.yaml
    python jobs/sweep.py sweeps/lr-attention.yaml --num_samples=8 --train.steps=400
    ray job submit --working-dir . -- python jobs/sweep.py sweeps/lr-attention.yaml
Options after the file: dotted sweep options (num_samples, searcher, scheduler.grace_period,
resources.num_workers, name, resume, ...) and dotted run-config keys (train.*, tracking.*,
storage.*, ray.*, ...) that go over the sweep's base config. Run it again after an interruption
(driver killed, cluster restarted): the sweep continues where it stopped (Tuner.restore).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from generalmodel.cli import user_errors_exit  # noqa: E402
from generalmodel.cluster import ray_session  # noqa: E402
from generalmodel.config import parse_options  # noqa: E402
from generalmodel.tracking import check_reachable, tracking_uri  # noqa: E402
from generalmodel.tune import SweepResult, run_sweep  # noqa: E402
from generalmodel.tune.spec import load_sweep  # noqa: E402


def main(argv: list[str]) -> SweepResult:
    path, overrides = parse(argv)
    sweep, base = load_sweep(path, overrides)
    check_reachable(tracking_uri(base))
    with ray_session(base.ray):
        result = run_sweep(sweep, base, Path(path).read_text())
    print(f"\nsweep {sweep.name!r}: trials ranked by {sweep.metric} ({sweep.mode})\n")
    print(result.markdown)
    print(f"best model: {result.best_model_uri}")
    print(f"MLflow: open experiment {base.tracking.experiment!r} at {tracking_uri(base)} (for a sqlite store: "
          f"`mlflow ui --backend-store-uri {tracking_uri(base)}`), expand run {sweep.name!r} "
          f"(id {result.parent_run_id}) for its trials; the comparison is in its artifacts "
          f"({sweep.metric}_curves.png, trials.md).")
    print(f"Tune state and trial checkpoints: {result.experiment_dir}")
    return result


def parse(argv: list[str]) -> tuple[str, dict]:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    path = argv[0]
    overrides = parse_options(argv[1:], "use --option=value after the sweep file")
    return path, overrides


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with user_errors_exit():
        main(sys.argv[1:])
