"""Reinforcement learning with verifiable rewards (GRPO): from a registered SFT model to BASE-rl.

    python -m jobs.rl --train.init_from=models:/llama-tiny-arith-sft/1 --data.source=prompts.jsonl
    make rl           # the offline demo: arithmetic word problems (jobs/arithmetic.py), after its SFT stage
The prompts (`prompt`: a string or a message list, plus the fields the verifiers read, e.g.
`answer`; .jsonl/.parquet, local, s3:// or hf:) are sampled rl.group_size times each by
rl.rollout_workers Ray actors on the batched KV-cache engine and scored by the verifiers
(rl.rewards); the learner runs on Ray Train (FSDP2 over ray.num_workers ranks, checkpoints, exact
resume) and sends each new version of the weights to the actors through the object store.
Held-out accuracy (greedy) is measured at the start, every rl.eval_every steps and at the end
(with rl.eval_samples, pass@1 sampled and pass@k at the start and the end: the job prints the gap
closed), plotted, and the model is registered as BASE-rl with the starting version and the prompts as its
lineage. The loss is ~0 by construction (centred advantages): watch the reward and the accuracy.
"""

from __future__ import annotations

import logging

from generalmodel.cli import RUN_SECTIONS, run_job
from generalmodel.cluster import ray_session
from generalmodel.config import Config
from generalmodel.post.base import start
from generalmodel.post.rl.learner import check_rl_config, rl_train
from generalmodel.post.rl.progress_plot import accuracy_report
from generalmodel.post.rl.tasks import load_prompts
from generalmodel.storage import RunLayout
from generalmodel.train.init_from import adapter_config
from generalmodel.train.job import register_trained, tracked_fit
from generalmodel.train.ray_trainer import fit
from generalmodel.train.resume import refuse_finished

log = logging.getLogger(__name__)


def main(cfg: Config) -> dict:
    check_rl_config(cfg)
    cfg, uri, init = start(cfg, "rl", "chat")
    if cfg.train.adapter != "none":  # Transformer²'s way: REINFORCE on the singular-value vectors
        cfg = adapter_config(cfg, init)
    layout = RunLayout.of(cfg)
    refuse_finished(cfg, layout)
    with ray_session(cfg.ray):
        warn_if_short(cfg)
        prompts = load_prompts(cfg, init.tokenizer_json)
        print(
            f"{len(prompts.train)} training and {len(prompts.heldout)} held-out prompts; "
            f"{cfg.rl.prompts_per_step} x {cfg.rl.group_size} completions per step, {cfg.train.steps} steps"
        )
        longest = max(len(p.ids) for p in prompts.train) + cfg.rl.max_new_tokens
        loop_args = {"prompts": prompts, "tokenizer_json": init.tokenizer_json}

        def run(run_id: str) -> None:
            fit(cfg, layout, longest, run_id, uri, init=init, loop=rl_train, loop_args=loop_args)

        run_id, lineage = tracked_fit(cfg, uri, prompts, init, run)
    trained = register_trained(cfg, uri, run_id, layout, prompts, lineage)
    accuracy = accuracy_report(trained, uri)
    return {"run_id": trained.run_id, "model_uri": trained.model_uri, "metrics": trained.metrics, **accuracy}


def warn_if_short(cfg: Config) -> None:
    """The learner ranks and the rollout actors reserve CPUs side by side: say so when the cluster
    (as it is now; an autoscaler may grow it) cannot hold both."""
    import ray

    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker + cfg.rl.rollout_workers * cfg.rl.rollout_cpus
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        log.warning(
            "the run reserves %.1f CPUs (ray.num_workers x ray.cpus_per_worker + rl.rollout_workers x "
            "rl.rollout_cpus) and the cluster has %.1f: it waits for more (or lower those fields)",
            need,
            have,
        )


def cli() -> None:
    run_job(main, Config, __doc__, sections=(*RUN_SECTIONS, "rl"))


if __name__ == "__main__":
    cli()
