"""The RL learner: the per-worker loop of GRPO, a plain function of the config like the
pretraining loop (generalmodel.train.loop), whose machinery it shares — FSDP2, the optimizer and
LR schedule, sharded checkpoints with exact resume, the non-finite step guard, the export.

    publish weights v0 → [rollouts(k): rank 0 asks the rollout workers, scatters the groups]
    → advantages → rl.updates_per_batch optimizer updates → publish v(k+1) → metrics, checkpoint

rl.mode=off_policy asks for step k+1's rollouts (with the weights before step k's update) before
training on step k's, so sampling and learning overlap; the clipped ratio against the sampler's
log-probs corrects for the one-step lag. Held-out accuracy (greedy, rl.eval_prompts prompts) is
measured by the rollout workers at step 0, every rl.eval_every steps and at the end.

A resumed run takes the step's prompts from (train.seed, step) and the samples' seeds from their
place in the step, so on-policy it repeats the uninterrupted run; off-policy, the first step after
the resume samples with the checkpoint's weights (the in-flight rollouts died with the run).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from generalmodel import UserError
from generalmodel.config import Config, dump_config
from generalmodel.infer.export import load_state
from generalmodel.optim import build_optimizer, lr_multiplier, set_lr
from generalmodel.post.rl.grpo import (
    STATS,
    group_advantages,
    grpo_loss,
    token_entropy,
    token_logprobs,
    token_weights,
    units,
)
from generalmodel.post.rl.rollout import Batch, LocalRollouts, RayRollouts, Rollout
from generalmodel.post.rl.tasks import PromptSet
from generalmodel.storage import RunLayout
from generalmodel.train.checkpoint import Checkpointer
from generalmodel.train.loop import (
    Report,
    TrainingError,
    _sum_across_ranks,
    _with_metrics_log,
    export_with_tokenizer,
    frozen_copy,
    full_state,
    resume,
    setup_distributed,
)
from generalmodel.train.parallelize import parallelize
from generalmodel.train.step import NonFiniteGuard, optimizer_step
from models import build_model

log = logging.getLogger(__name__)


class StepCounter:
    """The data position a checkpoint keeps: for RL, the step (the prompts follow from it)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def check_rl_config(cfg: Config) -> None:
    """Errors a user should see before any worker starts."""
    rl = cfg.rl
    if rl.prompts_per_step % cfg.ray.num_workers:
        raise UserError(
            f"rl.prompts_per_step={rl.prompts_per_step} must divide among ray.num_workers={cfg.ray.num_workers} "
            "learner ranks (each trains on whole groups)"
        )
    if rl.mode == "off_policy" and rl.updates_per_batch > 1:
        log.warning("rl.mode=off_policy with rl.updates_per_batch>1: the ratio is against the sampler's weights")


def rl_train(
    cfg: Config,
    report: Report | None = None,
    layout: RunLayout | None = None,
    init: Callable[[], dict[str, torch.Tensor]] | None = None,
    prompts: PromptSet | None = None,
    tokenizer_json: str | None = None,
    rollouts: str = "ray",
) -> dict[str, Any]:
    """GRPO from train.init_from (`init` gives its state) on `prompts`; `rollouts`: "ray" (actors
    owned by rank 0) or "local" (in this process). Returns the last metrics."""
    layout = layout or RunLayout.of(cfg)
    if init is None or prompts is None or tokenizer_json is None:
        raise TrainingError("the RL loop needs the starting model (train.init_from), its tokenizer and the prompts")
    check_rl_config(cfg)
    env = setup_distributed(cfg)
    rl = cfg.rl
    report = _with_metrics_log(report or (lambda metrics: None), cfg.train.metrics_log if env.is_main else None)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    load_state(model, init(), f"train.init_from {cfg.train.init_from!r}")
    after_step = parallelize(model, cfg.train, env.device, env.world_size, log_info=env.is_main)
    reference = frozen_copy(cfg, env, init) if rl.beta > 0 else None
    optimizer = build_optimizer(model, cfg.optim)
    ckpt = Checkpointer(layout.checkpoints, layout.storage, env.rank, env.world_size, cfg.train.keep_last)
    counter = StepCounter()
    config_dump = dump_config(cfg)
    start_step = resume(ckpt, cfg, config_dump, prompts.sha256, env, model, optimizer, counter)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda" else contextlib.nullcontext()
    steps = cfg.train.steps
    per_rank = rl.prompts_per_step // env.world_size
    heldout = list(range(min(rl.eval_prompts, len(prompts.heldout))))

    pool = None
    if env.is_main:
        pool = (RayRollouts if rollouts == "ray" else LocalRollouts)(cfg, tokenizer_json, prompts)
    requested: dict[int, Any] = {}
    evals: dict[int, Any] = {}

    def publish(version: int) -> None:
        state = full_state(model)  # a collective: every rank
        if pool is not None:
            pool.publish(version, state)
            if heldout and (version % rl.eval_every == 0 or version == steps):
                evals[version] = pool.submit_eval(heldout)

    def request(step: int) -> None:
        if pool is not None and step not in requested and step < steps:
            ids = prompts.step_prompts(step, rl.prompts_per_step, cfg.train.seed)
            slots = [(j * rl.group_size + g, i) for j, i in enumerate(ids) for g in range(rl.group_size)]
            requested[step] = pool.submit(step, slots)

    def heldout_metrics(version: int) -> dict[str, float]:
        if pool is None or version not in evals:
            return {}
        batch = pool.collect(evals.pop(version))
        return scores("heldout", batch.rollouts, rl.rewards)

    guard = NonFiniteGuard(cfg.train.max_bad_steps, env.device)
    last: dict[str, Any] = {}
    run_started = time.perf_counter()
    done = start_step
    step_started = time.perf_counter()
    publish(start_step)
    try:
        for step in range(start_step, steps):
            if cfg.train.fail_at_step == step and start_step == 0 and env.is_main:
                raise RuntimeError(f"train.fail_at_step: injected failure at step {step}")
            request(step)
            if rl.mode == "off_policy":
                request(step + 1)  # sampled by the current weights while this step trains
            batch = _gather(pool, requested.pop(step, None), rl.group_size, rl.rewards, env)
            first_eval = heldout_metrics(step) if step == start_step else {}
            if first_eval:  # the model it starts from, on the same prompts as every later evaluation
                report({"step": step, **first_eval})
            rewards = torch.tensor([r.reward for r in batch["rollouts"]]).view(-1, rl.group_size)
            advantages = group_advantages(rewards, rl.scale_rewards).view(-1)
            mine = slice(env.rank * per_rank * rl.group_size, (env.rank + 1) * per_rank * rl.group_size)
            tensors = _sequences(prompts, batch["rollouts"][mine], advantages[mine], env.device)

            learn_started = time.perf_counter()
            multiplier = lr_multiplier(step, steps, cfg.optim)
            set_lr(optimizer, multiplier)
            lr = cfg.optim.lr * multiplier
            total = _sum_across_ranks(units(tensors["mask"], rl)).clamp(min=1)
            token_total = _sum_across_ranks(tensors["mask"].float().sum()).clamp(min=1)
            sums = torch.zeros(1 + len(STATS), device=env.device)
            grad_norm = 0.0
            for _ in range(rl.updates_per_batch):
                sums.zero_()
                for chunk in _chunks(tensors, cfg.train.batch_size):
                    # Only the completion tokens are scored: the head runs at those positions only.
                    keep = chunk["mask"]
                    with autocast:
                        completion = model(chunk["inputs"], keep=keep)
                    logp = token_logprobs(completion, chunk["targets"][keep], rl.temperature)
                    ref_logp = None
                    if reference is not None:
                        with torch.no_grad(), autocast:
                            ref_logits = reference(chunk["inputs"], keep=keep)
                        ref_logp = token_logprobs(ref_logits, chunk["targets"][keep], rl.temperature)
                    row_adv = chunk["advantages"].unsqueeze(1).expand_as(keep)[keep]
                    loss, stats = grpo_loss(
                        logp,
                        chunk["old_logp"][keep],
                        row_adv,
                        token_weights(keep, rl)[keep],
                        token_entropy(completion, rl.temperature),
                        ref_logp,
                        rl,
                    )
                    (loss * env.world_size / total).backward()
                    sums += torch.stack([loss.detach(), *(stats[k] for k in STATS)])
                reduced_sums = _sum_across_ranks(sums)
                norm, _ = optimizer_step(model, optimizer, reduced_sums[0], cfg.optim.grad_clip, guard, step)
                after_step()
                reduced = reduced_sums.tolist()  # RL syncs every step anyway (rollouts)
                loss_value, grad_norm = reduced[0] / total.item(), norm.item()
                guard.read()
            learn_s = time.perf_counter() - learn_started
            step_s, step_started = time.perf_counter() - step_started, time.perf_counter()
            done = step + 1
            counter.step = done
            publish(done)
            if rl.mode == "on_policy":
                request(done)

            metrics: dict[str, Any] = {}
            if done % cfg.train.log_every == 0 or done == steps:
                stats = dict(zip(STATS, (v / token_total.item() for v in reduced[1:]), strict=True))
                if reference is None:
                    stats.pop("kl")
                learner_tokens = _sum_across_ranks(torch.tensor(float(tensors["inputs"].numel()))).item()
                metrics.update(
                    step=done,
                    loss=loss_value,
                    **stats,
                    **batch["metrics"],
                    lr=lr,
                    grad_norm=grad_norm,
                    skipped_steps=guard.skipped,
                    step_s=step_s,
                    learner_s=learn_s,
                    rollout_wait_s=step_s - learn_s,
                    rollout_wait_fraction=(step_s - learn_s) / step_s,
                    learner_tokens_per_s=learner_tokens * rl.updates_per_batch / max(learn_s, 1e-9),
                    policy_lag=step - min(r.version for r in batch["rollouts"]),
                    elapsed_s=time.perf_counter() - run_started,
                    eta_s=(steps - done) * (time.perf_counter() - run_started) / (done - start_step),
                )
                if pool is not None:
                    metrics["rollout_workers_replaced"] = pool.replaced
            evaluation = heldout_metrics(done) if env.is_main else {}
            if evaluation:
                metrics.update(step=done, **evaluation)
            if done == steps or (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0):
                stall = ckpt.save(
                    done,
                    model,
                    optimizer,
                    {"step": done, "loader": counter.state_dict(), "config": config_dump, "dataset": prompts.sha256},
                )
                metrics.update(step=done, checkpoint_stall_s=stall)
            if done == steps:
                ckpt.wait()
                export_with_tokenizer(model, cfg, tokenizer_json, env, layout)
            if metrics:
                metrics.setdefault("loss", loss_value)
                last.update(metrics)
                report(metrics)
    except BaseException:
        ckpt.finish_uploads()
        if pool is not None:
            pool.close()
        raise
    ckpt.wait()
    if pool is not None:
        pool.close()
    if done == start_step:
        export_with_tokenizer(model, cfg, tokenizer_json, env, layout)
    return last


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


def _metric_name(verifier: str) -> str:
    return verifier.replace(":", ".").replace("/", ".")


def rollout_metrics(batch: Batch, group_size: int, weights: dict[str, float]) -> dict[str, float]:
    rollouts = batch.rollouts
    rewards = torch.tensor([r.reward for r in rollouts])
    groups = rewards.view(-1, group_size)
    lengths = torch.tensor([len(r.completion) for r in rollouts], dtype=torch.float)
    metrics = scores("rollout", rollouts, weights)
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


def _sequences(prompts: PromptSet, rows: list[Rollout], advantages: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded: inputs, targets, the completion mask over the
    targets, the sampler's log-probs there, and each row's advantage."""
    seqs = [prompts.train[r.prompt].ids + r.completion for r in rows]
    length = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length - 1, dtype=torch.bool)
    old = torch.zeros(len(seqs), length - 1)
    for i, (seq, r) in enumerate(zip(seqs, rows, strict=True)):
        tokens[i, : len(seq)] = torch.tensor(seq)
        start = len(seq) - len(r.completion) - 1  # the target index of the first completion token
        mask[i, start : start + len(r.completion)] = True
        old[i, start : start + len(r.completion)] = torch.tensor(r.logprobs)
    return {
        "inputs": tokens[:, :-1].to(device),
        "targets": tokens[:, 1:].to(device),
        "mask": mask.to(device),
        "old_logp": old.to(device),
        "advantages": advantages.float().to(device),
    }


def _chunks(tensors: dict[str, torch.Tensor], size: int):
    n = tensors["inputs"].shape[0]
    for start in range(0, n, size):
        yield {k: v[start : start + size] for k, v in tensors.items()}
