"""GRPO on the real Ray cluster: rollouts on Ray actors, the learner on Ray Train, tracked and
registered in MLflow. A rollout actor killed mid-step is replaced and the step completes with the
same samples; a learner failure resumes from the last checkpoint with the same prompts, so the
interrupted run's rewards equal the uninterrupted run's, step by step (the faulty run syncs its
weights by a collective broadcast, the plain one through the object store: the same samples)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from test_rl import task_cfg, tiny_task  # noqa: F401 (a fixture)

from generalmodel.infer.export import export_files
from jobs import rl
from models import build_model


@pytest.fixture(scope="module")
def start_model(tiny_task):  # noqa: F811 (the fixture imported from test_rl)
    """The 1-digit task of test_rl and a random tiny chat model exported beside it (train.init_from)."""
    root, tokenizer_json = tiny_task
    cfg = task_cfg(root, root)
    torch.manual_seed(0)
    export = root / "start"
    export.mkdir(exist_ok=True)
    for name, data in export_files(cfg.model, build_model(cfg.model).state_dict(), tokenizer_json).items():
        (export / name).write_bytes(data)
    return root, export


def job_cfg(root, export, store, mlflow_uri, **overrides):
    return task_cfg(
        root,
        store,
        **{
            "train.init_from": str(export),
            "tracking.uri": mlflow_uri,
            "tracking.registered_model": "rl-test",
            "rl.rollout_workers": 2,
            "rl.rollout_cpus": 0.5,
            "ray.max_failures": 1,
            **overrides,
        },
    )


@pytest.mark.e2e
def test_rollout_actor_killed_and_learner_failure_change_nothing(
    start_model, ray_cluster, mlflow_server, tmp_path, caplog
):
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.INFO, logger="generalmodel")

    root, export = start_model
    client = MlflowClient(mlflow_server.uri)

    def per_step(run_id: str, key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    plain = rl.main(job_cfg(root, export, tmp_path / "plain", mlflow_server.uri, **{"train.run_name": "rl-plain"}))
    assert plain["model_uri"].startswith("models:/rl-test/")
    assert 0 <= plain["accuracy_start"] <= 1 and "accuracy_end" in plain
    assert plain["pass1_start"] == plain["accuracy_start"] and 0 <= plain["pass2_start"] <= 1  # rl.eval_samples 2
    run = client.get_run(plain["run_id"])
    assert {
        "reward_mean",
        "zero_variance_groups",
        "entropy",
        "clip_fraction",
        "completion_len",
        "rollout_tokens_per_s",
        "learner_tokens_per_s",
        "rollout_wait_fraction",
        "heldout_accuracy",
    } <= set(run.data.metrics)
    assert run.data.tags["init_from"] == str(export)
    assert "rl_progress.png" in {a.path for a in client.list_artifacts(plain["run_id"])}
    rewards = per_step(plain["run_id"], "reward_mean")
    assert sorted(rewards) == [1, 2, 3, 4]
    assert any(v < 1 for v in per_step(plain["run_id"], "zero_variance_groups").values())  # a reward signal

    # Faults, with the weights by a gloo broadcast instead of the object store (bit-identical, so
    # the same samples): the killed actor's replacement forms the group again with the others, the
    # failed learner resumes from its checkpoint; the rewards are the plain run's, step by step.
    faulty = rl.main(
        job_cfg(
            root,
            export,
            tmp_path / "faulty",
            mlflow_server.uri,
            **{
                "train.run_name": "rl-faulty",
                "rl.weight_sync": "collective",
                # placed apart by the resources of the nodes' groups (the session cluster has both)
                "ray.worker_resources": {"learner": 1},
                "rl.rollout_resources": {"rollout": 0.5},
                "rl.kill_rollout_at_step": 1,
                "train.fail_at_step": 3,
            },
        )
    )
    assert max(per_step(faulty["run_id"], "rollout_workers_replaced").values()) >= 1  # the killed actor's
    assert per_step(faulty["run_id"], "reward_mean") == rewards  # same prompts, same samples, same weights
    assert per_step(faulty["run_id"], "heldout_accuracy") == per_step(plain["run_id"], "heldout_accuracy")
    # the held-out samples are seeded by their prompt; the resumed attempt's first evaluation (step 2)
    # samples too, as every attempt's first does
    sampled, plain_sampled = per_step(faulty["run_id"], "heldout_pass2"), per_step(plain["run_id"], "heldout_pass2")
    assert sorted(plain_sampled) == [0, 4] and sorted(sampled) == [0, 2, 4]
    assert {s: sampled[s] for s in plain_sampled} == plain_sampled
    assert re.search(r"train worker rank 0 on node \w+, holding \{[^}]*'learner': 1\.0", caplog.text)
    assert re.search(r"2 rollout actors on node\(s\) \w+, each holding \{[^}]*'rollout': 0\.5", caplog.text)
    sizes = per_step(faulty["run_id"], "weight_sync_bytes")
    assert set(sizes.values()) == {max(per_step(plain["run_id"], "weight_sync_bytes").values())} != {0}
    assert all(s > 0 for s in per_step(faulty["run_id"], "weight_sync_s").values())
