"""The per-worker training loop: a plain function of the config.

It runs unchanged in one process, under `torchrun` (it reads RANK/WORLD_SIZE and starts the
process group) and under Ray Train's TorchTrainer (which starts the process group for it).
Ray appears only through the `report` callback the caller passes.

    build model → FSDP2 (world > 1) → compile / activation checkpointing → optimizer + LR schedule →
    [resume from the newest checkpoint] → steps: grad accumulation (one reduce-scatter per step),
    bf16 autocast on GPU, clip, NaN/inf skip → periodic eval, metrics, async checkpoints → final
    checkpoint.

The loss is the dataset's objective (generalmodel.train.objectives): next-token cross-entropy for
text (computed in the model's forward, so compile puts it in the graph), the same under the loss
mask for chat (SFT), DPO for preference pairs. Between log, eval and checkpoint steps the host reads
nothing back from the device: the loss, the gradient norm and the skip decision of a non-finite
step stay there (generalmodel.train.step), so a GPU never waits for Python.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from generalmodel import UserError
from generalmodel.config import Config, dump_config, flatten
from generalmodel.data.loader import TokenDataset, TokenLoader
from generalmodel.infer.export import load_state
from generalmodel.optim import build_optimizer, lr_multiplier, set_lr
from generalmodel.storage import RunLayout, resolve, with_retries
from generalmodel.train import fp8
from generalmodel.train.checkpoint import CheckpointDamaged, Checkpointer
from generalmodel.train.mfu import device_peak_flops
from generalmodel.train.objectives import objective_for
from generalmodel.train.parallelize import parallelize
from generalmodel.train.step import NonFiniteGuard, optimizer_step
from models import build_model

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]

# Keys whose change makes a checkpoint's continuation a different run. The number of workers is not
# one of them (DCP reshards, the loader resumes at another world size), but the global batch is.
RESUME_KEYS = ("model", "optim", "train.seed", "train.steps", "dpo", "rl")


class TrainingError(UserError):
    pass


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Dist:
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # torchrun; Ray Train has done this already
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if want_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device)


def check_compatible(cfg: Config, ds: TokenDataset) -> None:
    if ds.vocab_size != cfg.model.vocab_size:
        raise TrainingError(
            f"dataset {ds.loc.uri} has vocab_size {ds.vocab_size}, model.vocab_size is {cfg.model.vocab_size}: "
            f"set --model.vocab_size={ds.vocab_size}"
        )
    if ds.seq_len > cfg.model.max_seq_len:
        raise TrainingError(
            f"dataset {ds.loc.uri} has seq_len {ds.seq_len}, above model.max_seq_len={cfg.model.max_seq_len}"
        )


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (dotted) under RESUME_KEYS whose values differ between two config dumps. A key the
    saved config lacks (a field added since the checkpoint was written) counts as its default."""
    defaults = {k: v for k, v in flatten(dump_config(Config())).items() if not k.startswith("model.")}
    old, new = {**defaults, **flatten(saved)}, flatten(current)
    keys = sorted(k for k in old.keys() | new.keys() if k.startswith(RESUME_KEYS) and old.get(k) != new.get(k))
    why = {"train.steps": " (the LR schedule is laid over train.steps: it would jump)"}
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}{why.get(k, '')}" for k in keys]


def check_resumable(
    loc, manifest: dict[str, Any], cfg: Config, config_dump: dict[str, Any], dataset_sha: str, world_size: int
) -> None:
    """A TrainingError unless continuing `manifest`'s run with `cfg` is the same run: same model,
    optimizer, seed, steps and dataset, the same global batch, and not already finished."""
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
    before = (saved["batch_size"], saved["grad_accum"], manifest["world_size"])
    now = (cfg.train.batch_size, cfg.train.grad_accum, world_size)
    if math.prod(before) != math.prod(now):
        raise TrainingError(
            f"cannot resume from {loc.uri} on {world_size} workers: the global batch would change from "
            f"{before[0]} x {before[1]} x {before[2]} workers = {math.prod(before)} to "
            f"{now[0]} x {now[1]} x {now[2]} = {math.prod(now)} sequences per step; keep train.batch_size x "
            f"train.grad_accum x workers = {math.prod(before)} (e.g. raise train.grad_accum on fewer workers)"
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
    env: Dist,
    model,
    optimizer,
    loader: TokenLoader,
) -> int:
    """The step to start from: 0 for a fresh run, else the step of the newest usable checkpoint,
    restored into model, optimizer, loader and RNG. Damaged checkpoints are skipped with a warning."""
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
            check_resumable(loc, manifest, cfg, config_dump, dataset_sha, env.world_size)
            ckpt.load(loc, manifest, model, optimizer)
        except CheckpointDamaged as e:
            log.warning("checkpoint damaged, trying the one before it: %s", e)
            continue
        ckpt.protect(loc)
        loader.load_state_dict(manifest["loader"])
        if env.is_main:
            log.info("resumed from %s at step %d", loc.uri, manifest["step"])
            if manifest["step"] >= cfg.train.steps:  # a sweep trial restored after its last step
                log.warning("%s is the final checkpoint (train.steps=%d): nothing to train", loc.uri, cfg.train.steps)
        return manifest["step"]
    return 0


def train(
    cfg: Config,
    report: Report | None = None,
    layout: RunLayout | None = None,
    init: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Train per cfg; returns the last metrics. `report(metrics)` is called every
    train.log_every steps and after each eval, on every rank (the caller decides what to do).
    `layout`: where the dataset, checkpoints and export are (default: computed from cfg).
    `init`: gives the full state dict of train.init_from (generalmodel.train.init), loaded
    before sharding; a checkpoint of the run itself, when there is one, wins."""
    layout = layout or RunLayout.of(cfg)
    env = setup_distributed(cfg)
    if cfg.train.fp8 != "none":  # a clear error, not a silent bf16 run
        fp8.check_supported(cfg.train.fp8, env.device)
    report = _with_metrics_log(report or (lambda metrics: None), cfg.train.metrics_log if env.is_main else None)
    torch.manual_seed(cfg.train.seed)
    ds = TokenDataset.open(layout.dataset, layout.storage)
    check_compatible(cfg, ds)
    if layout.reference is not None:  # DPO: the reference's log-probs, computed beside the dataset
        ds.attach_published(layout.reference, layout.storage)

    model = build_model(cfg.model)  # same seed on every rank: identical init before sharding
    if cfg.train.init_from is not None:
        if init is None:
            raise TrainingError(f"train.init_from {cfg.train.init_from!r}: the job did not load it (load_init)")
        load_state(model, init(), f"train.init_from {cfg.train.init_from!r}")
    flops_per_token = model.flops_per_token(ds.seq_len)  # active parameters: honest MFU for MoE
    num_params = model.num_params()
    peak_flops = device_peak_flops(env.device) if env.is_main else None
    after_step = parallelize(model, cfg.train, env.device, env.world_size, log_info=env.is_main, seq_len=ds.seq_len)
    objective = objective_for(ds.format, cfg.dpo, _online_reference(cfg, ds, env, init), cfg.train.loss_chunk)
    optimizer = build_optimizer(model, cfg.optim)

    loader = TokenLoader(ds, "train", cfg.train.batch_size, env.rank, env.world_size, seed=cfg.train.seed)
    val_loader = TokenLoader(ds, "val", cfg.train.batch_size, env.rank, env.world_size, shuffle=False)
    ckpt = Checkpointer(layout.checkpoints, layout.storage, env.rank, env.world_size, cfg.train.keep_last)
    config_dump = dump_config(cfg)
    start_step = resume(ckpt, cfg, config_dump, ds.manifest_sha256, env, model, optimizer, loader)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else contextlib.nullcontext()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    sequences_per_row = 2 if ds.format == "preference" else 1  # a pair is two sequences
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * env.world_size * ds.seq_len * sequences_per_row
    steps = cfg.train.steps
    guard = NonFiniteGuard(cfg.train.max_bad_steps, env.device)
    last: dict[str, Any] = {}
    window_start, window_steps = time.perf_counter(), 0
    run_started = time.perf_counter()

    def save(step: int) -> float:
        return ckpt.save(
            step,
            model,
            optimizer,
            {"step": step, "loader": loader.state_dict(), "config": config_dump, "dataset": ds.manifest_sha256},
        )

    done = start_step
    try:
        for step in range(start_step, steps):
            if cfg.train.fail_at_step == step and start_step == 0 and env.is_main:
                raise RuntimeError(f"train.fail_at_step: injected failure at step {step}")
            multiplier = lr_multiplier(step, steps, cfg.optim)
            set_lr(optimizer, multiplier)
            lr = cfg.optim.lr * multiplier
            host_batches = [loader.next_batch() for _ in range(cfg.train.grad_accum)]
            # The step's loss is the mean over all its units (tokens or pairs) on all ranks: each
            # rank's sums are scaled by world/total, and FSDP averages the gradients over the ranks.
            # The units are counted on the host batches: no device value is read back.
            count = torch.tensor(sum(objective.count(b) for b in host_batches))
            total = _sum_across_ranks(count.to(env.device, non_blocking=True)).clamp(min=1)
            scale = env.world_size / total
            sums = torch.zeros(1 + len(objective.stats), device=env.device)
            for i, host_batch in enumerate(host_batches):
                batch = _to(host_batch, env.device)
                # FSDP2 reduce-scatters the gradients once per optimizer step, after the last micro-batch
                # (the unsharded gradients accumulate in between, in the reduce dtype).
                _gradient_sync(model, i == len(host_batches) - 1)
                loss, stats = objective.loss(model, batch, autocast)
                aux = model.aux_loss()  # MoE balance loss, None unless configured
                (loss * scale + (0 if aux is None else aux / cfg.train.grad_accum)).backward()
                sums += torch.stack([loss.detach(), *(stats[k] for k in objective.stats)])
            if cfg.train.nan_grad_at_step == step and env.is_main:  # testing aid: a finite loss, a NaN gradient
                next(model.parameters()).grad.fill_(float("nan"))
            sums = _sum_across_ranks(sums)
            grad_norm, routing = optimizer_step(model, optimizer, sums[0], cfg.optim.grad_clip, guard, step)
            after_step()  # fp8 all-gather: the new weights' scales, in one batched computation
            window_steps += 1
            done = step + 1

            log_step = done % cfg.train.log_every == 0 or done == steps
            eval_step = done % cfg.train.eval_every == 0 or done == steps
            save_step = done == steps or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0)
            if not (log_step or eval_step or save_step):
                continue  # no host read this step: the device runs on
            skipped = guard.read()  # raises TrainingDiverged before anything is saved
            metrics: dict[str, Any] = {}
            means = (sums / total).tolist()
            loss_value, step_stats = means[0], dict(zip(objective.stats, means[1:], strict=True))
            if log_step:
                elapsed = time.perf_counter() - window_start  # the device has caught up: .tolist() waited
                tok_s = tokens_per_step * window_steps / elapsed
                metrics.update(
                    step=done,
                    loss=loss_value,
                    **step_stats,
                    lr=lr,
                    grad_norm=grad_norm.item(),
                    tokens_per_s=tok_s,
                    tokens=done * tokens_per_step,
                    skipped_steps=skipped,
                    **{k: v.item() for k, v in routing.items()},
                    eta_s=(steps - done) * elapsed / window_steps,
                    elapsed_s=time.perf_counter() - run_started,
                )
                if peak_flops:
                    metrics["mfu"] = tok_s * flops_per_token / env.world_size / peak_flops
                if env.device.type == "cuda":
                    metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
                else:
                    import resource

                    metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                window_start, window_steps = time.perf_counter(), 0
            if eval_step:
                metrics.update(step=done, **evaluate(model, val_loader, cfg, env, autocast, objective))
            if save_step:
                metrics.update(step=done, checkpoint_stall_s=save(done))
            if done == steps:
                # Before the last report: whoever hears it (a Tune scheduler) may end the run at once.
                ckpt.wait()
                export(model, cfg, ds, env, layout)
            if metrics:
                metrics.setdefault("loss", loss_value)
                metrics["num_params"] = num_params
                last.update(metrics)
                report(metrics)
    except BaseException:
        ckpt.finish_uploads()  # what was saved before the failure still gets published
        raise
    ckpt.wait()
    loader.close()
    val_loader.close()
    if done == start_step:  # resumed at the end: nothing trained, the export is written again
        export(model, cfg, ds, env, layout)
    return last


def export(model, cfg: Config, ds: TokenDataset, env: Dist, layout: RunLayout) -> None:
    """The final model as safetensors + model config + tokenizer, written by rank 0."""
    export_with_tokenizer(model, cfg, ds.tokenizer_json(), env, layout)


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU (a collective under FSDP2: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_with_tokenizer(model, cfg: Config, tokenizer_json: str, env: Dist, layout: RunLayout) -> None:
    from generalmodel.infer.export import export_files

    state = full_state(model)
    if not env.is_main:
        return
    out = resolve(layout.export, layout.storage)
    files = export_files(cfg.model, state, tokenizer_json)
    for name, data in files.items():
        with_retries(f"writing {out.uri}/{name}", layout.storage.retry_timeout_s, out.join(name).write_bytes, data)


def _with_metrics_log(report: Report, path: str | None) -> Report:
    if path is None:
        return report

    def report_and_log(metrics: dict[str, Any]) -> None:
        import json

        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        report(metrics)

    return report_and_log


def _sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def _gradient_sync(model, sync: bool) -> None:
    """FSDP2: reduce-scatter this micro-batch's gradients (the last of the step) or keep
    accumulating them unsharded (the others); a no-op without FSDP2."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


def _online_reference(cfg: Config, ds: TokenDataset, env: Dist, init):
    """DPO with dpo.reference=online: a frozen copy of train.init_from on this worker, sharded like
    the policy (None for every other objective)."""
    if ds.format != "preference" or cfg.dpo.reference != "online":
        return None
    if init is None:
        raise TrainingError("dpo.reference=online needs train.init_from (the reference is the model it names)")
    return frozen_copy(cfg, env, init)


def frozen_copy(cfg: Config, env: Dist, init):
    """A frozen copy of train.init_from on this worker, sharded like the policy (a reference)."""
    reference = build_model(cfg.model)
    load_state(reference, init(), f"train.init_from {cfg.train.init_from!r}")
    reference.requires_grad_(False)
    frozen = cfg.train.model_copy(update={"activation_checkpointing": "none"})  # no backward through it
    parallelize(reference, frozen, env.device, env.world_size, log_info=False)
    return reference.eval()


@torch.no_grad()
def evaluate(model, loader: TokenLoader, cfg: Config, env: Dist, autocast, objective) -> dict[str, float]:
    """The objective's loss and statistics over the first train.eval_batches batches of the val
    split (the same ones every time), averaged over all their units on all ranks: val_loss, val_*."""
    model.eval()
    loader.rewind()
    sums = torch.zeros(2 + len(objective.stats), device=env.device)
    count = 0.0
    for _ in range(cfg.train.eval_batches):
        host_batch = loader.next_batch()
        count += objective.count(host_batch)
        loss, stats = objective.loss(model, _to(host_batch, env.device), autocast)
        sums[1:] += torch.stack([loss, *(stats[k] for k in objective.stats)])
    sums[0] = count
    model.train()
    count, *values = _sum_across_ranks(sums).tolist()
    return {f"val_{name}": v / max(count, 1) for name, v in zip(("loss", *objective.stats), values, strict=True)}
