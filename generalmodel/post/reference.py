"""DPO's reference log-probs, computed once in a Ray Data batch-inference pass and stored beside the
dataset, so that the frozen reference never occupies training memory (dpo.reference=precomputed).

    <dataset>/references/<key>/manifest.json            written last (kind dpo-reference)
    <dataset>/references/<key>/{train,val}/part-NNNNN.parquet.<first row>   ref_chosen, ref_rejected
                        (float32) of a run of rows of the dataset shard of that name: shards are
                        scored in chunks of CHUNK_ROWS rows, so that every actor gets work
`key` is a hash of the dataset's manifest and the reference's weights: another dataset version or
another reference model computes its own; the same ones reuse it (a DPO sweep scores once). The
training loop attaches the columns to the dataset's rows (`TokenDataset.attach_published`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from generalmodel.config import Config
from generalmodel.data.loader import REFERENCE_KIND, TokenDataset
from generalmodel.storage import MANIFEST, RunLayout, publish_manifest, resolve, sha256_hex

log = logging.getLogger(__name__)

SCORE_BATCH = 32  # pairs per forward
CHUNK_ROWS = 256  # pairs per Ray Data item


def reference_key(ds: TokenDataset, state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(ds.manifest_sha256.encode())
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def ensure_reference(cfg: Config, layout: RunLayout, ds: TokenDataset, state: dict[str, torch.Tensor]) -> str:
    """The URI of the reference log-probs of `state` (the reference model, cfg.model) on the
    preference dataset `ds`, computed now with Ray Data unless already there. Needs a Ray session."""
    import ray

    key = reference_key(ds, state)
    root = ds.loc.join("references").join(key)
    if root.join(MANIFEST).exists():
        log.info("reference log-probs: reusing %s", root.uri)
        return root.uri
    started = time.time()
    items = [
        {"split": split, "path": s.path, "lo": lo, "hi": min(lo + CHUNK_ROWS, s.rows)}
        for split, shards in ds.shards.items()
        for s in shards
        for lo in range(0, s.rows, CHUNK_ROWS)
    ]
    log.info("reference log-probs: scoring %d chunks of %d pairs into %s", len(items), CHUNK_ROWS, root.uri)
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
            "model_cfg": cfg.model,
            "state_ref": state_ref,
            "dataset": layout.dataset,
            "storage": layout.storage,
            "out": root.uri,
        },
    )
    results.context.enable_progress_bars = False
    results.context.print_on_execution_start = False
    metas = sorted((json.loads(r["meta"]) for r in results.take_all()), key=lambda m: (m["dataset_shard"], m["lo"]))
    parts: dict[str, list[dict[str, Any]]] = {}
    for m in metas:
        parts.setdefault(m["dataset_shard"], []).append(m["shard"])
    manifest = {
        "kind": REFERENCE_KIND,
        "dataset": ds.manifest_sha256,
        "reference": key,
        "model": cfg.model.name,
        "shards": parts,
        "seconds": round(time.time() - started, 2),
    }
    publish_manifest(root, manifest)
    log.info(
        "reference log-probs of %d pairs in %.1fs",
        sum(p["rows"] for m in parts.values() for p in m),
        manifest["seconds"],
    )
    return root.uri


class ReferenceScorer:
    """A Ray Data actor: the reference model, scoring whole dataset shards."""

    def __init__(self, model_cfg, state_ref, dataset: str, storage, out: str):
        import ray

        from generalmodel.infer.export import load_state
        from models import build_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = build_model(model_cfg)
        load_state(self.model, ray.get(state_ref), "the DPO reference")
        self.model.to(self.device).eval()
        self.ds = TokenDataset.open(dataset, storage)
        self.out = resolve(out, storage)
        self.shards: dict[str, dict[str, np.ndarray]] = {}  # the last dataset shard read

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from generalmodel.data.shards import shard_bytes

        metas = []
        for split, path, lo, hi in zip(batch["split"], batch["path"], batch["lo"], batch["hi"], strict=True):
            lo, hi = int(lo), int(hi)
            if path not in self.shards:  # a dataset shard is read (and checked) once per actor
                shard = next(s for s in self.ds.split_shards(split) if s.path == path)
                self.shards = {path: self.ds.read_columns(shard)}
            columns = {name: c[lo:hi] for name, c in self.shards[path].items()}
            payload = shard_bytes(score_pairs(self.model, columns, self.device))
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
