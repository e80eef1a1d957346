"""Ctrl-C (SIGINT) stops a job within seconds: exit code 130, one line, nothing unfinished
published, the local Ray cluster it started stopped. Each job runs as a real subprocess."""

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import REPO, write_corpus

pytestmark = pytest.mark.e2e


def start(args, ray_tmp):
    # RAY_TMPDIR: the local cluster the job starts lives under ray_tmp, so its processes can be found.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


def interrupt_when(proc, marker, timeout_s=240):
    """SIGINT once `marker` shows in the output; returns (output, seconds from SIGINT to exit)."""
    lines, deadline = [], time.time() + timeout_s
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            break
        assert time.time() < deadline, "".join(lines[-30:])
    else:
        pytest.fail("the job ended before it could be interrupted:\n" + "".join(lines[-30:]))
    time.sleep(1)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    try:
        rest, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not stop within 60 s of SIGINT")
    return "".join(lines) + rest, time.time() - sent


def ray_processes(ray_tmp):
    return subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="gmint-", dir="/tmp")  # Ray's socket paths must stay short
    yield path
    for pid in ray_processes(path):  # never leave a process behind, even when the test failed
        os.kill(int(pid), signal.SIGKILL)


def test_ctrl_c_stops_prepare_data_and_publishes_nothing(tmp_path, ray_tmp):
    out = tmp_path / "ds"
    proc = start(["jobs.prepare_data", f"--data.output={out}", f"--storage.root={tmp_path}/store"], ray_tmp)
    text, seconds = interrupt_when(proc, "tokenizing")
    assert proc.returncode == 130, text[-3000:]
    assert "interrupted: nothing unfinished was published" in text and seconds < 30, seconds
    assert not (out / "manifest.json").exists() and not list(out.glob("v-*")) if out.exists() else True
    assert not ray_processes(ray_tmp)


def test_ctrl_c_stops_pretraining_and_marks_the_run_killed(tmp_path, ray_tmp):
    from mlflow.tracking import MlflowClient

    corpus = write_corpus(tmp_path / "corpus", 60, seed=71)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["jobs.pretrain", f"--data.source={corpus}", "--data.vocab_size=320", "--data.seq_len=32",
            "--model.vocab_size=320", "--model.max_seq_len=32", "--model.n_layers=2", "--model.n_heads=2",
            "--model.d_model=32", "--train.steps=5000", "--train.batch_size=4", "--train.log_every=5",
            "--ray.num_workers=1", f"--storage.root={tmp_path}/store", f"--tracking.uri={uri}"]  # fmt: skip
    proc = start(args, ray_tmp)
    text, seconds = interrupt_when(proc, "generalmodel.progress: step")
    assert proc.returncode == 130, text[-3000:]
    assert seconds < 30, seconds
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("generalmodel").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not client.search_registered_models()  # nothing registered from an interrupted run
    assert not ray_processes(ray_tmp)
