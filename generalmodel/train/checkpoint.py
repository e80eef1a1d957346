"""Sharded checkpoints (torch Distributed Checkpoint) on the storage layer, saved without
stalling training and published atomically.

Layout: <checkpoint_dir>/step-00000100/ holds the DCP files of every rank (`.metadata`,
`__<rank>_0.distcp`), `rank-<r>.pt` (each rank's RNG state), and `manifest.json`, written last
by rank 0 once every rank's upload is done (each rank leaves a `.uploaded-<r>` marker), holding
the step, loader state, resolved config and world size. A step directory without a manifest is
an incomplete checkpoint and is never resumed from.

A save: every rank writes its DCP shard to a local temp dir (a collective, fast: local disk);
the upload to the store and the publication run in a background thread, so training continues.
The foreground time is the stall, returned to the caller to log.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from generalmodel import UserError
from generalmodel.config import StorageConfig
from generalmodel.storage import Location, publish_manifest, read_manifest, resolve

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "checkpoint"


class CheckpointError(UserError):
    pass


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


class Checkpointer:
    def __init__(self, uri: str, storage: StorageConfig, rank: int, world_size: int):
        self.root = resolve(uri, storage)
        self.rank, self.world_size = rank, world_size
        self._uploads: list[threading.Thread] = []
        self._errors: list[BaseException] = []

    # -- finding ---------------------------------------------------------------------------------

    def latest(self) -> tuple[Location, dict[str, Any]] | None:
        """The newest complete checkpoint (one with a manifest) and its manifest."""
        if not self.root.exists():
            return None
        infos = self.root.fs.get_file_info(pafs.FileSelector(self.root.path, allow_not_found=True))
        steps = sorted(
            (i.path.rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.Directory),
            reverse=True,
        )
        for name in steps:
            if not name.startswith("step-"):
                continue
            loc = self.root.join(name)
            if loc.join("manifest.json").exists():
                manifest, _ = read_manifest(loc, CHECKPOINT_KIND)
                return loc, manifest
        return None

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, manifest: dict[str, Any]) -> float:
        """Checkpoint `step`; returns the seconds training was stalled."""
        self.raise_upload_errors()
        started = time.perf_counter()
        local = tempfile.mkdtemp(prefix=f"gm-ckpt-{step}-")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=local)
        torch.save({"torch_rng": torch.get_rng_state()}, os.path.join(local, f"rank-{self.rank}.pt"))
        target = self.root.join(step_dir(step))
        thread = threading.Thread(
            target=self._upload,
            args=(local, target, {**manifest, "kind": CHECKPOINT_KIND, "step": step}),
            name=f"checkpoint-upload-{step}",
            daemon=True,
        )
        thread.start()
        self._uploads.append(thread)
        return time.perf_counter() - started

    def _upload(self, local: str, target: Location, manifest: dict[str, Any]) -> None:
        try:
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as f:
                    target.join(name).write_bytes(f.read())
            target.join(f".uploaded-{self.rank}").write_bytes(b"")
            if self.rank == 0:
                # Publish once every rank's files are there; markers, not collectives, because
                # collectives from this thread would interleave with training's.
                deadline = time.time() + 3600
                while not all(target.join(f".uploaded-{r}").exists() for r in range(self.world_size)):
                    if time.time() > deadline:
                        raise CheckpointError(f"{target.uri}: other ranks' uploads never finished")
                    time.sleep(0.2)
                publish_manifest(target, {**manifest, "world_size": self.world_size})
        except BaseException as e:  # surfaced on the training thread at the next save / wait
            self._errors.append(e)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def wait(self) -> None:
        """Block until every background upload is done (and published, on rank 0)."""
        for thread in self._uploads:
            thread.join()
        self._uploads.clear()
        self.raise_upload_errors()

    def raise_upload_errors(self) -> None:
        if self._errors:
            raise self._errors[0]

    # -- loading ---------------------------------------------------------------------------------

    def load(self, loc: Location, model, optimizer) -> dict[str, Any]:
        """Restore model and optimizer (resharding to this world size as DCP does) and this
        rank's RNG; returns the manifest."""
        manifest, _ = read_manifest(loc, CHECKPOINT_KIND)
        local = tempfile.mkdtemp(prefix="gm-ckpt-load-")
        try:
            for info in loc.list_files():
                name = posixpath.basename(info.path)
                if name.endswith((".distcp", ".pt")) or name == ".metadata":
                    with open(os.path.join(local, name), "wb") as f:
                        f.write(loc.join(name).read_bytes())
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=local)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            rng_file = os.path.join(local, f"rank-{self.rank}.pt")
            if os.path.exists(rng_file):
                torch.set_rng_state(torch.load(rng_file)["torch_rng"])
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        return manifest
