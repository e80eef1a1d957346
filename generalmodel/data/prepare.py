"""Corpus → tokenized, packed Parquet shards + manifest, with Ray Data.

The driver lists the source's files, trains (or loads) the tokenizer on a deterministic sample,
and groups the files into work units. Ray Data runs one task per unit on any node: read →
normalize → tokenize (EOS after each document) → split train/val by document hash → pack into
rows of seq_len+1 tokens → write one Parquet shard per split straight to the output store, and
return the shard's row count and sha256. The driver publishes the manifest last. Chat and
preference sources (`data.format`) run the same way with their own unit (data/conversations.py):
rows rendered with the chat format into token and loss-mask columns, with the model's tokenizer.

Output layout (every path in the manifest is relative to the dataset root):
    <output>/manifest.json                       written last: the dataset exists once it does
    <output>/<version>/tokenizer.json
    <output>/<version>/{train,val}/part-00000.parquet   column `tokens`: fixed_size_list<uint16|uint32>
A rerun with --data.overwrite writes a new <version> and swaps the manifest; the version it replaced
stays (`previous_versions`, for trainers still reading it) and the one before that is deleted. A
crash at any point leaves the previous dataset (or none) readable, never half of one; a version is
deleted only once it has been replaced twice (or, never published, is a day old), so two runs on
one output never delete each other's work.
Shards are a function of the config and the input alone, so the same config gives the same
shards and checksums on any cluster.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from generalmodel import RunFailed, UserError
from generalmodel.config import Config, DataConfig, StorageConfig, dump_config
from generalmodel.data import conversations
from generalmodel.data.loader import DATASET_KIND, FORMAT_VERSION
from generalmodel.data.quality import (
    NearDuplicates,
    difficulty_bounds,
    eval_ngrams,
    exact_key,
    minhash,
    why_removed,
)
from generalmodel.data.shards import COLUMNS, ITEMS, SPLITS, is_val, shard_bytes, token_dtype
from generalmodel.data.sources import SOTU_PREFIX, Piece, SourceError, list_pieces, read_documents, split_pieces
from generalmodel.data.tokenizer import (
    BYTES,
    byte_tokenizer,
    eos_id,
    load_tokenizer,
    read_tokenizer_file,
    special_ids,
    tokenizer_hash,
    train_bpe,
)
from generalmodel.storage import (
    MANIFEST,
    Location,
    RunLayout,
    check_bucket,
    publish_manifest,
    resolve,
    sha256_hex,
)
from generalmodel.version import code_version

log = logging.getLogger(__name__)

# Versions replaced by --data.overwrite that stay readable (a trainer may still be reading one).
KEEP_PREVIOUS = 1
# An unpublished version this old is a killed run's leftover, not a run in progress.
STALE_VERSION_S = 24 * 3600
# Small corpora are cut into about this many units so that every CPU gets work; large ones
# into units of data.shard_input_mb.
TARGET_UNITS = 32
MIN_UNIT_BYTES = 256 * 1024
# A removed document's sample in the manifest: its first characters.
REMOVED_SAMPLE_CHARS = 500


class DatasetExistsError(UserError):
    pass


@dataclass
class Plan:
    """Everything decided on the driver before any Ray task runs."""

    cfg: Config
    storage: StorageConfig  # with env-var credentials resolved, for tasks on other nodes
    out: Location
    pieces: list[Piece]
    units: list[list[Piece]]
    tokenizer_json: str
    vocab_size: int
    started: float
    eval_keys: np.ndarray | None = None  # data.decontaminate: the evaluation files' n-gram keys
    difficulty: tuple[float, float] | None = None  # data.difficulty: the scores a document must fall between


def plan_dataset(cfg: Config, layout: RunLayout | None = None) -> Plan:
    """Check the output (`layout.data_output`), list the source, train or load the tokenizer,
    group files into units. Needs no Ray; every bad input that can be found without reading the
    whole corpus fails here."""
    started = time.time()
    layout = layout or RunLayout.of(cfg)
    data, storage = cfg.data, layout.storage
    out = resolve(layout.data_output, storage)
    check_bucket(out)
    if out.join(MANIFEST).exists() and not data.overwrite:
        raise DatasetExistsError(
            f"{out.uri} already holds a dataset ({MANIFEST} exists); pass --data.overwrite=true to replace it"
        )
    pieces = list_pieces(data, storage)
    log.info("source %s: %d files, %.1f MB", data.source, len(pieces), sum(p.size for p in pieces) / 1e6)
    if data.format != "text" and data.tokenizer is None:
        raise UserError(
            f"data.format={data.format!r} needs the model's tokenizer: set data.tokenizer (the SFT and DPO jobs "
            "take it from train.init_from)"
        )
    target = unit_bytes(pieces, data.shard_input_mb)
    # A large file is read in ranges, by several tasks (a .txt only when over shard_input_mb)
    parts = split_pieces(pieces, target, storage, txt_above=data.shard_input_mb * 1e6)
    # The driver's deterministic corpus sample: what a tokenizer is trained on and difficulty bounds come from
    trains = data.tokenizer is None
    sample = sample_texts(parts, data, storage) if trains or data.difficulty != "none" else []
    tok_text, tok_origin = _tokenizer(data, storage, sample, len(parts))
    vocab = load_tokenizer(tok_text, tok_origin).get_vocab_size()
    if data.format != "text":
        from generalmodel.data.chat import ChatFormat, ChatFormatError

        try:
            ChatFormat.from_json(tok_text)
        except ChatFormatError as e:
            raise UserError(f"data.tokenizer {tok_origin}: {e}") from None
    if data.tokenizer is None and vocab != data.vocab_size:
        log.warning("the corpus supports only %d tokens (asked data.vocab_size=%d)", vocab, data.vocab_size)
    units = plan_units(parts, target)
    eval_keys = eval_ngrams(data.decontaminate, data.decontaminate_ngram, storage) if data.decontaminate else None
    bounds = difficulty_bounds(sample, data) if data.difficulty != "none" else None
    return Plan(cfg, storage, out, pieces, units, tok_text, vocab, started, eval_keys, bounds)


def build_dataset(plan: Plan) -> dict[str, Any]:
    """Run the units as Ray Data tasks and publish the manifest; returns it. Needs a Ray session
    (see generalmodel.cluster.ray_session). On any failure the new version is deleted."""
    import ray

    data, storage, out = plan.cfg.data, plan.storage, plan.out
    refuse_node_local(plan.pieces, out)
    version = f"v-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    version_loc = out.join(version)
    log.info("tokenizing %d units into %s", len(plan.units), version_loc.uri)
    try:
        version_loc.join("tokenizer.json").write_bytes(plan.tokenizer_json.encode())
        tok_ref = ray.put(plan.tokenizer_json)
        drops = find_duplicates(plan) if data.dedup != "none" else {}
        eval_ref = ray.put(plan.eval_keys) if plan.eval_keys is not None else None

        def run_unit(unit: int, pieces: list[Piece]) -> dict[str, Any]:
            eval_keys = ray.get(eval_ref) if eval_ref is not None else None
            removal = Removal(drops.get(unit, {}), eval_keys, plan.difficulty)
            return process_unit(unit, pieces, ray.get(tok_ref), data, storage, version_loc.uri, removal)

        metas = map_units(plan.units, run_unit)
        val_split = "documents" if data.format == "text" else "rows"
        if (
            data.format == "text"
            and data.val_fraction > 0
            and not all(any(m["splits"][s]["shard"] for m in metas) for s in SPLITS)
        ):
            val_split = _split_token_stream(metas, version_loc, data.val_fraction)
        manifest = _manifest(plan, version, metas)
        manifest["val_split"] = val_split
        retired = _record_versions(out, manifest)
        publish_manifest(out, manifest)
    except BaseException:
        _cleanup(version_loc)
        raise
    _delete_versions(out, retired, keep={version, *manifest["previous_versions"]})
    return manifest


def map_units(units: list[list[Piece]], run: Callable[[int, list[Piece]], dict[str, Any]]) -> list[dict[str, Any]]:
    """`run(unit, pieces)` for every unit as a Ray Data task (one CPU each); the results by unit. A
    task's UserError or RunFailed is raised here, with its message."""
    import ray

    items = [{"unit": i, "pieces": json.dumps([asdict(p) for p in u])} for i, u in enumerate(units)]
    # Largest units first, so that the last tasks to start are short (results are keyed by
    # unit, so the order of execution does not change the output).
    items.sort(key=lambda item: -sum(p.size for p in units[item["unit"]]))

    def run_batch(batch: dict[str, Any]) -> dict[str, Any]:
        results = []
        for unit, pieces_json in zip(batch["unit"], batch["pieces"], strict=True):
            try:
                meta = run(int(unit), [Piece(**p) for p in json.loads(pieces_json)])
            except (UserError, RunFailed) as e:
                # Ray keeps only the text of a task's exception; carry the message (and its kind) as data.
                meta = {"unit": int(unit), "error": str(e), "run_failed": isinstance(e, RunFailed)}
            results.append(json.dumps(meta))
        return {"meta": results}

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(run_batch, batch_size=1, num_cpus=1)
    # One operator: Ray Data's per-operator reservation would hold back CPUs for downstream
    # operators that do not exist (measured: 2 CPUs ran like 1.2). This dataset only.
    ds.context.op_resource_reservation_enabled = False
    # Our own lines say what runs ("tokenizing N units", "published ..."): Ray Data's progress
    # report (a block of lines every few seconds on a non-terminal) stays off the console.
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    metas = sorted((json.loads(r["meta"]) for r in ds.take_all()), key=lambda m: m["unit"])
    failed = [m for m in metas if "error" in m]
    if failed:
        more = f" (and {len(failed) - 1} more failed units)" if len(failed) > 1 else ""
        raise (RunFailed if any(m["run_failed"] for m in failed) else UserError)(failed[0]["error"] + more)
    return metas


def find_duplicates(plan: Plan) -> dict[int, dict[int, str]]:
    """data.dedup over the whole corpus: per unit, its documents (by index) that repeat an earlier
    one, and how (exact_duplicate, near_duplicate). One Ray Data pass computes each document's
    exact key (and MinHash signature); the driver keeps the first of each in corpus order."""
    data, storage = plan.cfg.data, plan.storage
    near = data.dedup == "near"

    def sign(unit: int, pieces: list[Piece]) -> dict[str, Any]:
        texts = [t for p in pieces for t in read_documents(p, data, storage).texts]
        entry: dict[str, Any] = {"unit": unit, "exact": [exact_key(t).hex() for t in texts]}
        if near and texts:
            signatures = np.stack([minhash(t, data.dedup_ngram, data.dedup_num_perm) for t in texts])
            entry["minhash"] = base64.b64encode(signatures.astype(np.uint64).tobytes()).decode()
        return entry

    log.info("dedup (%s): signing the documents of %d units", data.dedup, len(plan.units))
    exact: set[str] = set()
    index = NearDuplicates(data.dedup_threshold, data.dedup_num_perm) if near else None
    drops: dict[int, dict[int, str]] = {}
    for meta in map_units(plan.units, sign):
        unit = meta["unit"]
        signatures = (
            np.frombuffer(base64.b64decode(meta["minhash"]), dtype=np.uint64).reshape(-1, data.dedup_num_perm)
            if "minhash" in meta
            else None
        )
        for i, key in enumerate(meta["exact"]):
            if key in exact:
                drops.setdefault(unit, {})[i] = "exact_duplicate"
                continue
            exact.add(key)
            if index is not None and index.seen(len(exact), signatures[i]) is not None:
                drops.setdefault(unit, {})[i] = "near_duplicate"
    return drops


@dataclass
class Removal:
    """What a unit's task removes: documents by index (found by find_duplicates) and those that fail
    data.filters or share an n-gram with data.decontaminate's evaluation files (`eval_keys`)."""

    drops: dict[int, str]
    eval_keys: np.ndarray | None = None
    difficulty: tuple[float, float] | None = None  # the scores a document must fall between

    def why(self, index: int, text: str, data: DataConfig) -> str | None:
        if index in self.drops:
            return self.drops[index]
        if not data.filters and self.eval_keys is None and self.difficulty is None:
            return None
        return why_removed(text, data, self.eval_keys, self.difficulty)


def refuse_node_local(pieces: list[Piece], out: Location, names: tuple[str, str] = ("data.source", "data.output")):
    """On a Ray cluster of several nodes, refuse local input or output paths (`names`: what the
    message calls them): the nodes do not share a disk."""
    from generalmodel.cluster import alive_node_count

    if alive_node_count() <= 1:
        return
    local_input = any(not p.uri.startswith((SOTU_PREFIX, "s3://", "hf://")) for p in pieces)
    if out.is_local or local_input:
        what = names[1] if out.is_local else names[0]
        raise UserError(
            f"{what} is a local path but the Ray cluster has several nodes, which do not share a "
            "disk: use s3:// for corpora and outputs on a multi-node cluster"
        )


def _tokenizer(data: DataConfig, storage: StorageConfig, sample: list[str], files: int) -> tuple[str, str]:
    """The tokenizer JSON and where it came from: the byte tokenizer, a given file, or trained on the
    corpus sample."""
    if data.tokenizer == BYTES:
        return byte_tokenizer().to_str(), "the byte tokenizer (data.tokenizer=bytes)"
    if data.tokenizer is not None:
        return read_tokenizer_file(resolve(data.tokenizer, storage), "data.tokenizer")
    if not sample:
        raise SourceError(f"data.source {data.source!r}: only empty or unreadable documents in {files} files")
    t0 = time.time()
    tokenizer = train_bpe(sample, data.vocab_size)
    log.info(
        "trained a %d-token BPE on %d documents in %.1fs", tokenizer.get_vocab_size(), len(sample), time.time() - t0
    )
    return tokenizer.to_str(), "trained tokenizer"


def sample_texts(pieces: list[Piece], data: DataConfig, storage: StorageConfig) -> list[str]:
    """Documents from files taken in hash order (spread over the corpus, same every run) until
    data.tokenizer_sample_mb of text is in hand."""
    budget = data.tokenizer_sample_mb * 1e6
    texts: list[str] = []
    taken = 0
    for piece in sorted(pieces, key=lambda p: hashlib.sha1(p.where.encode()).hexdigest()):
        for text in read_documents(piece, data, storage).texts:
            texts.append(text)
            taken += len(text)
        if taken >= budget:
            break
    return texts


def unit_bytes(pieces: list[Piece], shard_input_mb: float) -> float:
    """The input bytes of one unit of work: data.shard_input_mb, less for small corpora (so that every
    CPU gets work), never under MIN_UNIT_BYTES. A function of the input and the config only."""
    total = sum(p.size for p in pieces)
    return min(shard_input_mb * 1e6, max(MIN_UNIT_BYTES, total / TARGET_UNITS))


def plan_units(pieces: list[Piece], target: float) -> list[list[Piece]]:
    """Consecutive files (or ranges of a large file: `split_pieces`) grouped up to `target` bytes."""
    units: list[list[Piece]] = [[]]
    size = 0
    for piece in pieces:
        if units[-1] and size + piece.size > target:
            units.append([])
            size = 0
        units[-1].append(piece)
        size += piece.size
    return units


# ---------------------------------------------------------------------------------------------
# One unit of work (a Ray task)

_TOKENIZERS: dict[str, Any] = {}


def _worker_tokenizer(text: str):
    key = tokenizer_hash(text)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = load_tokenizer(text, "tokenizer")
    return _TOKENIZERS[key]


def process_unit(
    unit: int,
    pieces: list[Piece],
    tok_text: str,
    data: DataConfig,
    storage: StorageConfig,
    version_uri: str,
    removal: Removal | None = None,
) -> dict[str, Any]:
    """Read, tokenize, pack and write one unit; returns what the manifest needs of it. `removal`:
    the documents that are not kept (text data: duplicates, filters, decontamination)."""
    # One tokenizer thread per task: Ray runs one task per CPU. (Read when rayon starts.)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    version = resolve(version_uri, storage)

    def write(split: str, columns: dict[str, np.ndarray]) -> dict[str, Any]:
        payload = shard_bytes(columns)
        path = f"{split}/part-{unit:05d}.parquet"
        version.join(path).write_bytes(payload)
        rows = len(next(iter(columns.values())))
        name = version.path.rsplit("/", 1)[-1]
        return {"path": f"{name}/{path}", "rows": rows, "bytes": len(payload), "sha256": sha256_hex(payload)}

    if data.format != "text":
        return {"unit": unit, "skipped": [], **conversations.process_unit(pieces, tok_text, data, storage, write)}

    tokenizer = _worker_tokenizer(tok_text)
    eos = eos_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    row_len = data.seq_len + 1

    docs: dict[str, list[str]] = {s: [] for s in SPLITS}
    skipped: list[tuple[str, str]] = []
    removed: dict[str, dict[str, Any]] = {}  # why -> {"documents": n, "samples": [...]}
    index = 0
    for piece in pieces:
        read = read_documents(piece, data, storage)
        skipped += read.skipped
        for text in read.texts:
            why = removal.why(index, text, data) if removal is not None else None
            index += 1
            if why:
                entry = removed.setdefault(why, {"documents": 0, "samples": []})
                entry["documents"] += 1
                if len(entry["samples"]) < data.removed_samples:
                    entry["samples"].append(text[:REMOVED_SAMPLE_CHARS])
                continue
            docs["val" if is_val(text, data.val_fraction) else "train"].append(text)

    meta: dict[str, Any] = {"unit": unit, "skipped": skipped, "removed": removed, "splits": {}}
    for split in SPLITS:
        encodings = tokenizer.encode_batch_fast(docs[split], add_special_tokens=False) if docs[split] else []
        rows, dropped = pack([e.ids for e in encodings], eos, row_len, dtype)
        entry: dict[str, Any] = {"documents": len(docs[split]), "dropped_tail_tokens": dropped, "shard": None}
        if len(rows):
            entry["shard"] = write(split, {"tokens": rows})
        meta["splits"][split] = entry
    return meta


def pack(docs: list[list[int]], eos: int, row_len: int, dtype) -> tuple[np.ndarray, int]:
    """Concatenate documents with EOS after each, cut into rows of `row_len`; the tail that
    does not fill a row is dropped (returned as a count)."""
    total = sum(len(d) + 1 for d in docs)
    flat = np.empty(total, dtype=dtype)
    pos = 0
    for ids in docs:
        flat[pos : pos + len(ids)] = ids
        flat[pos + len(ids)] = eos
        pos += len(ids) + 1
    num_rows = total // row_len
    return flat[: num_rows * row_len].reshape(num_rows, row_len), total - num_rows * row_len


def _split_token_stream(metas: list[dict[str, Any]], version_loc: Location, val_fraction: float) -> str:
    """A corpus of one or a few documents can leave a split empty when split by document (the one
    document hashed into val, or none did): take the last val_fraction of all rows (at least one)
    as the val split and the rest as train, from the last shard that has rows, and say so in the
    manifest. Runs on the driver before publishing; only small corpora get here."""
    shards = [(m, split) for m in metas for split in SPLITS if m["splits"][split]["shard"]]
    total = sum(m["splits"][split]["shard"]["rows"] for m, split in shards)
    if not shards or total < 2:
        return "documents"  # too little text for both splits: _manifest names the problem
    meta, source = shards[-1]
    entry = meta["splits"][source]["shard"]
    if entry["rows"] < 2:
        return "documents"
    n_val = min(max(1, round(val_fraction * total)), entry["rows"] - 1)
    n_train = entry["rows"] - n_val
    version_dir = version_loc.path.rsplit("/", 1)[-1]
    table = pq.read_table(io.BytesIO(version_loc.join(entry["path"][len(version_dir) + 1 :]).read_bytes()))
    rows = np.asarray(table.column("tokens").combine_chunks().flatten()).reshape(table.num_rows, -1)
    for split, part in (("train", rows[:n_train]), ("val", rows[n_train:])):  # both paths (re)written
        payload = shard_bytes({"tokens": part})
        path = f"{split}/part-{meta['unit']:05d}.parquet"
        version_loc.join(path).write_bytes(payload)
        meta["splits"][split]["shard"] = {
            "path": f"{version_dir}/{path}",
            "rows": len(part),
            "bytes": len(payload),
            "sha256": sha256_hex(payload),
        }
    log.warning("a split had no rows when split by document: the last %d of %d rows are the val split", n_val, total)
    return f"token stream: the last {n_val} of {total} rows (splitting by document left a split empty)"


# ---------------------------------------------------------------------------------------------
# Publishing


def _manifest(plan: Plan, version: str, metas: list[dict[str, Any]]) -> dict[str, Any]:
    cfg, pieces, tok_text, vocab = plan.cfg, plan.pieces, plan.tokenizer_json, plan.vocab_size
    data = cfg.data
    items = ITEMS[data.format]
    skipped = [{"uri": uri, "reason": reason} for m in metas for uri, reason in m["skipped"]]
    readable = sum(len(unit) for unit in plan.units) - len(skipped)  # files, or ranges of large ones
    splits: dict[str, Any] = {}
    for split in SPLITS:
        entries = [m["splits"][split] for m in metas]
        shards = [e["shard"] for e in entries if e["shard"]]
        rows = sum(s["rows"] for s in shards)
        counts = {k: sum(e[k] for e in entries) for k in entries[0] if k != "shard"}
        splits[split] = {**counts, "rows": rows, "tokens": rows * (data.seq_len + 1), "shards": shards}
    if readable == 0:
        raise SourceError(
            f"data.source {data.source!r}: none of its {len(pieces)} files is UTF-8 text "
            f"(e.g. {skipped[0]['uri']}: {skipped[0]['reason']})"
        )
    if sum(s[items] for s in splits.values()) == 0:
        what = "documents are empty or whitespace" if data.format == "text" else f"rows are malformed (no {items})"
        raise SourceError(f"data.source {data.source!r}: all {what}")
    for split in SPLITS:
        if split == "val" and data.val_fraction == 0:
            continue
        if splits[split]["rows"] == 0:
            if splits[split][items] == 0:
                by = f" by data.split_key={data.split_key!r} (whole groups go to one split)" if data.split_key else ""
                raise SourceError(
                    f"the {split} split is empty: none of the {items} landed in it{by}; change data.val_fraction="
                    f"{data.val_fraction} or add data"
                )
            hint = "lower data.seq_len" if data.format == "text" else "raise data.seq_len or data.truncation=right"
            raise SourceError(
                f"the {split} split is empty: its {splits[split][items]} {items} gave no row of "
                f"seq_len+1={data.seq_len + 1} tokens ({hint}, change data.val_fraction={data.val_fraction}, "
                f"or add data)"
            )
        if data.format != "text" and splits[split]["supervised_tokens"] == 0:  # never a silent zero loss
            raise SourceError(f"the {split} split has no supervised token (no assistant answer survived)")
    manifest = {
        "kind": DATASET_KIND,
        "format_version": FORMAT_VERSION,
        "format": data.format,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": version,
        "seq_len": data.seq_len,
        "row_len": data.seq_len + 1,
        "dtype": np.dtype(token_dtype(vocab)).name,
        "column": COLUMNS[data.format][0],
        "columns": list(COLUMNS[data.format]),
        "tokenizer": {
            "path": f"{version}/tokenizer.json",
            "sha256": tokenizer_hash(tok_text),
            "vocab_size": vocab,
            "special_tokens": _special_ids(tok_text),
        },
        "splits": splits,
        "source": {
            "spec": data.source,
            "files": len(pieces),
            "bytes": sum(p.size for p in pieces),
            "ranges": sum(1 for unit in plan.units for p in unit if p.end is not None),  # of large files
            "skipped_files": skipped,
        },
        "removed": _removed(metas, data.removed_samples),
        **(
            {
                "difficulty": {
                    "score": data.difficulty,
                    "quantiles": list(data.difficulty_quantiles),
                    "bounds": [str(b) for b in plan.difficulty],
                }
            }
            if plan.difficulty
            else {}
        ),  # fmt: skip
        "config": dump_config(cfg),
        "code_version": code_version(),
        "build_seconds": round(time.time() - plan.started, 2),
    }
    if data.format != "text":
        bad = sum(m["bad_rows"] for m in metas)
        manifest["rows_policy"] = {"truncation": data.truncation, "packing": data.packing, "bad_rows": data.bad_rows}
        manifest["source"]["bad_rows"] = bad
        manifest["source"]["bad_rows_named"] = [r for m in metas for r in m["bad_rows_named"]][
            : conversations.BAD_ROWS_NAMED
        ]
        if bad:
            log.warning("skipped %d malformed rows (data.bad_rows=skip); the manifest names the first ones", bad)
    return manifest


def _removed(metas: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Per reason (exact_duplicate, near_duplicate, FILTER:CHECK, decontaminated): the documents it
    removed and the first few of them, in corpus order."""
    out: dict[str, dict[str, Any]] = {}
    for meta in metas:
        for why, entry in meta.get("removed", {}).items():
            total = out.setdefault(why, {"documents": 0, "samples": []})
            total["documents"] += entry["documents"]
            total["samples"] = (total["samples"] + entry["samples"])[:samples]
    return dict(sorted(out.items()))


def describe(manifest: dict[str, Any], uri: str) -> str:
    """One line on a published dataset: its sizes, and for chat/preference data what became of the rows."""
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    line = (
        f"published {uri}: train {train['tokens']:,} tokens in {len(train['shards'])} shards, "
        f"val {val['tokens']:,} tokens; vocab {manifest['tokenizer']['vocab_size']}, "
        f"seq_len {manifest['seq_len']}, {len(manifest['source']['skipped_files'])} files skipped, "
        f"{manifest['build_seconds']}s"
    )
    fmt = manifest.get("format", "text")
    if fmt == "text":
        removed = manifest.get("removed", {})
        if removed:
            reasons = ", ".join(f"{why} {entry['documents']:,}" for why, entry in removed.items())
            line += f"\n  removed {sum(e['documents'] for e in removed.values()):,} documents: {reasons}"
        return line
    items = ITEMS[fmt]
    total = {k: train[k] + val[k] for k in (items, "truncated", "dropped_too_long", "dropped_no_supervised")}
    return (
        f"{line}\n  {total[items]:,} {items} ({train[items]:,} train, {val[items]:,} val): {total['truncated']:,} "
        f"truncated, {total['dropped_too_long'] + total['dropped_no_supervised']:,} dropped (too long or no "
        f"supervised token left), {manifest['source']['bad_rows']:,} malformed rows skipped; "
        f"{train['supervised_tokens']:,} supervised train tokens"
    )


def _special_ids(tok_text: str) -> dict[str, int]:
    """The special tokens by name (the manifest's `special_tokens`: name → id)."""
    from generalmodel.tokens import CHAT_TOKENS

    tokenizer = _worker_tokenizer(tok_text)
    ids = [i for i in special_ids(tokenizer).values() if i is not None]
    ids += [tokenizer.token_to_id(t) for t in CHAT_TOKENS.values() if tokenizer.token_to_id(t) is not None]
    return {tokenizer.id_to_token(i): i for i in ids}


def _cleanup(version_loc: Location) -> None:
    try:
        version_loc.delete_dir()
    except Exception as e:  # the original error matters more; say what is left behind
        log.warning("could not delete the unpublished %s: %s", version_loc.uri, e)


def _record_versions(out: Location, manifest: dict[str, Any]) -> list[str]:
    """Put the versions this publish replaces in the new manifest (`previous_versions`: the last
    KEEP_PREVIOUS stay readable for trainers still reading them); returns those retired beyond it."""
    previous: list[str] = []
    if out.join(MANIFEST).exists():
        old = json.loads(out.join(MANIFEST).read_bytes())
        previous = [old["version"], *old.get("previous_versions", [])]
    manifest["previous_versions"] = previous[:KEEP_PREVIOUS]
    return previous[KEEP_PREVIOUS:]


def _delete_versions(out: Location, retired: list[str], keep: set[str]) -> None:
    """Delete published versions that fell out of the history, and leftovers of killed runs (never
    published, older than STALE_VERSION_S). Never a version another run may be writing right now:
    versions are only ever deleted once they were published and replaced twice, or are stale."""
    now = datetime.datetime.now(datetime.UTC)
    for info in out.list_dir():
        name = info.path.rsplit("/", 1)[-1]
        if not name.startswith("v-") or name in keep:
            continue
        try:
            started = datetime.datetime.strptime(name.split("-")[1], "%Y%m%dT%H%M%S").replace(tzinfo=datetime.UTC)
        except (IndexError, ValueError):
            continue  # not ours
        if name in retired or (now - started).total_seconds() > STALE_VERSION_S:
            try:
                out.join(name).delete_dir()
            except Exception as e:  # a dataset published fine; say what is left behind
                log.warning("could not delete the old dataset version %s: %s", out.join(name).uri, e)
