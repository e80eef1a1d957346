"""The resume policy, beside the checkpointer: whether a checkpoint's run may be continued with
this config (`check_resumable`), refusing a run that has already finished before anything starts
(`refuse_finished`), and restoring the newest usable checkpoint into a loop (`resume`)."""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

from generalmodel.config import Config, dump_config, flatten
from generalmodel.errors import UserError
from generalmodel.storage import RunLayout
from generalmodel.train.checkpoint import CheckpointDamaged, Checkpointer, Companions

log = logging.getLogger(__name__)

# Keys whose change makes a checkpoint's continuation a different run. The number of workers is not
# one of them (DCP reshards, the loader resumes at another world size), but the global batch is.
RESUME_KEYS = (
    "model",
    "optim",
    "train.seed",
    "train.steps",
    "train.token_selection",
    "train.selection_reference",
    "dpo",
    "rl",
    "coconut",
    "quiet_star",
    "mixture",
)


class TrainingError(UserError):
    """A run that cannot start or continue as configured."""


class Position(Protocol):
    """Where a loop is in its data (the pretraining loader, RL's step counter): kept in checkpoints."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (dotted) under RESUME_KEYS whose values differ between two config dumps. A key the
    saved config lacks (a field added since the checkpoint was written) counts as its default."""
    defaults = {k: v for k, v in flatten(dump_config(Config())).items() if not k.startswith("model.")}
    old, new = {**defaults, **flatten(saved)}, flatten(current)
    keys = sorted(k for k in old.keys() | new.keys() if k.startswith(RESUME_KEYS) and old.get(k) != new.get(k))
    why = {"train.steps": " (the LR schedule is laid over train.steps: it would jump)"}
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}{why.get(k, '')}" for k in keys]


def check_resumable(
    loc, manifest: dict[str, Any], cfg: Config, config_dump: dict[str, Any], dataset_sha: str, data_world: int
) -> None:
    """A TrainingError unless continuing `manifest`'s run with `cfg` is the same run: same model,
    optimizer, seed, steps and dataset, the same global batch (`data_world`: the data-parallel
    ranks, the workers but for tensor parallel), and not already finished."""
    hint = " (start a new run: another --train.run_name or --train.checkpoint_dir)"
    if "name" not in manifest["config"].get("optim", {}):
        raise TrainingError(
            f"cannot resume from {loc.uri}: it was written before optim.name existed, by an optimizer with the "
            f"old two AdamW parameter groups; this version's optimizer state has other groups (embed, head, "
            f"matrices, decayed, other)" + hint
        )
    conflicts = resume_conflicts(manifest["config"], config_dump)
    if manifest.get("dataset") != dataset_sha:
        conflicts.append(f"dataset: checkpoint {manifest.get('dataset')}, now {dataset_sha}")
    if conflicts:
        raise TrainingError(f"cannot resume from {loc.uri}: the config differs in " + "; ".join(conflicts) + hint)
    saved = manifest["config"]["train"]
    before = (saved["batch_size"], saved["grad_accum"], manifest.get("data_world", manifest["world_size"]))
    now = (cfg.train.batch_size, cfg.train.grad_accum, data_world)
    if math.prod(before) != math.prod(now):
        raise TrainingError(
            f"cannot resume from {loc.uri} on {data_world} data-parallel workers: the global batch would change "
            f"from {before[0]} x {before[1]} x {before[2]} workers = {math.prod(before)} to "
            f"{now[0]} x {now[1]} x {now[2]} = {math.prod(now)} sequences per step; keep train.batch_size x "
            f"train.grad_accum x workers (over parallel.tensor) = {math.prod(before)} (e.g. raise "
            f"train.grad_accum on fewer workers)"
        )


def refuse_finished(cfg: Config, layout: RunLayout) -> None:
    """A job must not silently "train" a run that has already finished (and register its model
    again): a TrainingError naming the final checkpoint, before anything starts."""
    if cfg.train.resume != "auto":
        return
    fail_fast = layout.storage.model_copy(update={"retry_timeout_s": 0})  # a start-up check: no retries
    latest = Checkpointer(layout.checkpoints, fail_fast, 0, 1).latest()
    if latest is not None and latest[1]["step"] >= cfg.train.steps:
        raise TrainingError(
            f"run {cfg.train.run_name!r} has already finished: {latest[0].uri} is its final checkpoint (step "
            f"{latest[1]['step']} of train.steps={cfg.train.steps}), there is nothing left to train (start a new "
            f"run: another --train.run_name or --train.checkpoint_dir)"
        )


def resume(
    ckpt: Checkpointer,
    cfg: Config,
    config_dump: dict[str, Any],
    dataset_sha: str,
    data_world: int,
    model,
    optimizer,
    position: Position,
    companions: Companions = None,
) -> int:
    """The step to start from: 0 for a fresh run, else the step of the newest usable checkpoint,
    restored into model, optimizer, the companions and data position. Damaged checkpoints are
    skipped with a warning."""
    if cfg.train.resume == "never":
        existing = next(ckpt.checkpoints(), None)
        if existing is not None:
            raise TrainingError(
                f"train.resume=never, but {ckpt.root.uri} already holds checkpoints (newest: {existing[0].uri}); "
                f"a fresh run needs a directory of its own: use another --train.run_name or --train.checkpoint_dir"
            )
        return 0
    for loc, manifest in ckpt.checkpoints():
        try:
            ckpt.check(loc, manifest)
            check_resumable(loc, manifest, cfg, config_dump, dataset_sha, data_world)
            ckpt.load(loc, manifest, model, optimizer, companions)
        except CheckpointDamaged as e:
            log.warning("checkpoint damaged, trying the one before it: %s", e)
            continue
        ckpt.protect(loc)
        position.load_state_dict(manifest["loader"])
        if ckpt.rank == 0:
            log.info("resumed from %s at step %d", loc.uri, manifest["step"])
            if manifest["step"] >= cfg.train.steps:  # a sweep trial restored after its last step
                log.warning("%s is the final checkpoint (train.steps=%d): nothing to train", loc.uri, cfg.train.steps)
        return manifest["step"]
    return 0
