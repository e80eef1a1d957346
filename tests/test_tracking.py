"""Tracking against the real `mlflow server` (sqlite store): runs that start together — a sweep's
concurrent trials — each log the same prepared dataset as their input. The server inserts a new
dataset by check-then-insert, so all but one of a simultaneous batch used to fail with an
IntegrityError (HTTP 400), and the trial failed before its first step."""

import threading
import uuid

from generalmodel.tracking.runs import log_dataset_input

RUNS, ROUNDS = 8, 20  # one round in ~10 lost a run's input before the fix


def log_at_once(uri: str, runs: list[str], digest: str) -> list[Exception]:
    """Every run logs the dataset `digest` as its input, all released at the same moment."""
    from mlflow.tracking import MlflowClient

    start, errors = threading.Barrier(len(runs)), []

    def log(run_id: str) -> None:
        start.wait()
        try:
            log_dataset_input(MlflowClient(uri), run_id, "s3://bucket/datasets/sotu", digest)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_runs_starting_together_all_log_the_same_dataset(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"inputs-{uuid.uuid4().hex[:8]}")
    for _ in range(ROUNDS):
        runs = [client.create_run(experiment).info.run_id for _ in range(RUNS)]
        digest = uuid.uuid4().hex  # a dataset the server has never seen
        assert not (errors := log_at_once(mlflow_server.uri, runs, digest)), errors
        for run_id in runs:
            (logged,) = client.get_run(run_id).inputs.dataset_inputs
            assert logged.dataset.digest == digest[:36] and logged.dataset.name == "sotu"
