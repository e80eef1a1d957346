"""Chat and preference datasets: one unit of `generalmodel.data.prepare` for `data.format` chat or
preference (the listing, Ray Data tasks, versioning and manifest are the pretraining pipeline's).

Each row of the source (.jsonl lines, .parquet/.arrow rows, hf: datasets) is checked and rendered
with the chat format (generalmodel.data.chat), split train/val by the hash of `data.split_key`'s
value (or of the row), and written as fixed-length rows of seq_len+1 tokens with loss masks:

    chat        tokens, mask, docs                        one conversation per padded row, or
                                                          several whole ones (data.packing); docs
                                                          numbers each token's conversation in its
                                                          row (train.document_mask)
    preference  chosen, chosen_mask, rejected, rejected_mask   one pair per padded row

Padding is the tokenizer's PAD (else EOS) with mask 0. Rows longer than a row follow
data.truncation; the counts of truncated and dropped rows, supervised tokens and skipped
malformed rows (data.bad_rows=skip, with the first few named) go into the manifest.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from generalmodel.config import DataConfig, StorageConfig
from generalmodel.data.chat import ChatFormat, ChatFormatError, Rendered, messages, preference_pair, tool_names
from generalmodel.data.shards import ITEMS, SPLITS, is_val, token_dtype
from generalmodel.data.sources import Piece, RowError, read_rows

BAD_ROWS_NAMED = 20  # the manifest names this many skipped rows (all are counted)


def split_of(row: dict[str, Any], data: DataConfig, where: str) -> str:
    if data.split_key is None:
        key = json.dumps(row, sort_keys=True, default=str)
    elif data.split_key not in row:
        raise ChatFormatError(f"{where}: no field {data.split_key!r} (data.split_key)")
    else:
        key = str(row[data.split_key])
    return "val" if is_val(key, data.val_fraction) else "train"


class Unit:
    """The rows of one unit, per split, and their counts."""

    def __init__(self, data: DataConfig, fmt: ChatFormat):
        self.data, self.fmt = data, fmt
        self.row_len = data.seq_len + 1
        self.items: dict[str, list[Any]] = {s: [] for s in SPLITS}
        self.counts = {
            s: {ITEMS[data.format]: 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_supervised": 0}
            for s in SPLITS
        }
        self.bad_rows: list[list[str]] = []  # [where, reason] of skipped rows

    def add(self, where: str, row: dict[str, Any] | RowError) -> None:
        try:
            if isinstance(row, RowError):
                raise ChatFormatError(str(row))
            split = split_of(row, self.data, where)
            item = self._render(row, where)
        except ChatFormatError as e:
            if self.data.bad_rows == "error":
                raise ChatFormatError(f"{e} (data.bad_rows=skip skips and counts such rows)") from None
            self.bad_rows.append([where, str(e).removeprefix(f"{where}: ")])
            return
        counts = self.counts[split]
        counts[ITEMS[self.data.format]] += 1
        rendered = item if isinstance(item, list) else [item]
        too_long = any(len(r.ids) > self.row_len for r in rendered)
        if too_long and self.data.truncation == "drop":
            counts["dropped_too_long"] += 1
            return
        cut = [Rendered(r.ids[: self.row_len], r.mask[: self.row_len], too_long) for r in rendered]
        if any(sum(r.mask[1:]) == 0 for r in cut):  # targets are ids[1:]: the first token is never one
            counts["dropped_no_supervised"] += 1
            return
        counts["truncated"] += int(too_long)
        self.items[split].append(cut if isinstance(item, list) else cut[0])

    def _render(self, row: dict[str, Any], where: str) -> Rendered | list[Rendered]:
        if self.data.format == "chat":
            if self.data.messages_field not in row:
                raise ChatFormatError(
                    f"{where}: no field {self.data.messages_field!r} (data.messages_field); fields: {', '.join(row)}"
                )
            msgs = messages(row[self.data.messages_field], where)
            try:
                return self.fmt.render(msgs, tools=tool_names(row.get("tools"), where))
            except ChatFormatError as e:
                raise ChatFormatError(e if str(e).startswith(where) else f"{where}: {e}") from None
        pair = preference_pair(row, where)
        start = len(pair.prompt)
        return [
            self.fmt.render(pair.prompt + pair.chosen, supervise_from=start),
            self.fmt.render(pair.prompt + pair.rejected, supervise_from=start),
        ]

    def columns(self, split: str, pad: int, dtype) -> dict[str, np.ndarray]:
        """The split's rows as column arrays (rows × row_len)."""
        items = self.items[split]
        if self.data.format == "preference":
            chosen = self._padded([c for c, _ in items], pad, dtype)
            rejected = self._padded([r for _, r in items], pad, dtype)
            return {
                "chosen": chosen[0],
                "chosen_mask": chosen[1],
                "rejected": rejected[0],
                "rejected_mask": rejected[1],
            }
        groups = pack_first_fit(items, self.row_len) if self.data.packing else [[r] for r in items]
        merged = [Rendered([i for r in g for i in r.ids], [m for r in g for m in r.mask]) for g in groups]
        tokens, mask = self._padded(merged, pad, dtype)
        return {"tokens": tokens, "mask": mask, "docs": self._documents(groups)}

    def _documents(self, groups: list[list[Rendered]]) -> np.ndarray:
        """(rows × row_len): 0 for the first conversation of a row, 1 for the next, ...; the padding
        after them is one more (it attends to nothing real)."""
        docs = np.empty((len(groups), self.row_len), dtype=np.uint16 if self.row_len < 2**16 else np.uint32)
        for i, group in enumerate(groups):
            lengths = [len(r.ids) for r in group]
            docs[i] = np.repeat(np.arange(len(group) + 1), [*lengths, self.row_len - sum(lengths)])
        return docs

    def _padded(self, rows: list[Rendered], pad: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((len(rows), self.row_len), pad, dtype=dtype)
        mask = np.zeros((len(rows), self.row_len), dtype=np.uint8)
        for i, r in enumerate(rows):
            tokens[i, : len(r.ids)] = r.ids
            mask[i, : len(r.mask)] = r.mask
        return tokens, mask


def pack_first_fit(items: list[Rendered], row_len: int) -> list[list[Rendered]]:
    """Whole conversations into rows of row_len tokens, each into the first row it fits (in input
    order: the same input gives the same rows)."""
    rows: list[list[Rendered]] = []
    free: list[int] = []
    for item in items:
        for i, room in enumerate(free):
            if len(item.ids) <= room:
                rows[i].append(item)
                free[i] -= len(item.ids)
                break
        else:
            rows.append([item])
            free.append(row_len - len(item.ids))
    return rows


def process_unit(pieces: list[Piece], tok_text: str, data: DataConfig, storage: StorageConfig, write) -> dict:
    """Read, render and write one unit of a chat/preference source. `write(split, columns)`
    stores a shard and returns its manifest entry. Returns the unit's splits and skipped rows."""
    from generalmodel.data.tokenizer import special_ids

    fmt = ChatFormat.from_json(tok_text)
    ids = special_ids(fmt.tokenizer)
    pad = ids["pad"] if ids["pad"] is not None else ids["eos"]
    dtype = token_dtype(fmt.tokenizer.get_vocab_size())
    unit = Unit(data, fmt)
    for piece in pieces:
        for where, row in read_rows(piece, storage):
            unit.add(where, row)
    splits = {}
    for split in SPLITS:
        columns = unit.columns(split, pad, dtype)
        rows = len(next(iter(columns.values())))
        masks = [c for name, c in columns.items() if name.endswith("mask")]
        entry = dict(unit.counts[split], supervised_tokens=int(sum(m[:, 1:].sum() for m in masks)), shard=None)
        if rows:
            entry["shard"] = write(split, columns)
        splits[split] = entry
    return {"splits": splits, "bad_rows": len(unit.bad_rows), "bad_rows_named": unit.bad_rows[:BAD_ROWS_NAMED]}
