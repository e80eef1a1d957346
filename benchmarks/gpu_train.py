"""Single-GPU training throughput, no Ray: the platform's own training loop against the nanoGPT
reference in the same process, and the model zoo.

    python -m benchmarks.gpu_train                      (the product table, ~8 minutes on one H100/H200)
    python -m benchmarks.gpu_train --dry-run            (the same code on CPU with tiny presets, ~1 minute)

1. The product (default): the nanoGPT-recipe reference (`gpt2-124m`: 12 layers, 12 heads, d=768,
   vocab 50304; torch.compile of the model with its loss, bf16 autocast, fused AdamW, B=16,
   T=1024, random tokens) — then `generalmodel.train.loop.train`, the loop Ray Train runs, in this
   process on a synthetic dataset (benchmarks/corpora.py `synthetic`) for each of --loop-presets
   (gpt2-124m, llama-124m, llama-350m, llama-1.3b at its T=2048 with B=8) and each of
   --loop-variants (`full`: train.compile=full, the loss in the graph; `regional`: per block and
   the loss tail; `:chunkN` adds train.loss_chunk=N; `:fp8` train.fp8=tensorwise), and for the
   first preset also each of --first-variants (default `regional,full:chunk4096`: the rows that
   decide train.compile's and train.loss_chunk's defaults on a card). Tokens/s and MFU
   are the loop's own reports (windows of --loop-window steps after the first, which compiles),
   peak memory, and the ratios to the reference: tokens/s for gpt2-124m, MFU for the others. Then
   the host syncs per step outside log steps (CUDA's sync debug mode over two runs of 6 and 12
   steps that log only at the end), the SDPA backends (flash, efficient, cuDNN) timed on each
   preset's attention shape, and FlexAttention against masked SDPA (global, a 256 window and
   packed documents — train.document_mask: differences of outputs and gradients, time). Partial
   results are printed as they come.
2. --zoo: for each of --presets the compiled model with the loss outside (or, --compile-loss,
   inside) the graph on random tokens: tokens/s, MFU (6·N + 12·L·d·T FLOPs per token against the
   card's dense bf16 peak), peak memory, the MFU ratio to the reference run in the same invocation.
   --check-moe first compares the grouped MoE path with the per-expert reference.
3. --leak: the causal-leak check (generalmodel/train/leak.py: later tokens and other rows
   change nothing before the cut) for --presets in every compile mode under bf16 autocast, then
   training on random tokens (--steps) with the loss in and out of the compiled graph, on one
   fixed batch (a model may memorise it) and on a fresh batch every step (no model can do better
   than ln(vocab) there: a loss well below it means the model sees the tokens it predicts).
       python -m benchmarks.gpu_train --leak --presets gpt2-124m,deepseek-124m     (~5 minutes)
4. --fp8: for each of --fp8-presets, bf16 and each torchao recipe (tensorwise, rowwise,
   rowwise_with_gw_hp) through the platform's filter (generalmodel.train.fp8: head, routers and
   linears below --fp8-min-dim stay bf16), compiled: tokens/s, MFU against the bf16 peak, peak
   memory, the fp8/bf16 tokens/s ratio; then loss parity: a short run on the same data and seed in
   bf16 and in tensorwise fp8, and the largest loss difference against a stated tolerance.
       python -m benchmarks.gpu_train --fp8            (~6-8 minutes on one H100/H200)

The device machine has torch but neither pydantic (the platform's config) nor torchao: carry them
as wheels (`make gpu-wheels` downloads them into .whl/ for its Python 3.12) and install them first
(the device tool's README shows the command). Record the output with the card in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from generalmodel.config import OptimConfig, load_config
from generalmodel.optim import build_optimizer
from generalmodel.train.fp8 import RECIPES, check_supported
from generalmodel.train.fp8 import convert as fp8_convert
from generalmodel.train.mfu import device_peak_flops
from models import PRESETS, build_model

# (blt-static-124m: tokens are bytes, about 4 to a BPE token: compare its tok/s / 4 and MFU)
DEFAULT_PRESETS = "gpt2-124m,llama-124m,llama-350m,deepseek-124m,memory-124m,ultramem-124m,moeut-124m,blt-static-124m"
FP8_PRESETS = "gpt2-124m,llama-1.3b,llama-d4096"
PARITY_TOLERANCE = 0.05  # largest |loss_fp8 - loss_bf16| accepted over the parity run
REFERENCE = "gpt2-124m"


def bench(
    name: str,
    steps: int,
    warmup: int,
    batch: int,
    seq: int,
    compile_loss: bool = False,
    fp8: str = "none",
    fp8_min_dim: int = 2048,
    fresh: bool = False,
    device: str = "cuda",
    compile: bool = True,
) -> dict:
    """Train `name` on random tokens: one fixed batch (the throughput runs), or with `fresh` a new
    batch every step (the leak probe). `device`/`compile`: the CPU dry run passes cpu/False."""
    cfg = PRESETS[name]
    # Every run compiles the same code objects again: without a reset, dynamo's recompile limit (8)
    # is reached within the fp8 table and later runs fall back to eager without a word.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(cfg)
    flops_per_token = model.flops_per_token(seq)  # active parameters (MoE: top-k experts)
    peak = device_peak_flops(torch.device(device))  # None (no MFU) on CPU or a card not in the table
    converted = fp8_convert(model, fp8, fp8_min_dim, fsdp=False) if fp8 != "none" else []
    model = model.to(device)
    optimizer = build_optimizer(model, OptimConfig(lr=6e-4), fused=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def forward_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = model(inputs)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    # --compile-loss: the cross-entropy inside the compiled graph (as nanoGPT's forward does),
    # so the fp32 upcast of the (B·T × vocab) logits fuses with the softmax.
    compiled = forward_loss if compile_loss else model
    compiled = torch.compile(compiled) if compile else compiled
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        nonlocal inputs, targets
        if fresh:
            x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
            inputs, targets = x[:, :-1], x[:, 1:]
        if compile_loss:
            loss = compiled(inputs, targets)
        else:
            with autocast:
                logits = compiled(inputs)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _synchronize(device)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _synchronize(device)
    seconds = time.perf_counter() - t0
    tok_s = batch * seq * steps / seconds
    result = {
        "name": name,
        "params_m": model.num_params() / 1e6,
        "active_m": model.num_params(active=True) / 1e6,
        "tok_s": tok_s,
        "mfu": tok_s * flops_per_token / peak if peak else float("nan"),
        "peak_gb": _peak_gb(device),
        "compile_s": compile_s,
        "loss": loss.item(),
        "fp8_linears": len(converted),
    }
    return result


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- the product: the platform's training loop beside the reference --------------------------------

LOOP_PRESETS = "gpt2-124m,llama-124m,llama-350m,llama-1.3b"
LONG = {"llama-1.3b": (8, 2048)}  # (batch, seq) where the preset's own context is the point


class _Measured(Exception):
    """Raised from the report callback once the loop's windows are measured: the run stops there
    (no final checkpoint or export: they are not what is measured)."""


def loop_config(
    name: str, variant: str, dataset: str, store: str, batch: int, steps: int, window: int, device: str, **extra
):
    """The config of a loop run: the preset's model, AdamW (6e-4, the reference's), on `dataset`;
    variant `full` | `regional` | `none` (train.compile) with `:chunkN` (train.loss_chunk) and
    `:fp8` (train.fp8=tensorwise) suffixes; `extra`: more dotted overrides."""
    from dataclasses import asdict

    mode, *options = variant.split(":")
    overrides = {f"model.{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(PRESETS[name]).items()}
    overrides.update(
        {
            "train.dataset": dataset,
            "storage.root": store,
            "train.device": device,
            "train.compile": mode,
            "train.steps": steps,
            "train.batch_size": batch,
            "train.log_every": window,
            "train.eval_every": 10**6,
            "train.checkpoint_every": 0,
            "train.resume": "never",
            "train.run_name": f"{name}-{variant.replace(':', '-')}",
            "optim.name": "adamw",
            "optim.lr": 6e-4,
            "optim.warmup_steps": 0,
            **extra,
        }
    )
    for option in options:
        if option.startswith("chunk"):
            overrides["train.loss_chunk"] = int(option.removeprefix("chunk"))
        elif option == "fp8":
            overrides["train.fp8"] = "tensorwise"
        else:
            raise SystemExit(f"unknown loop variant option {option!r} in {variant!r} (chunkN, fp8)")
    return load_config(overrides=overrides)


def loop_bench(name: str, variant: str, args, device: str) -> dict:
    """`generalmodel.train.loop.train` on a synthetic dataset of the preset's vocab: the mean of
    its reported tokens/s and MFU over the windows after the first (which compiles)."""
    from benchmarks.corpora import synthetic
    from generalmodel.train.loop import train

    batch, seq = LONG.get(name, (args.batch, args.seq)) if device == "cuda" else (args.batch, args.seq)
    windows = args.loop_windows
    steps = args.loop_window * (windows + 1)
    store = tempfile.mkdtemp(prefix="gm-gpu-loop-")
    dataset = synthetic(f"{store}/data", PRESETS[name].vocab_size, seq, rows=batch * steps + batch)
    cfg = loop_config(name, variant, dataset, store, batch, steps, args.loop_window, device)
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reports: list[dict] = []

    def report(metrics: dict) -> None:
        if "tokens_per_s" in metrics:
            reports.append(metrics)
        if len(reports) > windows:
            raise _Measured

    started = time.perf_counter()
    try:
        train(cfg, report)
    except _Measured:
        pass
    measured = reports[1:]
    mean = lambda key: sum(m.get(key, float("nan")) for m in measured) / len(measured)  # noqa: E731
    return {
        "name": name,
        "variant": variant,
        "batch": batch,
        "seq": seq,
        "tok_s": mean("tokens_per_s"),
        "mfu": mean("mfu") if "mfu" in measured[0] else float("nan"),
        "peak_gb": _peak_gb(device),
        "loss": measured[-1]["loss"],
        "total_s": time.perf_counter() - started,
    }


def product_table(args, device: str) -> None:
    """The reference, then the platform's loop for each preset and variant, with the ratios."""
    reference = args.reference
    compile = device == "cuda"
    ref = bench(reference, args.steps, args.warmup, args.batch, args.seq, True, device=device, compile=compile)
    _forget(device)
    print(
        f"{'reference ' + reference:>34}: {ref['tok_s'] / 1e3:8.1f}K tok/s  MFU {ref['mfu']:6.1%}  "
        f"peak {ref['peak_gb']:5.1f} GB  (nanoGPT recipe: model + loss compiled={compile}, B={args.batch} "
        f"T={args.seq}, compile+warmup {ref['compile_s']:.0f}s)",
        flush=True,
    )
    for i, name in enumerate(args.loop_presets.split(",")):
        extra = [v for v in args.first_variants.split(",") if v] if i == 0 else []
        for variant in args.loop_variants.split(",") + extra:
            label = f"loop {name} {variant}"
            try:
                r = loop_bench(name, variant, args, device)
            except Exception as e:  # one row's failure should not hide the others' figures
                print(f"{label:>34}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                _forget(device)
                continue
            _forget(device)
            if name == reference and (r["batch"], r["seq"]) == (args.batch, args.seq):
                ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x the reference's tok/s"
            else:
                ratio = f"{r['mfu'] / ref['mfu']:.2f}x the reference's MFU"
            print(
                f"{label:>34}: {r['tok_s'] / 1e3:8.1f}K tok/s  MFU {r['mfu']:6.1%}  peak {r['peak_gb']:5.1f} GB  "
                f"{ratio}  (B={r['batch']} T={r['seq']}, loss {r['loss']:.2f}, run {r['total_s']:.0f}s)",
                flush=True,
            )


def host_syncs(device: str) -> None:
    """Host syncs per training step outside log steps: two loop runs (6 and 12 steps, llama-tiny,
    logging, evaluating and saving at the end only) counted by CUDA's sync debug mode (on CPU,
    the calls that would sync: generalmodel.train.step.HostReads); the difference / 6."""
    import warnings

    from benchmarks.corpora import synthetic
    from generalmodel.train.loop import train
    from generalmodel.train.step import HostReads

    counts = {}
    for steps in (6, 12):
        store = tempfile.mkdtemp(prefix="gm-gpu-syncs-")
        dataset = synthetic(f"{store}/data", PRESETS["llama-tiny"].vocab_size, 256, rows=8 * steps + 8)
        cfg = loop_config("llama-tiny", "none", dataset, store, 8, steps, steps, device, **{"train.eval_batches": 1})
        if device == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    train(cfg)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
        else:
            with HostReads() as reads:
                train(cfg)
            counts[steps] = len(reads.reads)
    per_step = (counts[12] - counts[6]) / 6
    print(
        f"\nhost syncs per step outside log steps: {per_step:g} ({counts[6]} in a 6-step run, {counts[12]} in a "
        f"12-step one: the end-of-run log, evaluation and checkpoint)",
        flush=True,
    )


def attention_table(presets: list[str], args) -> None:
    """Forward + backward of SDPA (causal, bf16) on each preset's attention shape, per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    print("\nattention (SDPA, causal, bf16, fwd+bwd) per backend, ms:", flush=True)
    for name in presets:
        cfg = PRESETS[name]
        batch, seq = LONG.get(name, (args.batch, args.seq))
        kv = cfg.kv_heads
        q = torch.randn(batch, cfg.n_heads, seq, cfg.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(batch, kv, seq, cfg.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        times = {}
        for label, backend in backends.items():
            try:
                with sdpa_kernel(backend):
                    for i in range(13):
                        if i == 3:
                            torch.cuda.synchronize()
                            t0 = time.perf_counter()
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != cfg.n_heads)
                        out.sum().backward()
                    torch.cuda.synchronize()
                times[label] = (time.perf_counter() - t0) / 10 * 1e3
            except Exception as e:
                times[label] = f"n/a ({type(e).__name__})"
        timed = [(t, b) for b, t in times.items() if isinstance(t, float)]
        best = min(timed)[1] if timed else "none"
        shown = "  ".join(f"{b} {t:.2f}" if isinstance(t, float) else f"{b} {t}" for b, t in times.items())
        shape = f"B={batch} H={cfg.n_heads}/{kv} T={seq} d={cfg.head_dim}"
        print(f"{name:>16} ({shape}): {shown}  fastest: {best}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


def flex_table(args, device: str = "cuda", B: int = 8, T: int = 2048, repeats: int = 10) -> None:
    """FlexAttention (compiled, block masks) against SDPA with the same boolean mask, on q/k/v made
    as the model makes them (strided views of one projection): the largest output and gradient
    differences, and fwd+bwd ms — global causal, a 256-token window, and packed documents
    (train.document_mask: block-causal within documents of 64..960 tokens, per row), B=8, T=2048,
    16/4 heads; plain causal SDPA (is_causal, the flash path) is the reference of every row."""
    from torch.nn.attention.flex_attention import flex_attention

    from models.attention import Documents, flex_block_mask
    from models.cache import attention_mask

    H, kv, d = 16, 4, 64
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"\nFlexAttention vs SDPA (compiled, {dtype}, B={B} T={T} H={H}/{kv} d={d}), fwd+bwd ms:", flush=True)
    flex = torch.compile(lambda q, k, v, m: flex_attention(q, k, v, block_mask=m, enable_gqa=True))
    lengths = torch.randint(64, 961, (B, T // 64), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(T // 64), n)[:T] for n in lengths]).to(device)
    documents = Documents.of(doc_ids)
    positions = torch.arange(T, device=device)[None]
    cases = {
        "causal": (attention_mask(positions, positions, None)[0, 0], flex_block_mask(T, None, device)),
        "window 256": (attention_mask(positions, positions, 256)[0, 0], flex_block_mask(T, 256, device)),
        "documents": (documents.mask(None), documents.block_mask(None)),
    }
    for case, (mask, block_mask) in cases.items():
        x = torch.randn(B, T, H * d, device=device, dtype=dtype, requires_grad=True)
        y = torch.randn(B, T, 2 * kv * d, device=device, dtype=dtype, requires_grad=True)

        def run(which, x=x, y=y, mask=mask, block_mask=block_mask):
            q = x.view(B, T, H, d).transpose(1, 2)
            k, v = y.view(B, T, 2, kv, d).permute(2, 0, 3, 1, 4)
            if which == "flex":
                return flex(q, k, v, block_mask)
            if which == "causal sdpa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        results, times = {}, {}
        for which in ("sdpa", "flex", "causal sdpa"):
            x.grad = y.grad = None
            out = run(which)
            out.float().square().mean().backward()
            results[which] = (out.detach().float(), x.grad.float(), y.grad.float())
            for i in range(repeats + 3):
                if i == 3:
                    _sync(device)
                    t0 = time.perf_counter()
                run(which).sum().backward()
            _sync(device)
            times[which] = (time.perf_counter() - t0) / repeats * 1e3
        diffs = [
            (a - b).abs().max().item() / b.abs().max().item()
            for a, b in zip(results["flex"], results["sdpa"], strict=True)
        ]
        print(
            f"  {case}: masked sdpa {times['sdpa']:.2f}  flex {times['flex']:.2f} "
            f"({times['sdpa'] / times['flex']:.2f}x)  causal sdpa {times['causal sdpa']:.2f} "
            f"(flex {times['causal sdpa'] / times['flex']:.2f}x of it)  relative max difference flex-sdpa out "
            f"{diffs[0]:.1e}, grads {diffs[1]:.1e} / {diffs[2]:.1e}",
            flush=True,
        )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _forget(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def leak_table(presets: list[str], args) -> None:
    """The causal-leak check in every compile mode, then the random-token training probe."""
    import math

    from generalmodel.train.leak import MODES, check

    print("\ncausal leak (bf16 autocast, B=4, T=512, cut 255; 'before' must be 0, 'after' > 0):", flush=True)
    for name in presets:
        for mode in MODES:
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = build_model(PRESETS[name]).cuda()
            try:
                r = check(model, mode, PRESETS[name].vocab_size, batch=4, seq=512, cut=255, autocast=torch.bfloat16)
            except Exception as e:
                print(f"{name:>16} {mode:>10}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            verdict = "LEAK" if r.relative > 1e-3 else "ok"
            print(
                f"{name:>16} {mode:>10}: before {r.earlier:.3g} (rel {r.relative:.1e}) after {r.later:.3g}  {verdict}",
                flush=True,
            )
            del model
            torch.cuda.empty_cache()
    print(f"\nrandom tokens, {args.steps + args.warmup} steps, B={args.batch}, T={args.seq}: final loss", flush=True)
    for name in presets:
        floor = math.log(PRESETS[name].vocab_size)
        for compile_loss in (False, True):
            fixed = bench(name, args.steps, args.warmup, args.batch, args.seq, compile_loss)["loss"]
            torch.cuda.empty_cache()
            new = bench(name, args.steps, args.warmup, args.batch, args.seq, compile_loss, fresh=True)["loss"]
            torch.cuda.empty_cache()
            print(
                f"{name:>16} loss in graph {compile_loss!s:>5}: fixed batch {fixed:.2f}, fresh batches {new:.2f} "
                f"(ln vocab {floor:.2f}{'; BELOW: a leak' if new < floor - 0.5 else ''})",
                flush=True,
            )


def check_moe() -> None:
    """The grouped path (torch._grouped_mm in bf16) against the per-expert reference loop."""
    from models.moe import MoE

    torch.manual_seed(0)
    moe = MoE(d_model=768, hidden=768, n_experts=16, top_k=2, n_shared=1).cuda()
    x = torch.randn(4, 512, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        grouped, reference = moe(x).float(), moe.forward_reference(x).float()
    error = (grouped - reference).abs().max().item() / reference.abs().max().item()
    print(
        f"MoE grouped (torch._grouped_mm: {hasattr(torch, '_grouped_mm')}) vs reference, bf16: "
        f"max relative difference {error:.2e}",
        flush=True,
    )


def fp8_table(presets: list[str], args) -> None:
    """Each preset in bf16 and in each fp8 recipe, in this process; fp8/bf16 ratios."""
    check_supported("tensorwise", torch.device("cuda"))
    print(
        f"\nfp8 (torchao, min dim {args.fp8_min_dim}; head/routers/experts bf16), compiled, "
        f"B={args.batch} T={args.seq}:"
    )
    for name in presets:
        base = None
        for recipe in ("none", *RECIPES):
            try:
                r = bench(name, args.steps, args.warmup, args.batch, args.seq, True, recipe, args.fp8_min_dim)
            except Exception as e:
                print(f"{name:>14} {recipe:>18}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
                torch.cuda.empty_cache()
                continue
            torch.cuda.empty_cache()
            base = r if recipe == "none" else base
            ratio = f"{r['tok_s'] / base['tok_s']:.2f}x bf16" if base and recipe != "none" else "reference"
            print(
                f"{name:>14} {('bf16' if recipe == 'none' else recipe):>18}: {r['tok_s'] / 1e3:8.1f}K tok/s  "
                f"MFU {r['mfu']:6.1%}  peak {r['peak_gb']:5.1f} GB  {ratio}  ({r['fp8_linears']} fp8 linears, "
                f"compile+warmup {r['compile_s']:.0f}s)",
                flush=True,
            )


def loss_parity(name: str, recipe: str, steps: int, min_dim: int) -> None:
    """Same seed, same data (a small learnable token stream): bf16 vs fp8 loss curves."""
    curves = {}
    for mode in ("none", recipe):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = build_model(PRESETS[name])
        if mode != "none":
            fp8_convert(model, mode, min_dim, fsdp=False)
        model = model.cuda()
        optimizer = build_optimizer(model, OptimConfig(lr=3e-4), fused=True)
        compiled = torch.compile(model)
        g = torch.Generator(device="cuda").manual_seed(1)
        data = torch.randint(0, 2048, (32, 513), device="cuda", generator=g)  # 4 batches, revisited: loss falls
        losses = []
        for step in range(steps):
            x = data[(step % 4) * 8 : (step % 4 + 1) * 8]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = compiled(x[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[mode] = losses
        del model, optimizer, compiled
        torch.cuda.empty_cache()
    diffs = [abs(a - b) for a, b in zip(curves["none"], curves[recipe], strict=True)]
    worst = max(range(steps), key=diffs.__getitem__)
    verdict = "within" if diffs[worst] <= PARITY_TOLERANCE else "OUTSIDE"
    print(
        f"\nloss parity {name}, bf16 vs {recipe}, {steps} steps: "
        f"bf16 {curves['none'][0]:.3f} -> {curves['none'][-1]:.3f}, "
        f"fp8 {curves[recipe][0]:.3f} -> {curves[recipe][-1]:.3f}; largest |difference| {diffs[worst]:.4f} at step "
        f"{worst} ({verdict} the tolerance {PARITY_TOLERANCE})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--reference", default=REFERENCE, help=f"the reference preset (default {REFERENCE})")
    parser.add_argument("--loop-presets", default=LOOP_PRESETS, help=f"the loop's rows (default {LOOP_PRESETS})")
    parser.add_argument(
        "--loop-variants", default="full", help="comma list of full|regional|none[:chunkN][:fp8] (default full)"
    )
    parser.add_argument(
        "--first-variants",
        default="regional,full:chunk4096",
        help="more variants for the first loop preset only ('' for none; default regional,full:chunk4096)",
    )
    parser.add_argument("--loop-window", type=int, default=10, help="steps per measured window of the loop")
    parser.add_argument("--loop-windows", type=int, default=2, help="measured windows after the compiling one")
    parser.add_argument("--no-syncs", action="store_true", help="skip the host-sync count")
    parser.add_argument("--no-attention", action="store_true", help="skip the SDPA backend table")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny presets, no compile: the code path only")
    parser.add_argument("--zoo", action="store_true", help="the model zoo table (the compiled model, random tokens)")
    parser.add_argument("--presets", default=DEFAULT_PRESETS, help=f"--zoo/--leak presets (default {DEFAULT_PRESETS})")
    parser.add_argument("--compile-loss", action="store_true", help="--zoo: compile the loss with the model")
    parser.add_argument(
        "--check-moe", action="store_true", help="--zoo: first compare the grouped MoE path with the reference"
    )
    parser.add_argument("--fp8", action="store_true", help="only the fp8 table and the loss parity check")
    parser.add_argument("--leak", action="store_true", help="only the causal-leak checks and the random-token probe")
    parser.add_argument("--fp8-presets", default=FP8_PRESETS, help=f"presets of the fp8 table (default {FP8_PRESETS})")
    parser.add_argument("--fp8-min-dim", type=int, default=2048, help="linears with a smaller dim stay bf16")
    parser.add_argument("--parity-steps", type=int, default=60)
    args = parser.parse_args()
    if args.dry_run:
        dry_run(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU (--dry-run runs its code path on CPU)")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = device_peak_flops(torch.device("cuda"))
    shown = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | peak bf16 {shown}")
    if args.fp8:
        if args.steps == 30 and args.warmup == 8:  # 12 compiled runs must fit in ~8 minutes
            args.steps, args.warmup = 15, 4
        fp8_table(args.fp8_presets.split(","), args)
        loss_parity("llama-350m", "tensorwise", args.parity_steps, min_dim=1024)
        return
    if args.leak:
        leak_table(args.presets.split(","), args)
        return
    if args.zoo:
        zoo_table(args)
        return
    product_table(args, "cuda")
    if not args.no_syncs:
        host_syncs("cuda")
    if not args.no_attention:
        attention_table(args.loop_presets.split(","), args)
        flex_table(args)


def dry_run(args) -> None:
    """The product table's code on CPU: tiny presets, no compile, a few steps (tests run it).
    Options left at their GPU defaults get CPU-sized ones; options given are kept."""
    defaults = {"batch": 16, "seq": 1024, "steps": 30, "warmup": 8, "loop_window": 10, "loop_windows": 2}
    small = {"batch": 4, "seq": 64, "steps": 2, "warmup": 1, "loop_window": 2, "loop_windows": 1}
    for key, value in small.items():
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)
    if args.reference == REFERENCE:
        args.reference = "gpt2-tiny"
    if args.loop_presets == LOOP_PRESETS:
        args.loop_presets = "gpt2-tiny,llama-tiny"
    if args.loop_variants == "full":
        args.loop_variants = "none,none:chunk64"
    if args.first_variants == "regional,full:chunk4096":
        args.first_variants = ""
    print(f"dry run on CPU | torch {torch.__version__}", flush=True)
    product_table(args, "cpu")
    if not args.no_syncs:
        host_syncs("cpu")


def zoo_table(args) -> None:
    """Each of --presets compiled on random tokens, with the MFU ratio to the reference's run."""
    if args.check_moe:
        check_moe()
    names = [REFERENCE] + [n for n in args.presets.split(",") if n != REFERENCE]
    results = []
    for name in names:
        try:
            r = bench(name, args.steps, args.warmup, args.batch, args.seq, args.compile_loss)
        except Exception as e:  # one preset's failure should not hide the others' figures
            print(f"{name:>16}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            torch.cuda.empty_cache()
            continue
        torch.cuda.empty_cache()  # the preset's model and optimizer are gone with bench()'s frame
        results.append(r)
        ratio = r["mfu"] / results[0]["mfu"]
        print(
            f"{name:>16}: {r['params_m']:6.1f}M params ({r['active_m']:.1f}M active) {r['tok_s'] / 1e3:8.1f}K tok/s  "
            f"MFU {r['mfu']:6.1%}  peak {r['peak_gb']:5.1f} GB  MFU vs {results[0]['name']} {ratio:.2f}x  "
            f"(compile+warmup {r['compile_s']:.0f}s, loss {r['loss']:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
