"""SVF adapters (train.adapter=svf) against full SFT at equal steps, and Transformer²'s two passes
over the experts, on the platform's two chat tasks: questions about the speeches (jobs.sotu_qa)
and arithmetic word problems (jobs.arithmetic).

    make pretrain && python -m benchmarks.adapters                 # CPU, 2 cores: ~40 min
    python -m benchmarks.adapters --steps 300 --seeds 0,1 --svf-lr 0.05 --questions 100

For each task and seed: jobs.sft from models:/llama-tiny/latest with the task's config
(configs/sft.yaml, configs/arithmetic-sft.yaml) for --steps steps, once training every weight
(its config's LR) and once only the singular-value vectors of every block's linears (--svf-lr);
then every model answers --questions held-out questions of each task greedily (exact match, the
SFT jobs' heldout_exact_match), and so do the two passes over the two SVF experts of the seed
(top1 and softmax over the prompt's loss under each expert), whose routing is scored too (the
share of questions sent to their own task's expert). Prints one markdown table per seed; record
it, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = {  # task -> (its config, its data's directory)
    "sotu_qa": ("configs/sft.yaml", ".generalmodel/sotu-qa"),
    "arithmetic": ("configs/arithmetic-sft.yaml", ".generalmodel/arithmetic"),
}


def task_config(task: str, overrides: dict | None = None):
    from generalmodel.config import load_config

    config, out = TASKS[task]
    return load_config(ROOT / config, {"data.source": str(ROOT / out / "sft.jsonl"), **(overrides or {})})


def write_data(task: str) -> None:
    from jobs.arithmetic import ArithmeticConfig
    from jobs.arithmetic import main as arithmetic
    from jobs.sotu_qa import SotuQaConfig
    from jobs.sotu_qa import main as sotu_qa

    out = str(ROOT / TASKS[task][1])
    sotu_qa(SotuQaConfig(out=out)) if task == "sotu_qa" else arithmetic(ArithmeticConfig(out=out))


def train(task: str, variant: str, seed: int, args) -> tuple[str, float]:
    """(the registered URI, seconds) of one SFT run: variant full or svf."""
    from jobs.sft import main as sft

    overrides = {
        "train.seed": seed,
        "train.steps": args.steps,
        "train.answer_eval": 0,  # scored below, on the same questions for every model
        "train.run_name": f"adapters-{task}-{variant}-s{seed}-{time.strftime('%m%d%H%M')}",
        "tracking.registered_model": f"llama-tiny-{task.replace('_', '-')}-{variant}",
    }
    if variant == "svf":
        overrides |= {"train.adapter": "svf", "optim.lr": args.svf_lr}
    started = time.perf_counter()
    uri = sft(task_config(task, overrides))["model_uri"]
    return uri, time.perf_counter() - started


def main() -> None:
    from generalmodel.config import load_config
    from generalmodel.infer import load_model
    from generalmodel.post.answers import answer_accuracy, heldout_questions
    from generalmodel.tracking import tracking_uri
    from generalmodel.tracking.registry import download_model, load_experts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--svf-lr", type=float, default=0.05)
    parser.add_argument("--questions", type=int, default=100, help="held-out questions per task")
    args = parser.parse_args()
    uri, storage = tracking_uri(load_config()), load_config().storage.resolved()
    for task in TASKS:
        write_data(task)
    questions = {task: heldout_questions(task_config(task), args.questions) for task in TASKS}
    base = "models:/llama-tiny/latest"
    base_model, tokenizer = load_model(download_model(base, uri, storage))
    tokenizer_json = tokenizer.to_str()
    base_scores = {t: answer_accuracy(base_model, tokenizer_json, q).accuracy for t, q in questions.items()}
    for seed in (int(s) for s in args.seeds.split(",")):
        rows = {"base": base_scores}
        svf = {}
        for task in TASKS:
            for variant in ("full", "svf"):
                model_uri, seconds = train(task, variant, seed, args)
                model, _ = load_model(download_model(model_uri, uri, storage))
                label = f"{variant} SFT on {task} ({seconds / 60:.1f} min)"
                rows[label] = {t: answer_accuracy(model, tokenizer_json, q).accuracy for t, q in questions.items()}
                if variant == "svf":
                    svf[task] = model_uri
        for mix in ("top1", "softmax"):
            experts = load_experts(base, [svf[t] for t in TASKS], uri, storage, mix, 0.1)
            names = list(experts.vectors)  # in TASKS' order
            scores, routed = {}, {}
            for task, qs in questions.items():
                right = sent = 0
                for q in qs:
                    model, alpha = experts.adapt(experts.prompt_ids(q.prompt))
                    sent += max(alpha, key=alpha.get) == names[list(TASKS).index(task)]
                    right += answer_accuracy(model, tokenizer_json, [q]).accuracy
                scores[task], routed[task] = right / len(qs), sent / len(qs)
            rows[f"two passes, {mix}"] = scores
            rows[f"  routed to the task's expert ({mix})"] = routed
        print(f"\nseed {seed}, {args.steps} steps each (svf lr {args.svf_lr}); held-out exact match:")
        print("| model | " + " | ".join(TASKS) + " |")
        print("|---|" + "---|" * len(TASKS))
        for label, scores in rows.items():
            print(f"| {label} | " + " | ".join(f"{scores[t]:.3f}" for t in TASKS) + " |")


if __name__ == "__main__":
    main()
