"""`jobs/interp.py` on a registered model (MLA + MoE, the chat format): every figure and table
per prompt, one MLflow run tagged with the model version (which points back at it), metrics that
are the model's own; bad prompt files fail naming the file and the entry, before anything is
written or logged."""

import csv
import dataclasses

import pytest
import torch
import yaml
from conftest import make_documents

from generalmodel import UserError
from generalmodel.data.tokenizer import train_bpe
from generalmodel.infer.export import export_files
from generalmodel.interp.prompts import read_prompts
from models import PRESETS, build_model

CFG = dataclasses.replace(PRESETS["deepseek-tiny"], vocab_size=400, d_model=64, max_seq_len=64)
PROMPTS = {
    "prompts": [
        {
            "name": "chat",
            "clean": {"user": "the people of the nation", "assistant": "the state"},
            "corrupted": {"user": "the people of the union", "assistant": "the state"},
            "answer": " of",
            "wrong": " and",
        },
        {"clean": "the government of the people"},  # raw text, the model's own prediction
    ]
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(make_documents(40, seed=2) + ["the people of the nation and the union"] * 5, CFG.vocab_size)


def test_prompt_files_are_checked_entry_by_entry(tokenizer, tmp_path):
    path = tmp_path / "p.yaml"
    tokenizer_json = tokenizer.to_str()

    def read(document):
        path.write_text(yaml.safe_dump(document))
        return read_prompts(str(path), tokenizer_json, CFG.max_seq_len)

    chat, raw = read(PROMPTS)
    assert chat.name == "chat" and raw.name == "prompt-1"
    assert len(chat.ids) == len(chat.corrupted) and chat.ids != chat.corrupted
    assert chat.answer == tokenizer.encode(" of").ids[0] and raw.answer is None and raw.corrupted is None
    bad = [
        ({"prompts": [{"clean": "x", "answer": " of the people"}]}, r"prompt 0: answer ' of the people' is \d tokens"),
        ({"prompts": [{"clean": "the people", "corrupted": "the people of the nation"}]}, "token-aligned"),
        ({"prompts": [{"clean": "a"}, {"clean": "b", "colour": 1}]}, "prompt 1: colour: Extra inputs"),
        ({"prompts": [{"clean": "a", "wrong": " of"}]}, "`wrong` needs an `answer`"),
        ({"prompts": [{"clean": "a", "corrupted": {"user": "b"}}]}, "both be text or both be chat turns"),
        ({"prompts": [{"name": "x", "clean": "a"}, {"name": "x", "clean": "b"}]}, "'x' is used twice"),
        ({"prompts": [{"clean": "the " * 80}]}, "more than the model's max_seq_len=64"),
        ({"prompts": []}, "non-empty list"),
    ]
    for document, message in bad:
        with pytest.raises(UserError, match=message) as error:
            read(document)
        assert str(path) in str(error.value)
    with pytest.raises(UserError, match="cannot read the prompts file"):
        read_prompts(str(tmp_path / "missing.yaml"), tokenizer_json, 64)


@pytest.mark.e2e
def test_the_job_logs_every_figure_to_a_run_linked_to_the_model_version(mlflow_server, tokenizer, tmp_path):
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking.runs import log_model, register
    from jobs.interp import InterpConfig, main

    torch.manual_seed(0)
    model = build_model(CFG).eval()
    export = tmp_path / "export"
    export.mkdir()
    for name, data in export_files(CFG, model.state_dict(), tokenizer.to_str()).items():
        (export / name).write_bytes(data)
    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment(f"interp-{tmp_path.name}"))
    log_model(client, run.info.run_id, str(export))
    client.set_terminated(run.info.run_id)
    reference = register(client, "interp-test", run.info.run_id)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump(PROMPTS))
    out = tmp_path / "out"
    cfg = InterpConfig(
        model=reference, prompts=str(prompts), out=str(out), tracking={"uri": mlflow_server.uri}, generate=True,
        sampling={"max_new_tokens": 8, "entropy_low": 5.0, "entropy_high": 5.5, "varentropy_high": 0.0},
    )  # fmt: skip

    result = main(cfg)

    per_prompt = {"attention.png", "logit_lens.png", "dla.png", "dla.csv", "routing.png"}
    per_prompt |= {"answer_entropy.png", "answer_entropy.csv"}  # --generate: the continuation's entropy
    steps = list(csv.DictReader(open(out / "chat" / "answer_entropy.csv")))
    assert 1 <= len(steps) <= 8 and {s["decision"] for s in steps} <= {"argmax", "sample", "explore"}
    assert result["metrics"]["chat.answer_mean_entropy"] == pytest.approx(
        sum(float(s["entropy"]) for s in steps) / len(steps), abs=1e-3
    )
    assert {p.name for p in (out / "chat").iterdir()} == per_prompt | {"patching.png", "patching.csv"}
    assert {p.name for p in (out / "prompt-1").iterdir()} == per_prompt
    rows = list(csv.DictReader(open(out / "chat" / "patching.csv")))
    T = len(read_prompts(str(prompts), tokenizer.to_str(), 64)[0].ids)
    L, H = CFG.n_layers, CFG.n_heads
    assert len(rows) == 3 * L * T + L * H
    # the model's own numbers: the clean logit difference is what a plain forward gives
    chat = read_prompts(str(prompts), tokenizer.to_str(), 64)[0]
    with torch.no_grad():
        last = model(torch.tensor([chat.ids]))[0, -1]
    assert result["metrics"]["chat.logit_diff_clean"] == pytest.approx(
        float(last[chat.answer] - last[chat.wrong]), abs=1e-4
    )

    logged = client.get_run(result["run_id"])
    assert logged.data.tags["model_name"] == "interp-test" and logged.data.tags["model_version"] == "1"
    assert logged.data.tags["run_id"] == run.info.run_id and logged.data.tags["generalmodel.kind"] == "interp"
    assert "chat.answer_prob" in logged.data.metrics and "prompt-1.answer_rank" in logged.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "chat")}
    assert "chat/patching.png" in artifacts and "chat/routing.png" in artifacts
    assert {a.path for a in client.list_artifacts(result["run_id"])} >= {"interp.md", "prompts.yaml", "chat"}
    assert client.get_model_version("interp-test", "1").tags["interp_run"] == result["run_id"]

    # a bad entry fails before anything is written or logged; the last figures stay
    prompts.write_text(yaml.safe_dump({"prompts": [*PROMPTS["prompts"], {"clean": "x", "answer": " the people"}]}))
    runs = len(client.search_runs([logged.info.experiment_id]))
    with pytest.raises(UserError, match=r"prompts.yaml: prompt 2: answer ' the people'"):
        main(cfg)
    assert len(client.search_runs([logged.info.experiment_id])) == runs
    assert (out / "chat" / "patching.png").exists()
    prompts.write_text(yaml.safe_dump(PROMPTS))
    with pytest.raises(UserError, match="'resid' is not a per-position hook point of every block"):
        main(cfg.model_copy(update={"patch": ["resid"]}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not the job's")
    with pytest.raises(UserError, match="holds files of something else"):
        main(cfg.model_copy(update={"out": str(tmp_path / "mine")}))
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_the_committed_prompt_files_read(tmp_path):
    """configs/prompts/*.yaml, with a tokenizer trained on the arithmetic demo's worked answers."""
    import random
    from pathlib import Path

    from generalmodel.post.arithmetic import problem

    rng = random.Random(0)
    problems = [problem(rng, 2) for _ in range(300)]
    tokenizer = train_bpe([f"{p.question} {p.worked}" for p in problems], 400)
    files = sorted((Path(__file__).parents[1] / "configs" / "prompts").glob("*.yaml"))
    assert files
    for path in files:
        assert read_prompts(str(path), tokenizer.to_str(), 256)
