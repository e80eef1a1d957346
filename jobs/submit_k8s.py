"""Render a RayJob for a training run and submit it to the current kube-context (KubeRay).

    python -m jobs.submit_k8s --config configs/llama-tiny.yaml --train.steps=2000 --k8s.dry_run
    python -m jobs.submit_k8s --config configs/llama-tiny.yaml --k8s.namespace=ml --k8s.cluster=generalmodel
    python -m jobs.submit_k8s --k8s.job=rl --config configs/reasoning-rl.yaml --rl.rollout_workers=8

The run config is validated here, then passed to the job (`k8s.job`: jobs/pretrain.py, or a
post-training job: sft, dpo, rl, coconut, quiet_star) in the image (/app) as the same preset + dotted
overrides. An RL job's rollout actors are Ray actors of the same cluster, each reserving
rl.rollout_cpus / rl.rollout_gpus beside the learner's workers. The job runs on an existing
RayCluster (k8s/base/raycluster.yaml) and takes S3/MLflow settings from its pods' environment
(configMap generalmodel-env, Secrets generalmodel-s3 and generalmodel-ray): credentials never go
on the command line.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from generalmodel import UserError
from generalmodel.cli import clean_exit, exit_on_help, print_config, setup_logging, split_args
from generalmodel.config import Config, Section, load_config

IMAGE_ROOT = "/app"
SECRET_KEYS = ("storage.access_key_id", "storage.secret_access_key")


class K8sSubmit(Section):
    """Where the RayJob goes (everything else is the run config it runs)."""

    namespace: str = Field("default", description="Kubernetes namespace of the RayJob.")
    cluster: str = Field("generalmodel", description="The RayCluster to run on (label ray.io/cluster).")
    name: str | None = Field(None, description="RayJob name (default: from train.run_name and the options).")
    dry_run: bool = Field(False, description="Print the RayJob YAML, submit nothing.")
    job: Literal["pretrain", "sft", "dpo", "rl", "coconut", "quiet_star"] = Field(
        "pretrain", description="The job the RayJob runs (jobs/JOB.py in the image)."
    )


class SubmitConfig(Config):
    """A run config plus where to submit it."""

    k8s: K8sSubmit = K8sSubmit()


def render(cfg: SubmitConfig, preset: str | None, run_args: dict[str, str]) -> dict:
    """The RayJob manifest that runs jobs/JOB.py (k8s.job) in the image with the same preset and
    the same dotted overrides (`run_args`, as typed)."""
    for key in SECRET_KEYS:
        if key in run_args:
            raise UserError(f"--{key} would put a credential in the RayJob: use the generalmodel-s3 Secret")
    args = [f"--{k}={v}" for k, v in run_args.items()]
    if preset is not None:  # a preset path, relative to the image's /app
        args.insert(0, f"--config={IMAGE_ROOT}/{Path(preset).as_posix().lstrip('./')}")
    command = ["python", f"{IMAGE_ROOT}/jobs/{cfg.k8s.job}.py", *args]
    if "storage.root" not in run_args:
        command.append("--storage.root=$GENERALMODEL_STORE")
    if "tracking.uri" not in run_args:
        command.append("--tracking.uri=$MLFLOW_TRACKING_URI")
    digest = hashlib.sha1(" ".join(args).encode()).hexdigest()[:6]
    name = cfg.k8s.name or f"{cfg.k8s.job}-{cfg.train.run_name}-{digest}".lower().replace("_", "-")[:63]
    # $VARS expand in the job's shell on the cluster; everything else is quoted.
    entrypoint = " ".join(
        a if a.endswith(("$GENERALMODEL_STORE", "$MLFLOW_TRACKING_URI")) else shlex.quote(a) for a in command
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "clusterSelector": {"ray.io/cluster": cfg.k8s.cluster},
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "entrypoint": entrypoint,
        },
    }


def submit(manifest: dict, namespace: str) -> str:
    try:
        from kubernetes import client, config
    except ImportError:
        raise UserError("submitting needs the kubernetes client: pip install 'generalmodel[k8s]'") from None
    try:
        config.load_kube_config()
    except Exception as e:
        raise UserError(f"no usable kube-context ({e}); use --dry-run to print the RayJob instead") from None
    try:
        client.CustomObjectsApi().create_namespaced_custom_object(
            group="ray.io", version="v1", namespace=namespace, plural="rayjobs", body=manifest
        )
    except Exception as e:
        raise UserError(f"the Kubernetes API refused the RayJob {manifest['metadata']['name']}: {e}") from None
    return manifest["metadata"]["name"]


def main(argv: list[str] | None = None) -> dict:
    """Validate the run config here (bad keys fail before anything reaches the cluster), render
    the RayJob, print or submit it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, SubmitConfig, __doc__)
    with clean_exit():
        line = split_args(argv)
        cfg = load_config(line.preset, line.overrides, SubmitConfig)
        if line.print_config:
            print_config(cfg)
        run_args = {k: v for k, v in line.raw.items() if not k.startswith("k8s.")}
        manifest = render(cfg, line.preset, run_args)
        if cfg.k8s.dry_run:
            print(yaml.safe_dump(manifest, sort_keys=False), end="")
        else:
            print(f"submitted RayJob {submit(manifest, cfg.k8s.namespace)} to namespace {cfg.k8s.namespace}")
        return manifest


def cli() -> None:
    setup_logging()
    main()


if __name__ == "__main__":
    cli()
