"""Read a published token dataset: `TokenDataset.open(uri)` and the training `TokenLoader`.

The loader defines one global stream of rows per epoch, independent of the world size:
shards in a seeded permutation, taken `shuffle_window` shards at a time, the rows of each
window in a seeded permutation. Global batch k is rows [k·G, (k+1)·G) of the stream, with
G = batch_size × world_size, and rank r takes rows [k·G + r·B, k·G + (r+1)·B). The last
partial global batch of an epoch is dropped. The position is (epoch, rows consumed), so
`state_dict()`/`load_state_dict()` resume exactly — also at another world size, as long as
the stream (dataset, seed, window) is the same, because the stream does not depend on it.

Each shard is read whole (one GET on S3), checked against the manifest's sha256, and decoded;
the next window is prefetched in a background thread.

A dataset's rows have the columns its manifest lists (`columns`): `tokens` for pretraining text;
`tokens`, `mask` for chat; `chosen`, `chosen_mask`, `rejected`, `rejected_mask` for preference
pairs. Columns computed later for the same rows (a reference model's scores) are attached from
shards stored beside the dataset (`attach`). `next_batch()` gives every column of a batch;
iterating a text dataset gives `(input, target)` pairs.
"""

from __future__ import annotations

import concurrent.futures
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from generalmodel import UserError
from generalmodel.config import StorageConfig
from generalmodel.storage import Location, read_manifest, resolve, sha256_hex, with_retries

DATASET_KIND = "token-dataset"
FORMAT_VERSION = 1
# Columns computed later for a dataset's rows and published beside it (generalmodel.train.reference):
# DPO's reference log-probs, Rho-1's per-token reference losses.
REFERENCE_KIND = "dpo-reference"
TOKEN_REFERENCE_KIND = "token-reference"


class DatasetError(UserError):
    """A dataset whose manifest and files disagree."""


@dataclass(frozen=True)
class Shard:
    path: str
    rows: int
    bytes: int
    sha256: str


class TokenDataset:
    """A published dataset: its manifest, verified against the files it lists."""

    def __init__(self, loc: Location, manifest: dict[str, Any], manifest_sha256: str, retry_timeout_s: float):
        self.loc = loc
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.row_len: int = manifest["row_len"]
        self.seq_len: int = manifest["seq_len"]
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.shards = {split: [Shard(**s) for s in info["shards"]] for split, info in manifest["splits"].items()}
        self.format: str = manifest.get("format", "text")
        self.column: str = manifest["column"]
        self.columns: tuple[str, ...] = tuple(manifest.get("columns", [self.column]))
        self.retry_timeout_s = retry_timeout_s  # shard reads ride out a restarting store
        self.attached: dict[str, tuple[Location, list[Shard]]] = {}  # dataset shard path → parts, more columns

    @classmethod
    def open(cls, uri: str, storage: StorageConfig | None = None) -> TokenDataset:
        """Open and check a dataset: manifest present and well-formed, every shard present with
        the size the manifest says. Checksums are checked as shards are read (`verify()` reads
        them all now)."""
        loc = resolve(uri, storage)
        manifest, digest = read_manifest(loc, DATASET_KIND)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{loc.uri}: dataset format_version {manifest.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        try:
            ds = cls(loc, manifest, digest, (storage or StorageConfig()).retry_timeout_s)
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{loc.uri}/manifest.json: malformed, missing or bad field {e}") from None
        infos = loc.fs.get_file_info([loc.join(s.path).path for shards in ds.shards.values() for s in shards])
        for shard, info in zip([s for shards in ds.shards.values() for s in shards], infos, strict=True):
            if info.size is None:
                raise DatasetError(f"{loc.uri}: shard {shard.path} listed in the manifest is missing")
            if info.size != shard.bytes:
                raise DatasetError(
                    f"{loc.uri}: shard {shard.path} has {info.size} bytes, the manifest says {shard.bytes}"
                )
        return ds

    @property
    def uri(self) -> str:
        return self.loc.uri

    @property
    def parts(self) -> dict[str, TokenDataset]:
        """The published datasets it reads, by name (a mixture has several)."""
        return {"dataset": self}

    def tokenizer_json(self) -> str:
        return self.loc.join(self.manifest["tokenizer"]["path"]).read_bytes().decode()

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.split_shards(split))

    def split_shards(self, split: str) -> list[Shard]:
        if split not in self.shards:
            raise DatasetError(f"{self.loc.uri}: no split {split!r}; splits: {', '.join(self.shards)}")
        return self.shards[split]

    def read_shard(self, shard: Shard) -> np.ndarray:
        """The shard's token rows (rows × row_len; the first token column), after checking its sha256."""
        return self.read_columns(shard)[self.column]

    def read_columns(self, shard: Shard) -> dict[str, np.ndarray]:
        """Every column of the shard's rows (and of its attached shard), checked against the manifest."""
        columns = self._read(self.loc, shard, self.row_len)
        if shard.path in self.attached:
            loc, parts = self.attached[shard.path]
            read = [self._read(loc, part, None) for part in parts]
            more = {name: np.concatenate([r[name] for r in read]) for name in read[0]}
            if len(next(iter(more.values()))) != shard.rows:
                raise DatasetError(f"{loc.uri}: the parts for {shard.path} do not have its {shard.rows} rows")
            columns.update(more)
        return columns

    def _read(self, root: Location, shard: Shard, row_len: int | None) -> dict[str, np.ndarray]:
        loc = root.join(shard.path)
        data = with_retries(f"reading {loc.uri}", self.retry_timeout_s, loc.read_bytes)
        digest = sha256_hex(data)
        if digest != shard.sha256:
            raise DatasetError(
                f"{root.uri}: shard {shard.path} has sha256 {digest[:16]}…, the manifest says {shard.sha256[:16]}…"
            )
        table = pq.read_table(io.BytesIO(data))
        columns = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                columns[name] = column.flatten().to_numpy().reshape(-1, row_len or column.type.list_size)
            else:
                columns[name] = column.to_numpy()
        rows = len(next(iter(columns.values())))
        if rows != shard.rows:
            raise DatasetError(f"{root.uri}: shard {shard.path} has {rows} rows, the manifest says {shard.rows}")
        return columns

    def attach(self, root: Location, parts: dict[str, list[Shard]]) -> None:
        """Read more columns for the rows of each dataset shard (by its path) from `root`'s shards:
        the rows of its parts, in order."""
        self.attached.update({path: (root, shard_parts) for path, shard_parts in parts.items()})

    def attach_published(self, uri: str, storage: StorageConfig | None, kind: str = REFERENCE_KIND) -> None:
        """Attach the columns published at `uri` (a manifest of `kind` listing parts per dataset
        shard, e.g. DPO's reference log-probs), checked: made from this dataset version, and a
        part for every shard."""
        root = resolve(uri, storage)
        manifest, _ = read_manifest(root, kind)
        if manifest["dataset"] != self.manifest_sha256:
            raise DatasetError(f"{root.uri}: columns computed from another dataset version than {self.loc.uri}")
        parts = {path: [Shard(**entry) for entry in entries] for path, entries in manifest["shards"].items()}
        missing = [s.path for split in self.shards.values() for s in split if s.path not in parts]
        if missing:
            raise DatasetError(f"{root.uri}: no attached columns for the dataset shard {missing[0]}")
        self.attach(root, parts)

    def verify(self) -> None:
        """Read every shard and check its checksum and row count."""
        for shards in self.shards.values():
            for shard in shards:
                self.read_shard(shard)


class Batches:
    """Iterating a loader gives `(input, target)` pairs of its dataset's token column; `next_batch()`
    (the subclass's) gives every column."""

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.next_batch()[self.dataset.column]
        return batch[:, :-1], batch[:, 1:]


class TokenLoader(Batches):
    """Deterministic, resumable `(input, target)` batches for one rank; see the module doc.

    `shuffle=False` streams the split in manifest order (for evaluation). Iterating never ends
    for training (epochs follow each other); `epochs=1` stops after one pass.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 8,
        epochs: int | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_window <= 0:
            raise ValueError(f"shuffle_window must be positive, got {shuffle_window}")
        self.dataset = dataset
        self.split = split
        self.shards = dataset.split_shards(split)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.window = shuffle_window
        self.epochs = epochs
        self.global_batch = batch_size * world_size
        self.rows_per_epoch = sum(s.rows for s in self.shards)
        if self.rows_per_epoch < self.global_batch:
            raise DatasetError(
                f"{dataset.loc.uri}: the {split} split has {self.rows_per_epoch} rows, fewer than one "
                f"global batch ({batch_size} × {world_size} ranks)"
            )
        self.epoch = 0
        self.rows_consumed = 0  # rows of the current epoch's stream taken by all ranks together
        self._plan_epoch: int | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="token-loader")
        self._windows: dict[int, concurrent.futures.Future] = {}

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "rows_consumed": self.rows_consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.window,
            "split": self.split,
            "dataset": self.dataset.manifest_sha256,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("dataset", "split", "seed", "shuffle", "shuffle_window"):
            if state[key] != mine[key]:
                raise DatasetError(
                    f"cannot resume the loader: {key} was {state[key]!r}, now {mine[key]!r} "
                    "(the token stream would differ)"
                )
        # A different global batch (another world size) is fine: the stream does not depend on
        # it, only where it is cut into batches.
        self.epoch = state["epoch"]
        self.rows_consumed = state["rows_consumed"]
        self._windows.clear()

    def rewind(self) -> None:
        """Back to the start of epoch 0, keeping what is already read (evaluation reuses one
        loader, so the val shards are read and checked once, not at every eval)."""
        if self.epoch != 0:
            self._windows.clear()
        self.epoch = 0
        self.rows_consumed = 0

    # -- iteration -----------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next batch: every column (token ids as int64, masks as bool, floats as they are)."""
        usable = self.rows_per_epoch - self.rows_per_epoch % self.global_batch
        if self.rows_consumed + self.global_batch > usable:
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self.epoch += 1
            self.rows_consumed = 0
        start = self.rows_consumed + self.rank * self.batch_size
        rows = self._stream_rows(start, start + self.batch_size)
        self.rows_consumed += self.global_batch
        return {name: batch_tensor(name, column) for name, column in rows.items()}

    def metrics(self) -> dict[str, float]:
        """What a log step reports about the position (a mixture: per dataset; one dataset: nothing)."""
        return {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the epoch's stream --------------------------------------------------------------------

    def _plan(self) -> None:
        if self._plan_epoch == self.epoch:
            return
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        else:
            order = np.arange(len(self.shards))
        self._window_shards = [order[i : i + self.window] for i in range(0, len(order), self.window)]
        sizes = [sum(self.shards[j].rows for j in w) for w in self._window_shards]
        self._window_starts = np.concatenate([[0], np.cumsum(sizes)])
        self._windows.clear()
        self._plan_epoch = self.epoch

    def stream_rows(self, epoch: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of epoch `epoch`'s stream, by column, whatever the loader's position (a
        mixture reads each dataset's stream this way); the position moves to that epoch."""
        if epoch != self.epoch:
            self.epoch, self.rows_consumed = epoch, 0
        return self._stream_rows(lo, hi)

    def _stream_rows(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of the current epoch's stream, by column."""
        self._plan()
        parts = []
        w = int(np.searchsorted(self._window_starts, lo, side="right")) - 1
        while lo < hi:
            rows = self._window(w)
            start, end = self._window_starts[w], self._window_starts[w + 1]
            take = min(hi, end) - lo
            parts.append({name: c[lo - start : lo - start + take] for name, c in rows.items()})
            lo += take
            w += 1
        return parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _window(self, w: int) -> dict[str, np.ndarray]:
        """Window w's rows in stream order; starts reading window w+1 in the background."""
        for old in [k for k in self._windows if k < w]:
            del self._windows[old]
        for k in (w, w + 1):
            if k < len(self._window_shards) and k not in self._windows:
                self._windows[k] = self._pool.submit(self._read_window, self.epoch, k)
        return self._windows[w].result()

    def _read_window(self, epoch: int, w: int) -> dict[str, np.ndarray]:
        parts = [self.dataset.read_columns(self.shards[j]) for j in self._window_shards[w]]
        rows = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, w]).permutation(len(rows[self.dataset.column]))
            rows = {name: c[order] for name, c in rows.items()}
        return rows


def batch_tensor(name: str, column: np.ndarray) -> torch.Tensor:
    if name.endswith("mask"):
        return torch.from_numpy(column.astype(bool))
    if np.issubdtype(column.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(column))
    return torch.from_numpy(column.astype(np.int64))
