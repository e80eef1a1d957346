"""Where an RL step's time goes: rollouts (sampling on the rollout workers) vs the learner, on-policy
(sample, then learn) against off-policy (sample steps k+1 … k+N while step k learns), and what
sending each new policy version to the actors costs (object store or a gloo broadcast).

    python -m benchmarks.rl_throughput                           # 2 CPUs: llama-tiny, 2 rollout actors
    python -m benchmarks.rl_throughput --device cuda --preset llama-124m --rollouts local   # a card, no Ray
    python -m benchmarks.rl_throughput --rows on_policy:object_store,on_policy:collective,off_policy2:collective

Every row runs the platform's learner (generalmodel.post.rl.learner.rl_train, one rank in this
process) on the same random model, prompts (2-digit arithmetic) and seeds, for `--steps` steps after
`--warmup`; `--rows` are MODE:WEIGHT_SYNC, MODE one of on_policy, off_policy (one step ahead) or
off_policyN (rl.max_staleness N), WEIGHT_SYNC object_store or collective (Ray rollouts only).
Rollouts run on Ray actors (`--rollouts ray`, a local Ray cluster) or in this process
(`--rollouts local`: nothing overlaps, the card's baseline). Prints per row: seconds per step, the
learner's share of it, rollout tokens/s (generated tokens over the workers' generation time),
learner tokens/s (sequence tokens through forward+backward over the learner's time), the seconds
from a version's publish until every actor holds it and its size, and the step-throughput ratio
to the first row (the reference, in the same run). Record the
output, with the machine or card, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from generalmodel.config import load_config
from generalmodel.data.tokenizer import train_bpe
from generalmodel.post import arithmetic
from generalmodel.post.rl.learner import train_in_process
from generalmodel.post.rl.tasks import load_prompts
from models import PRESETS, build_model


def run(row: str, args, root: Path, tokenizer_json: str, state) -> dict[str, float]:
    mode, _, sync = row.partition(":")
    staleness = int(mode.removeprefix("off_policy") or 1) if mode.startswith("off_policy") else 1
    cfg = load_config(
        overrides={
            "model": {**PRESETS[args.preset].__dict__, "vocab_size": 512, "max_seq_len": 128},
            "data.source": str(root / "train.jsonl"),
            "rl.eval_source": str(root / "test.jsonl"),
            "storage.root": str(root / f"store-{row.replace(':', '-')}"),
            "train.init_from": "random weights",
            "train.steps": args.warmup + args.steps,
            "train.batch_size": args.batch_size,
            "train.log_every": 1,
            "train.checkpoint_every": 0,
            "train.device": args.device,
            "rl.mode": "off_policy" if mode.startswith("off_policy") else "on_policy",
            "rl.max_staleness": staleness,
            "rl.weight_sync": sync or "object_store",
            "rl.prompts_per_step": args.prompts,
            "rl.group_size": args.group,
            "rl.max_new_tokens": args.new,
            "rl.rewards": {"exact_number": 1.0},
            "rl.eval_prompts": 0,
            "rl.rollout_workers": args.workers,
            "rl.rollout_cpus": args.rollout_cpus,
            "rl.rollout_gpus": 1.0 if args.device == "cuda" and args.rollouts == "ray" else 0.0,
            "ray.num_workers": 1,
        }
    )
    seen = train_in_process(cfg, state, load_prompts(cfg, tokenizer_json), tokenizer_json, args.rollouts)
    timed = [seen[s] for s in sorted(seen) if s > args.warmup and "step_s" in seen[s]]

    def median(key: str) -> float:
        return statistics.median(m[key] for m in timed)

    keys = ["step_s", "learner_s", "rollout_tokens_per_s", "learner_tokens_per_s"]
    keys += [k for k in ("weight_sync_s", "weight_sync_bytes") if all(k in m for m in timed)]
    return {key: median(key) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rollouts", default="ray", choices=["ray", "local"])
    parser.add_argument("--workers", type=int, default=2, help="rollout actors")
    parser.add_argument("--rollout_cpus", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new", type=int, default=24, help="max new tokens")
    parser.add_argument("--batch_size", type=int, default=32, help="learner micro-batch (sequences)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--rows",
        default="on_policy:object_store,off_policy:object_store,on_policy:collective,off_policy:collective,"
        "off_policy2:object_store",
        help="MODE:WEIGHT_SYNC per row (see above); the first is the reference",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="gm-bench-rl-"))
    arithmetic.build(root, sft=2000, train=500, test=50, digits=2)
    texts = (root / "sft.jsonl").read_text().splitlines()
    tokenizer_json = train_bpe(texts, 512).to_str()
    if args.rollouts == "ray":
        import ray

        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    torch.manual_seed(0)
    cfg = load_config(overrides={"model": {**PRESETS[args.preset].__dict__, "vocab_size": 512, "max_seq_len": 128}})
    state = build_model(cfg.model).state_dict()
    print(
        f"{args.preset}, {args.prompts} prompts x {args.group} completions x <= {args.new} new tokens per step; "
        f"rollouts: {args.rollouts} ({args.workers} workers); device {args.device}"
    )
    header = ("row", "s/step", "learner share", "rollout tok/s", "learner tok/s", "sync s", "sync MB", "vs first")
    print(
        f"{header[0]:<24} {header[1]:>7} {header[2]:>13} {header[3]:>13} {header[4]:>13} "
        + " ".join(f"{h:>9}" for h in header[5:])
    )
    first = None
    for row in args.rows.split(","):
        r = run(row, args, root, tokenizer_json, state)
        first = first or r
        sync = f"{r['weight_sync_s']:>9.3f} {r['weight_sync_bytes'] / 1e6:>9.1f}" if "weight_sync_s" in r else " " * 19
        print(
            f"{row:<24} {r['step_s']:>7.2f} {r['learner_s'] / r['step_s']:>13.0%} "
            f"{r['rollout_tokens_per_s']:>13,.0f} {r['learner_tokens_per_s']:>13,.0f} {sync} "
            f"{first['step_s'] / r['step_s']:>8.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
