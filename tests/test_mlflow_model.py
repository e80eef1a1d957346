"""Registered versions are real MLflow models: a pyfunc over our sampler (and the transformers
directory beside it) that `mlflow.pyfunc.load_model` predicts with and `mlflow models serve`
serves from the registry on 127.0.0.1; our own jobs still load the native export from them."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_documents

from generalmodel.cluster import free_port
from generalmodel.config import StorageConfig
from generalmodel.data.tokenizer import EOS, train_bpe
from generalmodel.infer import SamplingParams, export_files, generate, load_model, sample_chat
from generalmodel.tracking.pyfunc import save
from generalmodel.tracking.registry import download_model
from generalmodel.tracking.runs import log_model, register
from models import build_model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=320, max_seq_len=64, n_layers=2, n_heads=2, n_kv_heads=1, d_model=32)
PROMPTS = ["Fellow citizens,", "The state of the Union"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(CFG)
    tokenizer = train_bpe(make_documents(30, seed=5), CFG.vocab_size)
    directory = tmp_path_factory.mktemp("export")
    for name, data in export_files(CFG, model.state_dict(), tokenizer.to_str()).items():
        (directory / name).write_bytes(data)
    return directory


def greedy(export_dir, prompt, n=12):
    model, tokenizer = load_model(str(export_dir))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    out = generate(model, ids, SamplingParams(temperature=0, max_new_tokens=n), tokenizer.token_to_id(EOS))
    return tokenizer.decode(list(out))


def test_the_pyfunc_predicts_what_our_sampler_generates(export_dir, tmp_path):
    import mlflow

    assert save(str(export_dir), str(tmp_path / "model")) is None  # a llama: hf/ written too
    assert {"MLmodel", "data", "hf", "code", "requirements.txt"} <= set(os.listdir(tmp_path / "model"))
    pyfunc = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    assert pyfunc.metadata.signature.params.to_dict()[0]["name"] == "max_new_tokens"
    out = pyfunc.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 12, "temperature": 0.0})
    assert list(out) == [greedy(export_dir, p) for p in PROMPTS]
    assert load_model(str(tmp_path / "model"))[0].cfg == CFG  # our loaders read its export/
    # chat: each prompt is a user's message, the prediction the assistant's reply
    replies = pyfunc.predict(
        pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 12, "temperature": 0.0, "chat": True}
    )
    model, tokenizer = load_model(str(export_dir))
    params = SamplingParams(temperature=0, max_new_tokens=12)
    assert list(replies) == [
        "".join(sample_chat(model, tokenizer, [{"role": "user", "content": p}], params)) for p in PROMPTS
    ]


def test_mlflow_models_serve_answers_from_the_registry(export_dir, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"serve-{time.time_ns()}")
    run = client.create_run(experiment)
    log_model(client, run.info.run_id, str(export_dir))
    client.set_terminated(run.info.run_id)
    model_uri = register(client, "served-tiny", run.info.run_id)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["hf_export"] == "model/hf"
    assert tags["transformers_model"] == f"runs:/{run.info.run_id}/transformers"
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    pipeline = mlflow.transformers.load_model(tags["transformers_model"])  # the transformers flavor
    out = pipeline(PROMPTS[0], max_new_tokens=12, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"] == greedy(export_dir, PROMPTS[0])
    local = download_model(model_uri, mlflow_server.uri, StorageConfig())
    assert Path(local).name == "export"  # only the native export is downloaded for our jobs
    client.set_registered_model_alias("served-tiny", "champion", model_uri.rsplit("/", 1)[1])
    by_alias = download_model("models:/served-tiny@champion", mlflow_server.uri, StorageConfig())
    assert (Path(by_alias) / "model.safetensors").read_bytes() == (Path(local) / "model.safetensors").read_bytes()

    port = free_port()
    venv_bin = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH, as in an activated venv
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server.uri, PATH=f"{venv_bin}:{os.environ['PATH']}")
    log = open(tmp_path / "serve.log", "w")
    mlflow_cli = str(Path(venv_bin) / "mlflow")
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        body = {
            "dataframe_records": [{"prompt": p} for p in PROMPTS],
            "params": {"max_new_tokens": 12, "temperature": 0},
        }
        answer = post_when_up(f"http://127.0.0.1:{port}/invocations", body, server, tmp_path / "serve.log")
    finally:
        os.killpg(server.pid, 9)
        server.wait()
    assert answer == {"predictions": [greedy(export_dir, p) for p in PROMPTS]}


def post_when_up(url, body, server, log_path, timeout_s=120):
    deadline = time.time() + timeout_s
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError) as e:
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow models serve did not answer ({e}):\n{log_path.read_text()[-3000:]}")
            time.sleep(1)


def test_a_remote_code_model_carries_its_hf_directory_but_no_transformers_flavor(tmp_path):
    """MLA has no native class: `model/hf` is remote code, and the transformers flavor (a pipeline
    that would run the directory's code) is skipped with the reason as its tag."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from generalmodel.interop.hf import is_remote_code

    cfg = LlamaConfig(**{**CFG.__dict__, "attention": "mla", "kv_lora_rank": 16, "qk_rope_head_dim": 8})
    torch.manual_seed(0)
    directory = tmp_path / "export"
    directory.mkdir()
    tokenizer = train_bpe(make_documents(30, seed=5), cfg.vocab_size)
    for name, data in export_files(cfg, build_model(cfg).state_dict(), tokenizer.to_str()).items():
        (directory / name).write_bytes(data)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("remote", artifact_location=str(tmp_path / "artifacts")))
    log_model(client, run.info.run_id, str(directory))
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["hf_export"] == "model/hf"
    assert tags["transformers_model"].startswith("none: remote code; load model/hf with trust_remote_code=True")
    hf = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model/hf", tracking_uri=client.tracking_uri)
    assert is_remote_code(hf) and os.path.exists(os.path.join(hf, "modeling_generalmodel.py"))
