"""Retrieval (generalmodel/retrieval, jobs/index.py): passages keep whole sentences and every word;
the lsa embedder reads back from its stored files bit for bit; the model embedder's mean of hidden
states does not depend on padding; an index built by Ray Data returns the planted passage and equals
brute-force search; on S3, with titles from a column and an HNSW graph; the search tool; bad input
names the row and publishes nothing; an index is replaced only when asked, a damaged one refused;
jobs.sample --index answers after the passages."""

import json

import numpy as np
import pytest
import torch
from conftest import PLANTED, make_documents

from generalmodel import UserError
from generalmodel.config import StorageConfig
from generalmodel.data.tokenizer import train_bpe
from generalmodel.infer.tools import call
from generalmodel.retrieval import (
    Index,
    IndexConfig,
    IndexExistsError,
    ModelEmbedder,
    TfidfEmbedder,
    build_index,
    chunk,
    context,
    search_tool,
)
from generalmodel.storage import resolve
from models import build_model
from models.llama import LlamaConfig

QUERY = "how many whales did the lighthouse keeper count in the harbour"


def test_passages_are_whole_sentences_and_keep_every_word():
    text = "One two three. Four five six seven. " + " ".join(f"w{i}" for i in range(23)) + ". Last one."
    passages = chunk(text, 8)
    assert passages[0] == "One two three. Four five six seven."  # the next sentence would pass 8 words
    assert passages[1] == " ".join(f"w{i}" for i in range(8))  # a long sentence, cut
    assert all(len(p.split()) <= 8 for p in passages)
    assert " ".join(passages).split() == text.split()
    assert chunk("  ", 8) == [] and chunk("A b c.", 8) == ["A b c."]


@pytest.mark.parametrize("kind", ["tfidf", "lsa"])
def test_the_fitted_embedders_read_back_from_their_files_exactly(kind):
    texts = [p for d in make_documents(20, seed=3) for p in chunk(d, 30)]
    embedder = TfidfEmbedder.fit(texts, kind, dim=16)
    again = TfidfEmbedder.from_files(kind, embedder.files().__getitem__)
    x = embedder.embed(texts[:10] + ["zebra quokka"])
    assert np.array_equal(x, again.embed(texts[:10] + ["zebra quokka"])) and x.shape == (11, 16)
    assert np.allclose(np.linalg.norm(x[:10], axis=1), 1, atol=1e-5)
    assert not x[10].any()  # no known word: the zero vector (it matches nothing)
    with pytest.raises(UserError, match="at least 2 passages"):
        TfidfEmbedder.fit(["only one"], kind, 8)


def test_the_model_embedder_is_the_mean_hidden_state_whatever_the_padding():
    tokenizer = train_bpe(make_documents(10, seed=4), 300)
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=300, max_seq_len=64, n_layers=2, n_heads=2, d_model=32))
    embedder = ModelEmbedder("models:/x/1", model, tokenizer)
    texts = ["The river and the mountain.", "A quiet market in winter, with an ancient engine and a letter."]
    together = embedder.embed(texts)
    for text, row in zip(texts, together, strict=True):
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.inference_mode():
            mean = model(ids, hidden=True)[0].mean(0).numpy()
        assert np.allclose(row, mean / np.linalg.norm(mean), atol=1e-5)
        assert np.allclose(embedder.embed([text])[0], row, atol=1e-5)
    assert embedder.spec == {"kind": "model", "model": "models:/x/1", "dim": 32}


@pytest.mark.integration
def test_the_index_returns_the_planted_passage_and_equals_brute_force(planted_index):
    index = Index.load(planted_index, StorageConfig())
    hits = index.search([QUERY], 3)[0]
    assert PLANTED in hits[0].text and hits[0].title == "planted"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    manifest = index.manifest
    assert manifest["documents"] == 31 and manifest["passages"] == len(index)
    assert manifest["embedder"]["kind"] == "tfidf" and manifest["index"] == {"kind": "flat", "metric": "cosine"} | {
        "dim": index.embedder.dim
    }
    # flat search is exact: the same ids and scores as scoring every passage
    queries = [QUERY, "the ancient engine by the river", "a letter in winter"]
    every = index.embedder.embed(index.texts)
    for query, found in zip(queries, index.search(queries, 5), strict=True):
        scores = every @ index.embedder.embed([query])[0]
        best = np.argsort(-scores, kind="stable")[:5]
        assert np.allclose([h.score for h in found], scores[best], atol=1e-5)
        assert np.allclose(scores[[h.id for h in found]], scores[best], atol=1e-5)  # ids that score so (ties aside)
    text = context(hits[:2], words=5)
    assert text.splitlines()[0] == "context:" and text.splitlines()[1].startswith("[1] planted: ")
    assert len(text.splitlines()[2].split(": ", 1)[1].split()) <= 5


@pytest.mark.integration
def test_an_index_on_s3_with_titles_from_a_column_and_the_search_tool(ray_cluster, s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    storage = StorageConfig(
        endpoint_url=s3_server.endpoint, access_key_id=s3_server.key, secret_access_key=s3_server.secret
    )
    rows = [{"body": d, "name": f"Doc {i}"} for i, d in enumerate(make_documents(12, seed=8))]
    rows.insert(5, {"body": f"Some words first. {PLANTED} Then more.", "name": "Harbour log"})
    source = resolve(f"s3://{bucket}/corpus/docs.jsonl", storage)
    source.write_bytes("\n".join(json.dumps(r) for r in rows).encode())
    where = {"source": source.uri, "out": f"s3://{bucket}/index", "text_field": "body", "title_field": "name"}
    cfg = IndexConfig(**where, kind="hnsw", embedder="lsa", dim=32)
    manifest = build_index(cfg, storage)
    assert manifest["documents"] == 13 and manifest["index"]["kind"] == "hnsw"
    index = Index.load(cfg.out, storage)
    assert index.search([QUERY], 1)[0][0].title == "Harbour log"
    tool = search_tool(index, k=2, words=6)
    result = call("search", {"query": QUERY}, {"search": tool})
    assert result.startswith("[1] Harbour log: ") and "\n[2] " in result
    assert call("search", {"query": " "}, {"search": tool}) == "error: the query must be a non-empty string"
    assert tool.spec["function"]["parameters"]["required"] == ["query"]


@pytest.mark.integration
def test_bad_input_names_the_row_and_publishes_nothing_and_an_index_is_replaced_only_when_asked(
    ray_cluster, planted_index, tmp_path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine.", "title": "a"}) + "\n" + json.dumps({"text": "no title here."}) + "\n")
    out = tmp_path / "index"
    with pytest.raises(UserError, match=r"bad.jsonl:2: field 'title' should be a string, got NoneType"):
        build_index(IndexConfig(source=str(bad), out=str(out), title_field="title"), StorageConfig())
    assert not out.exists() or not any(out.iterdir())  # no manifest, no half-written version
    with pytest.raises(UserError, match=r"--embedder 'nope' is not 'tfidf', 'lsa' or a model that loads"):
        build_index(IndexConfig(source=str(bad), out=str(out), embedder="nope"), StorageConfig())
    assert not out.exists() or not any(out.iterdir())

    from jobs.index import IndexJobConfig, main

    with pytest.raises(IndexExistsError, match="already holds an index"):
        main(IndexJobConfig(source=str(tmp_path), out=planted_index))
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.txt").write_text(f"{PLANTED} Nothing else.")
    (good / "b.txt").write_text("A letter in winter. The river was quiet.")
    first = main(IndexJobConfig(source=str(good), out=str(out)))
    second = main(IndexJobConfig(source=str(good), out=str(out), overwrite=True, passage_words=8))
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", second["version"]])
    assert first["version"] != second["version"] and second["passages"] > first["passages"]
    assert main(IndexJobConfig(out=str(out), query=QUERY, k=1))["hits"][0]["title"] == "a"
    (out / second["version"] / "passages.parquet").write_bytes(b"damaged")
    with pytest.raises(UserError, match="passages.parquet: its sha256 differs"):
        Index.load(str(out), StorageConfig())


@pytest.mark.integration
def test_sampling_with_an_index_answers_after_the_passages(planted_index, tmp_path, capsys):
    from generalmodel.data.chat import ChatFormat
    from generalmodel.data.tokenizer import eos_id
    from generalmodel.infer import SamplingParams, generate
    from generalmodel.infer.export import export_files
    from jobs.sample import SampleConfig
    from jobs.sample import main as sample

    tokenizer = train_bpe(make_documents(10, seed=4), 300)  # reserves the chat tokens
    cfg = LlamaConfig(vocab_size=300, max_seq_len=256, n_layers=2, n_heads=2, d_model=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, data in export_files(cfg, model.state_dict(), tokenizer.to_str()).items():
        (tmp_path / name).write_bytes(data)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    asked = SampleConfig(model=str(tmp_path), chat=True, prompt=[QUERY], index=planted_index, retrieval_k=2)
    (answer,) = sample(asked.model_copy(update={"sampling": params}))
    assert "passages: [1] planted (" in capsys.readouterr().out
    hits = Index.load(planted_index, StorageConfig()).search([QUERY], 2)[0]
    fmt = ChatFormat.from_json(tokenizer.to_str())
    prompt = fmt.prompt_ids([{"role": "system", "content": context(hits)}, {"role": "user", "content": QUERY}])
    assert answer == tokenizer.decode(list(generate(model, prompt, params, {fmt.end_id, eos_id(tokenizer)})))
    with pytest.raises(UserError, match="--index puts passages in a system turn: it needs --chat"):
        sample(SampleConfig(model=str(tmp_path), prompt=[QUERY], index=planted_index))
