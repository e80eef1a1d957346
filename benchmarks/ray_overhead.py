"""The cost of running the training loop under Ray Train, and of checkpointing.

    .venv/bin/python -m benchmarks.ray_overhead [--steps 80] [--checkpoint-every 20]

Runs the same loop and config twice in one invocation: in this process (the reference), then
as a 1-worker Ray Train run with the same CPUs. Prints the mean step time of each (steps after
the first report, so start-up is excluded), their ratio (goal <= 1.03), and the checkpoint
stall of each save in steps (goal <= 1). The dataset is configs/tiny.yaml's (prepared if
missing). Record the figures with the machine in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray
import torch

from generalmodel.config import load_config
from generalmodel.data.prepare import build_dataset, plan_dataset
from generalmodel.storage import MANIFEST, RunLayout, resolve
from generalmodel.train.loop import train
from generalmodel.train.ray_trainer import fit

REPO = Path(__file__).resolve().parent.parent


def summarize(name: str, reports: list[dict]) -> tuple[float, list[float]]:
    logged = [r for r in reports if "elapsed_s" in r]
    first, last = logged[0], logged[-1]
    step_time = (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])
    stalls = [r["checkpoint_stall_s"] / step_time for r in reports if "checkpoint_stall_s" in r]
    print(
        f"{name:>22}: {step_time * 1e3:7.1f} ms/step over steps {first['step']}-{last['step']}; "
        f"checkpoint stalls (steps): {', '.join(f'{s:.2f}' for s in stalls)}"
    )
    return step_time, stalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    store = tempfile.mkdtemp(prefix="gm-overhead-")
    data_cfg = load_config(REPO / "configs/tiny.yaml")
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    dataset = RunLayout.of(data_cfg).data_output
    if not resolve(dataset, data_cfg.storage.resolved()).join(MANIFEST).exists():
        build_dataset(plan_dataset(data_cfg))

    def cfg(run: str):
        return load_config(
            REPO / "configs/llama-tiny.yaml",
            {
                "model.vocab_size": 512,
                "model.max_seq_len": 64,
                "train.dataset": os.path.abspath(dataset),
                "train.steps": args.steps,
                "train.log_every": 10,
                "train.eval_every": 40,
                "train.checkpoint_every": args.checkpoint_every,
                "train.run_name": run,
                "storage.root": store,
                "ray.num_workers": 1,
                "ray.cpus_per_worker": args.cpus,
                "train.batch_size": 16,
                "train.metrics_log": os.path.join(store, f"{run}.jsonl"),
            },
        )

    torch.set_num_threads(args.cpus)
    train(cfg("plain"))
    ray_cfg = cfg("ray")
    fit(ray_cfg, RunLayout.of(ray_cfg), data_cfg.data.seq_len, None, None)
    ray.shutdown()
    plain, under_ray = (
        [json.loads(line) for line in open(os.path.join(store, f"{run}.jsonl"))] for run in ("plain", "ray")
    )

    t_plain, _ = summarize("plain process", plain)
    t_ray, stalls = summarize("Ray Train, 1 worker", under_ray)
    print(
        f"step-time ratio Ray/plain: {t_ray / t_plain:.3f} (goal <= 1.03); "
        f"worst checkpoint stall: {max(stalls):.2f} steps (goal <= 1)"
    )


if __name__ == "__main__":
    main()
