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

import resource
import time
from typing import Any

import torch

from generalmodel.config import Config
from generalmodel.data.loader import TOKEN_REFERENCE_KIND, TokenDataset, TokenLoader
from generalmodel.data.mixture import MixedDataset, MixtureLoader
from generalmodel.data.tokenizer import eos_id, load_tokenizer
from generalmodel.storage import RunLayout
from generalmodel.train.core import (
    Dist,
    Init,
    Report,
    TrainingRun,
    check_fp8,
    frozen_copy,
    micro_batches,
    micro_batches_before,
    setup_distributed,
)
from generalmodel.train.mfu import device_peak_flops
from generalmodel.train.objectives import objective_for
from generalmodel.train.resume import TrainingError


def train(
    cfg: Config,
    report: Report | None = None,
    layout: RunLayout | None = None,
    init: Init | None = None,
) -> dict[str, Any]:
    """Train per cfg; returns the last metrics. `report(metrics)` is called every
    train.log_every steps and after each eval, on every rank (the caller decides what to do).
    `layout`: where the dataset, checkpoints and export are (default: computed from cfg).
    `init`: gives the full state dict of train.init_from (generalmodel.train.init_from), loaded
    before sharding; a checkpoint of the run itself, when there is one, wins."""
    layout = layout or RunLayout.of(cfg)
    env = setup_distributed(cfg)
    check_fp8(cfg, env)  # before anything is read or built
    ds = open_training_data(cfg, layout)
    if layout.reference is not None:  # DPO: the reference's log-probs, computed beside the dataset
        ds.attach_published(layout.reference, layout.storage)
    for name, uri in layout.token_references.items():  # Rho-1: each dataset's per-token reference losses
        ds.parts[name].attach_published(uri, layout.storage, TOKEN_REFERENCE_KIND)
    loader = training_loader(cfg, ds, env)
    val_loaders = {
        name: TokenLoader(part, "val", cfg.train.batch_size, env.data_rank, env.data_world, shuffle=False)
        for name, part in ds.parts.items()
    }
    run = TrainingRun(cfg, report, layout, init, loader, ds.manifest_sha256, ds.tokenizer_json, ds.seq_len, env)
    separator = eos_id(load_tokenizer(ds.tokenizer_json(), ds.uri)) if cfg.train.document_mask else None
    objective = objective_for(
        ds.format,
        cfg.dpo,
        _online_reference(cfg, ds, env, init),
        cfg.train.loss_chunk,
        separator,
        cfg.train.token_selection,
    )
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    step = TokenStep(run, objective, loader, val_loaders, 2 if ds.format == "preference" else 1)

    def close() -> None:
        for each in (loader, *val_loaders.values()):
            each.close()

    return run.run(step, close)


def open_training_data(cfg: Config, layout: RunLayout) -> TokenDataset | MixedDataset:
    """What the run trains on, checked against the model: the mixture's datasets, else one dataset."""
    if layout.mixture:
        ds = MixedDataset.open(layout.mixture, layout.storage)
    else:
        ds = TokenDataset.open(layout.dataset, layout.storage)
    for part in ds.parts.values():
        check_compatible(cfg, part)
    return ds


def training_loader(cfg: Config, ds: TokenDataset | MixedDataset, env: Dist) -> TokenLoader | MixtureLoader:
    """This rank's training batches: the mixed stream of a mixture, else the dataset's stream (the
    ranks of a tensor-parallel group read the same ones)."""
    if isinstance(ds, MixedDataset):
        rows_per_step = cfg.train.batch_size * cfg.train.grad_accum * env.data_world
        return MixtureLoader(
            ds, cfg.mixture, cfg.train.batch_size, env.data_rank, env.data_world, cfg.train.seed, rows_per_step
        )
    return TokenLoader(ds, "train", cfg.train.batch_size, env.data_rank, env.data_world, seed=cfg.train.seed)


class TokenStep:
    """One optimizer step of a dataset-driven objective (next token, SFT, DPO): gradient
    accumulation with one reduce-scatter per step, the metrics of log steps, evaluation."""

    def __init__(self, run: TrainingRun, objective, loader, val_loaders: dict[str, TokenLoader], per_row: int):
        self.run, self.objective, self.loader, self.val_loaders = run, objective, loader, val_loaders
        self.per_dataset = isinstance(loader, MixtureLoader)  # val_loss_NAME for each dataset mixed
        cfg, env = run.cfg, run.env
        # A preference pair is two sequences.
        # tokens of one micro-batch on every rank (a step has train.grad_accum of them, fewer in a batch warmup)
        self.tokens_per_micro = cfg.train.batch_size * env.data_world * loader.dataset.seq_len * per_row
        self.peak_flops = device_peak_flops(env.device) if env.is_main else None
        self.window_start, self.window_steps, self.window_micro = time.perf_counter(), 0, 0

    def __call__(self, step: int, lr: float) -> dict[str, Any]:
        run, cfg = self.run, self.run.cfg
        micro = micro_batches(cfg, step)  # train.grad_accum, fewer in a batch warmup
        sums, total = self.accumulate(step, micro)
        grad_norm, routing = run.update(sums[0], step)
        self.window_steps += 1
        self.window_micro += micro
        done = step + 1
        log_step = done % cfg.train.log_every == 0 or done == run.steps
        eval_step = done % cfg.train.eval_every == 0 or done == run.steps
        if not (log_step or eval_step or run.save_due(done)):
            return {}  # no host read this step: the device runs on
        skipped = run.guard.read()  # raises TrainingDiverged before anything is saved
        means = (sums / total).tolist()
        metrics: dict[str, Any] = {"loss": means[0]}
        if log_step:
            stats = dict(zip(self.objective.stats, means[1:], strict=True))
            metrics.update(self.log_metrics(done, lr, grad_norm, routing, skipped), loss=means[0], **stats)
        if eval_step:
            metrics.update(
                step=done,
                **evaluate(
                    run.model, self.val_loaders, cfg, run.env, run.autocast, self.objective.evaluation, self.per_dataset
                ),
            )
        return metrics

    def accumulate(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over `micro` micro-batches (train.grad_accum; fewer during a batch
        warmup, generalmodel.train.core.micro_batches): (the sums of the loss and its statistics
        over this step's units on all ranks, the number of those units)."""
        run, cfg, env, objective = self.run, self.run.cfg, self.run.env, self.objective
        host_batches = [self.loader.next_batch() for _ in range(micro)]
        # The step's loss is the mean over all its units (tokens or pairs) on all data-parallel
        # ranks: each rank's sums are scaled by data_world/total, and FSDP averages the gradients
        # over the data-parallel ranks. The units are counted on the host batches: no device value
        # is read back.
        count = torch.tensor(sum(objective.count(b) for b in host_batches))
        total = env.sum_over_data(count.to(env.device, non_blocking=True)).clamp(min=1)
        scale = env.data_world / total
        sums = torch.zeros(1 + len(objective.stats), device=env.device)
        for i, host_batch in enumerate(host_batches):
            # FSDP2 reduce-scatters the gradients once per optimizer step, after the last micro-batch
            # (the unsharded gradients accumulate in between, in the reduce dtype).
            _gradient_sync(run.model, i == len(host_batches) - 1)
            loss, stats = objective.loss(run.model, _to(host_batch, env.device), run.autocast)
            aux = run.model.aux_loss()  # MoE balance loss, None unless configured
            (loss * scale + (0 if aux is None else aux / len(host_batches))).backward()
            sums += torch.stack([loss.detach(), *(stats[k] for k in objective.stats)])
        if cfg.train.nan_grad_at_step == step and env.is_main:  # testing aid: a finite loss, a NaN gradient
            next(run.model.parameters()).grad.fill_(float("nan"))
        return env.sum_over_data(sums), total

    def log_metrics(self, done: int, lr: float, grad_norm, routing, skipped: int) -> dict[str, Any]:
        run, env = self.run, self.run.env
        elapsed = time.perf_counter() - self.window_start  # the device has caught up: the loss was read
        tok_s = self.tokens_per_micro * self.window_micro / elapsed
        metrics = {
            "step": done,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "tokens_per_s": tok_s,
            "tokens": micro_batches_before(run.cfg, done) * self.tokens_per_micro,
            "skipped_steps": skipped,
            **self.loader.metrics(),
            **{k: v.item() for k, v in routing.items()},
            "eta_s": (run.steps - done) * elapsed / self.window_steps,
            "elapsed_s": run.elapsed(),
        }
        if self.peak_flops:
            metrics["mfu"] = tok_s * run.flops_per_token / env.world_size / self.peak_flops
        if env.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        else:
            metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.window_start, self.window_steps, self.window_micro = time.perf_counter(), 0, 0
        return metrics


def check_compatible(cfg: Config, ds: TokenDataset) -> None:
    if ds.vocab_size != cfg.model.vocab_size:
        raise TrainingError(
            f"dataset {ds.uri} has vocab_size {ds.vocab_size}, model.vocab_size is {cfg.model.vocab_size}: "
            f"set --model.vocab_size={ds.vocab_size}"
        )
    if ds.seq_len > cfg.model.max_seq_len:
        raise TrainingError(
            f"dataset {ds.uri} has seq_len {ds.seq_len}, above model.max_seq_len={cfg.model.max_seq_len}"
        )
    if cfg.train.document_mask and ds.format == "preference":
        raise TrainingError(
            f"train.document_mask is for packed rows (data.format text or chat); dataset {ds.uri} holds "
            "preference pairs, one sequence per row"
        )
    if cfg.train.token_selection < 1 and ds.format == "preference":
        raise TrainingError(
            f"train.token_selection is for next-token losses (data.format text or chat); dataset {ds.uri} holds "
            "preference pairs (DPO)"
        )
    tensor = cfg.parallel.tensor
    if tensor > 1 and cfg.parallel.sequence_parallel and ds.seq_len % tensor:
        raise TrainingError(
            f"parallel.sequence_parallel splits rows over the parallel.tensor={tensor} ranks, and dataset {ds.uri} "
            f"has rows of {ds.seq_len} positions: prepare it with a data.seq_len that {tensor} divides, or set "
            f"--parallel.sequence_parallel=false"
        )
    if cfg.train.document_mask and ds.format == "chat" and "docs" not in ds.columns:
        raise TrainingError(
            f"train.document_mask: dataset {ds.uri} was prepared without the conversations' document ids "
            "(the docs column); prepare it again (--data.overwrite=true)"
        )


def _gradient_sync(model, sync: bool) -> None:
    """FSDP2: reduce-scatter this micro-batch's gradients (the last of the step) or keep
    accumulating them unsharded (the others); a no-op without FSDP2."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


def _online_reference(cfg: Config, ds: TokenDataset, env: Dist, init: Init | None):
    """DPO with dpo.reference=online: a frozen copy of train.init_from on this worker, sharded like
    the policy (None for every other objective)."""
    if ds.format != "preference" or cfg.dpo.reference != "online":
        return None
    if init is None:
        raise TrainingError("dpo.reference=online needs train.init_from (the reference is the model it names)")
    return frozen_copy(cfg, env, init)


@torch.no_grad()
def evaluate(
    model, loaders: dict[str, TokenLoader], cfg: Config, env: Dist, autocast, objective, each: bool = False
) -> dict[str, float]:
    """The objective's loss and statistics over the first train.eval_batches batches of each val
    split (the same ones every time), averaged over all their units on all ranks: val_loss, val_*;
    `each` (a mixture's datasets): each one's val_loss_NAME too."""
    model.eval()
    sums = {name: _eval_sums(model, loader, cfg, env, autocast, objective) for name, loader in loaders.items()}
    model.train()
    names = ("loss", *objective.stats)
    count, *values = env.sum_over_data(torch.stack(list(sums.values())).sum(0)).tolist()
    metrics = {f"val_{name}": v / max(count, 1) for name, v in zip(names, values, strict=True)}
    if each:
        per_dataset = env.sum_over_data(torch.stack([s[:2] for s in sums.values()])).tolist()
        metrics.update({f"val_loss_{name}": v / max(n, 1) for name, (n, v) in zip(sums, per_dataset, strict=True)})
    return metrics


def _eval_sums(model, loader: TokenLoader, cfg: Config, env: Dist, autocast, objective) -> torch.Tensor:
    """[units, loss sum, statistic sums...] over this rank's eval batches of one val split."""
    loader.rewind()
    sums = torch.zeros(2 + len(objective.stats), device=env.device)
    count = 0.0
    for _ in range(cfg.train.eval_batches):
        host_batch = loader.next_batch()
        count += objective.count(host_batch)
        loss, stats = objective.loss(model, _to(host_batch, env.device), autocast)
        sums[1:] += torch.stack([loss, *(stats[k] for k in objective.stats)])
    sums[0] = count
    return sums
