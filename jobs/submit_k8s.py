"""Render a RayJob for a pretraining run and submit it to the current kube-context (KubeRay).

    python jobs/submit_k8s.py --config configs/llama-tiny.yaml --train.steps=2000 --dry-run
    python jobs/submit_k8s.py --config configs/llama-tiny.yaml --namespace ml --cluster generalmodel

The run config is validated here, then passed to jobs/pretrain.py in the image (/app) as the
same preset + dotted overrides. The job runs on an existing RayCluster (k8s/base/raycluster.yaml)
and takes S3/MLflow settings from its pods' environment (configMap generalmodel-env, Secrets
generalmodel-s3 and generalmodel-ray): credentials never go on the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from generalmodel import UserError  # noqa: E402
from generalmodel.cli import user_errors_exit  # noqa: E402
from generalmodel.config import parse_args  # noqa: E402

IMAGE_ROOT = "/app"
SECRET_KEYS = ("storage.access_key_id", "storage.secret_access_key")


def render(config_args: list[str], name: str | None, cluster: str) -> dict:
    """The RayJob manifest for `config_args` (--config PRESET and --key=value overrides)."""
    cfg = parse_args(config_args)  # bad keys/values fail here, not on the cluster
    args = _normalized(config_args)
    for key in SECRET_KEYS:
        if any(a.startswith(f"--{key}") for a in args):
            raise UserError(f"--{key} would put a credential in the RayJob: use the generalmodel-s3 Secret")
    command = ["python", f"{IMAGE_ROOT}/jobs/pretrain.py", *args]
    if not any(a.startswith("--storage.root") for a in args):
        command.append("--storage.root=$GENERALMODEL_STORE")
    if not any(a.startswith("--tracking.uri") for a in args):
        command.append("--tracking.uri=$MLFLOW_TRACKING_URI")
    digest = hashlib.sha1(" ".join(args).encode()).hexdigest()[:6]
    name = name or f"pretrain-{cfg.train.run_name}-{digest}".lower().replace("_", "-")[:63]
    # $VARS expand in the job's shell on the cluster; everything else is quoted.
    entrypoint = " ".join(a if a.endswith(("$GENERALMODEL_STORE", "$MLFLOW_TRACKING_URI")) else shlex.quote(a)
                          for a in command)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name},
        "spec": {
            "clusterSelector": {"ray.io/cluster": cluster},
            "submissionMode": "K8sJobMode",
            "backoffLimit": 0,
            "entrypoint": entrypoint,
        },
    }


def _normalized(config_args: list[str]) -> list[str]:
    """`--key value` → `--key=value`; a preset path is made relative to the image's /app."""
    out, i = [], 0
    while i < len(config_args):
        arg = config_args[i]
        if "=" not in arg and i + 1 < len(config_args) and not config_args[i + 1].startswith("--"):
            arg, i = f"{arg}={config_args[i + 1]}", i + 1
        if arg.startswith("--config="):
            arg = f"--config={IMAGE_ROOT}/{Path(arg.split('=', 1)[1]).as_posix().lstrip('./')}"
        out.append(arg)
        i += 1
    return out


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
            group="ray.io", version="v1", namespace=namespace, plural="rayjobs", body=manifest)
    except Exception as e:
        raise UserError(f"the Kubernetes API refused the RayJob {manifest['metadata']['name']}: {e}") from None
    return manifest["metadata"]["name"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every other option is the run config: see jobs/pretrain.py --help.")
    parser.add_argument("--dry-run", action="store_true", help="print the RayJob YAML, submit nothing")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--cluster", default="generalmodel", help="the RayCluster to run on (ray.io/cluster)")
    parser.add_argument("--name", default=None, help="RayJob name (default: from run_name and the args)")
    ours, config_args = parser.parse_known_args(argv)
    with user_errors_exit():
        manifest = render(config_args, ours.name, ours.cluster)
        if ours.dry_run:
            print(yaml.safe_dump(manifest, sort_keys=False), end="")
        else:
            print(f"submitted RayJob {submit(manifest, ours.namespace)} to namespace {ours.namespace}")
        return manifest


if __name__ == "__main__":
    main()
