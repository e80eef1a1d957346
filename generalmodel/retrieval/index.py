"""A vector index of a corpus' passages on the object store: built by Ray Data, searched by FAISS.

    python -m jobs.index --source=sotu --out=s3://bucket/indexes/sotu           # (jobs/index.py)

Building (`build_index`, on a Ray session):
  1. the source is listed like data preparation's (`data.source`: sotu, files, s3://, hf:), and each
     unit of files is a Ray Data task that splits its documents into passages of whole sentences
     (`passage_words` at most) and writes them, with their document's title, as a Parquet part;
  2. the embedder is fitted on the driver (tfidf, lsa: on up to `fit_passages` passages spread
     over the corpus) or loaded (a registered model);
  3. a second pass of tasks embeds each part;
  4. the driver builds the FAISS index (exact inner product over unit vectors, `flat`, or an HNSW
     graph, `hnsw`) and writes, under a new version prefix, `passages.parquet` (id, title, text),
     `index.faiss` and the embedder's files; the manifest (`kind: retrieval_index`, counts, the
     embedder, the files' sha256) is written last. A failure deletes the version: readers see the
     previous index or none, never half of one.

Reading (`Index.load`): the manifest, then the files it names (their hashes checked); `search`
embeds queries and returns each one's top-k passages (`Hit`), best first.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import posixpath
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from generalmodel import UserError
from generalmodel.config import DataConfig, Section, StorageConfig
from generalmodel.data.prepare import map_units, plan_units, refuse_node_local, unit_bytes
from generalmodel.data.sources import (
    Piece,
    SourceError,
    list_pieces,
    normalize,
    read_documents,
    read_rows,
    split_pieces,
)
from generalmodel.retrieval.embedders import FITTED, Embedder, ModelEmbedder, TfidfEmbedder, load_npy, npy_bytes
from generalmodel.storage import MANIFEST, Location, check_bucket, publish_manifest, read_manifest, resolve
from generalmodel.storage.location import sha256_hex

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its "could not load AVX2" lines at import

KIND = "retrieval_index"
UNIT_MB = 64  # input per task at most (less for a small corpus, so that every CPU gets work)


class IndexConfig(Section):
    """What to index and how (`jobs/index.py`)."""

    source: str = Field("sotu", description="The corpus, as data.source: 'sotu', a path, s3:// prefix, hf:ID.")
    out: str = Field(..., description="Where the index goes (a directory or s3:// prefix).")
    text_field: str = Field("text", description="Text column of .jsonl/.parquet/HF sources.")
    title_field: str | None = Field(
        None, description="Column naming each document (cited with its passages); default: the file's name."
    )
    hf_split: str = Field("train", description="Split of a saved DatasetDict or hf: dataset.")
    passage_words: int = Field(80, ge=8, description="Most words in a passage (whole sentences, cut if longer).")
    embedder: str = Field(
        "tfidf", description="'tfidf' or 'lsa' (fitted on the corpus), or a model reference (models:/NAME/N)."
    )
    dim: int = Field(512, gt=0, description="tfidf, lsa: dimensions of the vectors (lsa: fewer for a small corpus).")
    fit_passages: int = Field(
        200_000, gt=1, description="tfidf, lsa: most passages fitted on (spread over the corpus)."
    )
    kind: Literal["flat", "hnsw"] = Field("flat", description="flat: exact search; hnsw: approximate, for millions.")
    overwrite: bool = Field(False, description="Replace an index already at `out`.")
    seed: int = 0

    def data(self) -> DataConfig:
        return DataConfig(source=self.source, text_field=self.text_field, hf_split=self.hf_split)


class IndexExistsError(UserError):
    pass


# ---------------------------------------------------------------------------------------------
# Passages

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def chunk(text: str, words: int) -> list[str]:
    """Runs of whole sentences of at most `words` words (a longer sentence is cut into runs of words)."""
    out: list[str] = []
    run: list[str] = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        w = sentence.split()
        if run and len(run) + len(w) > words:
            out.append(" ".join(run))
            run = []
        while len(w) > words:
            out.append(" ".join(w[:words]))
            w = w[words:]
        run += w
    if run:
        out.append(" ".join(run))
    return out


def documents(piece: Piece, cfg: IndexConfig, storage: StorageConfig) -> tuple[list[tuple[str, str]], list]:
    """(title, text) of every document of a piece, and the skipped files ((uri, reason))."""
    if cfg.title_field is None or piece.kind == "txt":
        docs = read_documents(piece, cfg.data(), storage)
        name = posixpath.splitext(posixpath.basename(piece.uri.split(":", 1)[-1]))[0]
        if piece.end is not None:
            name = f"{name} [{piece.start}:{piece.end}]"
        many = len(docs.texts) > 1
        return [(f"{name} #{i + 1}" if many else name, t) for i, t in enumerate(docs.texts)], docs.skipped
    out = []
    for where, row in read_rows(piece, storage):
        if isinstance(row, Exception):
            raise row
        text, title = row.get(cfg.text_field), row.get(cfg.title_field)
        if not isinstance(text, str) or not isinstance(title, str):
            field, got = (cfg.text_field, text) if not isinstance(text, str) else (cfg.title_field, title)
            raise SourceError(f"{where}: field {field!r} should be a string, got {type(got).__name__}")
        text = normalize(text)
        if text:
            out.append((title, text))
    return out, []


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _read_parquet(loc: Location) -> pa.Table:
    return pq.read_table(io.BytesIO(loc.read_bytes()))


# ---------------------------------------------------------------------------------------------
# Building (a Ray session)


def build_index(cfg: IndexConfig, storage: StorageConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Build and publish the index at `cfg.out`; returns its manifest. A model embedder
    (`cfg.embedder`, pinned by the caller) is downloaded from the registry at `tracking_uri` by
    the driver and by each worker process."""
    import ray

    out = resolve(cfg.out, storage)
    check_bucket(out)
    previous = None
    if out.join(MANIFEST).exists():
        if not cfg.overwrite:
            raise IndexExistsError(f"{out.uri} already holds an index ({MANIFEST} exists); pass --overwrite=true")
        previous = read_manifest(out, KIND)[0]["version"]  # another kind of artifact there: an error
    model = None if cfg.embedder in FITTED else _model_embedder(cfg.embedder, storage, tracking_uri)
    started = time.time()
    pieces = list_pieces(cfg.data(), storage)
    refuse_node_local(pieces, out, ("--source", "--out"))
    target = unit_bytes(pieces, UNIT_MB)
    units = plan_units(split_pieces(pieces, target, storage, txt_above=UNIT_MB * 1e6), target)
    version = f"v-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    vloc = out.join(version)
    parts = vloc.join("parts")
    parts_uri = parts.uri  # tasks resolve it themselves: an S3 client set up on their own process
    log.info("indexing %s: %d files in %d units into %s", cfg.source, len(pieces), len(units), vloc.uri)
    try:

        def split(unit: int, unit_pieces: list[Piece]) -> dict[str, Any]:
            titles, texts, skipped, count = [], [], [], 0
            for piece in unit_pieces:
                docs, skips = documents(piece, cfg, storage)
                skipped += skips
                count += len(docs)
                for title, text in docs:
                    for passage in chunk(text, cfg.passage_words):
                        titles.append(title)
                        texts.append(passage)
            where = resolve(parts_uri, storage).join(f"passages-{unit:05d}.parquet")
            where.write_bytes(_parquet_bytes(pa.table({"title": titles, "text": texts})))
            return {"unit": unit, "documents": count, "skipped": skipped}

        metas = map_units(units, split)
        # read once: what the embedder is fitted on and what passages.parquet holds
        passages = pa.concat_tables([_read_parquet(parts.join(f"passages-{m['unit']:05d}.parquet")) for m in metas])
        if len(passages) == 0:
            raise SourceError(f"source {cfg.source!r}: no text to index in {len(pieces)} files")
        embedder = model or _fit(cfg, passages.column("text").to_pylist())
        files = embedder.files()
        files_ref = ray.put(files)
        spec = embedder.spec

        def embed(unit: int, _pieces: list[Piece]) -> dict[str, Any]:
            local = cached_embedder(spec, lambda: ray.get(files_ref), storage, tracking_uri)
            here = resolve(parts_uri, storage)
            texts = _read_parquet(here.join(f"passages-{unit:05d}.parquet")).column("text").to_pylist()
            vectors = local.embed(texts) if texts else np.zeros((0, local.dim), np.float32)
            here.join(f"vectors-{unit:05d}.npy").write_bytes(npy_bytes(vectors))
            return {"unit": unit}

        map_units(units, embed)
        passages = passages.add_column(0, "id", pa.array(np.arange(len(passages), dtype=np.int64)))
        vectors = np.concatenate([load_npy(parts.join(f"vectors-{m['unit']:05d}.npy").read_bytes()) for m in metas])
        index_bytes = _faiss_bytes(vectors, cfg.kind)
        written = {
            "passages.parquet": _parquet_bytes(passages),
            "index.faiss": index_bytes,
            **{f"embedder/{k}": v for k, v in files.items()},
        }
        for name, data in written.items():
            vloc.join(name).write_bytes(data)
        parts.delete_dir()
        skipped = [s for m in metas for s in m["skipped"]]
        manifest = {
            "kind": KIND,
            "version": version,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "source": cfg.source,
            "text_field": cfg.text_field,
            "title_field": cfg.title_field,
            "documents": sum(m["documents"] for m in metas),
            "passages": len(passages),
            "passage_words": cfg.passage_words,
            "embedder": spec,
            "index": {"kind": cfg.kind, "metric": "cosine", "dim": int(vectors.shape[1])},
            "files": {name: {"sha256": sha256_hex(data), "bytes": len(data)} for name, data in written.items()},
            "skipped": {"files": len(skipped), "examples": [f"{u}: {r}" for u, r in skipped[:5]]},
            "seconds": round(time.time() - started, 1),
        }
        publish_manifest(out, manifest)
    except BaseException:
        vloc.delete_dir()
        raise
    if previous and previous != version:
        out.join(previous).delete_dir()
    return manifest


def _model_embedder(reference: str, storage: StorageConfig, tracking_uri: str | None) -> Embedder:
    """The model embedder, loaded on the driver before any work: a reference that does not resolve
    is an error naming the option."""
    try:
        return cached_embedder({"kind": "model", "model": reference}, dict, storage, tracking_uri)
    except UserError as e:
        raise UserError(f"--embedder {reference!r} is not 'tfidf', 'lsa' or a model that loads: {e}") from None


def _fit(cfg: IndexConfig, passages: list[str]) -> Embedder:
    """A tfidf or lsa embedder fitted on every stride-th passage, up to cfg.fit_passages."""
    texts = passages[:: max(1, -(-len(passages) // cfg.fit_passages))]  # spread over the whole corpus
    t0 = time.time()
    embedder = TfidfEmbedder.fit(texts, cfg.embedder, cfg.dim, cfg.seed)
    log.info("fitted %s (%d dims) on %d passages in %.1fs", cfg.embedder, embedder.dim, len(texts), time.time() - t0)
    return embedder


def _faiss_bytes(vectors: np.ndarray, kind: str) -> bytes:
    import faiss

    dim = vectors.shape[1]
    index = faiss.IndexFlatIP(dim) if kind == "flat" else faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def load_embedder(spec: dict[str, Any], read, model_dir: str | None = None) -> Embedder:
    """The embedder a manifest describes; `read(name)`: the bytes of one of its files;
    `model_dir`: the download of a model embedder."""
    if spec["kind"] in FITTED:
        return TfidfEmbedder.from_files(spec["kind"], read)
    if spec["kind"] == "model":
        if model_dir is None:
            raise UserError(f"the index embeds with {spec['model']}: its download is needed to load it")
        return ModelEmbedder.from_directory(spec["model"], model_dir)
    raise UserError(f"unknown embedder kind {spec['kind']!r} in the index manifest")


_EMBEDDERS: dict[str, Embedder] = {}  # per process: a worker embeds many units with one


def cached_embedder(spec: dict[str, Any], files, storage: StorageConfig, tracking_uri: str | None) -> Embedder:
    """The embedder `spec` describes, loaded once per process (`files()`: its files by name; a
    model embedder is downloaded from the registry)."""
    from generalmodel.tracking.registry import download_model

    key = json.dumps(spec, sort_keys=True)
    if key not in _EMBEDDERS:
        _EMBEDDERS.clear()
        model_dir = download_model(spec["model"], tracking_uri, storage) if spec["kind"] == "model" else None
        _EMBEDDERS[key] = load_embedder(spec, files().__getitem__, model_dir)
    return _EMBEDDERS[key]


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Hit:
    """One retrieved passage: its id in the index, its document's title, its text, the cosine score."""

    id: int
    title: str
    text: str
    score: float

    def cited(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "id": self.id, "title": self.title, "score": round(self.score, 4), "text": self.text}


class Index:
    """A published index in memory: its passages, FAISS index and embedder."""

    def __init__(self, uri: str, manifest: dict, passages: pa.Table, index, embedder: Embedder):
        self.uri, self.manifest, self.index, self.embedder = uri, manifest, index, embedder
        self.titles = passages.column("title").to_pylist()
        self.texts = passages.column("text").to_pylist()

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def load(cls, uri: str, storage: StorageConfig, model_dir: str | None = None) -> Index:
        """`model_dir`: the embedder model's download, for an index embedded by a model
        (`open_index` downloads it)."""
        import faiss

        root = resolve(uri, storage)
        manifest, _ = read_manifest(root, KIND)
        vloc = root.join(manifest["version"])

        def read(name: str) -> bytes:
            data = vloc.join(name).read_bytes()
            want = manifest["files"].get(name, {}).get("sha256")
            if want != sha256_hex(data):
                raise UserError(f"{vloc.join(name).uri}: its sha256 differs from the manifest's (a damaged index)")
            return data

        passages = pq.read_table(io.BytesIO(read("passages.parquet")))
        index = faiss.deserialize_index(np.frombuffer(read("index.faiss"), dtype=np.uint8))
        embedder = load_embedder(manifest["embedder"], lambda name: read(f"embedder/{name}"), model_dir)
        if index.ntotal != len(passages) or index.d != embedder.dim:
            raise UserError(f"{root.uri}: the index holds {index.ntotal}×{index.d}, the manifest's files disagree")
        return cls(root.uri, manifest, passages, index, embedder)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Each query's `k` best passages (fewer if the index is smaller), best first."""
        if not queries:
            return []
        k = min(k, len(self))
        scores, ids = self.index.search(self.embedder.embed(queries), k)
        return [
            [Hit(int(i), self.titles[i], self.texts[i], float(s)) for s, i in zip(row_s, row_i, strict=True) if i >= 0]
            for row_s, row_i in zip(scores, ids, strict=True)
        ]


def open_index(uri: str, storage: StorageConfig, tracking_uri: str | None) -> Index:
    """The index at `uri`, with the model it embeds with downloaded from the registry when it has
    one (a tfidf or lsa index needs nothing else)."""
    from generalmodel.tracking.registry import download_model

    spec = read_manifest(resolve(uri, storage), KIND)[0]["embedder"]
    directory = download_model(spec["model"], tracking_uri, storage) if spec.get("kind") == "model" else None
    return Index.load(uri, storage, directory)


def numbered(hits: list[Hit], words: int | None = None) -> str:
    """Passages as a model reads them: one line each, "[rank] title: text", cut to `words` words."""
    return "\n".join(
        f"[{rank}] {hit.title}: {' '.join(hit.text.split()[:words]) if words else hit.text}"
        for rank, hit in enumerate(hits, 1)
    )


def context(hits: list[Hit], words: int | None = None) -> str:
    """Retrieved passages as the text of a system turn before the question (`numbered` under
    "context:"): what the RAG demo's data and the served API's `retrieval` option write."""
    return "context:\n" + numbered(hits, words)


def search_tool(index: Index, k: int = 2, words: int | None = 40):
    """The `search` tool over an index (generalmodel.infer.tools.Tool): {"query": "..."} → the
    query's `k` best passages, `numbered`. Give it to `converse` in `available`."""
    from generalmodel.infer.tools import Tool, ToolError

    def run(query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise ToolError("the query must be a non-empty string")
        return numbered(index.search([query], k)[0], words) or "no passages"

    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "what to look for"}},
        "required": ["query"],
    }
    return Tool("search", f"Search {index.manifest['source']} for passages about a query.", parameters, run)
