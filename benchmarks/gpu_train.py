"""Single-GPU training throughput, no Ray: the model zoo against the nanoGPT reference, and the
platform's own training loop on the GPU path.

    python -m benchmarks.gpu_train [--steps 30] [--presets gpt2-124m,llama-124m] [--loop-dataset DIR]

1. For each preset: torch.compile(model), bf16 autocast, fused AdamW, random tokens, B=16,
   T=1024 (the nanoGPT recipe for the reference `gpt2-124m`: 12 layers, 12 heads, d=768, vocab
   50304). Prints tokens/s, MFU (6·N + 12·L·d·T FLOPs per token against the card's dense bf16
   peak), peak memory, and the MFU ratio to the reference run in the same invocation.
2. With --loop-dataset: `generalmodel.train.loop.train` (the loop Ray Train runs) in this process
   on CUDA with per-block compile, on a prepared dataset: its reported tokens/s, MFU and losses.
3. With --leak: the causal-leak check (generalmodel/train/leak.py: later tokens and other rows
   change nothing before the cut) for --presets in every compile mode under bf16 autocast, then
   training on random tokens (--steps) with the loss in and out of the compiled graph, on one
   fixed batch (a model may memorise it) and on a fresh batch every step (no model can do better
   than ln(vocab) there: a loss well below it means the model sees the tokens it predicts).
       python -m benchmarks.gpu_train --leak --presets gpt2-124m,deepseek-124m     (~5 minutes)
4. With --fp8: for each of --fp8-presets, bf16 and each torchao recipe (tensorwise, rowwise,
   rowwise_with_gw_hp) through the platform's filter (generalmodel.train.fp8: head, routers and
   linears below --fp8-min-dim stay bf16), compiled: tokens/s, MFU against the bf16 peak, peak
   memory, the fp8/bf16 tokens/s ratio; then loss parity: a short run on the same data and seed in
   bf16 and in tensorwise fp8, and the largest loss difference against a stated tolerance.
       python -m benchmarks.gpu_train --fp8            (~6-8 minutes on one H100/H200)
Record the output with the card in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generalmodel.config import OptimConfig, load_config
from generalmodel.optim import build_optimizer
from generalmodel.train.fp8 import RECIPES, check_supported
from generalmodel.train.fp8 import convert as fp8_convert
from generalmodel.train.mfu import device_peak_flops
from models import PRESETS, build_model

DEFAULT_PRESETS = "gpt2-124m,llama-124m,llama-350m,deepseek-124m,memory-124m"
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
) -> dict:
    """Train `name` on random tokens: one fixed batch (the throughput runs), or with `fresh` a new
    batch every step (the leak probe)."""
    cfg = PRESETS[name]
    # Every run compiles the same code objects again: without a reset, dynamo's recompile limit (8)
    # is reached within the fp8 table and later runs fall back to eager without a word.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(cfg)
    flops_per_token = model.flops_per_token(seq)  # active parameters (MoE: top-k experts)
    peak = device_peak_flops(torch.device("cuda"))  # None (no MFU) on a card not in the table
    converted = fp8_convert(model, fp8, fp8_min_dim, fsdp=False) if fp8 != "none" else []
    model = model.cuda()
    optimizer = build_optimizer(model, OptimConfig(lr=6e-4), fused=True)

    def forward_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(inputs)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    # --compile-loss: the cross-entropy inside the compiled graph (as nanoGPT's forward does),
    # so the fp32 upcast of the (B·T × vocab) logits fuses with the softmax.
    compiled = torch.compile(forward_loss if compile_loss else model)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
    inputs, targets = x[:, :-1], x[:, 1:]
    torch.cuda.reset_peak_memory_stats()

    def step() -> torch.Tensor:
        nonlocal inputs, targets
        if fresh:
            x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda")
            inputs, targets = x[:, :-1], x[:, 1:]
        if compile_loss:
            loss = compiled(inputs, targets)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
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
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tok_s = batch * seq * steps / seconds
    result = {
        "name": name,
        "params_m": model.num_params() / 1e6,
        "active_m": model.num_params(active=True) / 1e6,
        "tok_s": tok_s,
        "mfu": tok_s * flops_per_token / peak if peak else float("nan"),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
        "compile_s": compile_s,
        "loss": loss.item(),
        "fp8_linears": len(converted),
    }
    return result


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


def run_loop(dataset: str, steps: int) -> None:
    from generalmodel.train.loop import train

    store = tempfile.mkdtemp(prefix="gm-gpu-loop-")
    cfg = load_config(
        Path(__file__).resolve().parent.parent / "configs/llama-tiny.yaml",
        {
            "train.dataset": str(Path(dataset).resolve()),
            "storage.root": store,
            "train.device": "cuda",
            "train.compile": "regional",
            "train.steps": steps,
            "train.log_every": 25,
            "train.eval_every": steps,
            "train.batch_size": 64,
            "train.checkpoint_every": steps,
            "train.run_name": "gpu-loop",
        },
    )
    print(f"\nplatform loop (generalmodel.train.loop.train), llama-tiny, batch 64, compile per block, {steps} steps:")
    t0 = time.perf_counter()

    def report(m):
        extra = f" val {m['val_loss']:.3f}" if "val_loss" in m else ""
        mfu = f" MFU {m['mfu']:.1%}" if "mfu" in m else ""
        stall = f" ckpt stall {m['checkpoint_stall_s']:.2f}s" if "checkpoint_stall_s" in m else ""
        print(
            f"  step {m['step']:>4} loss {m['loss']:.3f}{extra} {m.get('tokens_per_s', 0) / 1e3:8.1f}K tok/s{mfu}"
            f" peak {m.get('peak_memory_gb', 0):.2f} GB{stall}",
            flush=True,
        )

    train(cfg, report)
    print(f"  loop total {time.perf_counter() - t0:.1f}s (compile included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--presets", default=DEFAULT_PRESETS, help=f"from models.PRESETS (default {DEFAULT_PRESETS})")
    parser.add_argument("--compile-loss", action="store_true", help="compile the loss with the model")
    parser.add_argument(
        "--check-moe", action="store_true", help="first compare the grouped MoE path with the reference"
    )
    parser.add_argument("--loop-dataset", default=None, help="a prepared dataset dir for the platform-loop check")
    parser.add_argument("--loop-steps", type=int, default=200)
    parser.add_argument("--fp8", action="store_true", help="only the fp8 table and the loss parity check")
    parser.add_argument("--leak", action="store_true", help="only the causal-leak checks and the random-token probe")
    parser.add_argument("--fp8-presets", default=FP8_PRESETS, help=f"presets of the fp8 table (default {FP8_PRESETS})")
    parser.add_argument("--fp8-min-dim", type=int, default=2048, help="linears with a smaller dim stay bf16")
    parser.add_argument("--parity-steps", type=int, default=60)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = device_peak_flops(torch.device("cuda"))
    shown = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | compile loss: {args.compile_loss} | "
        f"peak bf16 {shown}"
    )
    if args.fp8:
        if args.steps == 30 and args.warmup == 8:  # 12 compiled runs must fit in ~8 minutes
            args.steps, args.warmup = 15, 4
        fp8_table(args.fp8_presets.split(","), args)
        loss_parity("llama-350m", "tensorwise", args.parity_steps, min_dim=1024)
        return
    if args.leak:
        leak_table(args.presets.split(","), args)
        return
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
    if args.loop_dataset:
        run_loop(args.loop_dataset, args.loop_steps)


if __name__ == "__main__":
    main()
