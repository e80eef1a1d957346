"""benchmarks/learning_efficiency.py's arithmetic and recipes (the training itself is the loop's,
tested in test_train.py): tokens to reach a loss, interpolated on the val curve; every recipe and
switch builds a valid config at both settings; warmup scales with the run."""

import argparse
import math

import pytest

from benchmarks.learning_efficiency import RECIPES, SWITCHES, fractions, known, recipe_config, tokens_to_reach

CURVE = [(100, 6.0), (200, 5.0), (300, 4.5)]


def test_tokens_to_reach_interpolates_on_the_curve():
    assert tokens_to_reach(CURVE, 5.0) == 200
    assert tokens_to_reach(CURVE, 4.75) == 250
    assert tokens_to_reach(CURVE, 5.5) == 150
    assert tokens_to_reach(CURVE, 7.0) == 100  # already there at the first evaluation
    assert tokens_to_reach(CURVE, 4.0) == math.inf
    assert tokens_to_reach([(100, 6.0), (200, 6.5), (300, 5.0)], 5.75) == 250  # the first crossing


def test_fractions_pair_the_seeds():
    runs = {
        "reference": [{"curve": [(100, 7.0), (400, 5.0)]}, {"curve": [(100, 7.0), (400, 6.0)]}],
        "fast": [{"curve": [(100, 5.0), (400, 4.0)]}, {"curve": [(100, 7.0), (200, 6.0), (400, 5.5)]}],
    }
    assert fractions(runs, "fast", "reference") == [0.25, 0.5]
    assert fractions(runs, "reference", "reference") == [1.0, 1.0]


def args(gpu=False, steps=125):
    return argparse.Namespace(gpu=gpu, steps=steps, batch_size=16, eval_every=10, eval_batches=4, dataset="/d")


@pytest.mark.parametrize("gpu", [False, True])
def test_every_recipe_and_switch_is_a_valid_config(gpu, tmp_path):
    names = [*RECIPES, *(f"muon+{s}" for s in SWITCHES), "+".join(["muon", *SWITCHES])]
    for name in names:
        assert known(name)
        cfg = recipe_config(name, args(gpu), 0, str(tmp_path))
        assert cfg.model.d_model == (768 if gpu else 192) and cfg.train.steps == 125
    assert not known("muon+nope") and not known("nope")


def test_recipes_say_what_they_are(tmp_path):
    reference = recipe_config("reference", args(steps=600_000), 0, str(tmp_path))
    assert (reference.model.name, reference.model.positions, reference.optim.name) == ("gpt2", "learned", "adamw")
    assert reference.optim.lr == pytest.approx(6e-4 * 768 / 192) and reference.optim.warmup_steps == 2000
    adamw = recipe_config("adamw", args(steps=250), 0, str(tmp_path))
    assert (adamw.optim.name, adamw.optim.lr, adamw.optim.warmup_steps) == ("adamw", 3e-3, 15)  # 30 of 500 steps
    default = recipe_config("default", args(), 0, str(tmp_path))  # configs/llama-tiny.yaml as it is
    assert default.model.name == "llama" and default.train.steps == 125
    both = recipe_config("muon+qk+untied", args(), 0, str(tmp_path))
    assert both.model.qk_norm and not both.model.tie_embeddings and both.optim.name == "muon"


def test_the_window_warmup_switch_is_a_share_of_the_run(tmp_path):
    cfg = recipe_config("default+lsw", args(steps=200), 0, str(tmp_path))
    assert (cfg.model.window, cfg.model.global_every) == (128, 2)
    assert (cfg.train.window_warmup_steps, cfg.train.window_warmup_start) == (100, 32)
    assert recipe_config("default+ls", args(), 0, str(tmp_path)).train.window_warmup_steps == 0


def test_the_batch_warmup_switch_keeps_the_global_batch_in_four_micro_batches(tmp_path):
    cfg = recipe_config("default+bw", args(steps=200), 0, str(tmp_path))
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.batch_warmup_steps) == (4, 4, 100)
    assert recipe_config("default", args(), 0, str(tmp_path)).train.grad_accum == 1
