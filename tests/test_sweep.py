"""`jobs/sweep.py` on a real local Ray cluster (`ray start`, dashboard on), with a real MLflow
server and trial checkpoints on the real S3 server: parent and child runs, ASHA stopping trials,
the comparison artifacts, the best model registered; a sweep whose driver is killed continues
with Tuner.restore; bad input fails before any trial starts."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, train_worker_pids, write_corpus

from generalmodel.cluster import cluster_up

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster(s3_server):
    c = cluster_up(workers=0, cpus_per_node=2)
    yield c
    c.down()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("sweep-corpus"), 80, seed=41)


SWEEP = """
base:
  overrides:
    data.vocab_size: 320
    data.seq_len: 32
    data.val_fraction: 0.1
    model.vocab_size: 320
    model.max_seq_len: 32
    model.n_layers: 2
    model.n_heads: 2
    model.d_model: 32
    train.batch_size: 4
    train.log_every: 2
    train.eval_batches: 2
    optim.warmup_steps: 2
    tracking.experiment: sweeps
search:
  optim.lr: {grid: [0.01, 0.00001]}
  model.attention: {grid: [gqa, mla]}
searcher: random
scheduler: {kind: asha, grace_period: 4, reduction_factor: 2}
max_concurrent_trials: 2
resources: {num_workers: 1, cpus_per_worker: 0.9}
"""


def sweep_args(bucket, s3_server, mlflow_server, corpus, **extra):
    args = {
        "data.source": str(corpus),
        "storage.root": f"s3://{bucket}/store",
        "tracking.uri": mlflow_server.uri,
        **s3_server.storage_overrides(),
        **extra,
    }
    return [f"--{k}={v}" for k, v in args.items()]


def run_sweep(cluster, path, args, timeout=600, **popen):
    cmd = [sys.executable, str(REPO / "jobs/sweep.py"), str(path), f"--ray.address={cluster.address}", *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **popen,
    )


def finish(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def children(client, parent):
    return client.search_runs(
        [client.get_run(parent.info.run_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )


def parent_run(client, name):
    experiment = client.get_experiment_by_name("sweeps")
    if experiment is None:  # the sweep has not started tracking yet
        return []
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_sweep_tracks_stops_compares_and_registers(cluster, s3_server, mlflow_server, corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    bucket = s3_server.new_bucket()
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(SWEEP)
    proc = run_sweep(
        cluster,
        path,
        sweep_args(
            bucket,
            s3_server,
            mlflow_server,
            corpus,
            **{
                # 24 steps: a trial ASHA stops at a rung (4, 8, 16) must not reach its end before
                # the stop does (a 16-step trial sometimes finished first on 2 busy CPUs)
                "train.steps": 24,
                "train.eval_every": 4,
                "train.checkpoint_every": 8,
                "tracking.registered_model": "sweep-test",
            },
        ),
    )
    out = finish(proc)
    assert proc.returncode == 0, out[-6000:]
    assert "trials ranked by val_loss" in out and "best model: models:/sweep-test/" in out

    client = MlflowClient(mlflow_server.uri)
    (parent,) = parent_run(client, "tiny-sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.optim.lr"] == "grid[0.01, 1e-05]"
    assert parent.data.params["scheduler.kind"] == "asha"
    kids = children(client, parent)
    assert len(kids) == 4  # one child per trial of the 2x2 grid
    for kid in kids:
        assert kid.data.params["train.steps"] == "24" and kid.data.params["model.attention"] in ("gqa", "mla")
        assert kid.data.tags["stop_reason"]
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "loss")]
        # per-step metrics from the trial's rank 0
        assert steps[:2] == [2, 4], (kid.data.tags["stop_reason"], sorted(kid.data.metrics), out[-4000:])
    reasons = {k.data.tags["stop_reason"] for k in kids}
    stopped = [k for k in kids if k.data.tags["stop_reason"].startswith("stopped by ASHA at step")]
    assert stopped, reasons  # the 1e-5 trials cannot keep up with 1e-2 at the first rung
    assert all(k.info.status == "KILLED" for k in stopped)
    completed = [k for k in kids if k.data.tags["stop_reason"] == "completed"]
    assert completed and all(k.info.status == "FINISHED" for k in completed)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"val_loss_curves.png", "trials.csv", "trials.md", "sweep.yaml", "best_config.yaml"} <= artifacts
    csv_text = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    rows = open(csv_text).read().strip().splitlines()
    assert len(rows) == 5 and rows[1].split(",")[2] == "completed"

    best = parent.data.tags["best_run_id"]
    assert best in {k.info.run_id for k in completed}
    final = {k.info.run_id: client.get_metric_history(k.info.run_id, "val_loss")[-1].value for k in completed}
    assert best == min(final, key=final.get)
    version = parent.data.tags["best_model"].rsplit("/", 1)[1]
    assert client.get_model_version("sweep-test", version).run_id == best
    assert {a.path for a in client.list_artifacts(best, "model")} >= {"model/MLmodel", "model/data"}

    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/sweeps/tiny-sweep/")["Contents"]
    ]
    assert any("/checkpoints/" in k and k.endswith("manifest.json") for k in keys)  # trial checkpoints on S3
    assert any(os.path.basename(k).startswith("experiment_state") for k in keys)  # Tune's state, for restore


def test_a_killed_trial_worker_and_a_killed_driver_continue_from_checkpoints(
    cluster, s3_server, mlflow_server, corpus, tmp_path
):
    """A one-trial sweep: SIGKILL of the trial's Ray Train worker restarts it from its checkpoint
    on S3 (the same child run); then the sweep's driver is killed, and running the same command
    again continues it (Tuner.restore) to the end. Every step is logged, the steps computed twice
    have the same loss both times, and the sweep finishes with the trial's model registered."""
    from mlflow.tracking import MlflowClient

    bucket = s3_server.new_bucket()
    path = tmp_path / "restored.yaml"
    path.write_text(SWEEP.split("search:")[0] + "search:\n  optim.lr: {grid: [0.01]}\nscheduler: {kind: fifo}\n"
                    "resources: {num_workers: 1, cpus_per_worker: 0.9}\n")  # fmt: skip
    args = sweep_args(bucket, s3_server, mlflow_server, corpus, **{
        "train.steps": 140, "train.log_every": 10, "train.eval_every": 50, "train.checkpoint_every": 20,
        "tracking.registered_model": "sweep-restore-test"})  # fmt: skip
    client = MlflowClient(mlflow_server.uri)
    proc = run_sweep(cluster, path, args)

    def wait_until(what, done, timeout_s=300):
        deadline = time.time() + timeout_s
        while not done():
            assert time.time() < deadline and proc.poll() is None, f"{what}:\n" + finish(proc)[-4000:]
            time.sleep(0.2)

    def trial_steps() -> list[int]:
        parents = parent_run(client, "restored")
        kids = children(client, parents[0]) if parents else []
        return [m.step for m in client.get_metric_history(kids[0].info.run_id, "loss")] if kids else []

    def checkpoint_published() -> bool:
        listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/sweeps/restored/checkpoints/")
        return any(o["Key"].endswith("/manifest.json") for o in listed.get("Contents", []))

    wait_until("no trial checkpoint was published", checkpoint_published)
    workers = train_worker_pids()
    assert workers, "no Ray Train worker process found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    killed_at = max(trial_steps(), default=0)
    wait_until("the trial stopped after its worker was killed", lambda: max(trial_steps(), default=0) >= killed_at + 40)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray takes its trials down with it
    proc.wait()

    proc = run_sweep(cluster, path, args)
    out = finish(proc)
    assert proc.returncode == 0, out[-6000:]
    assert "restoring the interrupted sweep" in out and "[continuing]" in out
    (parent,) = parent_run(client, "restored")
    (kid,) = children(client, parent)  # the same child run through both failures, not a second one
    assert kid.info.status == "FINISHED" and kid.data.tags["stop_reason"] == "completed"
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(kid.info.run_id, "loss"):
        losses.setdefault(m.step, []).append(m.value)
    assert sorted(losses) == list(range(10, 141, 10))
    repeated = sorted(step for step, values in losses.items() if len(values) > 1)
    assert repeated and repeated[0] > 20, repeated  # from a checkpoint on S3, never from scratch
    assert all(len(set(values)) == 1 for values in losses.values()), losses  # exact resumes (CPU)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_run_id"] == kid.info.run_id

    proc = run_sweep(cluster, path, [*args, "--optim.lr=0.5"])  # not the sweep it continues
    out = finish(proc, timeout=300)
    assert proc.returncode == 2 and "was started with another base config" in out, out[-3000:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"resources.num_workers": 3},
            "a trial needs 2.71 CPUs (resources: 3 workers x 0.9 CPU + 0.01 for its driver) but the Ray cluster has 2",
        ),
        ({"metric": "val_acc"}, "'val_acc' is never reported by a trial"),
        ({"search.optim.lrate": "{uniform: [0.1, 0.2]}"}, "optim has no 'lrate'"),
    ],
)
def test_bad_sweeps_fail_before_any_trial(cluster, s3_server, mlflow_server, corpus, tmp_path, extra, message):
    path = tmp_path / "bad.yaml"
    path.write_text(SWEEP)
    args = sweep_args(s3_server.new_bucket(), s3_server, mlflow_server, corpus, **{"train.steps": 16, **extra})
    proc = run_sweep(cluster, path, args)
    out = finish(proc, timeout=300)
    assert proc.returncode == 2, out[-3000:]
    assert message in out, out[-3000:]
    assert "Traceback" not in out
