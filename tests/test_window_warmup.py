"""The speedrun's window-size warmup (train.window_warmup_steps): the sliding-window layers' window
grows from the start to model.window in whole multiples of the start, global layers stay global,
the attention really narrows (the loss differs from the plain run), and a run resumes exactly
across a change of window."""

import pytest
import torch
from test_train import tiny

from generalmodel.config import load_config
from generalmodel.train.core import warm_window
from generalmodel.train.loop import train
from models import build_model
from models.attention import set_backend, set_local_windows

WARM = {
    "model.window": 16,
    "model.global_every": 2,
    "train.window_warmup_steps": 6,
    "train.window_warmup_start": 4,
    "train.steps": 9,
    "train.eval_every": 9,
}


def test_the_window_grows_in_multiples_of_the_start():
    cfg = load_config(overrides={"model.window": 16, "train.window_warmup_steps": 6, "train.window_warmup_start": 4})
    assert [warm_window(cfg, s) for s in range(9)] == [4, 8, 8, 12, 12, 16, 16, 16, 16]
    with pytest.raises(ValueError, match="the model has none: set model.window"):
        load_config(overrides={"train.window_warmup_steps": 6})


def test_only_the_local_layers_narrow():
    cfg = load_config(overrides={"model.window": 16, "model.global_every": 2, "model.n_layers": 4})
    model = build_model(cfg.model)
    windows = lambda: [b.attn.window for b in model.blocks]  # noqa: E731
    assert windows() == [16, None, 16, None]
    set_local_windows(model, 8)
    assert windows() == [8, None, 8, None]
    set_local_windows(model, 64)  # never wider than configured
    assert windows() == [16, None, 16, None]
    x = torch.randint(0, 100, (1, 40))
    set_local_windows(model, 4)
    narrow = model(x)
    set_local_windows(model, 16)
    assert not torch.allclose(narrow, model(x))  # the window is what attention uses
    set_backend(model, "flex", seq_len=40)  # flex: each window size gets its own block mask
    set_local_windows(model, 4)
    with torch.no_grad():  # flex has no CPU backward
        assert torch.allclose(model(x), narrow, atol=1e-5)
    set_backend(model, "auto")


def test_a_run_with_window_warmup_resumes_exactly(train_dataset, tmp_path):
    logged: list[dict] = []
    train(tiny(train_dataset, tmp_path / "a", **WARM), logged.append)
    losses = {m["step"]: m["loss"] for m in logged if "loss" in m}
    assert [m["attention_window"] for m in logged if "lr" in m] == [4, 8, 8, 12, 12, 16, 16, 16, 16]
    plain: list[dict] = []
    train(tiny(train_dataset, tmp_path / "plain", **{**WARM, "train.window_warmup_steps": 0}), plain.append)
    assert [m["loss"] for m in plain if m["step"] == 2] != [losses[2]]  # the narrow windows change the run
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        train(tiny(train_dataset, tmp_path / "b", **WARM, **{"train.fail_at_step": 4}))
    resumed: list[dict] = []
    train(tiny(train_dataset, tmp_path / "b", **WARM, **{"train.fail_at_step": 4}), resumed.append)
    again = {m["step"]: m["loss"] for m in resumed if "loss" in m}
    assert min(again) == 4 and all(loss == losses[step] for step, loss in again.items())  # bit-identical on CPU
