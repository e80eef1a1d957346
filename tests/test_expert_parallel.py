"""Expert parallelism (generalmodel/train/expert_parallel.py) on a 2-rank gloo mesh equals one
process running both ranks' tokens: the outputs, the input gradients, each rank's experts' gradients and
the router's (summed over ranks), in fp32 and in the bf16 grouped-GEMM path."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import spawn_ranks

from models.moe import MoE

E, D, HIDDEN, TOKENS = 8, 32, 32, 40


def layer() -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, HIDDEN, E, top_k=2, n_shared=1)
    with torch.no_grad():  # a skewed router: ranks send each other unequal numbers of rows
        moe.router.weight.add_(torch.randn_like(moe.router.weight) * 0.5)
    return moe


def inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(2, TOKENS // 2, D, generator=g), torch.randn(2, TOKENS // 2, D, generator=g)


def single_process(dtype):
    moe = layer()
    xs, gs = zip(*(inputs(r) for r in range(2)), strict=True)
    x = torch.cat(xs).requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        y = moe(x)
    (y.float() * torch.cat(gs)).sum().backward()
    return y.detach().float(), x.grad, moe.experts.w_up.grad, moe.experts.w_down.grad, moe.router.weight.grad


DTYPES = (torch.float32, torch.bfloat16)


def _worker(rank, port, out):
    from generalmodel.train.expert_parallel import apply_expert_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("expert",))
    for dtype in DTYPES:
        moe = layer()
        assert apply_expert_parallel(moe, mesh) == 1
        assert (
            moe.experts.w_up.shape[0] == E and moe.experts.w_up.to_local().shape[0] == E // 2
        )  # a DTensor: global shape
        x, g = inputs(rank)
        x.requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = moe(x)
        (y.float() * g).sum().backward()
        router = moe.router.weight.grad.clone()
        torch.distributed.all_reduce(router)
        up, down = moe.experts.w_up.grad.to_local(), moe.experts.w_down.grad.to_local()
        out[rank, str(dtype)] = (y.detach().float(), x.grad, up, down, router)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    spawn_ranks(_worker, (port, out), 2)
    return dict(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_two_ranks_of_experts_equal_one_process(two_ranks, dtype):
    y, x_grad, up, down, router = single_process(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    half = 2
    for rank in range(2):
        ry, rx, rup, rdown, rrouter = two_ranks[rank, str(dtype)]
        torch.testing.assert_close(ry, y[rank * half : (rank + 1) * half], **tol)
        torch.testing.assert_close(rx, x_grad[rank * half : (rank + 1) * half], **tol)
        torch.testing.assert_close(rup, up[rank * E // 2 : (rank + 1) * E // 2], **tol)
        torch.testing.assert_close(rdown, down[rank * E // 2 : (rank + 1) * E // 2], **tol)
        torch.testing.assert_close(rrouter, router, **tol)
