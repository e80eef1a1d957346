"""A large file is prepared by many tasks (issue: one 20 GB .jsonl on one core): .txt and .jsonl files
in byte ranges that own the lines starting in them, Parquet in runs of row groups. The ranges hold
every record exactly once whatever their size, and a split file gives the dataset the whole file
gives: the same documents, the same tokens, the same shards on any cluster."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_documents

from generalmodel.config import DataConfig, StorageConfig, load_config
from generalmodel.data.prepare import plan_dataset
from generalmodel.data.sources import Piece, SourceError, list_pieces, read_documents, read_rows, split_pieces
from jobs import prepare_data

STORAGE = StorageConfig()


def whole_and_ranges(path, target: int) -> tuple[Piece, list[Piece]]:
    (piece,) = list_pieces(DataConfig(source=str(path)), STORAGE)
    return piece, split_pieces([piece], target, STORAGE)


@pytest.mark.parametrize("seed", range(6))
def test_byte_ranges_hold_every_line_once(tmp_path, seed):
    """Random lines (multi-byte characters, empty lines, CRLF, a missing last newline) cut at random
    range sizes: the ranges' documents are the whole file's, in order."""
    rng = random.Random(seed)
    lines = [
        json.dumps({"text": "".join(rng.choice("ab é中\t") for _ in range(rng.randint(0, 40))) or "x"})
        for _ in range(rng.randint(50, 200))
    ]
    newline = rng.choice(["\n", "\r\n"])
    text = newline.join(line + (newline * rng.randint(0, 1) if rng.random() < 0.2 else "") for line in lines)
    path = tmp_path / "big.jsonl"
    path.write_bytes(text.encode() + (b"\n" if seed % 2 else b""))
    data = DataConfig(source=str(path))
    whole, ranges = whole_and_ranges(path, rng.randint(7, 300))
    assert len(ranges) > 3 and all(r.end is not None for r in ranges)
    pieces = [t for r in ranges for t in read_documents(r, data, STORAGE).texts]
    assert pieces == read_documents(whole, data, STORAGE).texts
    rows = [row for r in ranges for _, row in read_rows(r, STORAGE)]  # chat/preference records too
    assert rows == [row for _, row in read_rows(whole, STORAGE)]


def test_a_large_txt_is_one_document_per_range(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n".join(make_documents(40, seed=3, words_per_doc=24)))  # lines of ~150 characters
    data = DataConfig(source=str(path))
    whole, ranges = whole_and_ranges(path, 800)
    texts = [read_documents(r, data, STORAGE).texts for r in ranges]
    assert all(len(t) == 1 for t in texts) and len(texts) == len(ranges) > 5
    assert "\n".join(t[0] for t in texts) == read_documents(whole, data, STORAGE).texts[0]  # cut at line ends


def test_parquet_is_read_in_runs_of_row_groups(tmp_path):
    path = tmp_path / "big.parquet"
    docs = make_documents(60, seed=4)
    pq.write_table(pa.table({"text": docs, "id": list(range(60))}), path, row_group_size=5)
    data = DataConfig(source=str(path))
    whole, ranges = whole_and_ranges(path, 6000)
    assert len(ranges) > 3 and [r.start for r in ranges[1:]] == [r.end for r in ranges[:-1]]
    assert [t for r in ranges for t in read_documents(r, data, STORAGE).texts] == docs
    assert [row["id"] for r in ranges for _, row in read_rows(r, STORAGE)] == list(range(60))
    bad = DataConfig(source=str(path), text_field="body")
    with pytest.raises(SourceError, match=r"big.parquet \[row groups 0:\d+\]: no column 'body'"):
        read_documents(ranges[0], bad, STORAGE)


def test_a_bad_line_is_named_with_its_range(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = [json.dumps({"messages": [{"role": "user", "content": "hi " * 30}]}) for _ in range(200)]
    path.write_text("\n".join(good[:150] + ["{not json"] + good[150:]) + "\n")
    _, ranges = whole_and_ranges(path, 2000)
    errors = [row for r in ranges for where, row in read_rows(r, STORAGE) if isinstance(row, Exception)]
    assert len(errors) == 1 and "chat.jsonl [bytes " in str(errors[0]) and "not valid JSON" in str(errors[0])


def test_one_large_jsonl_prepares_in_many_tasks_as_the_whole_file_would(ray_cluster, tmp_path):
    """The same lines as one .jsonl read in ranges, and as one file per line (which is never split):
    the same documents and tokens in each split, and the ranged dataset's shards do not depend on
    anything but the input and the config."""
    docs = make_documents(120, seed=8, words_per_doc=120)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "many").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "many" / f"{i:03d}.jsonl").write_text(json.dumps({"text": d}) + "\n")
    tokenizer = tmp_path / "tokenizer.json"

    def cfg(source, output):
        overrides = {"data.source": str(source), "data.output": str(tmp_path / output), "data.vocab_size": 400,
                     "data.seq_len": 32, "data.val_fraction": 0.1, "data.shard_input_mb": 0.02}  # fmt: skip
        if tokenizer.exists():
            overrides["data.tokenizer"] = str(tokenizer)
        return load_config(overrides=overrides)

    tokenizer.write_text(plan_dataset(cfg(tmp_path / "many", "x")).tokenizer_json)
    plan = plan_dataset(cfg(tmp_path / "one", "ranged"))
    assert len(plan.units) >= 4 and all(p.end is not None for unit in plan.units for p in unit)
    ranged = prepare_data.main(cfg(tmp_path / "one", "ranged"))
    files = prepare_data.main(cfg(tmp_path / "many", "files"))
    assert ranged["source"]["ranges"] == len(plan.units) and files["source"]["ranges"] == 0
    for split in ("train", "val"):
        a, b = ranged["splits"][split], files["splits"][split]
        assert a["documents"] == b["documents"] and a["documents"] > 0
        assert a["tokens"] + a["dropped_tail_tokens"] == b["tokens"] + b["dropped_tail_tokens"]
    again = prepare_data.main(cfg(tmp_path / "one", "again"))
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [
        s["sha256"] for s in ranged["splits"]["train"]["shards"]
    ]
