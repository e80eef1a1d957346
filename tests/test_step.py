"""The optimizer step without host syncs (generalmodel.train.step): a non-finite step is skipped on
the device — no weight, no optimizer state, no step count and no MoE routing bias changes — and
the guard counts on the device, read only when the loop reads anything else."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from generalmodel.config import OptimConfig
from generalmodel.optim import build_optimizer
from generalmodel.train.step import HostReads, NonFiniteGuard, TrainingDiverged, optimizer_step
from models import build_model
from models.deepseek import DeepSeekConfig

VOCAB = 96


def sparse_model():
    """A memory-layer block and MoE blocks (MLA attention), untied head, fp32: every kind of parameter
    and of optimizer state (matrices, expert stacks, vectors, tables), and the routing biases."""
    torch.manual_seed(0)
    cfg = DeepSeekConfig(
        vocab_size=VOCAB,
        max_seq_len=16,
        n_layers=3,
        n_heads=2,
        d_model=32,
        moe_experts=4,
        moe_first_dense=1,
        moe_hidden=32,
        memory_layers=(0,),
        memory_keys=4,
        memory_top_k=2,
        memory_key_dim=8,
        moe_aux_loss_weight=0.01,
    )
    return build_model(cfg)


def backward(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, 16), generator=g)
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="sum")
    (loss / tokens[:, 1:].numel() + model.aux_loss()).backward()
    return loss.detach()


def snapshot(model, optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
    }


def assert_identical(a: dict, b: dict) -> None:
    for part in ("model", "buffers"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("poison", ["nan_grad", "inf_grad", "inf_loss"])
def test_a_non_finite_step_changes_no_weight_and_no_optimizer_state(name, poison):
    model = sparse_model()
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-2, muon_lr=0.02, weight_decay=0.1))
    guard = NonFiniteGuard(3, torch.device("cpu"))
    for step in range(2):  # momentum, moments and routing biases are not zero any more
        optimizer_step(model, optimizer, backward(model, step), 1.0, guard, step)
    before = snapshot(model, optimizer)
    assert before["buffers"]["blocks.1.mlp.expert_bias"].abs().sum() > 0

    loss = backward(model, 2)
    if poison == "inf_loss":  # a finite gradient, a non-finite loss sum
        loss = loss + float("inf")
    else:
        model.blocks[1].mlp.experts.w_up.grad[0, 0, 0] = float("nan" if poison == "nan_grad" else "inf")
    norm, _ = optimizer_step(model, optimizer, loss, 1.0, guard, 2)
    assert_identical(before, snapshot(model, optimizer))
    assert all(p.grad is None for p in model.parameters())  # the bad gradients are dropped
    assert guard.read() == 1 and (poison == "inf_loss") == bool(torch.isfinite(norm))

    optimizer_step(model, optimizer, backward(model, 3), 1.0, guard, 3)  # the next good step steps
    after = snapshot(model, optimizer)
    assert not torch.equal(after["model"]["blocks.1.mlp.experts.w_up"], before["model"]["blocks.1.mlp.experts.w_up"])
    steps = {float(s["step"]) for s in after["optimizer"]["state"].values() if "step" in s}
    assert steps == {3.0}  # two good steps, one skipped, one good: the skipped one is not counted
    assert guard.read() == 1


def test_the_guard_reads_late_and_names_the_step_where_the_run_diverged(caplog):
    guard = NonFiniteGuard(3, torch.device("cpu"))
    flags = [False, True, True, False, True, True, True, True, False]
    with HostReads() as reads:
        for step, bad in enumerate(flags[:6]):
            guard.record(step, torch.tensor(bad))
    assert reads.reads == []  # recording never reads a value back
    with caplog.at_level(logging.WARNING):
        assert guard.read() == 4
    assert "steps 1, 2, 4, 5: non-finite loss or gradient norm, skipped (2 in a row now, 4 in all)" in caplog.text
    for step, bad in enumerate(flags[6:], start=6):
        guard.record(step, torch.tensor(bad))
    # steps 4, 5, 6 are the third bad step in a row at step 6; step 8 was good, the run still failed
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row .*max_bad_steps=3\) at step 6"):
        guard.read()


def test_host_reads_are_counted():
    t = torch.ones(3)
    with HostReads() as reads:
        t.sum().item()
        float(t[0])
        bool(t.sum() > 0)
        t.tolist()
        t.cpu()  # a CPU tensor: no transfer, not a read
        torch.isfinite(t).all()  # stays a tensor
        on_device = torch.ones(3, device="meta")  # a tensor that is not on the host
        on_device.to(torch.float64)  # a cast: stays there
        with pytest.raises(NotImplementedError):  # a meta tensor has no values to copy out
            on_device.to("cpu")
    assert reads.reads == ["item", "__float__", "__bool__", "tolist", "to"]
