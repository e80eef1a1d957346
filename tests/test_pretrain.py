"""The pretraining job on a real local Ray cluster: with a real MLflow server (artifacts on the
real S3 server) and checkpoints on s3://; a worker failure recovered by Ray Train; `ray job
submit` against a `ray start` cluster."""

import os
import re

import pytest
from conftest import TINY_RUN, train_worker_pids, write_corpus

from generalmodel import RunFailed, UserError
from generalmodel.cli import parse_args
from generalmodel.config import load_config
from jobs import pretrain, sample

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pretrain-corpus"), 80, seed=21)


def tiny_overrides(corpus, **extra):
    base = {
        **TINY_RUN,
        "data.source": str(corpus),
        "train.steps": 8,
        "train.log_every": 2,
        "train.eval_every": 4,
        "train.checkpoint_every": 2,
        "optim.warmup_steps": 2,
        "tracking.registered_model": "tiny-test",
    }
    base.update(extra)
    return base


def test_pretrain_tracks_registers_and_samples(ray_cluster, s3_server, mlflow_server, corpus, capsys):
    from mlflow.tracking import MlflowClient

    bucket = s3_server.new_bucket()
    cfg = load_config(
        overrides=tiny_overrides(
            corpus,
            **{
                "storage.root": f"s3://{bucket}/store",
                "tracking.uri": mlflow_server.uri,
                **s3_server.storage_overrides(),
            },
        )
    )
    result = pretrain.main(cfg)

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result["run_id"])
    assert run.data.params["model.n_layers"] == "2" and run.data.params["train.steps"] == "8"
    assert "**********" == run.data.params["storage.secret_access_key"]
    assert run.data.tags["dataset_manifest_sha256"] and run.data.tags["git_sha"]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6, 8]
    val = result["val_loss"]
    assert len(val) == 2 and val[-1][1] < val[0][1] + 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_lr.png", "model"} <= artifacts
    assert {"model/MLmodel", "model/data", "model/hf"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "model")
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model/data/export")} == {
        "model/data/export/model.safetensors",
        "model/data/export/model_config.json",
        "model/data/export/tokenizer.json",
    }
    assert run.data.tags["hf_export"] == "model/hf"  # the default llama has a transformers class
    assert result["model_uri"].startswith("models:/tiny-test/")
    assert client.get_model_version("tiny-test", result["model_uri"].rsplit("/", 1)[1]).run_id == run.info.run_id

    keys = [
        o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="store/checkpoints/")["Contents"]
    ]
    assert any(re.fullmatch(r"store/checkpoints/pretrain/step-00000008-[0-9a-f]+/manifest\.json", k) for k in keys)
    assert any(k.endswith(".distcp") for k in keys)

    capsys.readouterr()
    texts = sample.main(
        parse_args(
            [
                "--model",
                result["model_uri"],
                f"--tracking.uri={mlflow_server.uri}",
                "--prompt",
                "Document",
                "--sampling.max_new_tokens=8",
                "--sampling.top_k=20",
            ],
            sample.SampleConfig,
        )
    )
    assert texts[0].startswith("Document") and len(texts[0]) > len("Document")


def test_a_killed_train_worker_resumes_on_the_exact_token(ray_cluster, corpus, train_dataset, tmp_path):
    """SIGKILL a Ray Train worker process mid-run: Ray Train restarts the worker group, which resumes
    from the last published checkpoint, and every step computed twice has its first loss (CPU:
    the same tokens, bit-identical)."""
    import json
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    common = {
        "storage.root": str(tmp_path), "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", "train.steps": 40,
        "train.log_every": 1, "train.eval_every": 100, "train.checkpoint_every": 4,
        "train.dataset": train_dataset,  # prepared once for the session (preparing is the test above's)
    }  # fmt: skip
    log = tmp_path / "killed.jsonl"
    cfg = load_config(overrides=tiny_overrides(
        corpus, **common, **{"train.run_name": "killed", "train.metrics_log": str(log)}))  # fmt: skip
    result, errors = {}, []

    def run():
        try:
            result.update(pretrain.main(cfg))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.time() + 300
    published = tmp_path / "checkpoints/killed"
    while not (list(published.glob("step-*/manifest.json")) and log.exists()
               and any(json.loads(line)["step"] >= 10 for line in log.read_text().splitlines())):  # fmt: skip
        assert time.time() < deadline and thread.is_alive(), "the run never published a checkpoint"
        time.sleep(0.1)
    workers = train_worker_pids()
    assert workers, "no Ray Train worker process found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    thread.join(timeout=600)
    assert not errors and result, errors

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    losses: dict[int, list[float]] = {}
    for m in client.get_metric_history(result["run_id"], "loss"):
        losses.setdefault(m.step, []).append(m.value)
    assert sorted(losses) == list(range(1, 41))  # every step logged, none lost
    repeated = [step for step, values in losses.items() if len(values) > 1]
    assert repeated and min(repeated) > 4, losses  # resumed mid-run, not from scratch
    assert all(len(set(values)) == 1 for values in losses.values()), losses  # each its first loss


def test_a_run_that_fails_for_good_is_marked_failed(ray_cluster, corpus, train_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        overrides=tiny_overrides(
            corpus,
            **{"storage.root": str(tmp_path), "tracking.uri": uri, "train.fail_at_step": 3, "ray.max_failures": 0,
               "train.dataset": train_dataset},
        )
    )  # fmt: skip
    with pytest.raises(
        RunFailed, match="training failed: RuntimeError: train.fail_at_step: injected failure at step 3"
    ):
        pretrain.main(cfg)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("generalmodel").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_bad_input_is_a_clear_error(corpus, tmp_path):
    with pytest.raises(UserError, match="cannot reach the MLflow server at http://127.0.0.1:9"):
        pretrain.main(load_config(overrides=tiny_overrides(corpus, **{"tracking.uri": "http://127.0.0.1:9"})))
    with pytest.raises(UserError, match="cannot reach the S3 endpoint"):
        pretrain.main(
            load_config(
                overrides=tiny_overrides(
                    corpus,
                    **{
                        "storage.root": "s3://bucket/store",
                        "storage.endpoint_url": "http://127.0.0.1:9",
                        "storage.access_key_id": "k",
                        "storage.secret_access_key": "s",
                        "tracking.uri": f"sqlite:///{tmp_path}/m.db",
                    },
                )
            )
        )
    with pytest.raises(UserError, match="is not a published dataset"):
        pretrain.main(
            load_config(
                overrides=tiny_overrides(
                    corpus,
                    **{
                        "train.dataset": str(tmp_path / "nothing"),
                        "storage.root": str(tmp_path),
                        "tracking.uri": f"sqlite:///{tmp_path}/m.db",
                    },
                )
            )
        )


def test_a_model_that_cannot_fit_is_refused_before_any_worker_starts(ray_cluster, corpus, tmp_path):
    import time

    big = {"model.n_layers": 24, "model.d_model": 2048, "model.n_heads": 16}
    overrides = tiny_overrides(
        corpus, **{"storage.root": str(tmp_path), "tracking.uri": f"sqlite:///{tmp_path}/m.db"}, **big
    )
    started = time.time()
    with pytest.raises(
        UserError, match=r"does not fit: 1,2\d\d\.\dM parameters: .* GiB per worker \(FSDP over 2 ranks\), but each"
    ):
        pretrain.main(load_config(overrides=overrides))
    assert time.time() - started < 60
