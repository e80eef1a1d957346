"""Load on the OpenAI-compatible Ray Serve app (jobs/serve.py), with batching on and off in one run.

    python -m benchmarks.serve_load                                    # a llama-tiny of random weights
    python -m benchmarks.serve_load --model models:/llama-tiny/latest --concurrency 1,4,16,64

Starts a local Ray cluster, deploys the app on 127.0.0.1 (one replica) with `max_batch` =
--max-batch (batching on), warms it up with a few requests, drives it with streaming
/v1/completions requests from --concurrency clients at a time (httpx, asyncio) for a bounded
number of requests, then redeploys it with
`max_batch: 1` (one request decoded at a time: batching off) and does the same. Prints, per
setting and concurrency: time to first token p50/p99, inter-token latency p50/p99, aggregate
generated tokens/s, errors, the rows the replica decoded per step on average — and the aggregate
ratio to a single stream of the same setting.
Record the output, with the machine or card, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path


def random_model(preset: str, directory: Path) -> str:
    """An export of `preset` with seeded random weights and a BPE tokenizer trained on a few
    built-in speeches (the sotu package): realistic shapes, no training needed."""
    from dataclasses import replace

    import torch

    from generalmodel.data.sources import sotu_dir
    from generalmodel.data.tokenizer import train_bpe
    from generalmodel.infer.export import export_files
    from models import PRESETS, build_model

    texts = [p.read_text() for p in sorted(Path(str(sotu_dir())).glob("*.txt"))[:40]]
    tokenizer = train_bpe(texts, 2048)
    cfg = replace(PRESETS[preset], vocab_size=2048)
    torch.manual_seed(0)
    for name, data in export_files(cfg, build_model(cfg).state_dict(), tokenizer.to_str()).items():
        (directory / name).write_bytes(data)
    return str(directory)


async def one(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    stamps, tokens, error = [], 0, None
    try:
        async with client.stream("POST", url, json=body, timeout=600) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # counted, not fatal: the figure is the error count
        error = f"{type(e).__name__}: {e}"
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - start if stamps else None, "gaps": gaps, "tokens": tokens, "error": error}


async def drive(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    import httpx

    body = {"model": model, "prompt": "Fellow citizens,", "max_tokens": max_tokens, "temperature": 0.8, "stream": True}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits) as client:

        async def gated(i):
            async with gate:
                return await one(client, url, {**body, "seed": i})

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results if r.get("ttft") is not None)
    gaps = sorted(g for r in results for g in r.get("gaps", []))
    errors = [r["error"] for r in results if r.get("error")]
    return {
        "ttft p50 ms": 1000 * _pct(ttft, 50),
        "ttft p99 ms": 1000 * _pct(ttft, 99),
        "itl p50 ms": 1000 * _pct(gaps, 50),
        "itl p99 ms": 1000 * _pct(gaps, 99),
        "tok/s": sum(r.get("tokens", 0) for r in results) / wall,
        "errors": len(errors),
        "first error": errors[0][:120] if errors else "",
    }


def replica_stats(url: str) -> dict:
    """The replica's counters (/stats): decode steps and tokens, for the rows decoded per step."""
    import httpx

    return httpx.get(url.rsplit("/v1", 1)[0] + "/stats", timeout=30).json()


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


def main() -> None:
    import ray
    from ray import serve

    from generalmodel.cluster import free_port
    from jobs.serve import ServeJobConfig
    from jobs.serve import main as deploy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: a random-weight --preset")
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64, help="per concurrency (at least the concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-interval-ms", type=float, default=None, help="default: the app's")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model(args.preset, Path(tmp))
        ray.init(include_dashboard=False, log_to_driver=False)
        rows = []
        port = free_port()  # one HTTP proxy for both settings: Serve keeps the options it started with
        try:
            for setting, max_batch in (("batching on", args.max_batch), ("batching off", 1)):
                cfg = ServeJobConfig(
                    model=model, name="bench", port=port, max_batch=max_batch, device=args.device,
                    max_ongoing_requests=max(levels) + 8, num_cpus=1,
                    **({} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}),
                )  # fmt: skip
                url = deploy(cfg, block=False)
                asyncio.run(drive(f"{url}/completions", "bench", 2, 8, args.max_tokens))  # warm up, not counted
                single = None
                for c in levels:
                    before = replica_stats(url)
                    stats = asyncio.run(drive(f"{url}/completions", "bench", c, max(args.requests, c), args.max_tokens))
                    after = replica_stats(url)
                    steps = after["steps"] - before["steps"]
                    stats["rows/step"] = (after["tokens"] - before["tokens"]) / steps if steps else float("nan")
                    single = single or stats["tok/s"]
                    row = {"setting": f"{setting} (max_batch {max_batch})", "concurrency": c, **stats}
                    row["x single stream"] = stats["tok/s"] / single if single else float("nan")
                    rows.append(row)
                    print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
                serve.delete(cfg.app_name)
        finally:
            serve.shutdown()
            ray.shutdown()
    keys = list(rows[0]) if rows else []
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
