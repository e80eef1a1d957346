"""A local multi-node Ray cluster on this machine: a head and worker nodes, token auth on.

python -m jobs.cluster up --workers=1 --cpus_per_node=1      # make cluster-up
python -m jobs.cluster down                                  # make cluster-down
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import Field

from generalmodel import UserError
from generalmodel.cli import run_job
from generalmodel.cluster import STATE_FILE, LocalCluster, cluster_up
from generalmodel.config import Section


class ClusterConfig(Section):
    """Bring the local cluster up or down."""

    command: Literal["up", "down"] = Field(..., description="up: start the nodes; down: stop them.")
    workers: int = Field(1, ge=0, description="Worker nodes beside the head.")
    cpus_per_node: int = Field(1, gt=0, description="CPUs each node offers.")


def main(cfg: ClusterConfig) -> LocalCluster | None:
    if cfg.command == "up":
        if os.path.exists(STATE_FILE):
            raise UserError(f"a cluster is already up ({STATE_FILE}); run `make cluster-down` first")
        cluster = cluster_up(cfg.workers, cfg.cpus_per_node)
        os.makedirs(os.path.dirname(STATE_FILE), exist_ok=True)
        with open(STATE_FILE, "w") as f:
            json.dump({k: v for k, v in cluster.__dict__.items() if k != "env"}, f)
        print(
            f"Ray cluster up: head + {cfg.workers} worker node(s), {cfg.cpus_per_node} CPU(s) each.\n"
            f"  export RAY_AUTH_MODE=token   # the token is in ~/.ray/auth_token\n"
            f"  ray job submit --address {cluster.dashboard} --working-dir . \\\n    "
            f'--runtime-env-json \'{{"excludes": [".venv", ".git", ".generalmodel"]}}\' '
            f"-- python jobs/pretrain.py ...\n"
            f"Nodes see this shell's AWS_* settings; keep datasets and checkpoints on s3:// (no shared disk)."
        )
        return cluster
    if not os.path.exists(STATE_FILE):
        raise UserError(f"no local cluster is up (no {STATE_FILE})")
    with open(STATE_FILE) as f:
        LocalCluster(**json.load(f), env={}).down()
    os.remove(STATE_FILE)
    print("Ray cluster down")
    return None


def cli() -> None:
    run_job(main, ClusterConfig, __doc__, positional=("command",))


if __name__ == "__main__":
    cli()
