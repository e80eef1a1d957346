"""Single-GPU training throughput, no Ray: the model zoo against the nanoGPT reference, and the
platform's own training loop on the GPU path.

    python benchmarks/gpu_train.py [--steps 30] [--presets gpt2-124m,llama-124m] [--loop-dataset DIR]

1. For each preset: torch.compile(model), bf16 autocast, fused AdamW, random tokens, B=16,
   T=1024 (the nanoGPT recipe for the reference `gpt2-124m`: 12 layers, 12 heads, d=768, vocab
   50304). Prints tokens/s, MFU (6·N + 12·L·d·T FLOPs per token against the card's dense bf16
   peak), peak memory, and the MFU ratio to the reference run in the same invocation.
2. With --loop-dataset: `generalmodel.train.loop.train` (the loop Ray Train runs) in this process
   on CUDA with per-block compile, on a prepared dataset: its reported tokens/s, MFU and losses.
Record the output with the card in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from generalmodel.config import OptimConfig, load_config  # noqa: E402
from generalmodel.optim import build_optimizer  # noqa: E402
from generalmodel.train.loop import _peak_flops  # noqa: E402
from models import PRESETS, build_model  # noqa: E402

DEFAULT_PRESETS = "gpt2-124m,llama-124m,llama-350m,deepseek-124m"
REFERENCE = "gpt2-124m"


def bench(name: str, steps: int, warmup: int, batch: int, seq: int, compile_loss: bool = False) -> dict:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    flops_per_token = model.flops_per_token(seq)  # active parameters (MoE: top-k experts)
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
        "name": name, "params_m": model.num_params() / 1e6, "active_m": model.num_params(active=True) / 1e6,
        "tok_s": tok_s,
        "mfu": tok_s * flops_per_token / _peak_flops(torch.device("cuda")),
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30, "compile_s": compile_s, "loss": loss.item(),
    }
    return result


def check_moe() -> None:
    """The grouped path (torch._grouped_mm in bf16) against the per-expert reference loop."""
    from models.moe import MoE

    torch.manual_seed(0)
    moe = MoE(d_model=768, hidden=768, n_experts=16, top_k=2, n_shared=1).cuda()
    x = torch.randn(4, 512, 768, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        grouped, reference = moe(x).float(), moe.forward_reference(x).float()
    error = (grouped - reference).abs().max().item() / reference.abs().max().item()
    print(f"MoE grouped (torch._grouped_mm: {hasattr(torch, '_grouped_mm')}) vs reference, bf16: "
          f"max relative difference {error:.2e}", flush=True)


def run_loop(dataset: str, steps: int) -> None:
    from generalmodel.train.loop import train

    store = tempfile.mkdtemp(prefix="gm-gpu-loop-")
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/llama-tiny.yaml", {
        "train.dataset": str(Path(dataset).resolve()), "storage.root": store, "train.device": "cuda", "train.compile": True,
        "train.steps": steps, "train.log_every": 25, "train.eval_every": steps, "train.batch_size": 64,
        "train.checkpoint_every": steps, "train.run_name": "gpu-loop",
    })
    print(f"\nplatform loop (generalmodel.train.loop.train), llama-tiny, batch 64, compile per block, {steps} steps:")
    t0 = time.perf_counter()

    def report(m):
        extra = f" val {m['val_loss']:.3f}" if "val_loss" in m else ""
        mfu = f" MFU {m['mfu']:.1%}" if "mfu" in m else ""
        stall = f" ckpt stall {m['checkpoint_stall_s']:.2f}s" if "checkpoint_stall_s" in m else ""
        print(f"  step {m['step']:>4} loss {m['loss']:.3f}{extra} {m.get('tokens_per_s', 0) / 1e3:8.1f}K tok/s{mfu}"
              f" peak {m.get('peak_memory_gb', 0):.2f} GB{stall}", flush=True)

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
    parser.add_argument("--check-moe", action="store_true", help="first compare the grouped MoE path with the reference")
    parser.add_argument("--loop-dataset", default=None, help="a prepared dataset dir for the platform-loop check")
    parser.add_argument("--loop-steps", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | compile loss: {args.compile_loss} | peak bf16 {_peak_flops(torch.device('cuda')) / 1e12:.0f} TFLOP/s")
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
        print(f"{name:>16}: {r['params_m']:6.1f}M params ({r['active_m']:.1f}M active) {r['tok_s'] / 1e3:8.1f}K tok/s  "
              f"MFU {r['mfu']:6.1%}  peak {r['peak_gb']:5.1f} GB  MFU vs {results[0]['name']} {ratio:.2f}x  "
              f"(compile+warmup {r['compile_s']:.0f}s, loss {r['loss']:.2f})", flush=True)
    if args.loop_dataset:
        run_loop(args.loop_dataset, args.loop_steps)


if __name__ == "__main__":
    main()
