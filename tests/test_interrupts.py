"""The console of a job, run as a real subprocess with the local Ray cluster it starts: Ctrl-C
(SIGINT) stops it within seconds (exit code 130, one line, nothing unfinished published, the
local Ray stopped; the API server exits 0 after removing its app); an error inside a Ray worker
is one line, its traceback in a log file."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def start(args, ray_tmp, cwd=REPO):
    # RAY_TMPDIR: the local cluster the job starts lives under ray_tmp, so its processes can be found.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    # SIGINT as a terminal delivers it, even when pytest itself runs in the background of a
    # non-interactive shell (which starts it with SIGINT ignored; Python then keeps it ignored).
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def tiny_run(tmp_path, dataset, **extra):
    """Arguments for a tiny pretraining run on the session's prepared dataset (preparing one is
    test_ctrl_c_stops_prepare_data's and test_pretrain's), tracked in sqlite under tmp_path."""
    args = {
        "train.dataset": dataset, "model.vocab_size": 320,
        "model.max_seq_len": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_model": 32,
        "train.batch_size": 4, "train.log_every": 5, "ray.num_workers": 1, "storage.root": tmp_path / "store",
        "tracking.uri": f"sqlite:///{tmp_path}/mlflow.db", **extra,
    }  # fmt: skip
    return [f"--{k}={v}" for k, v in args.items()]


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


def test_ctrl_c_stops_pretraining_and_marks_the_run_killed(tmp_path, ray_tmp, train_dataset):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = start(["jobs.pretrain", *tiny_run(tmp_path, train_dataset, **{"train.steps": 5000})], ray_tmp)
    text, seconds = interrupt_when(proc, "generalmodel.progress: step")
    assert proc.returncode == 130, text[-3000:]
    assert seconds < 30, seconds
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("generalmodel").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert not client.search_registered_models()  # nothing registered from an interrupted run
    assert not ray_processes(ray_tmp)


SWEEP = """
search:
  optim.lr: {grid: [0.01, 0.003]}
scheduler: {kind: fifo}
max_concurrent_trials: 1
resources: {num_workers: 1, cpus_per_worker: 0.5}
"""


def test_ctrl_c_stops_a_sweep_and_marks_it_killed_for_a_rerun(tmp_path, ray_tmp, train_dataset):
    """Ray Tune catches SIGINT itself and returns from fit() as if the sweep were done: the job must
    not summarize, rank or register a half-run sweep."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    args = tiny_run(tmp_path, train_dataset, **{"train.steps": 5000, "tracking.registered_model": "interrupted-sweep"})
    proc = start(["jobs.sweep", str(tmp_path / "sweep.yaml"), *args], ray_tmp)
    text, seconds = interrupt_when(proc, "started with configuration")
    assert proc.returncode == 130, text[-3000:]
    assert seconds < 30, seconds
    assert "sweep interrupted with 2 trial(s) unfinished" in text and "run the same command again" in text
    assert "trials ranked by" not in text
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("generalmodel").experiment_id])
    assert runs and {r.info.status for r in runs} == {"KILLED"}  # the sweep's run and its started trial
    assert not client.search_registered_models()
    assert not ray_processes(ray_tmp)


def test_a_worker_error_is_one_line_and_its_traceback_goes_to_a_log_file(tmp_path, ray_tmp, train_dataset):
    from mlflow.tracking import MlflowClient

    args = tiny_run(tmp_path, train_dataset, **{"train.steps": 20, "train.fail_at_step": 3, "ray.max_failures": 0})
    proc = start(["jobs.pretrain", *args], ray_tmp, cwd=tmp_path)
    text, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: training failed: RuntimeError: train.fail_at_step: injected failure at step 3")
    assert "Traceback" not in text and "loop.py" not in text, text[-3000:]  # no worker stderr on the console
    assert "[rank 0] train worker rank 0 on node" in text  # the workers' own log lines are forwarded
    (log_file,) = (tmp_path / ".generalmodel/logs").glob("pretrain-*.log")
    assert str(log_file) in last and "--ray.verbose=true" in last
    for traceback in (log_file.read_text(), artifact_text(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))):
        assert "=== worker rank 0: RuntimeError" in traceback and "Traceback (most recent call last)" in traceback
        assert 'loop.py", line' in traceback and "injected failure at step 3" in traceback
    assert not ray_processes(ray_tmp)


def artifact_text(client) -> str:
    (run,) = client.search_runs([client.get_experiment_by_name("generalmodel").experiment_id])
    assert run.info.status == "FAILED"
    return Path(client.download_artifacts(run.info.run_id, "failure/tracebacks.txt")).read_text()


def test_ctrl_c_stops_the_api_server_and_its_cluster(tmp_path, ray_tmp):
    """`make serve`'s job in the foreground: it answers, then SIGINT removes the app and the
    local Ray cluster it started, exit 0."""
    import json
    import urllib.request

    import torch
    from conftest import make_documents

    from generalmodel.cluster import free_port
    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.infer.export import export_files
    from models import build_model
    from models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=320, max_seq_len=64, n_layers=2, n_heads=2, d_model=32)
    torch.manual_seed(0)
    files = export_files(cfg, build_model(cfg).state_dict(), train_bpe(make_documents(20, seed=3), 320).to_str())
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    port = free_port()
    proc = start(["jobs.serve", f"--model={tmp_path}", "--name=tiny", f"--port={port}", "--num_cpus=0.5"], ray_tmp)
    lines, deadline = [], time.time() + 180
    for line in proc.stdout:
        lines.append(line)
        if "(Ctrl-C stops)" in line:
            break
        assert time.time() < deadline, "".join(lines[-30:])
    body = json.dumps({"model": "tiny", "prompt": "The", "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] <= 4
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    assert "stopping: the requests in flight finish first" in text and time.time() - sent < 30
    assert not ray_processes(ray_tmp)
