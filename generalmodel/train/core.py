"""The core every training loop shares: pretraining/SFT/DPO (`generalmodel.train.loop`) and the RL
learner (`generalmodel.post.rl.learner`) each write only their step; this module does the rest.

    Dist             the process group (torchrun) or Ray Train's, the device, the device mesh
    TrainingRun      the model (built, initialised from train.init_from, parallelized), optimizer,
                     checkpointer and non-finite guard; resumed from the newest usable checkpoint;
                     `run(step)`: failure injection, LR schedule, the loop's step, periodic and
                     final checkpoints, the final export, metrics reported (and appended to
                     train.metrics_log), uploads finished even when the run fails

A loop's step is `step(step_index, lr) -> metrics` (empty between log steps); the run decides when
to checkpoint (`save_due`) so a step can read its guard before anything is saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from generalmodel.config import Config, dump_config
from generalmodel.infer.export import adapter_files, export_files, load_state
from generalmodel.optim import build_optimizer, lr_multiplier, set_lr
from generalmodel.storage import RunLayout, resolve, with_retries
from generalmodel.train import fp8
from generalmodel.train.checkpoint import Checkpointer, Companions
from generalmodel.train.mesh import ExpertMeshes, build_mesh, check_groups_within_node, mesh_shape
from generalmodel.train.parallelize import parallelize
from generalmodel.train.resume import Position, TrainingError, resume
from generalmodel.train.step import NonFiniteGuard, optimizer_step
from models import build_model, svf
from models.attention import set_local_windows

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any]], None]
Init = Callable[[], dict[str, torch.Tensor]]
Step = Callable[[int, float], dict[str, Any]]


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    mesh: Any = None  # the DeviceMesh FSDP2 shards over (generalmodel.train.mesh); None without data parallel
    experts: ExpertMeshes | None = None  # parallel.expert > 1: the routed experts' meshes
    tensor: Any = None  # parallel.tensor > 1: the mesh of this rank's tensor-parallel group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensor_ranks(self) -> int:
        return self.tensor.size() if self.tensor is not None else 1

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel rank: which batch it reads (the tensor ranks, innermost, share one)."""
        return self.rank // self.tensor_ranks

    @property
    def data_world(self) -> int:
        """Data-parallel ranks: distinct batches per micro-step."""
        return self.world_size // self.tensor_ranks

    def sum_over_data(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the data-parallel ranks (each tensor-parallel group's ranks hold
        the same value: the sum over all ranks divided by their number)."""
        total = sum_across_ranks(value)
        if self.tensor_ranks == 1:
            return total
        return total / self.tensor_ranks if total.is_floating_point() else total // self.tensor_ranks


def setup_distributed(cfg: Config) -> Dist:
    """The process group (joined here under torchrun; Ray Train has done it), the device, and the
    device mesh of cfg.parallel."""
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
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))  # Ray Train's; torchrun's
    meshes = build_mesh(mesh_shape(cfg.parallel, world), device)
    check_groups_within_node(cfg.parallel, meshes, rank, node_rank)
    return Dist(rank, world, device, meshes.fsdp, meshes.experts, meshes.tensor)


def check_fp8(cfg: Config, env: Dist) -> None:
    """train.fp8 on a device that cannot run it is a clear error, never a silent bf16 run."""
    if cfg.train.fp8 != "none":
        fp8.check_supported(cfg.train.fp8, env.device)


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all ranks (a copy; the value itself without a process group)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def with_metrics_log(report: Report, path: str | None) -> Report:
    """`report`, and each report appended to `path` as a JSON line (train.metrics_log) when set."""
    if path is None:
        return report

    def report_and_log(metrics: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        report(metrics)

    return report_and_log


def full_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU (a collective under FSDP2: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_with_tokenizer(model, cfg: Config, tokenizer_json: str, env: Dist, layout: RunLayout) -> None:
    """The final model as safetensors + model config + tokenizer (an adapter: its vectors, adapter.json
    naming train.init_from, the config and tokenizer), written by rank 0 (every rank takes part in
    gathering the state)."""
    state = full_state(model)
    if not env.is_main:
        return
    out = resolve(layout.export, layout.storage)
    if cfg.train.adapter != "none":
        files = adapter_files(cfg.model, state, tokenizer_json, cfg.train.init_from)
    else:
        files = export_files(cfg.model, state, tokenizer_json)
    for name, data in files.items():
        with_retries(f"writing {out.uri}/{name}", layout.storage.retry_timeout_s, out.join(name).write_bytes, data)


def frozen_copy(cfg: Config, env: Dist, init: Init, trainable: bool = False):
    """A frozen copy of train.init_from on this worker, sharded like the policy (a reference);
    `trainable`: a copy that trains beside it (RL's implicit process reward model). Its random init
    is overwritten: it draws from a forked generator, leaving the run's as it was."""
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        copy = build_model(cfg.model)
    load_state(copy, init(), f"train.init_from {cfg.train.init_from!r}")
    copy.requires_grad_(trainable)
    train = cfg.train if trainable else cfg.train.model_copy(update={"activation_checkpointing": "none"})
    parallelize(
        copy,
        train,
        env.device,
        env.mesh,
        log_info=False,
        experts=env.experts,
        tensor=env.tensor,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
    return copy.train(trainable)


def trained_copy(cfg: Config, env: Dist, init: Init, lr: float):
    """A copy of train.init_from that trains beside the run's model (sharded like it), and its
    optimizer (optim's kind, at `lr`, held constant): a companion of the run."""
    copy = frozen_copy(cfg, env, init, trainable=True)
    return copy, build_optimizer(copy, cfg.optim.model_copy(update={"lr": lr}))


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def warm_window(cfg: Config, step: int) -> int:
    """The sliding-window layers' window at `step` under train.window_warmup_steps: from
    train.window_warmup_start to model.window, linearly, rounded up to a multiple of the start (few
    distinct sizes: few block masks and compiled graphs); model.window from the warmup's end on."""
    full, train = cfg.model.window, cfg.train
    if step >= train.window_warmup_steps:
        return full
    start = train.window_warmup_start
    grown = start + (full - start) * step / train.window_warmup_steps
    return min(full, start * math.ceil(grown / start))


def micro_batches(cfg: Config, step: int) -> int:
    """Micro-batches per rank at `step` under train.batch_warmup_steps: from train.batch_warmup_start of
    train.grad_accum (rounded up, at least one) to all of them, linearly; train.grad_accum after."""
    train = cfg.train
    if step >= train.batch_warmup_steps:
        return train.grad_accum
    share = train.batch_warmup_start + (1 - train.batch_warmup_start) * step / train.batch_warmup_steps
    return max(1, min(train.grad_accum, math.ceil(train.grad_accum * share - 1e-9)))


def micro_batches_before(cfg: Config, step: int) -> int:
    """Micro-batches per rank in the steps before `step` (what the loader has served by then)."""
    warm = min(step, cfg.train.batch_warmup_steps)
    return sum(micro_batches(cfg, i) for i in range(warm)) + (step - warm) * cfg.train.grad_accum


class TrainingRun:
    """One training run on this worker: everything a loop shares but its step (see the module doc).
    `companions(env)`: the run's other trained models (name -> (model, optimizer), built on this
    worker), checkpointed and resumed with it (`self.companions`)."""

    def __init__(
        self,
        cfg: Config,
        report: Report | None,
        layout: RunLayout,
        init: Init | None,
        position: Position,
        dataset_sha: str,
        tokenizer_json: Callable[[], str],
        seq_len: int | None = None,
        env: Dist | None = None,
        companions: Callable[[Dist], Companions] | None = None,
    ):
        self.cfg, self.layout, self.position, self.dataset_sha = cfg, layout, position, dataset_sha
        self.tokenizer_json = tokenizer_json
        if env is None:  # a caller that set up the process itself has checked fp8 (the loop: first thing)
            env = setup_distributed(cfg)
            check_fp8(cfg, env)
        self.env = env
        self.report = with_metrics_log(report or (lambda metrics: None), cfg.train.metrics_log if env.is_main else None)
        torch.manual_seed(cfg.train.seed)
        self.model = model = build_model(cfg.model)  # same seed on every rank: identical init before sharding
        if cfg.train.init_from is not None and init is None:
            raise TrainingError(f"train.init_from {cfg.train.init_from!r}: the job did not load it (load_init)")
        if init is not None:  # train.init_from, or a fresh model with parts loaded (a BLT's entropy model)
            where = f"train.init_from {cfg.train.init_from!r}" if cfg.train.init_from else "the job's initial state"
            load_state(model, init(), where)
        self.num_params = model.num_params()
        self.flops_per_token = model.flops_per_token(seq_len) if seq_len else None  # active parameters (MoE)
        if cfg.train.adapter == "svf":  # after the base's weights are in: their singular vectors are frozen
            adapted = svf.attach(model, cfg.train.adapter_targets)
            if env.is_main:
                trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
                log.info("SVF: %d linears adapted, %d trained parameters", len(adapted), trained)
        self.hooks = parallelize(
            model,
            cfg.train,
            env.device,
            env.mesh,
            log_info=env.is_main,
            seq_len=seq_len,
            experts=env.experts,
            tensor=env.tensor,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )
        self.optimizer = build_optimizer(model, cfg.optim)
        self.companions = companions(env) if companions is not None else {}
        self.ckpt = Checkpointer(
            layout.checkpoints, layout.storage, env.rank, env.world_size, cfg.train.keep_last, env.data_world
        )
        self.config_dump = dump_config(cfg)
        args = (cfg, self.config_dump, dataset_sha, env.data_world, model, self.optimizer, position)
        self.start_step = resume(self.ckpt, *args, self.companions)
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps, env.device)
        self.autocast = autocast_for(env.device)
        self.started = time.perf_counter()

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    def update(self, loss_sum: torch.Tensor, step: int):
        """One optimizer step on the accumulated gradients (skipped on the device when not finite):
        (grad norm, routing metrics), both device tensors."""
        self.hooks.before_step()  # tensor parallel: the head- and position-local parameters' gradients summed
        out = optimizer_step(self.model, self.optimizer, loss_sum, self.cfg.optim.grad_clip, self.guard, step)
        self.hooks.after_step()  # fp8 all-gather: the new weights' scales, in one batched computation
        return out

    def save_due(self, done: int) -> bool:
        every = self.cfg.train.checkpoint_every
        return done == self.steps or bool(every and done % every == 0)

    def run(self, step: Step, close: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Run `step` for every step left; returns the last value of every metric reported.
        `close` releases the loop's own resources, whether the run ends or fails."""
        last: dict[str, Any] = {}
        done = self.start_step
        window = None
        try:
            for index in range(self.start_step, self.steps):
                self._inject_failure(index)
                multiplier = lr_multiplier(index, self.steps, self.cfg.optim)
                set_lr(self.optimizer, multiplier)
                if self.cfg.train.window_warmup_steps and window != (window := warm_window(self.cfg, index)):
                    set_local_windows(self.model, window)
                metrics = step(index, self.cfg.optim.lr * multiplier)
                if metrics and window is not None:
                    metrics["attention_window"] = window
                done = index + 1
                if self.save_due(done):
                    metrics.update(step=done, checkpoint_stall_s=self._save(done))
                if done == self.steps:
                    # Before the last report: whoever hears it (a Tune scheduler) may end the run at once.
                    self.ckpt.wait()
                    self.export()
                if metrics:
                    metrics["num_params"] = self.num_params
                    last.update(metrics)
                    self.report(metrics)
        except BaseException:
            self.ckpt.finish_uploads()  # what was saved before the failure still gets published
            close()
            raise
        self.ckpt.wait()
        close()
        if done == self.start_step:  # resumed at the end: nothing trained, the export is written again
            self.export()
        return last

    def export(self) -> None:
        export_with_tokenizer(self.model, self.cfg, self.tokenizer_json(), self.env, self.layout)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _save(self, done: int) -> float:
        state = {
            "step": done,
            "loader": self.position.state_dict(),
            "config": self.config_dump,
            "dataset": self.dataset_sha,
        }
        return self.ckpt.save(done, self.model, self.optimizer, state, self.companions)

    def _inject_failure(self, step: int) -> None:
        """train.fail_at_step: a failure of the first attempt at that step (a test of recovery)."""
        if self.cfg.train.fail_at_step == step and self.start_step == 0 and self.env.is_main:
            raise RuntimeError(f"train.fail_at_step: injected failure at step {step}")
