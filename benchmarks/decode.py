"""Decoding speed, memory and quantization cost, in one run.

    python -m benchmarks.decode                                   # CPU: llama-tiny and llama-124m
    python -m benchmarks.decode --device cuda --presets llama-124m,llama-350m
    python -m benchmarks.decode --model models:/llama-tiny/latest --dataset .generalmodel/store/datasets/sotu

For each preset (random weights of its shape; or the trained `--model`), each quantization that
the device runs (none, int8-weight, int8-dynamic; on a card also fp8-weight, fp8-dynamic,
int4-weight) and each mode (eager; compiled: torch.compile of the decode step): greedy decoding
of `--new` tokens after a `--prompt`-token prompt, at batch 1 and batch 16, on the static KV cache
(generalmodel.infer.engine). Prints tokens/s (generated tokens over the whole call, prefill
included), the ratio to eager unquantized batch 1 in the same run (the reference), weight and
KV-cache memory (on a card: peak allocated), and whether the tokens equal the reference's.

With `--model` and `--dataset`: the quality each quantization costs — val loss and bits per byte on
the dataset's held-out split (`--windows` rows), and the delta to the unquantized model.
Record the output, with the machine or card, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import time
from dataclasses import replace

import torch

from generalmodel.infer import SamplingParams
from generalmodel.infer.engine import generate_batch
from generalmodel.infer.quant import quantize
from models import PRESETS, build_model
from models.cache import KVCache

CPU_QUANTS = ["none", "int8-weight", "int8-dynamic"]
GPU_QUANTS = [*CPU_QUANTS, "fp8-weight", "fp8-dynamic", "int4-weight"]


def weight_bytes(model) -> int:
    """The serialized size of the weights (what torchao's packed tensors really hold)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_decode(model, prompts, new: int, compile: bool, device: str, repeats: int):
    """(tokens/s, tokens of the first row set): a warmup call (compiles), then the best of `repeats`."""
    params = SamplingParams(temperature=0, max_new_tokens=new)
    capacity = len(prompts[0]) + new
    if compile:  # a fresh compile per configuration: dynamo's recompile limit would fall back to eager
        torch._dynamo.reset()
    tokens = [r.tokens for r in generate_batch(model, prompts, params, compile=compile, capacity=capacity)]
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        generate_batch(model, prompts, params, compile=compile, capacity=capacity)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return len(prompts) * new / best, tokens


def build(cfg, state, device: str, dtype: torch.dtype):
    """The model of `cfg` with `state` (a trained model) or seeded random weights."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state, strict=False)
    return model.eval().to(device=device, dtype=dtype)


def quality(model, windows, sizes, batch: int = 8):
    from generalmodel.eval.scoring import score_windows

    score = score_windows(model, windows, sizes, batch)
    return score.loss, score.bits_per_byte


def load_trained(reference: str, dataset: str | None, limit: int):
    """(state to rebuild the model from, windows, token byte sizes) of a registered model."""
    import os

    from generalmodel.config import StorageConfig
    from generalmodel.data.tokenizer import load_tokenizer
    from generalmodel.eval.runner import dataset_windows
    from generalmodel.eval.scoring import token_bytes
    from generalmodel.infer.export import read_export
    from generalmodel.tracking.registry import download_model
    from generalmodel.tracking.store import LOCAL_DB

    storage = StorageConfig().resolved()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath(LOCAL_DB)}"
    cfg, state, tokenizer_json, where = read_export(download_model(reference, uri, storage))
    windows, sizes = None, None
    if dataset:
        windows = dataset_windows(dataset, storage, tokenizer_json, limit)
        sizes = token_bytes(load_tokenizer(tokenizer_json, where))
    return cfg, state, windows, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="llama-tiny,llama-124m")
    parser.add_argument("--model", default=None, help="a trained model instead of random presets")
    parser.add_argument("--dataset", default=None, help="with --model: its prepared dataset, for val loss")
    parser.add_argument("--windows", type=int, default=64, help="val rows scored per quantization")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quants", default=None, help="default: what the device runs")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="bfloat16 on a card by default")
    args = parser.parse_args()

    device = args.device
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    quants = args.quants.split(",") if args.quants else (GPU_QUANTS if device.startswith("cuda") else CPU_QUANTS)
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    name = (
        torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}; prompt {args.prompt}, new {args.new}")

    if args.model:
        cfg, state, windows, sizes = load_trained(args.model, args.dataset, args.windows)
        models = [(args.model, cfg, state)]
    else:
        models = [(p, PRESETS[p], None) for p in args.presets.split(",")]
        windows = sizes = None

    rows = []
    for label, cfg, state in models:
        cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, args.prompt + args.new))

        g = torch.Generator().manual_seed(0)
        prompt_ids = {
            b: [torch.randint(0, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(b)]
            for b in batches
        }
        reference_rate, reference_tokens, base_quality = None, {}, None
        for quant in quants:
            model = build(cfg, state, device, dtype)
            try:
                quantize(model, quant)
            except Exception as e:  # say why and go on: the table shows what this device runs
                print(f"{label} {quant}: skipped ({e})")
                continue
            weights = weight_bytes(model)
            q = quality(model, windows, sizes) if windows else None
            if q and quant == "none":
                base_quality = q
            for mode in modes:
                for b in batches:
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        rate, tokens = timed_decode(
                            model, prompt_ids[b], args.new, mode == "compiled", device, args.repeats
                        )
                    except Exception as e:
                        print(f"{label} {quant} {mode} batch {b}: failed ({type(e).__name__}: {str(e)[:200]})")
                        continue
                    if quant == "none" and mode == "eager":
                        reference_tokens[b] = tokens
                        if b == 1:
                            reference_rate = rate
                    same = tokens == reference_tokens.get(b)
                    cache = KVCache(model, b, args.prompt + args.new).nbytes()
                    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
                    row = {
                        "model": label,
                        "quant": quant,
                        "mode": mode,
                        "batch": b,
                        "tok/s": rate,
                        "x ref": rate / reference_rate if reference_rate else float("nan"),
                        "weights MB": weights / 2**20,
                        "KV cache MB": cache / 2**20,
                        "peak MB": peak,
                        "same tokens": same,
                    }
                    if q:
                        row["val loss"], row["bpb"] = q
                        row["d loss"] = q[0] - base_quality[0] if base_quality else float("nan")
                    rows.append(row)
                    print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    print()
    print(table(rows))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing ran)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
