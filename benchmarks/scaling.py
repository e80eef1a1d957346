"""A scaling plan on paper, computed: for a model and a mesh on named hardware, the memory per
GPU, the bytes each collective moves per optimizer step on each mesh axis, and the predicted step
time with and without overlapping communication, and the per-GPU efficiency that follows.

    .venv/bin/python -m benchmarks.scaling                 # the table for docs/scaling.md
    .venv/bin/python -m benchmarks.scaling --check-gloo    # + the collective model vs gloo here
    .venv/bin/python -m benchmarks.scaling --hardware h200 --tokens-per-gpu 16384

The model (per GPU, per optimizer step, weak scaling: every GPU processes `tokens_per_gpu`):
- compute = FLOPs/token (the model's own count over its active parameters) x tokens / (peak x
  the MFU measured on one card, benchmarks/RESULTS.md: dense 42%, MoE 21%);
- FSDP2 on the `shard` axis (size s): the bf16 weights all-gathered twice (forward, and again in
  backward: reshard after forward) and the fp32 gradients reduce-scattered once, each moving
  (s-1)/s of the unit's bytes through every rank; HSDP adds an all-reduce of the gradient shard
  over the `replicate` axis (size r): 2(r-1)/r of its bytes;
- tensor parallel (t, inside a node): per layer, 2 all-gathers + 2 reduce-scatters of the
  sequence-parallel activations forward and as many backward, on the critical path; 1/t of the
  dense weights on each rank (as generalmodel/train/tensor_parallel.py splits them; the norms,
  left whole there, are too small to count; tensor parallel of MoE layers is on paper only);
- expert parallel (e): per MoE layer, the tokens' top-k copies sent out and back (all-to-all),
  forward and backward, on the critical path;
- a collective runs at the bandwidth of its slowest link: NVLink when the axis stays in a node,
  the per-GPU NIC when it crosses nodes. Overlapped: FSDP/HSDP traffic hides behind compute
  (FSDP2 prefetches), TP/EP traffic does not.
Hardware figures are the vendors' (below); they are peaks, so every time here is a floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from models import PRESETS, build_model

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense, per GPU
    fp8_flops: float
    hbm_bytes: float
    intra_node_bw: float  # NVLink, per GPU, one direction (bytes/s)
    inter_node_bw: float  # the GPU's NIC, one direction (bytes/s)
    source: str


HARDWARE = {
    "h100": Hardware(
        "H100 SXM5 (8 per node)", 989e12, 1979e12, 80e9, 450e9, 50e9,
        "NVIDIA H100 datasheet (dense BF16 989 TFLOP/s, FP8 1979, 80 GB HBM3, NVLink 900 GB/s "
        "bidirectional); DGX H100: one 400 Gb/s ConnectX-7 NDR NIC per GPU",
    ),
    "h200": Hardware(
        "H200 SXM (8 per node)", 989e12, 1979e12, 141e9, 450e9, 50e9,
        "NVIDIA H200 datasheet (same compute and NVLink as H100, 141 GB HBM3e); 400 Gb/s NIC per GPU",
    ),
}  # fmt: skip

# Measured MFU on one H200 (benchmarks/RESULTS.md, gpu_train.py --zoo --compile-loss, 2026-11-27).
MEASURED_MFU = {"dense": 0.423, "moe": 0.208}  # llama-350m; deepseek-124m (active parameters)


@dataclass(frozen=True)
class Mesh:
    name: str
    replicate: int
    shard: int
    tensor: int = 1
    expert: int = 1

    @property
    def world(self) -> int:
        return self.replicate * self.shard * self.tensor


def meshes(nodes: int, per_node: int, moe: bool) -> list[Mesh]:
    world = nodes * per_node
    out = [Mesh("FSDP", 1, world)] + ([Mesh("HSDP", nodes, per_node)] if nodes > 1 else [])
    out.append(Mesh("HSDP+TP2", nodes, per_node // 2, tensor=2))
    if moe:
        out.append(Mesh(f"HSDP+EP{per_node}", nodes, per_node, expert=per_node))
    return out


@dataclass
class ModelShape:
    name: str
    params: int
    expert_params: int
    active_params: int
    flops_per_token: int
    n_layers: int
    moe_layers: int
    d_model: int
    top_k: int
    largest_block: int
    moe: bool


def shape_of(preset: str, seq_len: int) -> ModelShape:
    cfg = dataclasses.replace(PRESETS[preset], max_seq_len=max(seq_len, PRESETS[preset].max_seq_len))
    with torch.device("meta"):
        model = build_model(cfg)
    moe_layers = list(model.moe_layers())
    experts = sum(m.experts.w_up.numel() + m.experts.w_down.numel() for m in moe_layers)
    return ModelShape(
        preset,
        model.num_params(),
        experts,
        model.num_params(active=True),
        model.flops_per_token(seq_len),
        cfg.n_layers,
        len(moe_layers),
        cfg.d_model,
        cfg.moe_top_k,
        max(sum(p.numel() for p in b.parameters()) for b in model.blocks),
        bool(moe_layers),
    )


def ring(n: int) -> float:
    """The fraction of a buffer each rank sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n if n > 1 else 0.0


def axis_bw(hw: Hardware, span_gpus: int, per_node: int) -> float:
    """A collective over ranks spanning `span_gpus` consecutive GPUs runs at its slowest link."""
    return hw.intra_node_bw if span_gpus <= per_node else hw.inter_node_bw


@dataclass
class Plan:
    model: str
    nodes: int
    mesh: str
    memory_gb: dict[str, float]  # by activation checkpointing: none, full
    bytes_by_axis: dict[str, float]
    compute_s: float
    comm_s: dict[str, float]
    step_s: float
    step_overlap_s: float

    @property
    def efficiency(self) -> float:
        return self.compute_s / self.step_overlap_s


def plan(m: ModelShape, mesh: Mesh, hw: Hardware, nodes: int, per_node: int, tokens: int) -> Plan:
    dense = m.params - m.expert_params
    expert_shard = mesh.expert if mesh.expert > 1 else mesh.shard  # experts: over EP, else FSDP like the rest
    on_shard_axis = dense / mesh.tensor + (m.expert_params if mesh.expert == 1 else 0) / mesh.tensor
    # Memory: fp32 weights + fp32 gradients + AdamW's two fp32 moments (16 B/parameter) over the
    # shard group (and TP), experts over their own axis; 2 all-gathered bf16 blocks; activations
    # 34·d bytes per token and layer in bf16 (Korthikanti et al.); with full activation
    # checkpointing 2·d (the block inputs) plus one layer's 34·d while it is recomputed; a TP
    # group's tokens split over its ranks (sequence parallel), so the per-GPU figure is unchanged.
    held = 16 * (dense / (mesh.shard * mesh.tensor) + m.expert_params / (expert_shard * mesh.tensor))
    gathered = 2 * 2 * m.largest_block / mesh.tensor if mesh.shard > 1 else 0
    per_layer = m.d_model * tokens  # bytes per layer of one bf16 value per token and channel
    activations = {"none": 34 * per_layer * m.n_layers, "full": 2 * per_layer * m.n_layers + 34 * per_layer}
    memory = {ac: held + gathered + a for ac, a in activations.items()}
    # Bytes each GPU sends per step, by axis.
    dp_tokens = tokens * mesh.tensor  # a TP group shares its data-parallel rank's batch
    by_axis = {
        "shard (FSDP all-gather x2, reduce-scatter)": ring(mesh.shard) * on_shard_axis * (2 * 2 + 4),
        "replicate (HSDP all-reduce)": 2 * ring(mesh.replicate) * 4 * on_shard_axis / mesh.shard,
        "tensor (SP all-gather/reduce-scatter)": 8 * ring(mesh.tensor) * dp_tokens * m.d_model * 2 * m.n_layers,
        "expert (all-to-all)": 4 * ring(mesh.expert) * tokens * m.top_k * m.d_model * 2 * m.moe_layers,
    }
    if mesh.expert > 1 and mesh.replicate > 1:  # expert gradients all-reduced across the replicas holding them
        by_axis["replicate (HSDP all-reduce)"] += 2 * ring(mesh.replicate) * 4 * m.expert_params / mesh.expert
    span = {  # consecutive GPUs each axis's group spans (the mesh is laid out tensor fastest)
        "shard (FSDP all-gather x2, reduce-scatter)": mesh.shard * mesh.tensor,
        "replicate (HSDP all-reduce)": mesh.world,
        "tensor (SP all-gather/reduce-scatter)": mesh.tensor,
        "expert (all-to-all)": mesh.expert,
    }
    comm = {axis: b / axis_bw(hw, span[axis], per_node) for axis, b in by_axis.items()}
    mfu = MEASURED_MFU["moe" if m.moe else "dense"]
    compute = m.flops_per_token * tokens / (hw.bf16_flops * mfu)
    hidden = comm["shard (FSDP all-gather x2, reduce-scatter)"] + comm["replicate (HSDP all-reduce)"]
    exposed = comm["tensor (SP all-gather/reduce-scatter)"] + comm["expert (all-to-all)"]
    return Plan(
        m.name, nodes, mesh.name, {ac: b / GB for ac, b in memory.items()}, by_axis, compute, comm,
        compute + hidden + exposed, max(compute, hidden) + exposed,
    )  # fmt: skip


def table(presets: list[str], node_counts: list[int], hw: Hardware, per_node: int, tokens: int, seq_len: int) -> str:
    rows = [
        "| model | nodes × GPUs | mesh | memory/GPU (GB), no AC · full AC "
        "| GB sent/GPU/step: shard · replicate · tensor · expert | compute (ms) "
        "| step, no overlap (ms) | step, overlap (ms) | per-GPU efficiency (vs one card) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in presets:
        m = shape_of(preset, seq_len)
        for nodes in node_counts:
            for mesh in meshes(nodes, per_node, m.moe):
                p = plan(m, mesh, hw, nodes, per_node, tokens)
                memory = " · ".join(f"{gb:.1f}{'' if gb <= hw.hbm_bytes / GB else ' ✗'}" for gb in p.memory_gb.values())
                sent = " · ".join(f"{b / GB:.2f}" for b in p.bytes_by_axis.values())
                rows.append(
                    f"| {preset} ({m.params / 1e9:.2f}B) | {nodes} × {per_node} | {mesh.name} | "
                    f"{memory} | {sent} | {p.compute_s * 1e3:.0f} | {p.step_s * 1e3:.0f} | "
                    f"{p.step_overlap_s * 1e3:.0f} | {p.efficiency:.0%} |"
                )
    return "\n".join(rows)


# -- checking the model where it can be checked --------------------------------------------------


def _gloo_rank(rank: int, world: int, port: int, sizes: list[int], out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for n in sizes:
        x, full, shard = torch.ones(n), torch.empty(n * world), torch.empty(n)
        calls = {
            "all_reduce": (dist.all_reduce, (x,)),
            "all_gather": (dist.all_gather_into_tensor, (full, x)),
            "reduce_scatter": (dist.reduce_scatter_tensor, (shard, full)),
        }
        for kind, (fn, args) in calls.items():
            fn(*args)  # warm
            dist.barrier()
            start = time.perf_counter()
            for _ in range(5):
                fn(*args)
            dist.barrier()
            if rank == 0:
                out[(kind, n)] = (time.perf_counter() - start) / 5
    dist.destroy_process_group()


def check_gloo(world: int = 2) -> str:
    """Fit the α-β model (latency + bytes/bandwidth, with the ring factors above) to gloo's
    all-reduce on this machine, then predict all-gather and reduce-scatter: the error of the
    collective model's structure (not of the datasheet bandwidths, which a CPU box cannot check)."""
    import torch.multiprocessing as mp

    from generalmodel.cluster import free_port

    sizes = [2**18, 2**20, 2**22, 2**23]  # fp32 elements: 1 MB ... 32 MB
    out = mp.Manager().dict()
    mp.spawn(_gloo_rank, args=(world, free_port(), sizes, out), nprocs=world, join=True)
    # all-reduce moves 2(w-1)/w of the buffer: fit t = α + β·bytes on it.
    xs = [2 * ring(world) * 4 * n for n in sizes]
    ys = [out[("all_reduce", n)] for n in sizes]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    beta = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)
    alpha = max(mean_y - beta * mean_x, 0.0)
    lines = [
        f"gloo, {world} processes on this machine: all-reduce fit α={alpha * 1e6:.0f} µs, "
        f"bandwidth {1 / beta / GB:.2f} GB/s",
        "| collective | elements/rank | measured (ms) | predicted (ms) | error |",
        "|---|---|---|---|---|",
    ]
    errors = []
    for kind, moved in (
        ("all_gather", lambda n: ring(world) * 4 * n * world),
        ("reduce_scatter", lambda n: ring(world) * 4 * n * world),
    ):
        for n in sizes:
            measured, predicted = out[(kind, n)], alpha + beta * moved(n)
            errors.append(abs(predicted - measured) / measured)
            lines.append(
                f"| {kind} | {n:,} | {measured * 1e3:.2f} | {predicted * 1e3:.2f} | {predicted / measured - 1:+.0%} |"
            )
    lines.append(
        f"mean absolute error of the predicted all-gather/reduce-scatter times: {sum(errors) / len(errors):.0%}"
    )
    return "\n".join(lines)


def check_compute(hw: Hardware) -> str:
    """The compute model's MFU assumption (dense: llama-350m's measured 42.3%) predicting another
    measured dense row: llama-124m, 459.1K tok/s on one H200 (RESULTS.md, --zoo, T=1024)."""
    m = shape_of("llama-124m", 1024)
    predicted = hw.bf16_flops * MEASURED_MFU["dense"] / m.flops_per_token
    measured = 459.1e3
    return (
        f"compute model: llama-124m predicted {predicted / 1e3:.0f}K tok/s from llama-350m's MFU, measured "
        f"{measured / 1e3:.0f}K on one H200: error {predicted / measured - 1:+.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h100")
    parser.add_argument("--presets", default="gpt2-124m,llama-1.3b,llama-8b,deepseek-16b")
    parser.add_argument("--nodes", default="1,2,8,32")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tokens-per-gpu", type=int, default=16384, help="per optimizer step (weak scaling)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--check-gloo", action="store_true", help="time gloo collectives here against the model")
    args = parser.parse_args()
    hw = HARDWARE[args.hardware]
    print(f"hardware: {hw.name}; {hw.source}")
    print(f"{args.tokens_per_gpu} tokens per GPU per step, rows of {args.seq_len}; ✗: over {hw.hbm_bytes / GB:.0f} GB")
    print(table(args.presets.split(","), [int(n) for n in args.nodes.split(",")], hw, args.gpus_per_node,
                args.tokens_per_gpu, args.seq_len))  # fmt: skip
    print(check_compute(hw))
    if args.check_gloo:
        print(check_gloo())


if __name__ == "__main__":
    main()
