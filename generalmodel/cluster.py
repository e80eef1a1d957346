"""Connecting a job's driver to Ray (the cluster named by config/env, else a local one), and a
local multi-node cluster for development (`make cluster-up` / `python -m jobs.cluster up|down`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from generalmodel import UserError
from generalmodel.config import Config, RayConfig


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the Ray session that is already up, else connect (or start a local cluster) for the
    duration of the block and shut it down afterwards."""
    if ray.is_initialized():
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
    try:
        ray.init(
            address=address,
            num_cpus=None if address else cfg.num_cpus,
            # Ray Train V2's controller queries the state API, which the dashboard serves.
            include_dashboard=None if address else True,
            dashboard_host="127.0.0.1",
            # Off unless asked: our workers forward their log lines through the progress queue
            # and a failure's tracebacks go to a log file (train.ray_trainer), so the console
            # shows one line per event instead of every worker's stderr.
            log_to_driver=cfg.verbose,
            configure_logging=False,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {address!r} (ray.address): {e}{_token_hint()}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _token_hint() -> str:
    """Ray 2.60 clusters use token authentication by default; say so when this client has none."""
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    )
    if os.environ.get("RAY_AUTH_MODE") == "token" and has_token:
        return ""
    return (
        "; the cluster may require its auth token: set RAY_AUTH_MODE=token and provide the token "
        "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
    )


def _check_reachable(address: str) -> None:
    """Fail in seconds where ray.init would retry for minutes: is anything listening there?"""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise UserError(f"ray.address {address!r} must look like host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=5):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} (ray.address / RAY_ADDRESS): {e}") from None


def refuse_ephemeral_paths(cfg: Config, tracks: bool = True) -> None:
    """A job submitted with `ray job submit --working-dir` runs in a temporary package directory
    that Ray deletes after the job: a relative storage.root or the default sqlite tracking store
    would be written there and vanish with it. Refuse them, naming what to pass instead."""
    if "/runtime_resources/working_dir_files/" not in os.getcwd():
        return
    where = "this submitted job's temporary working directory, which Ray deletes after the job"
    if "://" not in cfg.storage.root and not os.path.isabs(cfg.storage.root):
        raise UserError(
            f"storage.root {cfg.storage.root!r} is relative: it would live in {where}; pass "
            f"--storage.root=s3://BUCKET/PREFIX (or an absolute path on a single-node cluster)"
        )
    if tracks and cfg.tracking.uri is None:
        raise UserError(
            f"tracking.uri is not set: the default sqlite store would live in {where}; pass "
            f"--tracking.uri=http://MLFLOW_HOST:PORT (or sqlite:////absolute/path/mlflow.db)"
        )


def alive_node_count() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


# ---------------------------------------------------------------------------------------------
# A local multi-node cluster: `make cluster-up` / `make cluster-down`
#
# One head and N worker nodes on this machine, each a `ray start --block` in its own process
# group (so that stopping one node, or the whole cluster, never touches another Ray cluster on
# the machine, which `ray stop` would). Token authentication stays on: the token is in
# ~/.ray/auth_token and every client needs RAY_AUTH_MODE=token.

STATE_FILE = ".generalmodel/cluster/state.json"


@dataclass
class LocalCluster:
    gcs_port: int
    dashboard_port: int
    head_pgid: int
    worker_pgids: list[int]
    temp_dir: str
    cpus_per_node: int
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_worker(self) -> int:
        """Start one more worker node; returns its process group id."""
        proc = subprocess.Popen(
            [
                _ray_bin(),
                "start",
                "--block",
                f"--address={self.address}",
                f"--num-cpus={self.cpus_per_node}",
                "--disable-usage-stats",
                # A session directory of its own: sharing the head's, this node's runtime-env cleanup
                # deleted a submitted job's working directory under the driver still running from it.
                f"--temp-dir={tempfile.mkdtemp(prefix='w', dir=self.temp_dir)}",
                *_agent_ports(),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.worker_pgids.append(proc.pid)
        return proc.pid

    def kill_node(self, pgid: int) -> None:
        """Stop a node at once (raylet and its workers), as a machine failure would."""
        _kill_group(pgid, signal.SIGKILL)
        if pgid in self.worker_pgids:
            self.worker_pgids.remove(pgid)

    def auth_headers(self) -> dict[str, str]:
        """The HTTP header of the cluster's token (`ray get-auth-token --generate` wrote it)."""
        path = self.env.get("RAY_AUTH_TOKEN_PATH") or os.path.join(
            self.env.get("HOME", os.path.expanduser("~")), ".ray", "auth_token"
        )
        with open(path) as f:
            return {"Authorization": f"Bearer {f.read().strip()}"}

    def alive_nodes(self) -> int | None:
        """The nodes the cluster counts alive (the dashboard's state API), None while it does not answer."""
        import json
        import urllib.request

        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes", headers=self.auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return None
        return sum(1 for node in nodes if node.get("state") == "ALIVE")

    def job_client(self):
        """A Ray Jobs SDK client of this cluster (`ray job logs/status/stop` without a process each)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers=self.auth_headers())

    def wait_for_nodes(self, count: int, timeout_s: float = 120, exactly: bool = False) -> None:
        """Wait until at least `count` nodes (exactly `count` with `exactly`) are alive. Asks the
        dashboard over HTTP: a driver process per poll (ray.init) cost seconds of CPU each."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            alive = self.alive_nodes()
            if alive is not None and (alive == count or (alive > count and not exactly)):
                return
            time.sleep(0.5)
        raise UserError(f"the local cluster at {self.address} did not reach {count} nodes in {timeout_s:.0f}s")

    def down(self) -> None:
        for pgid in [*self.worker_pgids, self.head_pgid]:
            _kill_group(pgid, signal.SIGTERM)
        time.sleep(2)
        for pgid in [*self.worker_pgids, self.head_pgid]:
            _kill_group(pgid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_bin() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.path.exists(candidate) else "ray"


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _agent_ports() -> list[str]:
    """Every node on one machine needs its own dashboard-agent port (default 52365): a node
    whose agent cannot bind has no job agent, and `ray job submit` then fails."""
    return [f"--dashboard-agent-listen-port={free_port()}"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_up(workers: int = 1, cpus_per_node: int = 1, env: dict[str, str] | None = None) -> LocalCluster:
    """Start a head and `workers` worker nodes, each with `cpus_per_node` CPUs. `env` (e.g. S3
    settings) is the nodes' environment, which jobs and workers inherit."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env.get('PATH', '')}"  # jobs' `python` is ours
    token = subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    if token.returncode != 0:
        raise UserError(f"cannot create the Ray auth token: {token.stderr.strip()[-500:]}")
    temp_dir = tempfile.mkdtemp(prefix="gmray-", dir="/tmp")  # Ray's socket paths must be short
    gcs, dash = free_port(), free_port()
    # Processes on this cluster that find "the" cluster by themselves (Ray Train's placement-group
    # cleaner calls the state API without an address) must find this one, not fail with "multiple
    # active Ray instances" when another Ray runs on the machine (and leak placement groups).
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
    head = subprocess.Popen(
        [
            _ray_bin(),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={cpus_per_node}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            *_agent_ports(),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cluster = LocalCluster(gcs, dash, head.pid, [], temp_dir, cpus_per_node, env)
    try:
        cluster.wait_for_nodes(1)
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_for_nodes(1 + workers)
    except BaseException:
        cluster.down()
        raise
    return cluster
