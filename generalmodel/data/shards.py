"""What every prepared dataset shares, whatever its format: the splits and how a row is assigned
to one, the columns and counted items of each format, the token dtype, and a shard's bytes.

The text pipeline (`prepare.py`), chat and preference rows (`conversations.py`), the DPO reference
pass and the benchmarks' synthetic datasets all write shards through this module, so a dataset's
layout is defined once.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = ("train", "val")
# The columns of a row, per data.format (the first is the manifest's `column`).
COLUMNS = {
    "text": ("tokens",),
    "chat": ("tokens", "mask", "docs"),  # docs: the conversation of each token in its row (padding: the next)
    "preference": ("chosen", "chosen_mask", "rejected", "rejected_mask"),
}
# What a row of the source is called in the counts: the manifest's per-split count of inputs.
ITEMS = {"text": "documents", "chat": "conversations", "preference": "pairs"}


def is_val(key: str, val_fraction: float) -> bool:
    """The split of a document (or of a row's split key): a function of its text alone."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned dtype that holds every token id of the vocabulary."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def shard_bytes(columns: dict[str, np.ndarray]) -> bytes:
    """A Parquet file with one column per array: fixed-size lists for 2-D arrays (rows × row_len),
    plain values for 1-D ones."""
    table = pa.table(
        {
            name: pa.FixedSizeListArray.from_arrays(
                pa.array(a.reshape(-1), type=pa.from_numpy_dtype(a.dtype)), a.shape[1]
            )
            if a.ndim == 2
            else pa.array(a, type=pa.from_numpy_dtype(a.dtype))
            for name, a in columns.items()
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", use_dictionary=False, write_statistics=False)
    return buf.getvalue()
