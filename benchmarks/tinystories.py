"""The TinyStories benchmark: prepare TinyStories, train the llama2.c "15M" shape, evaluate val
loss and bits per byte, register the model and sample stories — the whole platform path on a
known task, with a published reference to compare against.

    python -m benchmarks.tinystories                                   # configs/tinystories.yaml, online
    python -m benchmarks.tinystories --data.source=s3://BUCKET/tinystories --ray.use_gpu=true
    make bench-tinystories BENCH_ARGS="--train.steps=2000"
Any run-config override applies (see `python -m jobs.pretrain --help`). Reference: llama2.c's
15M model, val loss 1.072 with its 32K Llama 2 tokenizer (github.com/karpathy/llama2.c); with
our own tokenizer the losses are per different tokens, so bits per byte is the comparable figure.
Record the printed figures, with the machine or card, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys

from generalmodel.cli import clean_exit, exit_on_help, setup_logging, split_args
from generalmodel.config import Config, load_config
from generalmodel.storage import RunLayout
from jobs import pretrain
from jobs.eval import EvalConfig
from jobs.eval import main as evaluate

PRESET = "configs/tinystories.yaml"
REFERENCE = {"model": "llama2.c 15M (32K Llama 2 tokenizer)", "val_loss": 1.072}


def main(argv: list[str]) -> dict:
    line = split_args(argv)
    cfg = load_config(line.preset or PRESET, line.overrides)
    result = pretrain.main(cfg)
    layout = RunLayout.of(cfg)
    (evaluation,) = evaluate(
        EvalConfig(
            models=[result["model_uri"]],
            dataset=layout.dataset,
            limit=cfg.train.eval_batches * cfg.train.batch_size * cfg.ray.num_workers,
            name=f"bench-{cfg.train.run_name}",
            tracking=cfg.tracking,
            storage=cfg.storage,
            ray=cfg.ray,
        )
    )
    m = evaluation.metrics
    print("\nTinyStories benchmark")
    print("| model | vocab | val loss | val bits/byte |\n|---|---|---|---|")
    print(f"| {REFERENCE['model']} | 32000 | {REFERENCE['val_loss']:.3f} | (not published) |")
    print(f"| {result['model_uri']} ({cfg.train.steps} steps) | {cfg.data.vocab_size} | {m['val_loss']:.3f} | "
          f"{m['val_bpb']:.3f} |")  # fmt: skip
    return {"pretrain": result, "eval": m}


def cli() -> None:
    setup_logging()
    exit_on_help(sys.argv[1:], Config, __doc__)
    with clean_exit():
        main(sys.argv[1:])


if __name__ == "__main__":
    cli()
