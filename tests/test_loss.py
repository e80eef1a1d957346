"""The loss from the last hidden states (models/loss.py): chunked == all at once, in fp32 and under
bf16 autocast, with the soft-cap and ignored targets; the model's forward(targets=) == the
cross-entropy of its logits; a chunk never holds more than chunk × vocab logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models.gpt2 import GPT2Config
from models.llama import LlamaConfig
from models.loss import IGNORE, linear_cross_entropy

N, D, V = 300, 64, 1000


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = IGNORE
    return x, w, y


def loss_and_grads(chunk, softcap, autocast=False):
    x, w, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(x, w, y, softcap, chunk)
    (loss * 0.5).backward()  # an upstream gradient other than 1
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("chunk", [64, 7, 1000])  # dividing or not, more than N
def test_chunked_equals_all_at_once(softcap, chunk):
    loss, gx, gw = loss_and_grads(0, softcap)
    x, w, y = inputs()
    expected = F.cross_entropy(
        (F.linear(x, w) if softcap is None else softcap * torch.tanh(F.linear(x, w) / softcap)),
        y,
        ignore_index=IGNORE,
        reduction="sum",
    )
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    c_loss, c_gx, c_gw = loss_and_grads(chunk, softcap)
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(c_gx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_gw, gw, rtol=1e-5, atol=1e-5)
    assert c_gx[::7].abs().sum() == 0 and c_gx[1::7].abs().min(dim=1).values.gt(0).all()  # ignored rows: none


@pytest.mark.parametrize("softcap", [None, 15.0])
def test_chunked_under_bf16_autocast_within_bf16_tolerance(softcap):
    loss, gx, gw = loss_and_grads(0, softcap, autocast=True)
    c_loss, c_gx, c_gw = loss_and_grads(64, softcap, autocast=True)
    torch.testing.assert_close(c_loss, loss, rtol=1e-4, atol=0)
    # the gradients of bf16 matmuls: one rounding of the whole sum vs per-chunk sums in fp32
    torch.testing.assert_close(c_gx, gx, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(c_gw, gw, rtol=2e-2, atol=2e-2)


def test_without_grad_only_the_loss_is_computed():
    """Evaluation (no_grad) makes no gradient: no (vocab, d) weight gradient is allocated."""
    x, w, y = inputs()  # no soft-cap: W/c would be a (vocab, d) tensor of its own
    with torch.no_grad(), LargestTensor() as made:
        loss = linear_cross_entropy(x, w, y, None, 64)
    torch.testing.assert_close(loss, linear_cross_entropy(x, w, y, None, 0).detach(), rtol=1e-6, atol=0)
    assert (V, D) not in made.shapes
    with LargestTensor() as made:
        linear_cross_entropy(x, w, y, None, 64)
    assert (V, D) in made.shapes  # with grad: the weight's gradient is made in the same pass


class LargestTensor(TorchDispatchMode):
    """Records the shape of every tensor an op makes, and the largest size."""

    def __init__(self):
        super().__init__()
        self.largest, self.shapes = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.add(tuple(t.shape))
        return out


def test_a_chunk_never_holds_more_than_chunk_times_vocab_logits():
    x, w, y = inputs()
    with LargestTensor() as all_at_once:
        linear_cross_entropy(x, w, y, 15.0, 0).backward()
    x, w, y = inputs()
    with LargestTensor() as chunked:
        linear_cross_entropy(x, w, y, 15.0, 32).backward()
    assert all_at_once.largest == N * V
    assert chunked.largest == max(32 * V, V * D)  # a chunk's logits, or the weight's gradient


@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig(vocab_size=V, max_seq_len=16, n_layers=2, n_heads=2, d_model=32, logit_softcap=10.0),
        GPT2Config(vocab_size=V, max_seq_len=16, n_layers=2, n_heads=2, d_model=32),  # tied head, biases
    ],
    ids=["llama-softcap-untied", "gpt2-tied"],
)
@pytest.mark.parametrize("chunk", [0, 24])
def test_the_models_loss_equals_the_cross_entropy_of_its_logits(cfg, chunk):
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, V, (3, 16))
    targets = tokens[:, 1:].clone()
    targets[0, :5] = IGNORE  # a chat row's prompt
    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(tokens[:, :-1], targets=targets, loss_chunk=chunk)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_chunked_loss_compiles():
    x, w, y = inputs()
    expected = linear_cross_entropy(x, w, y, 15.0, 0)
    compiled = torch.compile(lambda x, w, y: linear_cross_entropy(x, w, y, 15.0, 64))
    loss = compiled(x, w, y)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert x.grad is not None and w.grad is not None


def _vocab_parallel_rank(rank, port, out):
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (2,))
    for chunk in (0, 64):
        for softcap in (None, 15.0):
            x, w, y = inputs()
            split = torch.nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(0)]))
            loss = linear_cross_entropy(x, split, y, softcap, chunk)
            (loss * 0.5).backward()  # as loss_and_grads
            if rank == 0:
                out[(chunk, softcap)] = (loss.detach(), x.grad, split.grad.full_tensor())
            else:
                split.grad.full_tensor()  # a collective: both ranks take part
    dist.destroy_process_group()


def test_the_vocab_parallel_loss_equals_the_whole_one():
    """The head's weight split by vocabulary over 2 ranks (tensor parallel): each rank's part of the
    logits, combined by all-reduces, gives the loss and the gradients of the whole computation."""
    import torch.multiprocessing as mp
    from conftest import spawn_ranks

    from generalmodel.cluster import free_port

    out = mp.Manager().dict()
    spawn_ranks(_vocab_parallel_rank, (free_port(), out), 2)
    for (_, softcap), (loss, grad_x, grad_w) in out.items():  # chunked or not, against the whole one
        want_loss, want_x, want_w = loss_and_grads(0, softcap)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad_x, want_x, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_w, want_w, rtol=1e-4, atol=1e-6)
    assert len(out) == 4
