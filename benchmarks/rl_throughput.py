"""Where an RL step's time goes: rollouts (sampling on the rollout workers) vs the learner, on-policy
(sample, then learn) against one-step-off-policy (sample step k+1 while step k learns).

    python -m benchmarks.rl_throughput                           # 2 CPUs: llama-tiny, 2 rollout actors
    python -m benchmarks.rl_throughput --device cuda --preset llama-124m --rollouts local   # a card, no Ray

Both modes run the platform's learner (generalmodel.post.rl.learner.rl_train, one rank in this
process) on the same random model, prompts (2-digit arithmetic) and seeds, for `--steps` steps after
`--warmup`. Rollouts run on Ray actors (`--rollouts ray`, a local Ray cluster) or in this process
(`--rollouts local`: nothing overlaps, the card's baseline). Prints per mode: seconds per step, the
learner's share of it, rollout tokens/s (generated tokens over the workers' generation time),
learner tokens/s (sequence tokens through forward+backward over the learner's time), and the
off-policy/on-policy step-throughput ratio (the reference is on-policy, in the same run). Record the
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


def run(mode: str, args, root: Path, tokenizer_json: str, state) -> dict[str, float]:
    cfg = load_config(
        overrides={
            "model": {**PRESETS[args.preset].__dict__, "vocab_size": 512, "max_seq_len": 128},
            "data.source": str(root / "train.jsonl"),
            "rl.eval_source": str(root / "test.jsonl"),
            "storage.root": str(root / f"store-{mode}"),
            "train.init_from": "random weights",
            "train.steps": args.warmup + args.steps,
            "train.batch_size": args.batch_size,
            "train.log_every": 1,
            "train.checkpoint_every": 0,
            "train.device": args.device,
            "rl.mode": mode,
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

    return {key: median(key) for key in ("step_s", "learner_s", "rollout_tokens_per_s", "learner_tokens_per_s")}


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
    header = ("mode", "s/step", "learner share", "rollout tok/s", "learner tok/s", "vs on-policy")
    print(f"{header[0]:<11} {header[1]:>7} {header[2]:>13} {header[3]:>13} {header[4]:>13} {header[5]:>12}")
    results = {}
    for mode in ("on_policy", "off_policy"):
        r = results[mode] = run(mode, args, root, tokenizer_json, state)
        ratio = results["on_policy"]["step_s"] / r["step_s"]
        print(
            f"{mode:<11} {r['step_s']:>7.2f} {r['learner_s'] / r['step_s']:>13.0%} "
            f"{r['rollout_tokens_per_s']:>13,.0f} {r['learner_tokens_per_s']:>13,.0f} {ratio:>11.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
