"""The RL learner: the per-worker loop of GRPO, a plain function of the config like the
pretraining loop (generalmodel.train.loop), whose machinery it shares — FSDP2, the optimizer and
LR schedule, sharded checkpoints with exact resume, the non-finite step guard, the export.

    publish weights v0 → [rollouts(k): rank 0 asks the rollout workers, scatters the groups]
    → advantages → rl.updates_per_batch optimizer updates → publish v(k+1) → metrics, checkpoint

rl.mode=off_policy asks for the rollouts of steps k+1 … k+rl.max_staleness (with the weights before
step k's update) before training on step k's, so sampling and learning overlap; the clipped ratio
against the sampler's log-probs corrects for the lag, at most rl.max_staleness versions. Held-out
accuracy (greedy, rl.eval_prompts prompts) is measured by the rollout workers at step 0, every
rl.eval_every steps and at the end.

A resumed run takes the step's prompts from (train.seed, step) — with rl.skip_uniform_for, from the
checkpoint's prompt schedule (generalmodel.post.rl.tasks.PromptSchedule) — and the samples' seeds
from their place in the step, so on-policy it repeats the uninterrupted run; off-policy, the first
step after the resume samples with the checkpoint's weights (the in-flight rollouts died with the
run).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from generalmodel import UserError
from generalmodel.config import Config
from generalmodel.eval.problems import pass_at_k
from generalmodel.post.rl.grpo import (
    STATS,
    group_advantages,
    grpo_loss,
    token_entropy,
    token_logprobs,
    token_weights,
    units,
)
from generalmodel.post.rl.prime import ImplicitPRM, implicit_prm
from generalmodel.post.rl.rollout import Batch, LocalRollouts, RayRollouts, Rollout
from generalmodel.post.rl.tasks import PromptSchedule, PromptSet
from generalmodel.post.rows import refuse_dataset_loop_switches
from generalmodel.storage import RunLayout
from generalmodel.train.core import Init, Report, TrainingRun, frozen_copy, full_state, sum_across_ranks
from generalmodel.train.mesh import world_sizes
from generalmodel.train.resume import TrainingError
from models import svf

log = logging.getLogger(__name__)


def check_rl_config(cfg: Config) -> None:
    """Errors a user should see before any worker starts."""
    rl = cfg.rl
    uneven = [w for w in world_sizes(cfg) if rl.prompts_per_step % w]  # every size an elastic group may take
    if uneven:
        raise UserError(
            f"rl.prompts_per_step={rl.prompts_per_step} must divide among the learner's ranks "
            f"(ray.num_workers={cfg.ray.num_workers}, ray.min_workers={cfg.ray.min_workers}); it does not "
            f"among {', '.join(map(str, uneven))} (each rank trains on whole groups)"
        )
    if rl.mode == "off_policy" and rl.updates_per_batch > 1:
        log.warning("rl.mode=off_policy with rl.updates_per_batch>1: the ratio is against the sampler's weights")


def rl_train(
    cfg: Config,
    report: Report | None = None,
    layout: RunLayout | None = None,
    init: Init | None = None,
    prompts: PromptSet | None = None,
    tokenizer_json: str | None = None,
    rollouts: str = "ray",
) -> dict[str, Any]:
    """GRPO from train.init_from (`init` gives its state) on `prompts`; `rollouts`: "ray" (actors
    owned by rank 0) or "local" (in this process). Returns the last metrics."""
    layout = layout or RunLayout.of(cfg)
    if init is None or prompts is None or tokenizer_json is None or cfg.train.init_from is None:
        raise TrainingError("the RL loop needs the starting model (train.init_from), its tokenizer and the prompts")
    check_rl_config(cfg)
    schedule = PromptSchedule(prompts, drawn_per_step(cfg.rl), cfg.train.seed, cfg.rl.skip_uniform_for)
    companions = (lambda env: {"prm": implicit_prm(cfg, env, init)}) if cfg.rl.prime else None
    run = TrainingRun(
        cfg, report, layout, init, schedule, prompts.sha256, lambda: tokenizer_json, companions=companions
    )
    reference = frozen_copy(cfg, run.env, init) if cfg.rl.beta > 0 or cfg.rl.prime else None
    pool = None
    if run.env.is_main:
        pool = (RayRollouts if rollouts == "ray" else LocalRollouts)(cfg, tokenizer_json, prompts)
    step = GrpoStep(run, prompts, pool, reference)
    step.publish(run.start_step)

    def close() -> None:
        if pool is not None:
            pool.close()

    return run.run(step, close)


def drawn_per_step(rl) -> int:
    """Prompts sampled per step: rl.prompts_per_step, times rl.oversample (dynamic sampling)."""
    return math.ceil(rl.prompts_per_step * rl.oversample)


def informative_first(rewards: torch.Tensor, keep: int) -> list[int]:
    """DAPO's dynamic sampling: `keep` of the groups (rows of `rewards`), those whose rewards are
    not all equal first, then the others, each in the order drawn; returned in that order sorted."""
    varied = (rewards.max(dim=1).values > rewards.min(dim=1).values).tolist()
    order = [g for g, v in enumerate(varied) if v] + [g for g, v in enumerate(varied) if not v]
    return sorted(order[:keep])


def spread_indices(total: int, count: int) -> list[int]:
    """`count` of range(total) at even strides: a held-out file sorted by task or difficulty is
    sampled across its length, not cut to its first rows (the same prompts in every run)."""
    count = min(count, total)
    return [i * total // count for i in range(count)]


class GrpoStep:
    """One GRPO step on the learner: the step's rollouts (asked for ahead of time off-policy),
    group advantages, rl.updates_per_batch optimizer updates, the new weights published to the
    rollout workers, held-out accuracy at its steps."""

    def __init__(self, run: TrainingRun, prompts: PromptSet, pool, reference):
        refuse_dataset_loop_switches(run, type(self).__name__)
        self.run, self.prompts, self.pool, self.reference = run, prompts, pool, reference
        self.rl = run.cfg.rl
        self.per_rank = self.rl.prompts_per_step // run.env.world_size
        self.heldout = spread_indices(len(prompts.heldout), self.rl.eval_prompts)
        self.requested: dict[int, Any] = {}
        self.evals: dict[int, Any] = {}
        self.prime = None
        if self.rl.prime:
            self.prime = ImplicitPRM(run.cfg, run.env, *run.companions["prm"], run.autocast)
        self.step_started = time.perf_counter()

    def publish(self, version: int) -> None:
        state = full_state(self.run.model)  # a collective: every rank
        if self.run.cfg.train.adapter != "none":  # the rollouts' models are plain: the vectors folded in
            state = svf.merged(state)
        if self.pool is not None:
            self.pool.publish(version, state)
            if self.heldout and (version % self.rl.eval_every == 0 or version == self.run.steps):
                samples = self.rl.eval_samples if version in (self.run.start_step, self.run.steps) else 0
                self.evals[version] = (self.pool.submit_eval(self.heldout, samples), samples)

    def request(self, step: int) -> None:
        if self.pool is not None and step not in self.requested and step < self.run.steps:
            ids = self.run.position.prompts_for(step)
            slots = [(j * self.rl.group_size + g, i) for j, i in enumerate(ids) for g in range(self.rl.group_size)]
            self.requested[step] = self.pool.submit(step, slots)

    def heldout_metrics(self, version: int) -> dict[str, float]:
        if self.pool is None or version not in self.evals:
            return {}
        handle, samples = self.evals.pop(version)
        rollouts = self.pool.collect(handle).rollouts  # per prompt: the greedy one, then its samples
        greedy = rollouts[:: 1 + samples]
        metrics = scores("heldout", greedy, self.rl.rewards)
        if samples:
            metrics.update(sampled_scores(rollouts, samples, next(iter(self.rl.rewards))))
        return metrics

    def __call__(self, step: int, lr: float) -> dict[str, Any]:
        run, rl, env = self.run, self.rl, self.run.env
        self.request(step)
        if rl.mode == "off_policy":  # sampled by the current weights while this step trains
            for ahead in range(1, rl.max_staleness + 1):
                self.request(step + ahead)
        batch = _gather(self.pool, self.requested.pop(step, None), rl.group_size, rl.rewards, env)
        first_eval = self.heldout_metrics(step) if step == run.start_step else {}
        if first_eval:  # the model it starts from, on the same prompts as every later evaluation
            run.report({"step": step, **first_eval})
        advantages = self.advantages(batch, step)
        rows = self.per_rank * rl.group_size
        mine = slice(env.rank * rows, (env.rank + 1) * rows)
        outcome = next(iter(rl.rewards))
        tensors = _sequences(self.prompts, batch["rollouts"][mine], advantages[mine], outcome, env.device)
        learn_started = time.perf_counter()
        reduced, total, token_total, grad_norm, prm = self.learn(tensors, step)
        learn_s = time.perf_counter() - learn_started
        step_s, self.step_started = time.perf_counter() - self.step_started, time.perf_counter()
        done = step + 1
        run.position.step = done
        self.publish(done)
        if rl.mode == "on_policy":
            self.request(done)
        metrics: dict[str, Any] = {}
        if done % run.cfg.train.log_every == 0 or done == run.steps:
            stats = dict(zip(STATS, (v / token_total.item() for v in reduced[1:]), strict=True))
            if rl.beta == 0:  # no KL term (rl.prime keeps a reference for its rewards alone)
                stats.pop("kl")
            learner_tokens = sum_across_ranks(torch.tensor(float(tensors["inputs"].numel()))).item()
            metrics.update(
                step=done,
                loss=reduced[0] / total.item(),
                **stats,
                **prm,
                **batch["metrics"],
                lr=lr,
                grad_norm=grad_norm,
                skipped_steps=run.guard.skipped,
                step_s=step_s,
                learner_s=learn_s,
                rollout_wait_s=step_s - learn_s,
                rollout_wait_fraction=(step_s - learn_s) / step_s,
                learner_tokens_per_s=learner_tokens * rl.updates_per_batch / max(learn_s, 1e-9),
                policy_lag=step - min(r.version for r in batch["rollouts"]),
                **({"prompts_skipped": run.position.skipped(done)} if rl.skip_uniform_for else {}),
                elapsed_s=run.elapsed(),
                eta_s=(run.steps - done) * run.elapsed() / (done - run.start_step),
            )
        evaluation = self.heldout_metrics(done) if env.is_main else {}
        if evaluation:
            metrics.update(step=done, **evaluation)
        if metrics and self.pool is not None:  # after the held-out collect, which can meet a dead actor too
            metrics["rollout_workers_replaced"] = self.pool.replaced
            metrics.update(self.pool.sync_metrics())
        if metrics or run.save_due(done):
            metrics.setdefault("loss", reduced[0] / total.item())
        return metrics

    def advantages(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        """The step's groups recorded in the prompt schedule, cut to rl.prompts_per_step with dynamic
        sampling (the groups with a signal first; `batch` keeps those), and their advantages."""
        rl = self.rl
        rewards = torch.tensor([r.reward for r in batch["rollouts"]]).view(-1, rl.group_size)
        firsts = batch["rollouts"][:: rl.group_size]
        self.run.position.record(step, [(r.prompt, g) for r, g in zip(firsts, rewards.tolist(), strict=True)])
        if len(firsts) > rl.prompts_per_step:
            kept = informative_first(rewards, rl.prompts_per_step)
            rewards = rewards[kept]
            g = rl.group_size
            batch["rollouts"] = [r for k in kept for r in batch["rollouts"][k * g : (k + 1) * g]]
            batch["metrics"]["trained_zero_variance_groups"] = (rewards.std(dim=1) == 0).float().mean().item()
        return group_advantages(rewards, rl.scale_rewards).view(-1)

    def learn(self, tensors: dict[str, torch.Tensor], step: int):
        """rl.updates_per_batch optimizer updates on this rank's rollouts (with rl.prime, after the
        PRM's update gave their process advantages): (the last update's summed loss and statistics
        over all ranks, the loss's unit count, the token count, its grad norm, the PRM's metrics)."""
        run, rl, env = self.run, self.rl, self.run.env
        prm: dict[str, float] = {}
        if self.reference is not None:  # the frozen start's log-probs: rl.beta's KL term and rl.prime's rewards
            tensors["ref_logp"] = self.reference_logps(tensors)
        if self.prime is not None:
            process, prm = self.prime.step(list(_chunks(tensors, run.cfg.train.batch_size)), step)
            tensors["process"] = process * rl.prime_weight
        total = sum_across_ranks(units(tensors["mask"], rl)).clamp(min=1)
        token_total = sum_across_ranks(tensors["mask"].float().sum()).clamp(min=1)
        sums = torch.zeros(1 + len(STATS), device=env.device)
        for _ in range(rl.updates_per_batch):
            sums.zero_()
            for chunk in _chunks(tensors, run.cfg.train.batch_size):
                loss, stats = self.chunk_loss(chunk)
                (loss * env.world_size / total).backward()
                sums += torch.stack([loss.detach(), *(stats[k] for k in STATS)])
            reduced_sums = sum_across_ranks(sums)
            norm, _ = run.update(reduced_sums[0], step)
            reduced = reduced_sums.tolist()  # RL syncs every step anyway (rollouts)
            grad_norm = norm.item()
            run.guard.read()
        return reduced, total, token_total, grad_norm, prm

    @torch.no_grad()
    def reference_logps(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's log-prob of every completion token, (rows, T) like the mask (once a step,
        whatever rl.updates_per_batch)."""
        dense = torch.zeros(tensors["mask"].shape, device=self.run.env.device)
        for chunk in _chunks({**tensors, "ref_logp": dense}, self.run.cfg.train.batch_size):
            keep = chunk["mask"]
            with self.run.autocast:
                logits = self.reference(chunk["inputs"], keep=keep)
            chunk["ref_logp"][keep] = token_logprobs(logits, chunk["targets"][keep], self.rl.temperature)  # a view
        return dense

    def chunk_loss(self, chunk: dict[str, torch.Tensor]):
        """The GRPO loss of a chunk of rows. Only the completion tokens are scored: the head runs
        at those positions only."""
        rl, model, autocast = self.rl, self.run.model, self.run.autocast
        keep = chunk["mask"]
        with autocast:
            completion = model(chunk["inputs"], keep=keep)
        logp = token_logprobs(completion, chunk["targets"][keep], rl.temperature)
        ref_logp = chunk["ref_logp"][keep] if "ref_logp" in chunk else None
        row_adv = chunk["advantages"].unsqueeze(1).expand_as(keep)[keep]
        if "process" in chunk:  # rl.prime: each token's process advantage added to its row's
            row_adv = row_adv + chunk["process"][keep]
        weights = token_weights(keep, rl)[keep]
        entropy = token_entropy(completion, rl.temperature)
        return grpo_loss(logp, chunk["old_logp"][keep], row_adv, weights, entropy, ref_logp, rl)


def train_in_process(cfg: Config, state, prompts: PromptSet, tokenizer_json: str, rollouts: str = "local"):
    """rl_train in this process (one learner rank, no Ray Train), its reports merged by step:
    {step: metrics}. For tests, benchmarks and the GPU machine (which has no Ray)."""
    seen: dict[int, dict[str, Any]] = {}
    rl_train(
        cfg,
        lambda m: seen.setdefault(m["step"], {}).update(m),
        init=lambda: state,
        prompts=prompts,
        tokenizer_json=tokenizer_json,
        rollouts=rollouts,
    )
    return seen


def scores(prefix: str, rollouts: list[Rollout], weights: dict[str, float]) -> dict[str, float]:
    """Means over rollouts: the reward, each verifier's score; `<prefix>_accuracy` is the first
    verifier's (the one that checks the answer)."""
    n = max(len(rollouts), 1)
    out = {f"{prefix}_reward": sum(r.reward for r in rollouts) / n}
    for name in weights:
        out[f"{prefix}_{_metric_name(name)}"] = sum(r.scores[name] for r in rollouts) / n
    out[f"{prefix}_accuracy"] = out[f"{prefix}_{_metric_name(next(iter(weights)))}"]
    return out


def pass_ks(samples: int) -> list[int]:
    """The k of pass@k reported from `samples` completions a prompt: 8 and 32 where there are that
    many (the unbiased estimate from n samples), and n itself."""
    return sorted({k for k in (8, 32) if k < samples} | {samples})


def gap_k(samples: int) -> int:
    """The pass@k the greedy answer's gap is measured against: pass@8, or pass@n under 8 samples."""
    return min(8, samples)


def sampled_scores(rollouts: list[Rollout], samples: int, verifier: str) -> dict[str, float]:
    """pass@1 of the sampled completions and pass@k (k in `pass_ks(samples)`) over held-out prompts
    whose rollouts are the greedy one and then `samples` samples each; a sample solves its prompt
    when the first verifier gives it its full score (1)."""
    per_prompt = [rollouts[i + 1 : i + 1 + samples] for i in range(0, len(rollouts), 1 + samples)]
    solved = [sum(r.scores[verifier] >= 1.0 for r in group) for group in per_prompt]
    n = max(len(per_prompt), 1)
    out = {"heldout_pass1_sampled": sum(pass_at_k(samples, c, 1) for c in solved) / n}
    for k in pass_ks(samples):
        out[f"heldout_pass{k}"] = sum(pass_at_k(samples, c, k) for c in solved) / n
    return out


def _metric_name(verifier: str) -> str:
    return verifier.replace(":", ".").replace("/", ".")


def rollout_metrics(batch: Batch, group_size: int, weights: dict[str, float]) -> dict[str, float]:
    rollouts = batch.rollouts
    rewards = torch.tensor([r.reward for r in rollouts])
    groups = rewards.view(-1, group_size)
    lengths = torch.tensor([r.sampled for r in rollouts], dtype=torch.float)  # the policy's tokens
    metrics = scores("rollout", rollouts, weights)
    if any(r.policy is not None for r in rollouts):  # rl.tools: the share of rollouts that called one
        metrics["tool_use"] = sum(r.policy is not None and not all(r.policy) for r in rollouts) / len(rollouts)
    metrics.update(
        reward_mean=rewards.mean().item(),
        reward_std=rewards.std().item() if len(rollouts) > 1 else 0.0,
        zero_variance_groups=(groups.std(dim=1) == 0).float().mean().item(),
        completion_len=lengths.mean().item(),
        stopped_fraction=sum(r.stopped for r in rollouts) / len(rollouts),
        rollout_tokens_per_s=batch.generated_tokens / max(batch.generate_s, 1e-9),
        rollout_generate_s=batch.generate_s,
    )
    return metrics


def _gather(pool, handle, group_size: int, weights: dict[str, float], env) -> dict[str, Any]:
    """Rank 0 collects the step's rollouts (in slot order) and sends them to every rank."""
    payload = [None]
    if pool is not None:
        batch = pool.collect(handle)
        payload = [{"rollouts": batch.rollouts, "metrics": rollout_metrics(batch, group_size, weights)}]
    if dist.is_initialized() and env.world_size > 1:
        dist.broadcast_object_list(payload, src=0, device=env.device if env.device.type == "cuda" else None)
    return payload[0]


def _sequences(
    prompts: PromptSet, rows: list[Rollout], advantages: torch.Tensor, outcome: str, device
) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded: inputs, targets, the completion mask over the
    targets (the ids the policy sampled: not the tools' results of rl.tools), the sampler's
    log-probs there, each row's advantage and its outcome (the `outcome` verifier's score in [0, 1]:
    what rl.prime's reward model learns)."""
    seqs = [prompts.train[r.prompt].ids + r.completion for r in rows]
    length = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length - 1, dtype=torch.bool)
    old = torch.zeros(len(seqs), length - 1)
    for i, (seq, r) in enumerate(zip(seqs, rows, strict=True)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        start = len(seq) - len(r.completion) - 1  # the target index of the first completion token
        mask[i, start : start + len(r.completion)] = True if r.policy is None else torch.tensor(r.policy)
        old[i, start : start + len(r.completion)] = torch.tensor(r.logprobs)
    return {
        "inputs": tokens[:, :-1].to(device),
        "targets": tokens[:, 1:].to(device),
        "mask": mask.to(device),
        "old_logp": old.to(device),
        "advantages": advantages.float().to(device),
        "outcomes": torch.tensor([min(max(r.scores[outcome], 0.0), 1.0) for r in rows], device=device),
    }


def _chunks(tensors: dict[str, torch.Tensor], size: int):
    n = tensors["inputs"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in tensors.items()}
