"""MLflow for a sweep: one parent run (search space, searcher, scheduler, then the comparison and
the best config) and one child run per trial (its config, per-step metrics, stop reason).

A restored sweep finds its parent by the sweep's storage location, and each trial its child by
the trial id, so an interrupted sweep continues the same runs instead of starting new ones."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml

from generalmodel.config import Config, dump_config

log = logging.getLogger(__name__)

SWEEP_DIR_TAG = "generalmodel.sweep_dir"
TRIAL_TAG = "generalmodel.trial_id"
STOP_TAG = "stop_reason"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _find(client, experiment_id: str, filter_string: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def open_parent_run(
    uri: str,
    experiment_id: str,
    name: str,
    sweep_dir: str,
    params: dict[str, Any],
    spec_yaml: str,
    base: Config,
    restoring: bool,
) -> tuple[str, bool]:
    """The sweep's parent run: (run id, whether it is the earlier run of a sweep being restored)."""
    from mlflow.entities import Param

    client = _client(uri)
    found = restoring and _find(
        client, experiment_id, f"tags.`{SWEEP_DIR_TAG}` = '{sweep_dir}' and tags.`mlflow.parentRunId` IS NULL"
    )
    if found:
        client.update_run(found, status="RUNNING")
        return found, True
    run = client.create_run(experiment_id, run_name=name, tags={SWEEP_DIR_TAG: sweep_dir, "generalmodel.sweep": name})
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
    client.log_text(run_id, spec_yaml, "sweep.yaml")
    client.log_text(run_id, yaml.safe_dump(dump_config(base), sort_keys=False), "base_config.yaml")
    return run_id, False


def open_child_run(uri: str, parent_run_id: str, trial_id: str, trial_name: str) -> tuple[str, bool]:
    """A trial's run, nested under the parent: (run id, whether it existed: a resumed trial)."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    found = _find(
        client,
        parent.info.experiment_id,
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    if found:
        client.update_run(found, status="RUNNING")
        return found, True
    run = client.create_run(
        parent.info.experiment_id, run_name=trial_name, tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id}
    )
    return run.info.run_id, False


def close_run(uri: str, run_id: str, status: str, stop_reason: str) -> None:
    client = _client(uri)
    client.set_tag(run_id, STOP_TAG, stop_reason)
    client.set_terminated(run_id, status=status)


@dataclass
class TrialRow:
    """One trial in the comparison."""

    trial_id: str
    run_id: str | None
    params: dict[str, Any]
    status: str  # completed | early-stopped | failed | pending
    stop_reason: str
    last_step: int | None = None
    metric_last: float | None = None
    metric_best: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)


def rank(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Completed trials by their final metric, then early-stopped ones by their last value (they
    stopped at an earlier step), then the rest."""
    order = {"completed": 0, "early-stopped": 1}
    sign = 1 if mode == "min" else -1

    def key(row: TrialRow):
        value = row.metric_last if row.metric_last is not None else float("inf") * sign
        return order.get(row.status, 2), sign * value

    return sorted(rows, key=key)


def table(rows: list[TrialRow], metric: str) -> tuple[str, str]:
    """The ranked trials as (CSV, markdown)."""
    keys = sorted({k for row in rows for k in row.params})
    header = [
        "rank",
        "trial",
        "status",
        "steps",
        f"{metric} (last)",
        f"{metric} (best)",
        *keys,
        "stop_reason",
        "mlflow_run",
    ]
    lines = []
    for i, row in enumerate(rows, 1):
        lines.append(
            [
                i,
                row.trial_id,
                row.status,
                row.last_step if row.last_step is not None else "",
                _fmt(row.metric_last),
                _fmt(row.metric_best),
                *[_fmt(row.params.get(k)) for k in keys],
                row.stop_reason,
                row.run_id or "",
            ]
        )
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(lines)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return buf.getvalue(), "\n".join(md) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def curves(uri: str, rows: list[TrialRow], metric: str) -> None:
    """Fill each row's metric history from its child run."""
    client = _client(uri)
    for row in rows:
        if row.run_id:
            row.curve = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, metric))


def log_comparison(uri: str, parent_run_id: str, rows: list[TrialRow], metric: str, title: str) -> None:
    """On the parent run: every trial's metric curve in one figure, and the ranked table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = _client(uri)
    fig, ax = plt.subplots(figsize=(9, 5))
    for row in rows:
        if not row.curve:
            continue
        style = {"completed": "-", "early-stopped": "--"}.get(row.status, ":")
        label = f"{row.trial_id} ({row.status}) " + ", ".join(
            f"{k.split('.')[-1]}={_fmt(v)}" for k, v in row.params.items()
        )
        ax.plot([s for s, _ in row.curve], [v for _, v in row.curve], style, marker="o", markersize=3, label=label)
    ax.set(xlabel="step", ylabel=metric, title=f"{title}: {metric} per trial (dashed: stopped early)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    client.log_figure(parent_run_id, fig, f"{metric}_curves.png")
    plt.close(fig)
    csv_text, md_text = table(rows, metric)
    client.log_text(parent_run_id, csv_text, "trials.csv")
    client.log_text(parent_run_id, md_text, "trials.md")
