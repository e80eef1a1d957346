"""Sharded checkpoints (torch Distributed Checkpoint) on the storage layer: saved without stalling
training, published atomically, verified before they are trusted, pruned after newer ones exist.

Layout: every save gets a fresh directory <checkpoint_dir>/step-00000100-<save id>/ (the id is
rank 0's, broadcast to all ranks; it grows with time, so it also orders saves of one step). It
holds the DCP files of every rank (`.metadata`, `__<rank>_0.distcp`), `rank-<r>.pt` (each rank's
RNG state), `.uploaded-<r>` (rank r's files with size and sha256, written after its upload), and
`manifest.json`, written last by rank 0 once every rank's marker is there: step, loader state,
resolved config, world size and every file with its size and sha256. A directory without a
manifest is never resumed from, and since a save never reuses a directory, neither a crashed
save's files nor its upload markers can make another save look complete.

Reading: `checkpoints()` lists the complete ones newest first; `check()` compares a checkpoint's
files with its manifest (presence and size); `load()` also checks every file's sha256 before the
model is touched and raises `CheckpointDamaged` otherwise, so the caller falls back to the
previous checkpoint with a warning naming the damaged one.

Retention: after publishing, rank 0 deletes complete checkpoints beyond `keep_last`, never the
one this run resumed from, and the leftovers of crashed saves older than the newest complete one.

Trust: DCP's `.metadata` file is a pickle, so loading a checkpoint can run code from whoever could
write the checkpoint directory. Only resume from storage you control; the RNG files are read with
`torch.load(weights_only=True)`, and exported models (safetensors) carry no such risk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from generalmodel import UserError
from generalmodel.config import StorageConfig
from generalmodel.storage import (
    MANIFEST,
    Location,
    publish_manifest,
    read_manifest,
    resolve,
    sha256_hex,
    with_retries,
)

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "checkpoint"
STEP_DIR = re.compile(r"^step-(\d{8})-([0-9a-f]+)$")
MARKER = ".uploaded-{rank}"


Companions = dict[str, tuple[Any, Any]] | None  # a run's other trained models: name -> (model, optimizer)


def _pairs(model, optimizer, companions: Companions) -> dict[str, tuple[Any, Any]]:
    """The state keys' prefix of each (model, optimizer): "" for the run's, "NAME_" for a companion's."""
    return {"": (model, optimizer), **{f"{name}_": pair for name, pair in (companions or {}).items()}}


def _states(model, optimizer, companions: Companions) -> dict[str, Any]:
    """What DCP saves and loads: "model"/"optim", and "NAME_model"/"NAME_optim" for each companion."""
    states: dict[str, Any] = {}
    for prefix, (m, o) in _pairs(model, optimizer, companions).items():
        states[f"{prefix}model"], states[f"{prefix}optim"] = get_state_dict(m, o)
    return states


class CheckpointError(UserError):
    pass


class CheckpointDamaged(CheckpointError):
    """A published checkpoint whose files do not match its manifest."""


def step_dir(step: int, save_id: str) -> str:
    return f"step-{step:08d}-{save_id}"


def _file_entry(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    return {"bytes": len(data), "sha256": sha256_hex(data)}


class Checkpointer:
    def __init__(
        self, uri: str, storage: StorageConfig, rank: int, world_size: int, keep_last: int = 3, data_world: int = 0
    ):
        self.root = resolve(uri, storage)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.data_world = data_world or world_size  # data-parallel ranks (fewer under tensor parallel)
        self.retry_timeout_s = storage.retry_timeout_s  # a restarting store is waited for, with backoff
        self._uploads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._protected: set[str] = set()  # the checkpoint this run resumed from

    # -- finding ---------------------------------------------------------------------------------

    def _retry(self, what: str, fn, *args):
        return with_retries(what, self.retry_timeout_s, fn, *args)

    def _step_dirs(self) -> list[tuple[int, str, str]]:
        """(step, save id, name) of every save directory, newest first."""
        infos = self._retry(f"listing {self.root.uri}", self.root.list_dir)
        found = []
        for info in infos:
            name = info.path.rsplit("/", 1)[-1]
            match = STEP_DIR.match(name)
            if info.type == pafs.FileType.Directory and match:
                found.append((int(match.group(1)), match.group(2), name))
        return sorted(found, reverse=True)

    def checkpoints(self) -> Iterator[tuple[Location, dict[str, Any]]]:
        """The published checkpoints (those with a manifest), newest first, with their manifests."""
        for _, _, name in self._step_dirs():
            loc = self.root.join(name)
            if self._retry(f"reading {loc.uri}", loc.join(MANIFEST).exists):
                manifest, _ = self._retry(f"reading {loc.uri}", read_manifest, loc, CHECKPOINT_KIND)
                yield loc, manifest

    def check(self, loc: Location, manifest: dict[str, Any]) -> None:
        """Every file the manifest lists is there with its size; raises CheckpointDamaged."""
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise CheckpointDamaged(f"{loc.uri}: its manifest lists no files (written by an older version?)")
        infos = {i.path.rsplit("/", 1)[-1]: i for i in self._retry(f"listing {loc.uri}", loc.list_files)}
        for name, entry in sorted(files.items()):
            info = infos.get(name)
            if info is None:
                raise CheckpointDamaged(f"{loc.uri}: {name} is missing")
            if info.size != entry["bytes"]:
                raise CheckpointDamaged(f"{loc.uri}: {name} has {info.size} bytes, the manifest says {entry['bytes']}")

    def latest(self) -> tuple[Location, dict[str, Any]] | None:
        """The newest complete checkpoint whose files match its manifest; damaged ones are skipped
        with a warning that names them."""
        for loc, manifest in self.checkpoints():
            try:
                self.check(loc, manifest)
            except CheckpointDamaged as e:
                log.warning("skipping a damaged checkpoint: %s", e)
                continue
            return loc, manifest
        return None

    def protect(self, loc: Location) -> None:
        """Never delete `loc` (the checkpoint a resume is reading) in this run's retention."""
        self._protected.add(loc.path.rsplit("/", 1)[-1])

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, model, optimizer, manifest: dict[str, Any], companions: Companions = None) -> float:
        """Checkpoint `step` into a fresh directory; returns the seconds training was stalled
        (the local DCP write, plus waiting for the previous save's upload if it is still running).
        `companions`: other trained models of the run (name -> (model, optimizer)), saved beside it."""
        started = time.perf_counter()
        self.wait()  # one upload at a time: retention never races an older save's upload
        save_id = [f"{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:6]}"]
        if dist.is_initialized():
            dist.broadcast_object_list(save_id, src=0)
        local = tempfile.mkdtemp(prefix=f"gm-ckpt-{step}-")
        dcp.save(_states(model, optimizer, companions), checkpoint_id=local)
        torch.save({"torch_rng": torch.get_rng_state()}, os.path.join(local, f"rank-{self.rank}.pt"))
        target = self.root.join(step_dir(step, save_id[0]))
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
            mine = {}
            for name in sorted(os.listdir(local)):
                path = os.path.join(local, name)
                mine[name] = _file_entry(path)
                with open(path, "rb") as f:
                    data = f.read()
                self._retry(f"uploading {target.uri}/{name}", target.join(name).write_bytes, data)
            marker = target.join(MARKER.format(rank=self.rank))
            self._retry(f"uploading {marker.uri}", marker.write_bytes, json.dumps(mine).encode())
            if self.rank == 0:
                self._publish(target, manifest)
                try:
                    self._prune()
                except Exception as e:  # retention must never fail a run
                    log.warning("checkpoint retention skipped: %s", e)
        except BaseException as e:  # surfaced on the training thread at the next save / wait
            self._errors.append(e)
            try:  # what this failed save wrote is useless: never published, free its space
                target.delete_dir()
            except Exception as cleanup:
                log.warning("could not delete the failed save %s: %s", target.uri, cleanup)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def _publish(self, target: Location, manifest: dict[str, Any]) -> None:
        """Once every rank's marker is in `target`, write the manifest (files, sizes, sha256s).
        Markers, not collectives: collectives from this thread would interleave with training's."""
        deadline = time.time() + 3600
        markers = [target.join(MARKER.format(rank=r)) for r in range(self.world_size)]
        while not all(self._retry(f"checking {m.uri}", m.exists) for m in markers):
            if time.time() > deadline:
                raise CheckpointError(f"{target.uri}: other ranks' uploads never finished")
            time.sleep(0.2)
        files: dict[str, Any] = {}
        for marker in markers:
            files.update(json.loads(self._retry(f"reading {marker.uri}", marker.read_bytes)))
        manifest = {**manifest, "world_size": self.world_size, "data_world": self.data_world, "files": files}
        self._retry(f"publishing {target.uri}", publish_manifest, target, manifest)

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints (and the protected one); delete the
        rest, and crashed saves older than the newest complete checkpoint."""
        complete = [loc.path.rsplit("/", 1)[-1] for loc, _ in self.checkpoints()]
        if not complete:
            return
        keep = set(complete[: self.keep_last]) | self._protected
        newest_step = int(STEP_DIR.match(complete[0]).group(1))
        for step, _, name in self._step_dirs():
            stale = name not in complete and step < newest_step
            if name not in keep and (name in complete or stale):
                try:
                    self.root.join(name).delete_dir()
                except Exception as e:  # retention must never fail a run
                    log.warning("could not delete the old checkpoint %s: %s", self.root.join(name).uri, e)

    def wait(self) -> None:
        """Block until every background upload is done (and published, on rank 0)."""
        for thread in self._uploads:
            thread.join()
        self._uploads.clear()
        self.raise_upload_errors()

    def finish_uploads(self, timeout_s: float = 120) -> None:
        """For a run that is failing anyway: give the uploads in flight a bounded time to publish
        (another rank may be gone, and rank 0 would wait for its marker); errors are logged."""
        deadline = time.time() + timeout_s
        for thread in self._uploads:
            thread.join(max(0.0, deadline - time.time()))
        if any(t.is_alive() for t in self._uploads):
            log.warning("a checkpoint upload did not finish within %.0fs of the failure: left unpublished", timeout_s)
        for e in self._errors:
            log.warning("a checkpoint upload failed too: %s", e)

    def raise_upload_errors(self) -> None:
        if self._errors:
            raise self._errors[0]

    # -- loading ---------------------------------------------------------------------------------

    def load(self, loc: Location, manifest: dict[str, Any], model, optimizer, companions: Companions = None) -> None:
        """Download the checkpoint, check every file against the manifest (CheckpointDamaged
        before anything is restored), then restore model and optimizer (and the companions; all
        resharded to this world size by DCP) and this rank's RNG."""
        local = tempfile.mkdtemp(prefix="gm-ckpt-load-")
        try:
            for name, entry in sorted(manifest["files"].items()):
                if name.startswith(".uploaded-"):
                    continue
                data = self._retry(f"reading {loc.uri}/{name}", loc.join(name).read_bytes)
                if len(data) != entry["bytes"] or sha256_hex(data) != entry["sha256"]:
                    raise CheckpointDamaged(f"{loc.uri}: {name} does not match its sha256 in the manifest")
                with open(os.path.join(local, name), "wb") as f:
                    f.write(data)
            state = _states(model, optimizer, companions)
            dcp.load(state, checkpoint_id=local)
            for prefix, (m, o) in _pairs(model, optimizer, companions).items():
                set_state_dict(m, o, model_state_dict=state[f"{prefix}model"], optim_state_dict=state[f"{prefix}optim"])
            rng_file = os.path.join(local, f"rank-{self.rank}.pt")
            if os.path.exists(rng_file):
                torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch_rng"])
        finally:
            shutil.rmtree(local, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
