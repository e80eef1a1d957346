"""A frozen reference model's scores of a dataset's rows, computed once in a Ray Data batch-inference
pass and stored beside the dataset, so that the reference never occupies training memory:

    kind                 for                               columns (per row)
    dpo-reference        DPO (dpo.reference=precomputed)   ref_chosen, ref_rejected: summed log-probs (float32)
    token-reference      Rho-1 (train.token_selection)     ref_loss: each target's loss (row_len − 1, float16)

    <dataset>/references/<key>/manifest.json            written last (its kind, above)
    <dataset>/references/<key>/{train,val}/part-NNNNN.parquet.<first row>   the columns of a run of
                        rows of the dataset shard of that name: shards are scored in chunks of
                        CHUNK_ROWS rows, so that every actor gets work
`key` is a hash of the dataset's manifest, the reference's weights and what the scores depend on
besides (the kind; document masks): another dataset version or another reference model computes
its own; the same ones reuse it (a DPO sweep scores once). The training loop attaches the columns
to the dataset's rows (`TokenDataset.attach_published`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.data.loader import REFERENCE_KIND, TOKEN_REFERENCE_KIND, TokenDataset, batch_tensor
from generalmodel.storage import MANIFEST, RunLayout, publish_manifest, resolve, sha256_hex

log = logging.getLogger(__name__)

SCORE_BATCH = 32  # rows (pairs) per forward
CHUNK_ROWS = 256  # rows (pairs) per Ray Data item
TOKEN_CHUNK = 4096  # positions per head pass when scoring tokens (never more than this × vocab logits)


def reference_key(ds: TokenDataset, state: dict[str, torch.Tensor], *also: str) -> str:
    """A hash of the dataset version, the reference's weights and `also` (what else the scores depend on)."""
    digest = hashlib.sha256(ds.manifest_sha256.encode())
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for item in also:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def ensure_reference(
    cfg: Config,
    layout: RunLayout,
    ds: TokenDataset,
    state: dict[str, torch.Tensor],
    kind: str = REFERENCE_KIND,
    model_cfg=None,
    separator: int | None = None,
) -> str:
    """The URI of the scores of `kind` of the reference model (`state`, of `model_cfg`: default
    cfg.model) on the dataset `ds`, computed now with Ray Data unless already there: DPO's
    log-probs of a preference dataset, or Rho-1's per-token losses (`separator`: the EOS id when
    the run masks documents: the reference scores each document alone too). Needs a Ray session."""
    also = () if kind == REFERENCE_KIND else (kind, f"separator={separator}")  # DPO's keys stay what they were
    key = reference_key(ds, state, *also)
    root = ds.loc.join("references").join(key)
    if root.join(MANIFEST).exists():
        log.info("reference %s: reusing %s", kind, root.uri)
        return root.uri
    started = time.time()
    model_cfg = model_cfg or cfg.model
    parts = score_dataset(cfg, layout, ds, state, kind, model_cfg, separator, root)
    manifest = {
        "kind": kind,
        "dataset": ds.manifest_sha256,
        "reference": key,
        "model": model_cfg.name,
        "shards": parts,
        "seconds": round(time.time() - started, 2),
    }
    publish_manifest(root, manifest)
    log.info(
        "reference %s of %d rows in %.1fs", kind, sum(p["rows"] for m in parts.values() for p in m), manifest["seconds"]
    )
    return root.uri


def score_dataset(
    cfg: Config, layout: RunLayout, ds: TokenDataset, state, kind: str, model_cfg, separator: int | None, root
) -> dict[str, list[dict[str, Any]]]:
    """Score every row of `ds` with Ray Data actors, writing the parts under `root`: the parts
    (path, rows, bytes, sha256) of each dataset shard, in row order."""
    import ray

    items = [
        {"split": split, "path": s.path, "lo": lo, "hi": min(lo + CHUNK_ROWS, s.rows)}
        for split, shards in ds.shards.items()
        for s in shards
        for lo in range(0, s.rows, CHUNK_ROWS)
    ]
    log.info("reference %s: scoring %d chunks of %d rows into %s", kind, len(items), CHUNK_ROWS, root.uri)
    state_ref = ray.put(state)  # one put; every actor gets it
    # Ray 2.60 logs "Actor ... has constructor arguments in the object store" (an error line from
    # core_worker) for any Ray Data actor: ray-project/ray#57733, not about our arguments.
    workers = max(1, min(len(items), int(ray.available_resources().get("CPU", 1))))
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ReferenceScorer,
        batch_size=1,
        num_cpus=1,
        num_gpus=1 if cfg.ray.use_gpu else 0,
        concurrency=workers,
        fn_constructor_kwargs={
            "model_cfg": model_cfg,
            "state_ref": state_ref,
            "dataset": ds.uri,
            "storage": layout.storage,
            "out": root.uri,
            "kind": kind,
            "separator": separator,
        },
    )
    results.context.enable_progress_bars = False
    results.context.print_on_execution_start = False
    metas = sorted((json.loads(r["meta"]) for r in results.take_all()), key=lambda m: (m["dataset_shard"], m["lo"]))
    parts: dict[str, list[dict[str, Any]]] = {}
    for m in metas:
        parts.setdefault(m["dataset_shard"], []).append(m["shard"])
    return parts


class ReferenceScorer:
    """A Ray Data actor: the reference model, scoring whole dataset shards."""

    def __init__(self, model_cfg, state_ref, dataset: str, storage, out: str, kind: str, separator: int | None):
        import ray

        from generalmodel.infer.export import load_state
        from models import build_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(model_cfg)
        load_state(self.model, ray.get(state_ref), f"the reference ({kind})")
        self.model.to(self.device).eval()
        self.ds = TokenDataset.open(dataset, storage)
        self.out = resolve(out, storage)
        self.shards: dict[str, dict[str, np.ndarray]] = {}  # the last dataset shard read
        self.kind, self.separator = kind, separator

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from generalmodel.data.shards import shard_bytes

        metas = []
        for split, path, lo, hi in zip(batch["split"], batch["path"], batch["lo"], batch["hi"], strict=True):
            lo, hi = int(lo), int(hi)
            if path not in self.shards:  # a dataset shard is read (and checked) once per actor
                shard = next(s for s in self.ds.split_shards(split) if s.path == path)
                self.shards = {path: self.ds.read_columns(shard)}
            columns = {name: c[lo:hi] for name, c in self.shards[path].items()}
            if self.kind == REFERENCE_KIND:
                scores = score_pairs(self.model, columns, self.device)
            else:
                scores = score_tokens(self.model, columns, self.device, self.separator)
            payload = shard_bytes(scores)
            name = f"{split}/{path.rsplit('/', 1)[-1]}.{lo:08d}"
            self.out.join(name).write_bytes(payload)
            entry = {"path": name, "rows": hi - lo, "bytes": len(payload), "sha256": sha256_hex(payload)}
            metas.append(json.dumps({"dataset_shard": path, "lo": lo, "shard": entry}))
        return {"meta": metas}


@torch.no_grad()
def score_pairs(model, columns: dict[str, np.ndarray], device: torch.device) -> dict[str, np.ndarray]:
    """ref_chosen, ref_rejected: each row's summed log-probs of its response under `model`."""
    from generalmodel.train.objectives import sequence_logps

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    out: dict[str, list[np.ndarray]] = {"ref_chosen": [], "ref_rejected": []}
    rows = len(columns["chosen"])
    for lo in range(0, rows, SCORE_BATCH):
        for side in ("chosen", "rejected"):
            tokens = torch.from_numpy(columns[side][lo : lo + SCORE_BATCH].astype(np.int64)).to(device)
            mask = torch.from_numpy(columns[side + "_mask"][lo : lo + SCORE_BATCH].astype(bool)).to(device)
            logps, _ = sequence_logps(model, tokens, mask, autocast)
            out["ref_" + side].append(logps.float().cpu().numpy())
    return {name: np.concatenate(parts) if parts else np.zeros(0, np.float32) for name, parts in out.items()}


@torch.no_grad()
def score_tokens(
    model, columns: dict[str, np.ndarray], device: torch.device, separator: int | None
) -> dict[str, np.ndarray]:
    """ref_loss: each target's cross-entropy under `model` (rows × (row_len − 1), float16; 0 where
    a chat row's mask supervises nothing), the documents of a row each scored alone when
    `separator` is given (as a run with train.document_mask trains on them)."""
    from generalmodel.train.objectives import LanguageModeling, lm_targets

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    documents = LanguageModeling(TOKEN_CHUNK, separator).documents
    rows = len(columns["tokens"])
    out: list[np.ndarray] = []
    for lo in range(0, rows, SCORE_BATCH):
        batch = {
            name: batch_tensor(name, columns[name][lo : lo + SCORE_BATCH]).to(device)
            for name in ("tokens", "mask", "docs")
            if name in columns
        }
        x, y = lm_targets(batch)
        with autocast:
            losses = model(x, targets=y, loss_chunk=TOKEN_CHUNK, docs=documents(batch, x), per_token=True)
        out.append(losses.float().cpu().numpy().astype(np.float16))
    width = columns["tokens"].shape[1] - 1
    return {"ref_loss": np.concatenate(out) if out else np.zeros((0, width), np.float16)}


def check_selection_reference(source, ds) -> None:
    """Rho-1's reference (`source`, loaded) against what the run trains on (`ds`, a dataset or a
    mixture): the same tokenizer, rows it can read. A UserError naming them. (Preference data is
    refused with the dataset's other checks: train.loop.check_compatible.)"""
    from generalmodel.data.tokenizer import tokenizer_hash

    for part in ds.parts.values():
        if tokenizer_hash(part.tokenizer_json()) != tokenizer_hash(source.tokenizer_json):
            raise UserError(
                f"train.selection_reference {source.reference!r} was trained with another tokenizer than dataset "
                f"{part.uri}: its losses would score other tokens; use a reference trained on a dataset "
                "tokenized like this one"
            )
        if part.seq_len > source.model.max_seq_len:
            raise UserError(
                f"train.selection_reference {source.reference!r} reads {source.model.max_seq_len} tokens at most; "
                f"dataset {part.uri} has rows of {part.seq_len}"
            )


def with_token_references(cfg: Config, layout: RunLayout, ds, source) -> RunLayout:
    """Rho-1: `layout` with the per-token losses of the reference `source` (loaded, checked) on
    each dataset the run reads, computed now with Ray Data unless already there."""
    from generalmodel.data.tokenizer import eos_id, load_tokenizer

    check_selection_reference(source, ds)
    references = {}
    for name, part in ds.parts.items():
        separator = eos_id(load_tokenizer(part.tokenizer_json(), part.uri)) if cfg.train.document_mask else None
        references[name] = ensure_reference(
            cfg, layout, part, source.state, TOKEN_REFERENCE_KIND, source.model, separator
        )
    return dataclasses.replace(layout, token_references=references)
