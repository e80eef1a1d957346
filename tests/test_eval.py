"""Evaluation: bits per byte counts every byte of the text once, whatever the tokenizer; the
multiple-choice scorer reads HellaSwag's format and names bad lines; `jobs/eval.py` compares two
registered versions over Ray tasks into MLflow; our scorer and lm-evaluation-harness (through
the adapter) give identical acc and acc_norm on the same fixture and model."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_documents

from generalmodel import UserError
from generalmodel.data.tokenizer import EOS, train_bpe
from generalmodel.eval.runner import LoadedModel, evaluate
from generalmodel.eval.scoring import corpus_windows, read_hellaswag, score_windows, split_pair, token_bytes
from generalmodel.infer.export import export_files
from models import build_model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=320, max_seq_len=64, n_layers=2, n_heads=2, d_model=32)
DOCS = make_documents(12, seed=9) + ["Ünïcödé — ✓ and emoji 🙂 in a document."]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(make_documents(30, seed=5), CFG.vocab_size)


def model(seed):
    torch.manual_seed(seed)
    return build_model(CFG).eval()


def test_bits_per_byte_counts_each_byte_of_the_text_once(tokenizer):
    sizes = token_bytes(tokenizer)
    eos = tokenizer.token_to_id(EOS)
    assert sizes[eos] == 0
    windows = corpus_windows(tokenizer, DOCS, CFG.max_seq_len, eos)
    score = score_windows(model(0), windows, sizes, batch_size=3)
    assert score.bytes == sum(len(d.encode()) for d in DOCS)
    assert score.tokens == sum(len(tokenizer.encode(d, add_special_tokens=False).ids) for d in DOCS)
    assert math.isclose(score.bits_per_byte, score.nats / math.log(2) / score.bytes)
    # batching changes nothing
    one = score_windows(model(0), windows, sizes, batch_size=1)
    assert math.isclose(one.nats, score.nats, rel_tol=1e-5)


def test_bytes_of_a_sentencepiece_style_tokenizer():
    """Metaspace tokens ('▁' for a space) and byte-fallback tokens (<0x0A>) count their real bytes."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "</s>": 1, "▁the": 2, "é": 3, "<0x0A>": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.add_special_tokens(["</s>"])
    sizes = token_bytes(tokenizer)
    assert list(sizes[[1, 2, 3, 4]]) == [0, 4, 2, 1]


def test_multiple_choice_reading_and_the_harness_split(tokenizer, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"ctx": "A man", "endings": ["walks.", "runs."], "label": 1}) + "\n\n{broken\n")
    with pytest.raises(UserError, match=r"mc.jsonl:3: not a multiple-choice example"):
        read_hellaswag(str(path))
    (example,) = read_hellaswag(str(path), limit=1)
    assert example.continuations == [" walks.", " runs."] and example.label == 1
    head, tail = split_pair(tokenizer, "A man ", "walks.")  # the context's trailing space moves over
    assert tokenizer.decode(head) == "A man" and tokenizer.decode(tail) == " walks."


def write_mc_fixture(path, n=12, seed=0):
    rng = np.random.default_rng(seed)
    words = " ".join(make_documents(4, seed=seed)).split()
    with open(path, "w") as f:
        for _ in range(n):
            ctx = " ".join(rng.choice(words, 8))
            endings = [" ".join(rng.choice(words, int(rng.integers(2, 7)))) + "." for _ in range(4)]
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": int(rng.integers(0, 4))}) + "\n")
    return path


def export_dir(tmp_path, seed, tokenizer):
    directory = tmp_path / f"model-{seed}"
    directory.mkdir()
    for name, data in export_files(CFG, model(seed).state_dict(), tokenizer.to_str()).items():
        (directory / name).write_bytes(data)
    return directory


def test_our_scorer_and_lm_eval_agree_on_a_fixture(ray_cluster, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    from jobs.eval import EvalConfig

    fixture = write_mc_fixture(tmp_path / "fixture.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gm_fixture.yaml").write_text(
        f"task: gm_fixture\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {fixture}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_target: '{{label}}'\n"
        "doc_to_choice: '{{endings}}'\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    cfg = EvalConfig(
        models=["x"], tasks=[str(fixture)], harness_tasks=["gm_fixture"], harness_include=str(tmp_path / "tasks")
    )
    m = model(3)
    metrics = evaluate(LoadedModel("x", CFG, m.state_dict(), tokenizer.to_str()), cfg, cfg.storage.resolved())
    assert metrics["fixture.examples"] == 12
    assert metrics["fixture.acc"] == metrics["harness.gm_fixture.acc"]
    assert metrics["fixture.acc_norm"] == metrics["harness.gm_fixture.acc_norm"]


def test_two_registered_versions_side_by_side(ray_cluster, mlflow_server, tokenizer, tmp_path):
    from mlflow.tracking import MlflowClient

    from generalmodel.tracking.runs import log_model, register
    from jobs.eval import EvalConfig
    from jobs.eval import main as eval_job

    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment(f"eval-{tmp_path.name}")
    uris = []
    for seed in (1, 2):
        run = client.create_run(experiment)
        log_model(client, run.info.run_id, str(export_dir(tmp_path, seed, tokenizer)))
        client.set_terminated(run.info.run_id)
        uris.append(register(client, "eval-test", run.info.run_id))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"{i}.txt").write_text(doc)
    fixture = write_mc_fixture(tmp_path / "mc.jsonl")
    cfg = EvalConfig(
        models=uris, corpus=str(corpus), tasks=[str(fixture)], parallelism=2, tracking={"uri": mlflow_server.uri},
        name=f"eval-{tmp_path.name}",
    )  # fmt: skip
    results = eval_job(cfg)
    assert [r.reference for r in results] == uris
    for r in results:
        assert r.metrics["corpus_bytes"] == sum(len(d.encode()) for d in DOCS)
        assert 0 < r.metrics["corpus_bpb"] < 20 and 0 <= r.metrics["mc.acc"] <= 1
    assert results[0].metrics["corpus_bpb"] != results[1].metrics["corpus_bpb"]  # two different models

    (parent,) = client.search_runs(
        [client.get_experiment_by_name("generalmodel").experiment_id], f"attributes.run_name = 'eval-{tmp_path.name}'"
    )
    table = client.download_artifacts(parent.info.run_id, "eval.md", str(tmp_path))
    assert all(u in open(table).read() for u in uris)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["model_version"] for c in children) == ["1", "2"]
    assert all("corpus_bpb" in c.data.metrics for c in children)
