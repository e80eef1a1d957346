"""The optimizer step of a post-training objective over rows held in memory (Coconut's worked
conversations, Quiet-STaR's), on the training core (generalmodel.train.core.TrainingRun).

Step k takes positions k·N … of the endless stream of seeded permutations of the rows (N = rows per
step over all ranks: train.batch_size × train.grad_accum × world size), so the rows of a step are a
function of (train.seed, k) and a resumed run sees what the uninterrupted one saw; each rank takes
its contiguous share in train.grad_accum micro-batches of train.batch_size. An objective gives the
micro-batch of some rows (`batch`), its loss *summed* over its units (`loss`) and how many units
a micro-batch has, counted on the host (`count`); the step divides by the count over every rank and
micro-batch, so the gradient is the mean over every unit of the step whatever the world size, and
FSDP2 reduce-scatters once, after the last micro-batch. RL's prompt sets read their sources and
walk their prompts with the same helpers (`read_source`, `step_items`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.data.sources import RowError, list_pieces, read_rows
from generalmodel.storage import RunLayout
from generalmodel.train.core import Init, Report, TrainingRun, sum_across_ranks
from generalmodel.train.resume import TrainingError


def read_source(cfg: Config, source: str, storage, digest) -> list[tuple[str, dict[str, Any]]]:
    """The rows of `source` (.jsonl/.parquet, local, s3:// or hf:), each with its file:line, every
    row fed to `digest` (what names a run's data); a malformed row raises its UserError."""
    data = cfg.data.model_copy(update={"source": source})
    out = []
    for piece in list_pieces(data, storage):
        for where, row in read_rows(piece, storage):
            if isinstance(row, RowError):
                raise row
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            out.append((where, row))
    return out


def step_items(n: int, step: int, count: int, seed: int) -> list[int]:
    """Indices into n items of step `step`'s `count`: positions step·count … of the endless stream
    of seeded permutations of range(n), one per epoch (a pure function of seed and step)."""
    out = []
    for i in range(step * count, (step + 1) * count):
        epoch, pos = divmod(i, n)
        out.append(int(permutation(n, seed, epoch)[pos]))
    return out


_PERMUTATIONS: dict[tuple[int, int, int], np.ndarray] = {}


def permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()  # one epoch at a time is what a run walks through
        _PERMUTATIONS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMUTATIONS[key]


class InMemoryData:
    """Data a run holds in memory, named by a digest (a resumed run must see the same): `uri`,
    `manifest_sha256` and `parts` are what MLflow's dataset inputs and the checkpoint manifests read
    (a TokenDataset's names). Subclasses are dataclasses with `uri` and `sha256`; PART names them."""

    PART = "rows"
    sha256: str

    @property
    def manifest_sha256(self) -> str:
        return self.sha256

    @property
    def parts(self) -> dict[str, InMemoryData]:
        return {self.PART: self}


@dataclass
class RowSet(InMemoryData):
    """The rows of such a run and the digest that names them."""

    uri: str
    rows: list
    sha256: str


class StepPosition:
    """Where such a run is: its step (a step's rows are a function of seed and step)."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def refuse_dataset_loop_switches(run: TrainingRun, step: str) -> None:
    """A UserError for what only the dataset loop (jobs.pretrain, jobs.sft, jobs.dpo) does: the
    batch warmup, and tensor parallel (whose ranks must read the same rows)."""
    cfg = run.cfg
    if cfg.train.batch_warmup_steps:
        raise UserError(
            f"train.batch_warmup_steps={cfg.train.batch_warmup_steps}: the batch warmup is the dataset loop's "
            f"(jobs.pretrain, jobs.sft, jobs.dpo); {step} steps over rows in batches of train.batch_size x "
            f"train.grad_accum. Drop it"
        )
    if cfg.parallel.tensor > 1:
        raise UserError(
            f"parallel.tensor={cfg.parallel.tensor}: tensor parallel is the dataset loop's (jobs.pretrain, "
            f"jobs.sft, jobs.dpo); {step} hands each rank rows of its own. Use parallel.tensor=1"
        )


class RowsStep:
    """One optimizer step over this rank's rows of the step (module doc); subclasses give the
    objective. `unit` names what the loss is a mean over (for the throughput metric)."""

    unit = "tokens"

    def __init__(self, run: TrainingRun, rows: list):
        refuse_dataset_loop_switches(run, type(self).__name__)
        self.run, self.rows = run, rows
        self.window = time.perf_counter(), 0, 0.0  # started, steps, units

    def batch(self, rows: list, step: int, first: int) -> dict[str, torch.Tensor]:
        """The micro-batch of `rows`, the first of them at place `first` of the step's rows (over
        all ranks: what a per-row seed is made from, so draws do not depend on the world size)."""
        raise NotImplementedError

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the summed loss of a micro-batch on the device, summed statistics to report as means)."""
        raise NotImplementedError

    def before(self, step: int) -> dict[str, Any]:
        """What the objective does before a step; returns metrics of the step (e.g. its stage)."""
        return {}

    def __call__(self, step: int, lr: float) -> dict[str, Any]:
        run, cfg, env = self.run, self.run.cfg, self.run.env
        extra = self.before(step)
        per, rows_per_rank = cfg.train.batch_size, cfg.train.batch_size * cfg.train.grad_accum
        picked = step_items(len(self.rows), step, rows_per_rank * env.world_size, cfg.train.seed)
        mine = [self.rows[i] for i in picked[env.rank * rows_per_rank : (env.rank + 1) * rows_per_rank]]
        offset = env.rank * rows_per_rank
        chunks = [self.batch(mine[i : i + per], step, offset + i) for i in range(0, len(mine), per)]
        count = sum(self.count(c) for c in chunks)
        total = sum_across_ranks(torch.tensor(count, device=env.device)).clamp(min=1)
        sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=env.device)}
        for i, chunk in enumerate(chunks):
            if hasattr(run.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once, after the last
                run.model.set_requires_gradient_sync(i == len(chunks) - 1)
            loss, stats = self.loss({k: v.to(env.device) for k, v in chunk.items()}, step)
            (loss * env.world_size / total).backward()
            for name, value in {"loss": loss, **stats}.items():
                sums[name] = sums.get(name, 0) + value.detach()
        reduced = {name: sum_across_ranks(value) for name, value in sums.items()}
        grad_norm, _ = run.update(reduced["loss"], step)
        run.position.step = done = step + 1
        started, steps, units = self.window
        self.window = started, steps + 1, units + total.item()
        if not (done % cfg.train.log_every == 0 or done == run.steps or run.save_due(done)):
            return {}
        skipped = run.guard.read()
        elapsed = time.perf_counter() - started
        self.window = time.perf_counter(), 0, 0.0
        return {
            "step": done,
            **{name: (value / total).item() for name, value in reduced.items()},
            **extra,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            f"supervised_{self.unit}_per_s": (units + total.item()) / elapsed,
            "skipped_steps": skipped,
            "elapsed_s": run.elapsed(),
            "eta_s": (run.steps - done) * elapsed / (steps + 1),
        }


def train_rows(
    cfg: Config, report: Report | None, layout: RunLayout | None, init: Init | None, data, tokenizer_json, step_class
) -> dict[str, Any]:
    """The per-worker loop of a rows objective (`step_class(run, data, tokenizer_json)`) on the
    platform's TrainingRun (FSDP2, checkpoints, exact resume, export); returns the last metrics."""
    if init is None or data is None or tokenizer_json is None or cfg.train.init_from is None:
        raise TrainingError(f"{step_class.__name__} needs the starting model (train.init_from), its tokenizer and rows")
    layout = layout or RunLayout.of(cfg)
    run = TrainingRun(cfg, report, layout, init, StepPosition(), data.sha256, lambda: tokenizer_json)
    return run.run(step_class(run, data, tokenizer_json))


def fit_and_register(cfg: Config, uri: str, init, data, seq_len: int, loop):
    """A rows objective's job on Ray Train: `loop` (train_rows of its step) over `data`, tracked
    in MLflow and registered (generalmodel.train.job). Returns the Trained."""
    from generalmodel.cluster import ray_session
    from generalmodel.train.job import register_trained, tracked_fit
    from generalmodel.train.ray_trainer import fit
    from generalmodel.train.resume import refuse_finished

    layout = RunLayout.of(cfg)
    refuse_finished(cfg, layout)
    with ray_session(cfg.ray):
        loop_args = {"data": data, "tokenizer_json": init.tokenizer_json}

        def run(run_id: str) -> None:
            fit(cfg, layout, seq_len, run_id, uri, init=init, loop=loop, loop_args=loop_args)

        run_id, lineage = tracked_fit(cfg, uri, data, init, run)
    return register_trained(cfg, uri, run_id, layout, data, lineage)
