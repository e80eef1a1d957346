"""Connecting a job's driver to Ray: the cluster named by config/env, else a local one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray

from generalmodel import UserError
from generalmodel.config import RayConfig


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the Ray session that is already up, else connect (or start a local cluster) for the
    duration of the block and shut it down afterwards."""
    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        ray.init(
            address=address,
            num_cpus=None if address else cfg.num_cpus,
            # Ray Train V2's controller queries the state API, which the dashboard serves.
            include_dashboard=None if address else True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {address!r} (ray.address): {e}") from None
    try:
        yield
    finally:
        ray.shutdown()


def alive_node_count() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))
