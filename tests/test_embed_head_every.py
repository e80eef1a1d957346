"""The speedrun's accumulation for the embedding and head (optim.embed_head_every=N): they step
every N optimizer steps, on the mean of those steps' clipped gradients, while every other weight
steps every step; a skipped (non-finite) step leaves their sum alone; checkpoints fall on window
ends, so a resumed run is exact."""

import pytest
import torch
from test_step import backward, sparse_model
from test_train import tiny

from generalmodel.config import ConfigError, OptimConfig, load_config
from generalmodel.optim import build_optimizer
from generalmodel.train.loop import train
from generalmodel.train.step import NonFiniteGuard, optimizer_step


def test_embedding_and_head_step_every_n_on_the_mean_of_their_gradients():
    model = sparse_model()
    optimizer = build_optimizer(model, OptimConfig(embed_head_every=2, grad_clip=0.0))
    guard = NonFiniteGuard(3, torch.device("cpu"))
    embed, head, block = model.embed.weight, model.head.weight, model.blocks[1].attn.out_proj.weight
    seen, grads = [], []
    for step in range(4):
        backward(model, seed=step)
        grads.append(embed.grad.clone())
        before = [t.detach().clone() for t in (embed, head, block)]
        optimizer_step(model, optimizer, torch.tensor(1.0), 0.0, guard, step)
        seen.append([not torch.equal(b, t) for b, t in zip(before, (embed, head, block), strict=True)])
        if step % 2 == 0:  # held: the sum so far, and no gradient left for the optimizer
            assert torch.equal(optimizer.held_grads[embed], grads[-1]) and embed.grad is None
    assert seen == [[False, False, True], [True, True, True]] * 2
    assert not optimizer.held_grads  # nothing held at a window's end
    assert optimizer.state[embed]["step"] == 2 and optimizer.state[block]["step"] == 4


def test_a_skipped_step_leaves_the_held_sum_alone():
    model = sparse_model()
    optimizer = build_optimizer(model, OptimConfig(embed_head_every=3))
    guard = NonFiniteGuard(3, torch.device("cpu"))
    backward(model, seed=0)
    optimizer_step(model, optimizer, torch.tensor(1.0), 1.0, guard, 0)
    kept = optimizer.held_grads[model.embed.weight].clone()
    backward(model, seed=1)
    optimizer_step(model, optimizer, torch.tensor(float("nan")), 1.0, guard, 1)  # a non-finite loss: skipped
    assert torch.equal(optimizer.held_grads[model.embed.weight], kept)


def test_checkpoints_must_fall_on_window_ends():
    with pytest.raises(ConfigError, match=r"optim.embed_head_every=2 .* train.checkpoint_every=3 would save"):
        load_config(overrides={"optim.embed_head_every": 2, "train.checkpoint_every": 3})
    load_config(overrides={"optim.embed_head_every": 2, "train.checkpoint_every": 4})


def test_a_run_with_held_embedding_gradients_resumes_exactly(train_dataset, tmp_path):
    every = {"optim.embed_head_every": 2, "train.checkpoint_every": 4, "train.steps": 8}
    logged: list[dict] = []
    train(tiny(train_dataset, tmp_path / "a", **every), logged.append)
    losses = {m["step"]: m["loss"] for m in logged if "lr" in m}
    plain: list[dict] = []
    train(tiny(train_dataset, tmp_path / "plain", **{**every, "optim.embed_head_every": 1}), plain.append)
    assert {m["step"]: m["loss"] for m in plain if "lr" in m}[3] != losses[3]  # the switch acts
    with pytest.raises(RuntimeError, match="injected failure at step 6"):
        train(tiny(train_dataset, tmp_path / "b", **every, **{"train.fail_at_step": 6}), lambda m: None)
    resumed: list[dict] = []
    train(tiny(train_dataset, tmp_path / "b", **every), resumed.append)
    again = {m["step"]: m["loss"] for m in resumed if "lr" in m}
    assert min(again) == 5 and all(again[s] == losses[s] for s in again)
