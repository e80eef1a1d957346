"""Shared fixtures: one local Ray cluster and one real S3 server (Ceph RADOS Gateway) per test
session, plus small corpora written into tmp dirs."""

from __future__ import annotations

import os

# One intra-op thread per test process (before torch is imported): the suite runs two pytest workers
# and Ray's processes on 2 cores, where a second OpenMP thread per process only contends (and spins)
# for a core; measured, test_train + test_causality side by side took 139 s instead of 152.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from generalmodel.cluster import free_port

REPO = Path(__file__).resolve().parent.parent
# Ray Train's preemption watcher (a polling actor per run, for spot/cloud nodes) has nothing to
# watch on this machine; off, each of the suite's ~20 Ray Train runs starts one Python process less.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
S3_KEY, S3_SECRET = "gm-test-key", "gm-test-secret"
# Fixtures that start a service; a test that needs one (even through another fixture) is an
# integration test, whatever its module says, so `make test-fast` never starts one.
SERVICE_FIXTURES = ("ray_cluster", "s3_server", "mlflow_server")
SERVICE_MARKERS = ("integration", "e2e", "cluster")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(f in item.fixturenames for f in SERVICE_FIXTURES) and not any(
            item.get_closest_marker(m) for m in SERVICE_MARKERS
        ):
            item.add_marker(pytest.mark.integration)
    # The longest tiers first (a stable sort: files stay together, in their order): with `pytest -n`
    # the multi-minute cluster and end-to-end files start early on separate workers and the
    # short unit tests fill in around them, instead of one long file running alone at the end.
    tier = {"cluster": 0, "e2e": 1, "integration": 2}

    def rank(item) -> int:
        return min((tier[m.name] for m in item.iter_markers() if m.name in tier), default=3)

    items.sort(key=rank)


def spawn_ranks(fn, args: tuple, nprocs: int) -> None:
    """`torch.multiprocessing.spawn(fn, args, nprocs)` with each rank forked from a forkserver that
    imported torch and the training loop once per test process: a spawned rank starts a new Python
    and imports them again (~2.5 s of CPU each, ~50 ranks a suite). A rank sets its own env."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "generalmodel.train.loop"])
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


# A post-training run at test size (RL, Coconut, Quiet-STaR) from a random model.
TINY_POST_RUN = {
    "train.init_from": "a random model",
    "model.max_seq_len": 128,
    "model.n_layers": 2,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "model.d_model": 32,
    "train.steps": 4,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "optim.lr": 3e-3,
    "optim.warmup_steps": 0,
    "ray.num_workers": 1,
}


def seeded_model(cfg, seed: int = 0):
    """cfg.model built after torch.manual_seed(seed)."""
    import torch

    from models import build_model

    torch.manual_seed(seed)
    return build_model(cfg.model)


def run_rows_loop(loop, cfg, state, data, tokenizer_json) -> dict[int, dict]:
    """A rows objective's loop (generalmodel.post.rows: Coconut's, Quiet-STaR's) in this process,
    from `state`: its reports merged by step."""
    seen: dict[int, dict] = {}
    report = lambda m: seen.setdefault(m["step"], {}).update(m)  # noqa: E731
    loop(cfg, report, init=lambda: state, data=data, tokenizer_json=tokenizer_json)
    return seen


def rows_rank(rank, port, loop, cfg, state, data, tokenizer_json, out) -> None:
    """One rank of a 2-rank `run_rows_loop` (spawn_ranks); rank 0's reports go to `out`."""
    import torch
    import torch.distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    seen = run_rows_loop(loop, cfg, state, data, tokenizer_json)
    if rank == 0:
        out.update(seen)
    torch.distributed.destroy_process_group()


def train_worker_pids() -> list[int]:
    """The Ray Train worker processes this test process started (its descendants, through the Ray
    clusters it runs): a test that kills one never touches another test's run beside it (pytest -n)."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    children: dict[int, list[int]] = {}
    args: dict[int, str] = {}
    for row in rows:
        pid, ppid, *cmd = row.split(None, 2)
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = cmd[0] if cmd else ""
    mine, stack = [], [os.getpid()]
    while stack:
        for child in children.get(stack.pop(), []):
            mine.append(child)
            stack.append(child)
    return sorted(pid for pid in mine if args[pid].startswith("ray::RayTrainWorker"))


# -- Ray ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster shared by the whole session (starting one costs seconds). Its
    workers can import the test modules, as a user's cluster imports the modules they ship with
    a runtime env (an RL verifier named `module:function`)."""
    import ray

    here = str(Path(__file__).resolve().parent)
    ray.init(
        num_cpus=2,
        # node-group resources as a KubeRay group would advertise them (ray.worker_resources,
        # rl.rollout_resources: RL's learner and rollouts on nodes of their own)
        resources={"learner": 2, "rollout": 2},
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": here}},
    )
    yield ray
    ray.shutdown()


# -- S3 ----------------------------------------------------------------------------------------


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    workdir: Path

    def stop_gateway(self) -> None:
        """Kill the RADOS Gateway (the S3 endpoint); the data stays in the OSD."""
        import time

        pid = int((self.workdir / "run/client.rgw.a.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while self._answers() and time.time() < deadline:
            time.sleep(0.2)

    def start_gateway(self) -> None:
        import time

        subprocess.run(["radosgw", "-c", "ceph.conf", "-n", "client.rgw.a"], cwd=self.workdir, check=True, timeout=60)
        deadline = time.time() + 60
        while not self._answers():
            assert time.time() < deadline, "the RADOS Gateway did not come back"
            time.sleep(0.2)

    def _answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except OSError:
            return False

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"gm-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def storage_overrides(self) -> dict[str, str]:
        return {
            "storage.endpoint_url": self.endpoint,
            "storage.access_key_id": self.key,
            "storage.secret_access_key": self.secret,
        }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1: single-node Ceph (mon + memstore OSD + radosgw)."""
    if shutil.which("radosgw") is None:
        message = "radosgw is not installed (apt-get install ceph-mon ceph-osd radosgw; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("ceph")
    port, mon_port = free_port(), free_port()
    env = dict(os.environ, S3_KEY=S3_KEY, S3_SECRET=S3_SECRET)
    started = subprocess.run(
        ["bash", str(REPO / "tests/services/ceph-rgw-start.sh"), str(workdir), str(port), str(mon_port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        if started.returncode != 0:
            pytest.fail(f"Ceph RGW did not start:\n{started.stdout}\n{started.stderr}")
        yield S3Server(f"http://127.0.0.1:{port}", S3_KEY, S3_SECRET, workdir)
    finally:
        for pidfile in (workdir / "run").glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


# -- corpora -----------------------------------------------------------------------------------

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "river mountain engine letter garden window quiet bright ancient market winter signal"
).split()


def make_documents(count: int, seed: int = 0, words_per_doc: int = 300) -> list[str]:
    """Deterministic English-like documents (no downloads in tests)."""
    import random

    rng = random.Random(seed)
    docs = []
    for i in range(count):
        sentences = []
        for _ in range(words_per_doc // 12):
            words = [rng.choice(WORDS) for _ in range(12)]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(f"Document {i}. " + " ".join(sentences))
    return docs


def write_corpus(root: Path, count: int, seed: int) -> Path:
    """`count` documents as <root>/NNN.txt (a local corpus for the jobs)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(make_documents(count, seed=seed)):
        (root / f"{i:03d}.txt").write_text(doc)
    return root


# A tiny model on a tiny dataset prepared from a few documents: what the job tests train.
TINY_RUN = {
    "data.output": "datasets/tiny", "data.vocab_size": 320, "data.seq_len": 32, "data.val_fraction": 0.1,
    "model.vocab_size": 320, "model.max_seq_len": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_model": 32,
    "train.batch_size": 4, "train.eval_batches": 2,
}  # fmt: skip


@pytest.fixture(scope="session")
def train_dataset(ray_cluster, tmp_path_factory):
    """A tiny prepared dataset (vocab 320, rows of 32 tokens) shared by the training-loop tests."""
    from generalmodel.config import load_config
    from jobs import prepare_data

    root = tmp_path_factory.mktemp("train-data")
    (root / "src").mkdir()
    for i, doc in enumerate(make_documents(80, seed=11)):
        (root / "src" / f"{i:03d}.txt").write_text(doc)
    prepare_data.main(
        load_config(
            overrides={
                "data.source": str(root / "src"),
                "data.output": str(root / "ds"),
                "data.vocab_size": 320,
                "data.seq_len": 32,
                "data.val_fraction": 0.1,
            }
        )
    )
    return str(root / "ds")


# A sentence no generated document has: what retrieval must find.
PLANTED = "The lighthouse keeper of Vardo counted ninety-seven whales in the frozen harbour."


@pytest.fixture(scope="session")
def planted_index(ray_cluster, tmp_path_factory) -> str:
    """A retrieval index (tfidf, flat) of 30 generated documents and planted.txt, which holds PLANTED
    among generated sentences; its URI."""
    from generalmodel.config import StorageConfig
    from generalmodel.retrieval import IndexConfig, build_index

    root = write_corpus(tmp_path_factory.mktemp("retrieval") / "corpus", 30, seed=21)
    filler = make_documents(2, seed=22, words_per_doc=120)
    (root / "planted.txt").write_text(f"{filler[0]} {PLANTED} {filler[1]}")
    out = str(root.parent / "index")
    build_index(IndexConfig(source=str(root), out=out, passage_words=40), StorageConfig())
    return out


@pytest.fixture
def txt_corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, doc in enumerate(make_documents(60)):
        (root / ("sub" if i % 2 else "") / f"doc{i:03d}.txt").write_text(doc)
    return root


# -- MLflow ------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    uri: str
    artifacts: str


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1: sqlite backend, artifacts on the real S3 server."""
    bucket = s3_server.new_bucket()
    workdir = tmp_path_factory.mktemp("mlflow")
    env = dict(
        os.environ,
        MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint,
        AWS_ACCESS_KEY_ID=s3_server.key,
        AWS_SECRET_ACCESS_KEY=s3_server.secret,
        AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
        AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
    )
    with running_mlflow(workdir, f"s3://{bucket}/mlflow", env) as uri:
        yield MlflowServer(uri, f"s3://{bucket}/mlflow")


@contextlib.contextmanager
def running_mlflow(workdir: Path, artifacts: str, env: dict | None = None):
    """`mlflow server` (sqlite in workdir, artifacts at `artifacts`) on a free port of 127.0.0.1:
    yields its URI once /health answers; stopped (its process group) afterwards."""
    import time
    import urllib.request

    uri = f"http://127.0.0.1:{free_port()}"
    log = open(workdir / "server.log", "w")
    # No server-side job runner (its 7 huey worker processes serve MLflow's GenAI jobs, unused here).
    env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir}/mlflow.db",
         "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1],
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(workdir / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


# -- ray job submit ----------------------------------------------------------------------------

EXCLUDES = json.dumps({"excludes": [".venv", ".git", ".generalmodel", ".whl"]})


def ray_job(cluster, *args, timeout=600) -> subprocess.CompletedProcess:
    """`ray job ARGS...` against a LocalCluster (its env holds RAY_AUTH_MODE=token)."""
    return subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", *args],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_job(cluster, entrypoint: list[str], wait: bool = True) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir REPO -- ENTRYPOINT`, as the README shows it."""
    import time

    for _ in range(20):  # the head answers HTTP before its job agent is ready: poll until it is
        extra = [] if wait else ["--no-wait"]
        out = ray_job(
            cluster,
            "submit",
            f"--address={cluster.dashboard}",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            EXCLUDES,
            *extra,
            "--",
            *entrypoint,
        )
        if "No available agent to submit job" not in out.stderr:
            return out
        time.sleep(3)
    return out


# -- a loud banner for what could not run here -------------------------------------------------


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    no_s3 = [r.nodeid for r in skipped if "radosgw is not installed" in str(r.longrepr)]
    if no_s3:
        bar = "!" * 100
        terminalreporter.write_line(bar, yellow=True, bold=True)
        terminalreporter.write_line(
            f"{len(no_s3)} tests did NOT run: they need the S3 server (Ceph RADOS Gateway), which is not installed.",
            yellow=True,
            bold=True,
        )
        terminalreporter.write_line("  enable them: sudo apt-get install ceph-mon ceph-osd radosgw   (then make test)")
        for nodeid in no_s3:
            terminalreporter.write_line(f"  skipped: {nodeid}")
        terminalreporter.write_line(bar, yellow=True, bold=True)


# The post-training tests' data (test_post.py, test_svf.py): rows of SEQ tokens.
SEQ = 48


def qa_rows(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Arithmetic conversations (some with a system prompt, some two turns) and preference pairs."""
    rng = random.Random(seed)
    chats, pairs = [], []
    for i in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        messages = [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": str(a + b)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer with a number."})
        if i % 4 == 0:
            messages += [{"role": "user", "content": "Doubled?"}, {"role": "assistant", "content": str(2 * (a + b))}]
        chats.append({"messages": messages, "group": i % 20})
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        pairs.append(
            {"prompt": f"What is {a} plus {b}?", "chosen": str(a + b), "rejected": str(wrong), "group": i % 20}
        )
    return chats, pairs


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


@pytest.fixture(scope="session")
def post_data(ray_cluster, tmp_path_factory):
    """Chat conversations and preference pairs about arithmetic, their tokenizer, and both prepared
    (ROOT/chat-ds, ROOT/pref-ds; SEQ-token rows): (ROOT, chats, pairs). Shared by the post-training tests."""
    from generalmodel.config import load_config
    from generalmodel.data.tokenizer import train_bpe
    from jobs import prepare_data

    root = tmp_path_factory.mktemp("post")
    chats, pairs = qa_rows(240, seed=5)
    texts = make_documents(30, seed=4) + [m["content"] for c in chats for m in c["messages"]]
    (root / "tokenizer.json").write_text(train_bpe(texts, 320).to_str())
    common = {
        "data.tokenizer": str(root / "tokenizer.json"),
        "data.seq_len": SEQ,
        "data.split_key": "group",
        "data.val_fraction": 0.25,
    }
    for name, rows, fmt in (("chat", chats, "chat"), ("pref", pairs, "preference")):
        source = str(write_jsonl(root / f"{name}s.jsonl" if name == "chat" else root / "pairs.jsonl", rows))
        prepare_data.main(
            load_config(
                overrides={**common, "data.source": source, "data.format": fmt, "data.output": str(root / f"{name}-ds")}
            )
        )
    return root, chats, pairs


def tool_conversations() -> list[dict]:
    """Three calculator conversations in the suite's format (generalmodel.eval.reasoning)."""
    from generalmodel.eval.reasoning import Problem, tool_conversation

    rows = []
    for a, b in ((12, 7), (345, 78), (9, 40)):
        p = Problem("addition", 1, f"What is {a} + {b}?", a + b, (), f"The answer is {a + b}.", "", {}, f"{a} + {b}")
        rows.append(tool_conversation(p, declared=True))
    return rows


def train_on_conversations(model, tokenizer_json: str, rows: list[dict], steps: int, lr: float = 3e-3):
    """`model` trained in place (AdamW, full batch) on the assistant tokens of chat rows with
    optional `tools`: a tiny model learns them by heart in a few dozen steps."""
    import torch
    import torch.nn.functional as F

    from generalmodel.data.chat import ChatFormat, messages, tool_names

    fmt = ChatFormat.from_json(tokenizer_json)
    rendered = [fmt.render(messages(r["messages"], "row"), tools=tool_names(r.get("tools"), "row")) for r in rows]
    width = max(len(r.ids) for r in rendered)
    ids = torch.zeros(len(rendered), width, dtype=torch.long)
    mask = torch.zeros(len(rendered), width, dtype=torch.bool)
    for i, r in enumerate(rendered):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        mask[i, : len(r.mask)] = torch.tensor(r.mask, dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())
