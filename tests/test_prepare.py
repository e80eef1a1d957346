"""The Ray Data preparation job on a real local Ray cluster: sources, manifest, determinism,
overwrite, and bad input (clear error, non-zero exit, nothing published)."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_documents

from generalmodel import UserError
from generalmodel.config import load_config
from generalmodel.data.loader import TokenDataset, TokenLoader
from generalmodel.data.tokenizer import load_tokenizer
from jobs import prepare_data


def config(source, output, **data):
    overrides = {"data.source": str(source), "data.output": str(output), "data.vocab_size": 400, "data.seq_len": 32}
    overrides.update({f"data.{k}": v for k, v in data.items()})
    return load_config(overrides=overrides)


def shard_checksums(manifest):
    return [s["sha256"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]


def test_txt_corpus_end_to_end(ray_cluster, txt_corpus, tmp_path):
    out = tmp_path / "ds"
    manifest = prepare_data.main(config(txt_corpus, out, val_fraction=0.1))

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["source"]["files"] == 60
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == 60 and val["documents"] > 0
    assert train["tokens"] == train["rows"] * 33 and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == 400
    assert manifest["config"]["data"]["seq_len"] == 32

    # Every token of every kept document is in a shard, EOS after each document, in order
    # within a unit; only the tails that do not fill a row are dropped.
    ds = TokenDataset.open(str(out))
    tokenizer = load_tokenizer(ds.tokenizer_json(), "tokenizer")
    eos = manifest["tokenizer"]["special_tokens"]["<|eos|>"]
    total = sum(len(tokenizer.encode(d).ids) + 1 for d in make_documents(60))
    kept = sum(manifest["splits"][s]["tokens"] + manifest["splits"][s]["dropped_tail_tokens"] for s in ("train", "val"))
    assert kept == total
    first = ds.read_shard(ds.shards["train"][0]).reshape(-1)
    assert (first == eos).sum() >= 1
    decoded = tokenizer.decode(first[: list(first).index(eos)].tolist())
    assert decoded.startswith("Document ")

    batch_x, batch_y = next(TokenLoader(ds, "train", batch_size=4))
    assert batch_x.shape == (4, 32) and (batch_x[:, 1:] == batch_y[:, :-1]).all()


def test_same_config_same_shards_and_rerun_refuses(ray_cluster, txt_corpus, tmp_path):
    first = prepare_data.main(config(txt_corpus, tmp_path / "a"))
    second = prepare_data.main(config(txt_corpus, tmp_path / "b"))
    assert shard_checksums(first) == shard_checksums(second)
    assert first["tokenizer"]["sha256"] == second["tokenizer"]["sha256"]

    with pytest.raises(UserError, match="already holds a dataset.*--data.overwrite"):
        prepare_data.main(config(txt_corpus, tmp_path / "a"))

    # Overwrite publishes a new version; a trainer reading the old one reads on (a whole epoch).
    old = TokenDataset.open(str(tmp_path / "a"))
    reader = TokenLoader(old, "train", batch_size=4, seed=3)
    next(reader)
    third = prepare_data.main(config(txt_corpus, tmp_path / "a", overwrite=True, seq_len=16))
    assert third["previous_versions"] == [first["version"]]
    for _ in range(old.rows("train") // 4 + 2):  # past the end of the epoch: every old shard read
        x, _ = next(reader)
        assert x.shape == (4, 32)
    assert TokenDataset.open(str(tmp_path / "a")).seq_len == 16
    # The next overwrite retires the first version: never more than the current and one previous.
    fourth = prepare_data.main(config(txt_corpus, tmp_path / "a", overwrite=True, seq_len=16))
    versions = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("v-"))
    assert versions == sorted([third["version"], fourth["version"]])


def test_two_runs_on_one_output_never_corrupt_it(ray_cluster, txt_corpus, tmp_path):
    import threading

    results, errors = [], []

    def prepare(seq_len):
        try:
            results.append(prepare_data.main(config(txt_corpus, tmp_path / "ds", overwrite=True, seq_len=seq_len)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=prepare, args=(n,)) for n in (16, 24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors and len(results) == 2
    ds = TokenDataset.open(str(tmp_path / "ds"))
    ds.verify()  # whichever published last: whole, every shard present and matching
    assert ds.manifest["version"] in {r["version"] for r in results}


def test_jsonl_parquet_and_saved_hf_sources(ray_cluster, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = make_documents(40, seed=3)
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:15]))
    pq.write_table(pa.table({"text": docs[15:30]}), src / "b.parquet")
    datasets.Dataset.from_dict({"text": docs[30:]}).save_to_disk(str(tmp_path / "hf"))

    mixed = prepare_data.main(config(src, tmp_path / "out1", val_fraction=0.1))
    assert mixed["splits"]["train"]["documents"] + mixed["splits"]["val"]["documents"] == 30
    hf = prepare_data.main(config(tmp_path / "hf", tmp_path / "out2", val_fraction=0.2))
    assert hf["splits"]["train"]["documents"] + hf["splits"]["val"]["documents"] == 10


def test_skipped_files_are_counted_in_the_manifest(ray_cluster, txt_corpus, tmp_path):
    (txt_corpus / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    manifest = prepare_data.main(config(txt_corpus, tmp_path / "ds"))
    assert manifest["source"]["skipped_files"] == [
        {"uri": str(txt_corpus / "blob.txt"), "reason": "binary (contains NUL bytes)"}
    ]


def test_reused_tokenizer(ray_cluster, txt_corpus, tmp_path):
    first = prepare_data.main(config(txt_corpus, tmp_path / "a"))
    tok = tmp_path / "a" / first["tokenizer"]["path"]
    second = prepare_data.main(config(txt_corpus, tmp_path / "b", tokenizer=str(tok), seq_len=64))
    assert second["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]


def assert_nothing_published(out):
    assert not (out / "manifest.json").exists()
    assert not any(p.name.startswith("v-") for p in out.iterdir()) if out.exists() else True


def test_failure_inside_a_ray_task_publishes_nothing(ray_cluster, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(make_documents(30)):
        (src / f"d{i:02d}.jsonl").write_text(json.dumps({"text": d}))
    # Broken JSON in a file the tokenizer sample does not reach is found by a Ray task.
    (src / "z.jsonl").write_text('{"text": "ok"}\n{"text": ')
    cfg = config(src, tmp_path / "ds", tokenizer_sample_mb=0.001)
    with pytest.raises(UserError, match=r"z.jsonl: not valid JSON lines"):
        prepare_data.main(cfg)
    assert_nothing_published(tmp_path / "ds")


def test_whitespace_only_corpus_with_given_tokenizer(ray_cluster, txt_corpus, tmp_path):
    first = prepare_data.main(config(txt_corpus, tmp_path / "a"))
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(3):
        (blank / f"{i}.txt").write_text(" \n\t \n")
    tok = str(tmp_path / "a" / first["tokenizer"]["path"])
    with pytest.raises(UserError, match="all documents are empty or whitespace"):
        prepare_data.main(config(blank, tmp_path / "ds", tokenizer=tok))
    assert_nothing_published(tmp_path / "ds")


def run_job(*args):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs/prepare_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_bad_input_exits_non_zero_with_a_clear_message(tmp_path):
    out = tmp_path / "ds"
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "a.docx").write_text("x")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "manifest.json").write_text("{}")
    cases = [
        ([f"--data.source={tmp_path}/nope"], "no such file or directory"),
        ([f"--data.source={tmp_path}/odd"], "unknown file type '.docx'"),
        ([f"--data.source={blank}"], "only empty or unreadable documents"),
        (["--data.seq_len=0"], "data.seq_len = 0"),
        (["--data.vocab_size=258"], "data.vocab_size = 258"),
        ([f"--data.output={tmp_path}/existing"], "already holds a dataset"),
        (
            ["--data.tokenizer=/nonexistent/tokenizer.json"],
            "data.tokenizer '/nonexistent/tokenizer.json': no such file",
        ),
    ]
    for args, message in cases:
        if not any(a.startswith("--data.output") for a in args):
            args = [*args, f"--data.output={out}"]
        result = run_job(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not out.exists()


@pytest.mark.parametrize("val_fraction", [0.1, 0.95])  # the one document in train, or (likely) in val
def test_a_single_input_txt_prepares_with_val_from_the_token_stream(ray_cluster, tmp_path, val_fraction):
    """Most people's first try: one file, one document. Split by document, one split is empty; the
    val split then comes from the end of the token stream, and the manifest says so."""
    (tmp_path / "input.txt").write_text(" ".join(make_documents(12)))  # one document, ~20K characters
    manifest = prepare_data.main(config(tmp_path / "input.txt", tmp_path / "ds", val_fraction=val_fraction))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["val_split"].startswith("token stream: the last")
    assert train["documents"] + val["documents"] == 1
    assert val["rows"] >= 1 and train["rows"] >= 1
    assert val["rows"] == round(val_fraction * (train["rows"] + val["rows"]))
    ds = TokenDataset.open(str(tmp_path / "ds"))
    ds.verify()  # the rewritten shards match the manifest
    x, _ = next(TokenLoader(ds, "val", batch_size=1, shuffle=False))
    assert x.shape == (1, 32)


def test_without_a_val_split_nothing_is_moved(ray_cluster, tmp_path):
    (tmp_path / "input.txt").write_text(" ".join(make_documents(12)))
    manifest = prepare_data.main(config(tmp_path / "input.txt", tmp_path / "ds", val_fraction=0.0))
    assert manifest["val_split"] == "documents" and manifest["splits"]["val"]["rows"] == 0


def test_a_job_refuses_a_dataset_prepared_from_an_older_source(ray_cluster, txt_corpus, tmp_path):
    """A training job reuses the dataset its data section names; when the source's files changed
    since it was prepared, the job stops with the difference (or re-prepares with overwrite)."""
    from generalmodel.storage import RunLayout
    from generalmodel.train.readiness import ensure_dataset

    cfg = config(txt_corpus, tmp_path / "ds", val_fraction=0.1)
    layout = RunLayout.of(cfg)
    _, first = ensure_dataset(cfg, layout)  # missing: prepared
    _, again = ensure_dataset(cfg, layout)  # unchanged: reused
    assert again.manifest_sha256 == first.manifest_sha256
    (txt_corpus / "new.txt").write_text(make_documents(1, seed=9)[0])
    with pytest.raises(UserError, match=r"was prepared from .* when it had 60 files .* it now has 61 files"):
        ensure_dataset(cfg, layout)
    cfg = config(txt_corpus, tmp_path / "ds", val_fraction=0.1, overwrite=True)
    _, fresh = ensure_dataset(cfg, layout)
    assert fresh.manifest["source"]["files"] == 61


def test_byte_tokenizer_dataset_holds_every_byte_and_is_not_mixed_up_with_bpe(ray_cluster, txt_corpus, tmp_path):
    """data.tokenizer=bytes: every document's UTF-8 bytes (then EOS) are its tokens, through the same
    Ray Data path and manifest; a job asking for bytes refuses a BPE dataset at its output, and the
    other way round."""
    from generalmodel.storage import RunLayout
    from generalmodel.train.readiness import ensure_dataset, tokenizer_changed

    (txt_corpus / "accents.txt").write_text("Naïve café — 日本語, déjà vu.")
    manifest = prepare_data.main(config(txt_corpus, tmp_path / "bytes", tokenizer="bytes", val_fraction=0.0))
    assert manifest["tokenizer"]["vocab_size"] == 263
    split = manifest["splits"]["train"]
    texts = make_documents(60) + ["Naïve café — 日本語, déjà vu."]
    assert split["tokens"] + split["dropped_tail_tokens"] == sum(len(t.encode()) + 1 for t in texts)
    ds = TokenDataset.open(str(tmp_path / "bytes"))
    tokenizer = load_tokenizer(ds.tokenizer_json(), "tokenizer")
    rows = ds.read_shard(ds.shards["train"][0]).reshape(-1).tolist()
    eos = manifest["tokenizer"]["special_tokens"]["<|eos|>"]
    document = rows[: rows.index(eos)]
    assert bytes(i - 7 for i in document).decode() == tokenizer.decode(document)
    assert tokenizer.decode(document) in texts

    asks_bpe = config(txt_corpus, tmp_path / "bytes")
    with pytest.raises(UserError, match=r"prepared from .* with the byte tokenizer, and data.tokenizer is None"):
        ensure_dataset(asks_bpe, RunLayout.of(asks_bpe))
    asks_bytes = config(txt_corpus, tmp_path / "bytes", tokenizer="bytes")
    assert tokenizer_changed(asks_bytes, manifest) is None
    bpe_manifest = {"tokenizer": {"sha256": "a trained BPE's"}}
    assert "another tokenizer than the byte one" in tokenizer_changed(asks_bytes, bpe_manifest)
    assert tokenizer_changed(asks_bpe, bpe_manifest) is None
    shares_its_tokenizer = config(txt_corpus, tmp_path / "bytes", tokenizer=str(tmp_path / "bytes"))
    assert tokenizer_changed(shares_its_tokenizer, manifest) is None  # a file: not judged
