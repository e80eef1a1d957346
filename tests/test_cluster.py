"""A 2-node Ray cluster on this machine (`make cluster-up`'s code): `ray job submit` runs HSDP with
a shard group of train workers on each node and checkpoints on the real S3 server, and resumes
exactly after a train worker is SIGKILLed; an elastic run loses its worker node for good, goes
on with fewer workers (the same global batch and data) and grows back when a node returns."""

import os
import re
import signal
import subprocess
import time

import pytest
from conftest import REPO, TINY_RUN, make_documents, submit_job, train_worker_pids

from generalmodel.cluster import cluster_up

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(s3_server):
    env = {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret,
        # Faster failover than Ray's defaults (docs/reliability.md): the GCS marks a silent node dead
        # after 3 missed 1 s health checks, and Ray Train gives up on a worker group whose placement
        # waits on the lost node after 20 s instead of 60 (then it starts the group that fits).
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
    }
    c = cluster_up(workers=1, cpus_per_node=1, env=env)
    yield c
    c.down()


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = s3_server.new_bucket()
    client = s3_server.client()
    for i, doc in enumerate(make_documents(80, seed=31)):
        client.put_object(Bucket=name, Key=f"corpus/{i:03d}.txt", Body=doc.encode())
    return name


STEPS = 70
# HSDP with the replicate axis across the nodes: 2 workers per node shard a replica.
HSDP = {"ray.num_workers": 4, "ray.cpus_per_worker": 0.5, "parallel.replicate": 2, "parallel.shard": 2,
        "parallel.shard_within_node": "true"}  # fmt: skip
# Elastic: one worker per node; with a node gone the run goes on with one worker, then grows back.
# Bigger batches than the other runs: fewer steps (and checkpoints) while a node starts.
ELASTIC = {"ray.num_workers": 2, "ray.min_workers": 1, "ray.resize_interval_s": 5, "ray.max_failures": 4,
           "train.batch_size": 32}  # fmt: skip


def job_args(bucket, mlflow_uri, run_name, steps=STEPS, **extra):
    args = {
        **TINY_RUN,
        "data.source": f"s3://{bucket}/corpus",
        "train.steps": steps,
        "train.log_every": 5,  # a resume recomputes at least one logged step
        "train.eval_every": steps,
        "train.checkpoint_every": 20,
        "storage.root": f"s3://{bucket}/store",
        "tracking.uri": mlflow_uri,
        "train.run_name": run_name,
        "tracking.registered_model": "cluster-test",
        **extra,
    }
    return [f"--{k}={v}" for k, v in args.items()]


def submit(cluster, args, wait=True):
    return submit_job(cluster, ["python", "jobs/pretrain.py", *args], wait)


def metric_history(mlflow_uri, run_name) -> dict[str, dict[int, list[float]]]:
    """Every value logged for `loss` and `tokens`, by step (a step computed again after a resume has two)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs(
        client.get_experiment_by_name("generalmodel").experiment_id, f"attributes.run_name = '{run_name}'"
    )
    history: dict[str, dict[int, list[float]]] = {}
    for key in ("loss", "tokens"):
        for m in client.get_metric_history(runs[0].info.run_id, key):
            history.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return history


def logged_losses(path) -> list[tuple[int, float]]:
    """(step, loss) of every step a train.metrics_log file holds so far, in order; a line still
    being written is left for the next read."""
    import json

    lines = path.read_text().split("\n")[:-1] if path.exists() else []  # the text after the last newline
    return [(int(row["step"]), row["loss"]) for row in map(json.loads, lines) if "loss" in row]


class Job:
    """A pretraining job submitted without waiting (`ray job submit --no-wait`, as a user would):
    its logs, a wait for a line, a wait for its end — read with the Jobs SDK, not a `ray job`
    process per poll (each one a Python start and a Ray import: seconds of CPU)."""

    def __init__(self, cluster, args):
        out = submit(cluster, args, wait=False)
        assert out.returncode == 0, out.stderr[-2000:]
        self.cluster, self.id = cluster, re.search(r"(raysubmit_\w+)", out.stdout + out.stderr).group(1)
        self.client = cluster.job_client()

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)

    def stop(self) -> None:
        self.client.stop_job(self.id)

    def give_up(self, what):
        (REPO / ".generalmodel").mkdir(exist_ok=True)
        (REPO / f".generalmodel/{self.id}.log").write_text(self.logs())
        pytest.fail(f"{what}; the job's log is in .generalmodel/{self.id}.log")

    def wait_for(self, text, timeout_s=300, after=0):
        """Wait until the job prints `text` (past the first `after` characters of its log)."""
        deadline = time.time() + timeout_s
        while text not in self.logs()[after:]:
            if time.time() > deadline:
                self.give_up(f"the job never printed {text!r}")
            time.sleep(1)

    def wait_for_end(self, timeout_s=240) -> str:
        deadline = time.time() + timeout_s
        while True:
            status = self.client.get_job_status(self.id)
            if status.is_terminal():
                return status.value.lower()  # succeeded, failed, stopped
            if time.time() > deadline:
                self.give_up(f"the job did not finish (status {status.value})")
            time.sleep(1)

    def resumes(self, after=0) -> list[int]:
        """The checkpoint step of every resume in the job's log (past its first `after` characters), in order."""
        text = self.logs()[after:]
        return [int(m) for m in re.findall(r"resumed from s3://\S+/step-(\d{8})-[0-9a-f]+ at step", text)]


def test_hsdp_across_two_nodes_resumes_a_killed_worker_exactly(cluster, bucket, mlflow_server, s3_server, tmp_path):
    """`ray job submit --working-dir . -- python jobs/pretrain.py ...`, as the README shows it: the
    job runs from the unpacked working directory, HSDP with a shard group of 2 workers on each node
    (the replicate axis across the nodes), checkpoints on S3. SIGKILL one Ray Train worker process:
    Ray Train restarts the group from the last checkpoint (FailureConfig); every step computed twice
    has the same loss both times; the job finishes, tracks and registers its model."""
    # Rank 0 also appends each logged step to a local file as it goes (train.metrics_log): what the
    # run has done at the kill. MLflow's copy is sent in the background and lags (tens of steps
    # on a busy machine), and the killed rank's unsent metrics are lost with it.
    steps_log = tmp_path / "hsdp.jsonl"
    job = Job(cluster, job_args(bucket, mlflow_server.uri, "hsdp", **HSDP, **{"train.metrics_log": steps_log}))
    deadline = time.time() + 300

    def wait_until(ready, what: str) -> int:
        while not ready(done := ([step for step, _ in logged_losses(steps_log)] or [0])[-1]):
            if time.time() > deadline or done >= STEPS - 10:
                job.give_up(f"never saw {what} (last logged step: {done})")
            time.sleep(0.05)
        return done

    wait_until(lambda step: step >= 5, "a logged step")
    workers = train_worker_pids()
    assert len(workers) == 4, workers  # two per node
    # Kill early between two checkpoints (every 20; a step logged every 5): the steps since the
    # last one are computed again, and the next checkpoint is 6 or more steps away.
    done = wait_until(lambda step: step >= 40 and step % 20 in (5, 10), "step 45 or 50")
    os.kill(int(workers[0]), signal.SIGKILL)
    status = job.wait_for_end()
    text = job.logs()
    assert "succeeded" in status, text[-5000:]
    assert "MLflow run " in text and "registered models:/cluster-test/" in text, text[-3000:]
    assert "FSDP2 over the mesh {'replicate': 2, 'shard': 2}" in text, text[-3000:]
    placed = re.findall(r"train worker rank (\d) on node (\w+)", text)[:4]  # the first worker group
    nodes = {rank: node for rank, node in placed}
    # Ray Train numbers the workers node by node: each shard group {0, 1}, {2, 3} is one node.
    assert nodes["0"] == nodes["1"] != nodes["2"] == nodes["3"], placed
    (resumed,) = job.resumes()
    assert 20 <= resumed < done, text[-5000:]  # mid-run, not from scratch
    assert sorted(metric_history(mlflow_server.uri, "hsdp")["loss"]) == list(range(5, STEPS + 1, 5))  # none lost
    losses: dict[int, list[float]] = {}
    for step, loss in logged_losses(steps_log):
        losses.setdefault(step, []).append(loss)
    repeated = {step: values for step, values in losses.items() if len(values) > 1}
    # the steps after the resumed checkpoint that ran before the kill ran again
    assert set(range(resumed + 5, done + 1, 5)) <= set(repeated), losses
    # CPU, same config, data and mesh: the steps after a resume are bit-identical to their first run.
    assert all(len(set(values)) == 1 for values in repeated.values()), repeated
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/checkpoints/hsdp/")["Contents"]
    ]
    assert any(re.fullmatch(rf"store/checkpoints/hsdp/step-{STEPS:08d}-[0-9a-f]+/manifest\.json", k) for k in keys)
    assert any(k.endswith("__1_0.distcp") for k in keys)  # rank 1's shard (DCP writes a replicated one once)


def test_an_elastic_run_goes_on_without_a_lost_node_and_grows_back(cluster, bucket, mlflow_server):
    """A worker on each node, `ray.min_workers=1`: the worker node dies for good and the run goes
    on at once with the head's worker (twice the gradient accumulation: the same global batch);
    a node joins and the group grows back to 2 at the next resize check and goes on from its last
    checkpoint. Every step sees the same tokens and every step computed again has its first loss
    (to fp32 rounding: another summation order). The run is longer than the test: once the grown
    group has logged 20 steps the job is stopped (finishing a run on the cluster is the HSDP
    test's), so the test never races the end of the run however slowly a node starts."""
    steps = 5000
    job = Job(cluster, job_args(bucket, mlflow_server.uri, "elastic", steps=steps, **ELASTIC))
    try:
        job.wait_for(f"step {60:>5}/{steps}")
        cluster.kill_node(cluster.worker_pgids[0])
        job.wait_for("elastic: a group of 1 of at most 2 workers, 2 micro-batches each per step")
        shrunk = len(job.logs())
        cluster.add_worker()  # a node joins: the group grows at the next resize check (every 5 s)
        job.wait_for("elastic: a group of 2 of at most 2 workers", after=shrunk, timeout_s=240)
        grew = job.logs().index("elastic: a group of 2 of at most 2 workers", shrunk)
        deadline = time.time() + 180
        while not job.resumes(after=grew):  # the grown group's resume
            if time.time() > deadline:
                job.give_up("the grown group never resumed from a checkpoint")
            time.sleep(2)
        resumes = job.resumes()  # the lost node's (one or more), then the growth's
        grown = resumes[-1]
        deadline = time.time() + 180
        while max(metric_history(mlflow_server.uri, "elastic").get("loss", {0: []})) < grown + 20:
            if time.time() > deadline:
                job.give_up(f"the grown group never logged step {grown + 20}")
            time.sleep(2)
    finally:
        job.stop()
    text = job.logs()
    assert 20 <= resumes[0] and resumes == sorted(resumes), text[-5000:]  # each mid-run, in order
    metrics = metric_history(mlflow_server.uri, "elastic")
    losses, tokens = metrics["loss"], metrics["tokens"]
    logged = [step for step in sorted(losses) if step <= grown + 20]
    assert logged == list(range(5, grown + 21, 5)), logged  # none lost across the shrink and the growth
    assert any(len(losses[step]) > 1 for step in logged), losses  # steps computed again after a resume
    per_step = 2 * 32 * 32  # ray.num_workers x train.batch_size x data.seq_len, whatever the group's size
    assert all(values == [step * per_step] * len(values) for step, values in tokens.items()), tokens
    for step, values in losses.items():
        assert max(values) - min(values) <= 1e-5 * abs(values[0]), (step, values)


def test_a_submitted_job_refuses_stores_that_would_vanish_with_it(cluster, bucket, mlflow_server):
    args = job_args(bucket, mlflow_server.uri, "ephemeral")
    no_tracking = submit(cluster, [a for a in args if not a.startswith("--tracking.uri")])
    assert no_tracking.returncode != 0
    assert "tracking.uri is not set: the default sqlite store would live in this submitted job's temporary" in (
        no_tracking.stdout + no_tracking.stderr)  # fmt: skip
    relative = submit(cluster, [a for a in args if not a.startswith("--storage.root")])
    assert "storage.root '.generalmodel/store' is relative" in relative.stdout + relative.stderr


def test_bad_cluster_address_and_missing_token_are_clear_errors(cluster, tmp_path):
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token here
    job = [sys.executable, str(REPO / "jobs/prepare_data.py"), f"--data.output={tmp_path}/ds", "--data.vocab_size=300"]
    unreachable = subprocess.run(
        [*job, "--ray.address=127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert unreachable.returncode == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in unreachable.stderr
    no_token = subprocess.run(
        [*job, f"--ray.address={cluster.address}"], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert no_token.returncode == 2
    assert "cannot connect to the Ray cluster" in no_token.stderr and "RAY_AUTH_MODE=token" in no_token.stderr
    assert not (tmp_path / "ds").exists()
