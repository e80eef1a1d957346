"""Opt-in (`make test-ui`, needs Debian's chromium): a tiny sweep, then the MLflow UI in headless
Chromium. The experiment page must list the sweep's parent run and its child runs, and the parent's
artifacts page the comparison; screenshots land in $GM_UI_OUT (default: a tmp dir) for a person."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, running_mlflow, write_corpus

pytestmark = pytest.mark.skipif(
    not os.environ.get("GM_UI_TEST") or shutil.which("chromium") is None,
    reason="opt-in: GM_UI_TEST=1 and Debian's chromium (make test-ui)",
)

SWEEP = """
base:
  overrides: {data.vocab_size: 320, data.seq_len: 32, data.val_fraction: 0.1, model.vocab_size: 320,
              model.max_seq_len: 32, model.n_layers: 2, model.n_heads: 2, model.d_model: 32, train.steps: 16,
              train.batch_size: 4, train.log_every: 2, train.eval_every: 4, train.eval_batches: 2,
              optim.warmup_steps: 2, tracking.registered_model: ui-sweep}
search:
  optim.lr: {grid: [0.01, 0.00001]}
scheduler: {kind: asha, grace_period: 4}
resources: {num_workers: 1, cpus_per_worker: 0.9}
"""


def chromium(url: str, *, screenshot: Path | None = None) -> str:
    args = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--run-all-compositor-stages-before-draw",
        "--virtual-time-budget=60000",
        "--window-size=1600,1000",
    ]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=180)
    return out.stdout


@pytest.fixture
def mlflow_ui(tmp_path):
    with running_mlflow(tmp_path, str(tmp_path / "artifacts")) as uri:
        yield uri


def test_mlflow_ui_shows_parent_children_and_comparison(mlflow_ui, tmp_path):
    from mlflow.tracking import MlflowClient

    corpus = write_corpus(tmp_path / "corpus", 60, seed=5)
    sweep = tmp_path / "ui-sweep.yaml"
    sweep.write_text(SWEEP)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.sweep",
            str(sweep),
            f"--data.source={corpus}",
            f"--storage.root={tmp_path / 'store'}",
            f"--tracking.uri={mlflow_ui}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    client = MlflowClient(mlflow_ui)
    experiment = client.get_experiment_by_name("generalmodel")
    (parent,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'ui-sweep'")
    kids = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    shots = Path(os.environ.get("GM_UI_OUT") or tmp_path)
    runs_page = f"{mlflow_ui}/#/experiments/{experiment.experiment_id}"
    # MLflow 3.17 opens an experiment on its GenAI overview; the run list is under /runs, where the
    # parent has an expander over its children.
    dom = chromium(f"{runs_page}/runs")
    import re

    text = re.sub(r"<[^>]+>", " ", dom)
    assert "ui-sweep" in text and re.search(rf"{1 + len(kids)}\s+matching runs", text), text[-3000:]
    chromium(f"{runs_page}/runs", screenshot=shots / "mlflow-runs.png")
    parent_page = f"{runs_page}/runs/{parent.info.run_id}"
    dom = chromium(parent_page)
    assert all(k.info.run_name in dom for k in kids), dom[-2000:]  # the parent's page lists its children
    chromium(parent_page, screenshot=shots / "mlflow-parent.png")
    artifacts_page = f"{parent_page}/artifacts/val_loss_curves.png"
    dom = chromium(artifacts_page)
    assert "trials.md" in dom and "val_loss_curves.png" in dom, dom[-2000:]
    chromium(artifacts_page, screenshot=shots / "mlflow-comparison.png")
    print(f"screenshots in {shots}")
