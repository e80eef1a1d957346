"""Several published datasets read as one training stream (mixture.*): `MixedDataset`, `MixtureLoader`.

The mixed stream is a sequence of global rows j = 0, 1, 2, ...; row j comes from the dataset that
the stage holding j picks with a Weyl sequence u_j = frac(a + j·φ) (φ the golden ratio's fractional
part, a drawn from train.seed) against the stage's cumulative weights. Any window of n rows then
holds each dataset's share of them to within a few rows (a low-discrepancy sequence: every batch
has its proportions, not only their average), and row j's dataset needs no state but j. The rows
a dataset gives are its own `TokenLoader` stream taken in order (world size 1: its shards in a
seeded order, shuffled within windows, epoch after epoch; a dataset that runs out starts its next
epoch, or is an error under mixture.exhausted=error).

Global batch k is rows [k·G, (k+1)·G) (G = batch size × world size) and rank r takes rows
[k·G + r·B, k·G + (r+1)·B) — for each dataset one contiguous run of its stream, so a rank reads
only its own rows. A stage starts at a row: start_tokens at the row holding that token, start_step
at that step's first row at the run's first world size. The position is the rows consumed, each
dataset's rows consumed and the stages' rows, so a run resumes exactly — mid-stage, and at another
world size, since the stream does not depend on how it is cut into batches.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch

from generalmodel.config import MixtureConfig, StorageConfig
from generalmodel.data.loader import Batches, DatasetError, TokenDataset, TokenLoader, batch_tensor
from generalmodel.errors import UserError

# 2^64 / golden ratio, odd: consecutive rows' u_j are φ apart (mod 1), computed exactly in uint64.
WEYL_STEP = np.uint64(0x9E3779B97F4A7C15)


class MixedDataset:
    """The datasets of a mixture, checked to be one stream's worth: one tokenizer, one row length,
    one format. Stands where a `TokenDataset` does for the job (tracking, the model's vocabulary)."""

    def __init__(self, datasets: dict[str, TokenDataset]):
        if not datasets:
            raise ValueError("a mixture needs at least one dataset")
        self.datasets = datasets
        (first_name, first), *others = datasets.items()
        for name, ds in others:
            for what, mine, theirs in [
                ("tokenizer (sha256)", ds.manifest["tokenizer"]["sha256"], first.manifest["tokenizer"]["sha256"]),
                ("seq_len", ds.seq_len, first.seq_len),
                ("format", ds.format, first.format),
                ("columns", ds.columns, first.columns),
            ]:
                if mine != theirs:
                    raise DatasetError(
                        f"mixture dataset {name!r} ({ds.uri}) has {what} {_short(mine)}, but {first_name!r} "
                        f"({first.uri}) has {_short(theirs)}: a mixture's datasets are one token stream (prepare "
                        f"it again with --data.tokenizer={first.uri})"
                    )
        self.first = first
        self.seq_len, self.row_len, self.vocab_size = first.seq_len, first.row_len, first.vocab_size
        self.format, self.column, self.columns = first.format, first.column, first.columns
        shas = {name: ds.manifest_sha256 for name, ds in datasets.items()}
        self.manifest_sha256 = hashlib.sha256(json.dumps(shas, sort_keys=True).encode()).hexdigest()
        self.uri = "mixture:" + ",".join(f"{name}={ds.uri}" for name, ds in datasets.items())

    @classmethod
    def open(cls, uris: dict[str, str], storage: StorageConfig | None = None) -> MixedDataset:
        opened = {}
        for name, uri in uris.items():
            try:
                opened[name] = TokenDataset.open(uri, storage)
            except UserError as e:
                raise DatasetError(f"mixture dataset {name!r}: {e}") from None
        return cls(opened)

    @property
    def parts(self) -> dict[str, TokenDataset]:
        return self.datasets

    def tokenizer_json(self) -> str:
        return self.first.tokenizer_json()


def _short(value: Any) -> str:
    text = str(value)
    return text[:16] + "…" if len(text) > 40 else text


class MixtureLoader(Batches):
    """This rank's batches of the mixed stream (see the module doc); the `TokenLoader` interface:
    `next_batch()`, `state_dict()`/`load_state_dict()`, `metrics()`, `close()`."""

    def __init__(
        self,
        data: MixedDataset,
        mixture: MixtureConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        rows_per_step: int | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset, self.mixture = data, mixture
        self.names = list(data.datasets)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.streams = [TokenLoader(ds, "train", 1, seed=seed) for ds in data.datasets.values()]
        self.epoch_rows = np.array([s.rows_per_epoch for s in self.streams], dtype=np.int64)
        weights = mixture.stage_weights()
        self.cdfs = np.stack([_cdf([w[name] for name in self.names]) for w in weights])
        rows_per_step = rows_per_step or self.global_batch
        self.starts = [0] + [_start_row(stage.start, data.seq_len, rows_per_step) for stage in mixture.stages]
        self.offset = np.uint64(np.random.default_rng([seed, 0x6D6978]).integers(0, 2**63))
        self.rows_consumed = 0  # rows of the mixed stream taken by all ranks together
        self.taken = np.zeros(len(self.names), dtype=np.int64)  # each dataset's rows in them

    # -- the stream ----------------------------------------------------------------------------

    def sources(self, lo: int, hi: int) -> np.ndarray:
        """The dataset index of each row in [lo, hi) of the mixed stream."""
        rows = np.arange(lo, hi, dtype=np.uint64)
        u = ((self.offset + rows * WEYL_STEP) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        stage = np.searchsorted(np.array(self.starts), np.arange(lo, hi), side="right") - 1
        out = np.empty(hi - lo, dtype=np.int64)
        for s in np.unique(stage):
            here = stage == s
            out[here] = np.searchsorted(self.cdfs[s], u[here], side="right")
        return np.minimum(out, len(self.names) - 1)

    def stage_at(self, row: int) -> int:
        return int(np.searchsorted(np.array(self.starts), row, side="right")) - 1

    # -- iteration -----------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        lo = self.rows_consumed
        src = self.sources(lo, lo + self.global_batch)
        counts = np.bincount(src, minlength=len(self.names))
        if self.mixture.exhausted == "error":
            over = np.flatnonzero(self.taken + counts > self.epoch_rows)
            if len(over):
                i = int(over[0])
                raise DatasetError(
                    f"mixture dataset {self.names[i]!r} ({self.dataset.datasets[self.names[i]].uri}) ran out: its "
                    f"{self.epoch_rows[i]} train rows are all used after {lo} rows of the mixture "
                    "(mixture.exhausted=error; 'repeat' starts its next epoch)"
                )
        first = self.rank * self.batch_size
        mine = src[first : first + self.batch_size]
        before = np.bincount(src[:first], minlength=len(self.names))
        columns: dict[str, np.ndarray] = {}
        for i in np.unique(mine):
            at = np.flatnonzero(mine == i)
            start = int(self.taken[i] + before[i])
            rows = self._dataset_rows(int(i), start, start + len(at))
            for name, values in rows.items():
                if name not in columns:
                    columns[name] = np.empty((len(mine), *values.shape[1:]), dtype=values.dtype)
                columns[name][at] = values
        self.taken += counts
        self.rows_consumed += self.global_batch
        return {name: batch_tensor(name, column) for name, column in columns.items()}

    def _dataset_rows(self, i: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of dataset i's stream, epoch after epoch."""
        n, parts = int(self.epoch_rows[i]), []
        while lo < hi:
            epoch, at = divmod(lo, n)
            take = min(hi - lo, n - at)
            parts.append(self.streams[i].stream_rows(epoch, at, at + take))
            lo += take
        return parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def metrics(self) -> dict[str, float]:
        """Per dataset: the tokens of it trained on so far, and its epochs (rows used / its train rows)."""
        out: dict[str, float] = {"mixture_stage": float(self.stage_at(max(self.rows_consumed - 1, 0)))}
        for name, taken, rows in zip(self.names, self.taken, self.epoch_rows, strict=True):
            out[f"tokens_{name}"] = float(taken * self.dataset.seq_len)
            out[f"epochs_{name}"] = float(taken / rows)
        return out

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": True,
            "rows_consumed": self.rows_consumed,
            "taken": {name: int(t) for name, t in zip(self.names, self.taken, strict=True)},
            "stage_rows": list(self.starts),
            "datasets": {name: ds.manifest_sha256 for name, ds in self.dataset.datasets.items()},
            "stages": self._stages(),
            "seed": self.seed,
            "global_batch": self.global_batch,
        }

    def _stages(self) -> list[dict[str, Any]]:
        first = {"weights": self.mixture.stage_weights()[0], "start": ["row", 0]}
        later = [
            {"weights": w, "start": list(s.start)}
            for w, s in zip(self.mixture.stage_weights()[1:], self.mixture.stages, strict=True)
        ]
        return [first, *later]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("mixture"):
            raise DatasetError("cannot resume a mixture from a checkpoint of a run on one dataset")
        mine = self.state_dict()
        for key, what in [("datasets", "datasets (name: manifest sha256)"), ("stages", "stages"), ("seed", "seed")]:
            if state[key] != mine[key]:
                raise DatasetError(
                    f"cannot resume the mixture: its {what} were {state[key]!r}, now {mine[key]!r} "
                    "(the token stream would differ)"
                )
        # The stages keep the rows they started at in the run's first world size (start_step).
        self.starts = [int(r) for r in state["stage_rows"]]
        self.rows_consumed = int(state["rows_consumed"])
        self.taken = np.array([state["taken"][name] for name in self.names], dtype=np.int64)


def _cdf(weights: list[float]) -> np.ndarray:
    """Cumulative weights ending at exactly 1, flat (no interval) for a weight of 0."""
    w = np.asarray(weights, dtype=np.float64)
    cdf = np.cumsum(w) / w.sum()
    cdf[np.flatnonzero(w > 0)[-1] :] = 1.0
    return cdf


def _start_row(start: tuple[str, int], seq_len: int, rows_per_step: int) -> int:
    unit, value = start
    if unit == "step":
        return value * rows_per_step
    return math.ceil(value / seq_len)  # the first row that starts at or after that many tokens
