"""How many tokens a recipe needs: the nanoGPT reference recipe, the previous AdamW default and
candidate recipes, trained at the same size, tokens, data order and seeds.

    python -m benchmarks.learning_efficiency                         # CPU: sotu, ≤ 15 min on 2 cores
    python -m benchmarks.learning_efficiency --corpus shakespeare    # the second corpus
    python -m benchmarks.learning_efficiency --recipes reference,adamw,default,muon --seeds 0,1,2
    python -m benchmarks.learning_efficiency --gpu                   # 124M on one GPU (no MLflow there)

Each run is the platform's own loop (generalmodel.train.loop.train, one process, no Ray) on a
prepared dataset, two at a time on CPU (--jobs). The CPU setting: 125 steps × 16 × 256 tokens (the
global batch of `make pretrain`), ~14 min for 3 recipes × 2 seeds on 2 cores; --gpu: 400 steps ×
32 × 1024 at 124M (needs a dataset of vocab 50304 and rows of 1024: `--dataset`, or `--corpus`
prepares one with Ray here first).

Recipes (RECIPES; `NAME+switch+...` adds SWITCHES): `reference` — GPT-2 (learned positions,
LayerNorm, GELU, tied) with nanoGPT's AdamW recipe (β = 0.9/0.95, wd 0.1, clip 1, cosine to 10%,
warmup 2000 of 600K steps) at the LR scaled by width from its 6e-4 at d=768; `adamw` — the
platform's default before issue 18 (Llama, AdamW lr 3e-3, warmup 30 of 500 steps, cosine);
`default` — configs/llama-tiny.yaml as it is now (what `make pretrain` runs); `muon` — `adamw`'s
model with Muon. Every recipe's model is the CPU size (4 layers, d=192, 8K vocab) or, with --gpu,
the 124M size; warmups given for 500 steps are scaled to the run.

Prints the final val loss of each recipe (mean and spread over seeds), the transformers class its
model exports as (a native class, or remote code) and, for each recipe, the fraction of the
reference's tokens it needed to reach the reference's final val loss, and of the `adamw` recipe's
tokens to reach that one's (seed by seed, interpolated linearly on the val curve; "> 1" when never
reached; `--baselines` names other recipes to race to); and Muon's optimizer step as a share of
the training step. Writes the val-loss-vs-tokens plot and logs one MLflow parent run (the table,
the plot, the fractions) with a child run per recipe × seed (its config and val curve). Record the
output in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from generalmodel.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CPU_SIZE = dict(vocab_size=8192, max_seq_len=256, n_layers=4, n_heads=4, d_model=192)
GPU_SIZE = dict(vocab_size=50304, max_seq_len=1024, n_layers=12, n_heads=12, d_model=768)
NOMINAL_STEPS = 500  # the recipes' warmup_steps are for configs/llama-tiny.yaml's run; scaled to --steps
NANOGPT = dict(lr=6e-4, d_model=768, warmup_fraction=2000 / 600_000)

# Recipes: config overrides on top of the size; "config" names a YAML file whose model/optim sections
# are taken as they are (the current default).
RECIPES: dict[str, dict[str, Any]] = {
    "reference": {"model": {"name": "gpt2", "tie_embeddings": True}, "optim": {"name": "adamw"}},
    "adamw": {
        "model": {"name": "llama", "n_kv_heads": 2, "tie_embeddings": True},
        "optim": {"name": "adamw", "lr": 3e-3, "warmup_steps": 30},
    },
    "default": {"config": "configs/llama-tiny.yaml"},
    "muon": {
        "model": {"name": "llama", "n_kv_heads": 2, "tie_embeddings": True},
        "optim": {"name": "muon", "lr": 3e-3, "muon_lr": 0.02, "warmup_steps": 30},
    },
}


# Switches a recipe name may add with "+": `muon+qk+relu2` is the muon recipe with QK-norm and ReLU².
SWITCHES: dict[str, dict[str, dict[str, Any]]] = {
    "qk": {"model": {"qk_norm": True}},
    "relu2": {"model": {"mlp": "relu2"}},
    "vres": {"model": {"value_residual": True}},
    "cap": {"model": {"logit_softcap": 15.0}},
    "zero": {"model": {"zero_init": True}},
    "untied": {"model": {"tie_embeddings": False}},
    "wsd": {"optim": {"schedule": "wsd", "decay_fraction": 0.3, "min_lr_ratio": 0.0}},
    "moonlight": {"optim": {"muon_scaling": "moonlight", "muon_lr": 3e-3}},
    # issue 33: Grokfast, and the speedrun's Polar Express and skips
    "grokfast": {"optim": {"grad_filter": "ema"}},
    "polar": {"optim": {"muon_orthogonalizer": "polar_express"}},
    "x0": {"model": {"embed_skip": True}},
    "unet": {"model": {"unet_skips": True}},
    "ve": {"model": {"value_embeds": 1}},  # the CPU size has 4 layers: one table for layers 0 and 3
    # the speedrun's long/short windows (local layers see 128 of the CPU size's 256; every 2nd global),
    # and with the window-size warmup: 32 → 128 over the first half of the run (a fraction of --steps)
    "ls": {"model": {"window": 128, "global_every": 2}},
    "lsw": {"model": {"window": 128, "global_every": 2}, "train": {"window_warmup_fraction": 0.5}},
    # a batch-size schedule: the global batch (4 micro-batches of a quarter of --batch-size rows) grows
    # from a quarter to all of it over the first half of the run; fewer tokens in the same steps
    "bw": {"train": {"batch_warmup_fraction": 0.5}},
    # the speedrun's accumulation: embedding and head step every 2 steps on the mean of their gradients
    "eh2": {"optim": {"embed_head_every": 2}},
    # off-switches, for the default minus what no native transformers class has:
    # `default+novres+nocap+swiglu` exports as Qwen3, `default+novres+nocap+noqk` as Arcee
    "novres": {"model": {"value_residual": False}},
    "nocap": {"model": {"logit_softcap": None}},
    "noqk": {"model": {"qk_norm": False}},
    "swiglu": {"model": {"mlp": "swiglu"}},
}


def known(name: str) -> bool:
    base, *switches = name.split("+")
    return base in RECIPES and all(s in SWITCHES for s in switches)


def reference_optim(size: dict, steps: int) -> dict[str, Any]:
    """nanoGPT's GPT-2 recipe scaled to the model: AdamW's LR by width (as μP scales Adam's hidden LR)."""
    return {
        "lr": NANOGPT["lr"] * NANOGPT["d_model"] / size["d_model"],
        "warmup_steps": max(1, round(NANOGPT["warmup_fraction"] * steps)),
        "schedule": "cosine",
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "beta1": 0.9,
        "beta2": 0.95,
        "grad_clip": 1.0,
    }


def exported_class(name: str, args) -> str:
    """The transformers class recipe `name`'s model exports as (generalmodel.interop.hf)."""
    from generalmodel.interop.hf import adapter_for

    return adapter_for(recipe_config(name, args, 0, tempfile.gettempdir()).model).architecture


def add_cpu_budget(parser) -> None:
    """The CPU setting's options that the harnesses built on this one (mixture.py,
    token_selection.py) share: seeds, steps, batch, eval batches, runs at a time."""
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=125)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)


def recipe_config(name: str, args, seed: int, root: str):
    """The full run config of recipe `name` at this setting."""
    import yaml

    base, *switches = name.split("+")
    recipe = RECIPES[base]
    size = GPU_SIZE if args.gpu else CPU_SIZE
    if "config" in recipe:
        text = yaml.safe_load((ROOT / recipe["config"]).read_text())
        model, optim = text.get("model", {}), text.get("optim", {})
    else:
        model, optim = dict(recipe["model"]), dict(recipe.get("optim", {}))
    train_extra: dict[str, Any] = {}
    for switch in switches:
        model.update(SWITCHES[switch].get("model", {}))
        optim.update(SWITCHES[switch].get("optim", {}))
        train_extra.update(SWITCHES[switch].get("train", {}))
    if "window_warmup_fraction" in train_extra:  # a share of this run's steps, from a 32-token window
        fraction = train_extra.pop("window_warmup_fraction")
        train_extra.update(window_warmup_steps=max(1, round(fraction * args.steps)), window_warmup_start=32)
    if "batch_warmup_fraction" in train_extra:  # the same global batch, as 4 micro-batches, warmed up
        fraction = train_extra.pop("batch_warmup_fraction")
        train_extra.update(batch_warmup_steps=max(1, round(fraction * args.steps)), grad_accum=4)
    if base == "reference":
        optim = {**reference_optim(size, args.steps), **optim}
    elif "warmup_steps" in optim:  # given for the default's 500 steps: the same fraction of this run
        optim["warmup_steps"] = max(1, round(optim["warmup_steps"] * args.steps / NOMINAL_STEPS))
    model = {**model, **size}
    run = f"lr-eff-{name}-{seed}"
    overrides = {
        "model": model,
        "optim": optim,
        "train.dataset": args.dataset,
        "storage.root": root,
        "train.steps": args.steps,
        "train.batch_size": args.batch_size // train_extra.get("grad_accum", 1),
        "train.seed": seed,
        "train.eval_every": args.eval_every,
        "train.eval_batches": args.eval_batches,
        "train.checkpoint_every": 0,
        "train.log_every": args.eval_every,
        "train.run_name": run,
        **{f"train.{k}": v for k, v in train_extra.items()},
    }
    if args.gpu:
        overrides.update({"train.compile": "regional", "train.device": "cuda"})
    return load_config(overrides=overrides)


def train_recipe(name: str, seed: int, args, threads: int | None = None) -> dict[str, Any]:
    import torch

    from generalmodel.train.loop import train

    if threads:
        torch.set_num_threads(threads)

    cfg = recipe_config(name, args, seed, tempfile.mkdtemp(prefix="gm-lr-eff-"))
    curve: list[tuple[int, float]] = []

    def report(m: dict[str, Any]) -> None:
        if "val_loss" in m:  # a log step too (train.log_every = train.eval_every): its tokens so far
            curve.append((m["tokens"], m["val_loss"]))

    t0 = time.perf_counter()
    train(cfg, report)
    return {"recipe": name, "seed": seed, "curve": curve, "seconds": time.perf_counter() - t0, "config": cfg}


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float:
    """Tokens at which the val curve first reaches `target` (linear between evaluations; the
    curve starts at (0, ln V)); inf if it never does."""
    points = [(0, math.inf), *curve]
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            if not math.isfinite(l0):
                return float(t1)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return math.inf


def fractions(runs: dict[str, list[dict]], name: str, baseline: str) -> list[float]:
    """Per seed: the tokens `name` needed to reach `baseline`'s final val loss, over baseline's tokens."""
    out = []
    for run, base in zip(runs[name], runs[baseline], strict=True):
        target, total = base["curve"][-1][1], base["curve"][-1][0]
        out.append(tokens_to_reach(run["curve"], target) / total)
    return out


def optimizer_step_share(args, steps: int = 8) -> dict[str, float]:
    """Wall time of optimizer.step() over that of the whole training step (forward, backward, clip,
    step) at this setting, for AdamW and Muon, measured on synthetic batches in this process."""
    import torch

    from generalmodel.optim import build_optimizer
    from models import build_model

    out = {}
    for name in ("adamw", "muon"):
        cfg = recipe_config(name, args, 0, tempfile.mkdtemp(prefix="gm-lr-eff-"))
        device = torch.device("cuda" if args.gpu else "cpu")
        model = build_model(cfg.model).to(device)
        opt = build_optimizer(model, cfg.optim, fused=args.gpu)
        ids = torch.randint(0, cfg.model.vocab_size, (args.batch_size, cfg.model.max_seq_len + 1), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.gpu)
        total = stepping = 0.0
        for i in range(steps + 2):
            sync = torch.cuda.synchronize if args.gpu else (lambda: None)
            sync()
            t0 = time.perf_counter()
            with autocast:
                logits = model(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            sync()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t2 = time.perf_counter()
            if i >= 2:  # warm-up steps excluded
                total += t2 - t0
                stepping += t2 - t1
        out[name] = stepping / total
    return out


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, seeds in runs.items():
        tokens = [t / 1e6 for t, _ in seeds[0]["curve"]]
        losses = [[loss for _, loss in r["curve"]] for r in seeds]
        mean = [statistics.mean(col) for col in zip(*losses, strict=True)]
        (line,) = ax.plot(tokens, mean, label=name)
        ax.fill_between(
            tokens, [min(c) for c in zip(*losses, strict=True)], [max(c) for c in zip(*losses, strict=True)],
            color=line.get_color(), alpha=0.2,
        )  # fmt: skip
    for baseline, style in (("reference", ":"), ("adamw", "--")):
        if baseline in runs:
            final = statistics.mean(r["curve"][-1][1] for r in runs[baseline])
            ax.axhline(final, color="grey", linestyle=style, linewidth=1, label=f"{baseline} final")
    low = min(r["curve"][-1][1] for seeds in runs.values() for r in seeds)
    ax.set_ylim(low - 0.1, low + 1.6)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("val loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_mlflow(runs, table: str, summary: dict[str, float], plot_path: Path, args) -> str:
    import mlflow

    from generalmodel.tracking.store import ensure_experiment, tracking_uri

    uri = tracking_uri(load_config(overrides={"tracking.uri": args.mlflow} if args.mlflow else {}))
    mlflow.set_tracking_uri(uri)
    experiment = ensure_experiment(uri, args.experiment)
    setting = {"corpus": args.corpus or args.dataset, "steps": args.steps, "batch_size": args.batch_size,
               "gpu": args.gpu, "seeds": args.seeds, "recipes": args.recipes}  # fmt: skip
    name = f"learning-efficiency-{args.corpus or 'dataset'}"
    with mlflow.start_run(experiment_id=experiment, run_name=name) as parent:
        mlflow.log_params(setting)
        mlflow.log_metrics({key.replace("+", "."): value for key, value in summary.items()})  # no "+" in names
        mlflow.log_text(table, "learning_efficiency.md")
        mlflow.log_artifact(str(plot_path))
        for name, seeds in runs.items():
            for r in seeds:
                with mlflow.start_run(
                    experiment_id=experiment, run_name=f"{name}-seed{r['seed']}", nested=True,
                    tags={"recipe": name, "seed": str(r["seed"])},
                ):  # fmt: skip
                    flat = r["config"].model_dump(mode="json", exclude={"storage", "ray", "tracking", "rl", "dpo"})
                    mlflow.log_params({f"{k}.{kk}": v for k, sec in flat.items() if isinstance(sec, dict)
                                       for kk, v in sec.items()})  # fmt: skip
                    for tokens, loss in r["curve"]:
                        mlflow.log_metric("val_loss", loss, step=tokens)
                    mlflow.log_metrics({"final_val_loss": r["curve"][-1][1], "train_seconds": r["seconds"]})
        return parent.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=["sotu", "shakespeare"], default="sotu",
                        help="a built-in corpus, prepared on first use (benchmarks/corpora.py)")  # fmt: skip
    parser.add_argument("--dataset", help="a prepared dataset instead of --corpus (its vocab must be the size's)")
    parser.add_argument("--recipes", default="reference,adamw,default")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--baselines", default="reference,adamw", help="recipes whose final loss the others race to")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--gpu", action="store_true", help="the 124M setting on one CUDA GPU")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: 2 on CPU, 1 with --gpu)")
    parser.add_argument("--mlflow", help="tracking URI (default: the platform's local store)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--no-step-share", action="store_true", help="skip timing the optimizer step")
    parser.add_argument("--experiment", default="learning-efficiency")
    parser.add_argument("--out", default=str(ROOT / ".generalmodel/learning_efficiency"))
    args = parser.parse_args()
    # CPU: 125 steps × 16 × 256 = 0.5M tokens per run (the global batch of `make pretrain`'s 2 workers);
    # GPU (124M): 400 steps × 32 × 1024 = 13M.
    args.steps = args.steps or (400 if args.gpu else 125)
    args.batch_size = args.batch_size or (32 if args.gpu else 16)
    args.eval_every = args.eval_every or max(1, args.steps // 12)
    args.jobs = args.jobs or (1 if args.gpu else 2)
    if args.dataset:
        args.corpus = None
    else:
        from benchmarks.corpora import prepared

        args.dataset = prepared(args.corpus, seq_len=(GPU_SIZE if args.gpu else CPU_SIZE)["max_seq_len"],
                                vocab_size=(GPU_SIZE if args.gpu else CPU_SIZE)["vocab_size"])  # fmt: skip
    recipes = args.recipes.split(",")
    unknown = [r for r in recipes if not known(r)]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}, each with +{'/+'.join(SWITCHES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in recipes}
    jobs = [(name, seed) for name in recipes for seed in seeds]
    # Runs in --jobs processes of cores/jobs threads each (on 2 cores two 1-thread runs get ~1.4x the
    # throughput of one 2-thread run: these matrices are too small to keep two threads busy).
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_recipe, name, seed, args, threads): (name, seed) for name, seed in jobs}
        for future in as_completed(futures):
            r = future.result()
            print(f"{r['recipe']} seed {r['seed']}: final val loss {r['curve'][-1][1]:.4f} ({r['seconds']:.0f} s)",
                  flush=True)  # fmt: skip
            runs[r["recipe"]].append(r)
    for name in recipes:
        runs[name].sort(key=lambda r: r["seed"])
    share = optimizer_step_share(args) if not args.no_step_share else {"adamw": math.nan, "muon": math.nan}
    tokens = runs[recipes[0]][0]["curve"][-1][0]
    baselines = args.baselines.split(",")
    lines = [
        f"{args.corpus or args.dataset}, {'124M' if args.gpu else 'CPU size'}: {args.steps} steps × "
        f"{args.batch_size} × {(GPU_SIZE if args.gpu else CPU_SIZE)['max_seq_len']} = {tokens / 1e6:.2f}M tokens, "
        f"seeds {seeds}",
        "",
        "| recipe | exports as | final val loss (mean ± half spread) | "
        + "".join(f"tokens to reach {b}'s final | " for b in baselines)
        + "s/run |",
        "|---|---|---|" + "---|" * len(baselines) + "---|",
    ]
    summary: dict[str, float] = {}
    for name, seed_runs in runs.items():
        finals = [r["curve"][-1][1] for r in seed_runs]
        cells = []
        for baseline in baselines:
            if baseline not in runs:
                cells.append("—")
                continue
            f = fractions(runs, name, baseline)
            summary[f"{name}_tokens_vs_{baseline}"] = statistics.mean(f)
            cells.append(" ".join(f"{x:.2f}" if math.isfinite(x) else "> 1" for x in f)
                         + (f" (mean {statistics.mean(f):.2f})" if all(map(math.isfinite, f)) else ""))  # fmt: skip
        summary[f"{name}_final_val_loss"] = statistics.mean(finals)
        seconds = statistics.mean(r["seconds"] for r in seed_runs)
        lines.append(
            f"| {name} | {exported_class(name, args)} | {statistics.mean(finals):.4f} ± "
            f"{(max(finals) - min(finals)) / 2:.4f} | " + "".join(f"{c} | " for c in cells) + f"{seconds:.0f} |"
        )
    lines += ["", f"optimizer step / training step: AdamW {share['adamw']:.1%}, Muon {share['muon']:.1%}",
              f"total {time.perf_counter() - t0:.0f} s"]  # fmt: skip
    summary.update(adamw_step_share=share["adamw"], muon_step_share=share["muon"])
    table = "\n".join(lines)
    print("\n" + table)
    plot_path = out / f"learning_efficiency_{args.corpus or 'dataset'}.png"
    plot(runs, plot_path, f"val loss vs tokens — {args.corpus or args.dataset}")
    (out / f"curves_{args.corpus or 'dataset'}.json").write_text(
        json.dumps({n: [{"seed": r["seed"], "curve": r["curve"]} for r in rs] for n, rs in runs.items()})
    )
    print(f"plot: {plot_path}")
    if not args.no_mlflow and not args.gpu:
        print(f"MLflow parent run: {log_to_mlflow(runs, table, summary, plot_path, args)}")


if __name__ == "__main__":
    main()
