"""Grokfast (optim.grad_filter: ema): the optimizer steps on g + λ·EMA(g) with AdamW and with Muon, a
skipped step changes neither the weights nor the EMA, and the EMA is in the checkpoint: a run
resumes exactly."""

import copy

import pytest
import torch
from test_train import tiny

from generalmodel.config import load_config
from generalmodel.optim import build_optimizer
from generalmodel.optim.grokfast import KEY
from generalmodel.train.loop import train
from models import build_model

SIZE = {"model.vocab_size": 64, "model.max_seq_len": 16, "model.n_layers": 2, "model.n_heads": 2, "model.d_model": 16}


def model_and_config(name: str, lamb: float):
    cfg = load_config(overrides={**SIZE, "optim.name": name, "optim.grad_filter": "ema" if lamb else "none",
                                 "optim.grad_filter_lambda": lamb, "optim.grad_filter_alpha": 0.8,
                                 "optim.muon_ns_dtype": "float32"})  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def gradients(model, steps: int) -> list[list[torch.Tensor]]:
    torch.manual_seed(1)
    return [[torch.randn_like(p) for p in model.parameters()] for _ in range(steps)]


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_optimizer_steps_on_the_amplified_slow_gradient(name):
    model, cfg = model_and_config(name, lamb=2.0)
    plain_model, plain_cfg = model_and_config(name, lamb=0.0)
    opt, plain = build_optimizer(model, cfg.optim), build_optimizer(plain_model, plain_cfg.optim)
    ema = [torch.zeros_like(p) for p in model.parameters()]
    for grads in gradients(model, 3):
        for p, q, g, h in zip(model.parameters(), plain_model.parameters(), grads, ema, strict=True):
            h.mul_(0.8).add_(g, alpha=0.2)  # h <- a*h + (1 - a)*g, from 0
            p.grad, q.grad = g.clone(), g + 2.0 * h  # the reference gets the filtered gradient by hand
        opt.step()
        plain.step()
    for p, q, h in zip(model.parameters(), plain_model.parameters(), ema, strict=True):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        assert torch.allclose(opt.state[p][KEY], h, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_skipped_step_keeps_the_weights_and_the_average(name):
    model, cfg = model_and_config(name, lamb=2.0)
    opt = build_optimizer(model, cfg.optim)
    first, second = gradients(model, 2)
    for p, g in zip(model.parameters(), first, strict=True):
        p.grad = g
    opt.step()
    before = copy.deepcopy(model.state_dict())
    averages = [opt.state[p][KEY].clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), second, strict=True):
        p.grad = torch.full_like(g, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    for name_, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name_]), name_
    for p, h in zip(model.parameters(), averages, strict=True):
        assert torch.equal(opt.state[p][KEY], h)


def test_a_run_with_grokfast_resumes_exactly(train_dataset, tmp_path):
    extra = {"optim.grad_filter": "ema", "train.steps": 8, "train.eval_every": 8, "train.checkpoint_every": 4}
    logged: list[dict] = []
    train(tiny(train_dataset, tmp_path / "a", **extra), logged.append)
    losses = {m["step"]: m["loss"] for m in logged if "loss" in m}
    plain: list[dict] = []
    train(tiny(train_dataset, tmp_path / "plain", **{**extra, "optim.grad_filter": "none"}), plain.append)
    assert [m["loss"] for m in plain if m["step"] == 8] != [losses[8]]  # the filter changes the run
    with pytest.raises(RuntimeError, match="injected failure at step 6"):
        train(tiny(train_dataset, tmp_path / "b", **extra, **{"train.fail_at_step": 6}))
    resumed: list[dict] = []
    train(tiny(train_dataset, tmp_path / "b", **extra, **{"train.fail_at_step": 6}), resumed.append)
    again = {m["step"]: m["loss"] for m in resumed if "loss" in m}
    assert min(again) == 5 and all(loss == losses[step] for step, loss in again.items())  # bit-identical on CPU
