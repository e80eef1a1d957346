"""Sweep files: every YAML under sweeps/ parses and validates; bad input is an error naming it."""

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from generalmodel.tune.spec import SweepError, end_values, load_sweep, trial_config

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # sweep files name presets relative to the repo, as `make sweep` runs them


def test_there_are_sweeps():
    assert any(p.name == "lr-attention.yaml" for p in SWEEPS)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_validates(path):
    from generalmodel.tune.runner import param_space, search_algorithm

    sweep, base = load_sweep(path)
    assert sweep.name == path.stem
    assert sweep.search
    for key, dist in sweep.search.items():
        for value in end_values(dist):  # each end of each distribution builds a valid trial config
            cfg = trial_config(sweep, {key: value}, {})
            if key != "model.preset":
                node = cfg
                for part in key.split("."):  # a section's field, or an entry of a mapping field
                    node = node[part] if isinstance(node, dict) else getattr(node, part)
                assert node == (pytest.approx(value) if isinstance(value, float) else value)
    assert set(param_space(sweep)) == set(sweep.search)
    search_algorithm(sweep)
    assert base.train.steps > sweep.scheduler.grace_period


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


BASE = """
base:
  config: configs/tiny.yaml
  overrides: {model.preset: llama-tiny, model.vocab_size: 512, model.max_seq_len: 64, train.steps: 100}
scheduler: {grace_period: 10}
"""


def test_a_trial_needing_custom_resources_the_cluster_lacks_is_refused(tmp_path, ray_cluster):
    """The session cluster advertises learner: 2 (tests/conftest.py): two workers of {learner: 1}
    fit, three do not, and a resource it has none of is named."""
    from generalmodel.tune.runner import check_resources

    path = write(tmp_path, BASE + "search:\n  optim.lr: {grid: [0.01]}\n")
    fits = {"ray.worker_resources": {"learner": 1}, "resources.num_workers": 2, "resources.cpus_per_worker": 0.5}
    check_resources(*load_sweep(path, fits))
    with pytest.raises(
        SweepError,
        match=r"needs 3 of the Ray resource 'learner' \(ray.worker_resources: 3 workers x 1\) but the Ray cluster has",
    ):
        check_resources(*load_sweep(path, {**fits, "resources.num_workers": 3}))
    with pytest.raises(SweepError, match="needs 1 of the Ray resource 'a100' .* has 0"):
        check_resources(*load_sweep(path, {**fits, "ray.worker_resources": {"a100": 0.5}}))


def test_overrides_split_between_sweep_and_base(tmp_path):
    path = write(tmp_path, BASE + "search:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    sweep, base = load_sweep(
        path, {"num_samples": 3, "scheduler.grace_period": 20, "train.steps": 50, "tracking.experiment": "x"}
    )
    assert sweep.num_samples == 3 and sweep.scheduler.grace_period == 20
    assert base.train.steps == 50 and base.tracking.experiment == "x"
    assert base.data.vocab_size == 512  # from the preset file: trials get it as keys, not as a path
    cfg = trial_config(sweep, {"optim.lr": 0.002}, {"train.run_name": "t1"})
    assert cfg.optim.lr == 0.002 and cfg.train.run_name == "t1" and cfg.train.steps == 50


@pytest.mark.parametrize(
    "search, message",
    [
        ("optim.lrr: {uniform: [0.1, 0.2]}", "optim has no 'lrr'"),
        ("modle.n_layers: {choice: [2]}", "the config has no 'modle'"),
        ("optim.lr: {choice: []}", "choice needs a non-empty list"),
        ("optim.lr: {grid: []}", "grid needs a non-empty list"),
        ("optim.lr: {uniform: [0.01, 0.001]}", "lower bound 0.01 must be below the upper bound 0.001"),
        ("optim.lr: {loguniform: [0.01, 0.01]}", "lower bound 0.01 must be below"),
        ("optim.lr: {loguniform: [0.0, 0.01]}", "positive lower bound"),
        ("optim.lr: {normal: [0.0, 0.01]}", "unknown distribution 'normal'"),
        ("optim.lr: 0.01", "must be one {kind: args}"),
        ("optim.lr: {uniform: [0.0, 0.01]}", "search.optim.lr = 0.0 is not a valid value"),
        ("model.attention: {choice: [gqa, flash]}", "search.model.attention = 'flash' is not a valid value"),
        ("optim.schedule: {choice: [cosine, step]}", "search.optim.schedule = 'step'"),
        ("data.seq_len: {choice: [32, 64]}", "search.data.seq_len cannot be searched"),
        ("train.run_name: {choice: [a, b]}", "search.train.run_name cannot be searched"),
        ("model.preset: {choice: [llama-tiny, mla-tiny]}", "would be overridden by the base config's model."),
        ("model.n_layers: {randint: [2.5, 4]}", "randint needs integer bounds"),
    ],
)
def test_bad_search_space_is_an_error_naming_it(tmp_path, search, message):
    path = write(tmp_path, BASE + "search:\n  " + search + "\n")
    with pytest.raises(SweepError, match=None) as e:
        load_sweep(path)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("metric: val_accuracy", "'val_accuracy' is never reported by a trial; trials report val_loss, loss"),
        ("searcher: bayes", "searcher"),
        ("scheduler: {kind: asha, grace_period: 100}", "grace_period 100 must be below max_t 100"),
        ("num_samples: 0", "num_samples"),
        ("bogus: 1", "bogus: unknown option"),
        ("searcher: grid", "searcher 'grid' enumerates lists only; search.optim.lr is loguniform"),
    ],
)
def test_bad_sweep_options(tmp_path, extra, message):
    text = BASE.replace("scheduler: {grace_period: 10}\n", "") + "search:\n  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    if not extra.startswith("scheduler"):
        text += "scheduler: {grace_period: 10}\n"
    path = write(tmp_path, text + extra + "\n")
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert message in str(e.value), str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SweepError, match="does not exist; sweeps: .*sweeps/lr-attention.yaml"):
        load_sweep("sweeps/nope.yaml")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(write(tmp_path, "search: {a: [\n"))
    with pytest.raises(SweepError, match="search: Field required"):
        load_sweep(write(tmp_path, yaml.safe_dump({"num_samples": 2})))
    with pytest.raises(SweepError, match="base config: config preset 'configs/none.yaml' does not exist"):
        load_sweep(write(tmp_path, "base: {config: configs/none.yaml}\nsearch: {optim.lr: {choice: [0.1]}}\n"))


def test_grid_searcher_turns_choices_into_grids(tmp_path):
    from generalmodel.tune.runner import param_space

    path = write(
        tmp_path,
        BASE + "searcher: grid\nsearch:\n  optim.lr: {choice: [0.001, 0.01]}\n"
        "  optim.schedule: {grid: [cosine, wsd]}\n",
    )
    sweep, _ = load_sweep(path)
    space = param_space(sweep)
    assert space["optim.lr"] == {"grid_search": [0.001, 0.01]}
    assert space["optim.schedule"] == {"grid_search": ["cosine", "wsd"]}


@pytest.mark.parametrize("searcher", ["random", "grid"])
def test_max_concurrent_trials_reaches_the_variant_generator(tmp_path, searcher):
    """Tune ignores max_concurrent_trials for a BasicVariantGenerator passed in: all trials started
    at once, and ASHA's rungs were filled by whichever trial ran ahead."""
    from generalmodel.tune.runner import search_algorithm

    path = write(
        tmp_path,
        BASE + f"searcher: {searcher}\nmax_concurrent_trials: 2\nsearch:\n  optim.lr: {{choice: [0.001, 0.01]}}\n",
    )
    sweep, _ = load_sweep(path)
    assert search_algorithm(sweep).max_concurrent == 2


def test_planned_trials_count_every_grid_pass(tmp_path):
    """What an interrupted sweep still owes: trials Tune has not created yet count too."""
    from generalmodel.tune.runner import planned_trials

    grid = "  optim.lr: {grid: [0.001, 0.01, 0.1]}\n  optim.schedule: {grid: [cosine, wsd]}\n"
    assert planned_trials(load_sweep(write(tmp_path, BASE + f"num_samples: 2\nsearch:\n{grid}"))[0]) == 12
    sampled = "search:\n  optim.lr: {loguniform: [0.0001, 0.01]}\n"
    assert planned_trials(load_sweep(write(tmp_path, BASE + f"num_samples: 5\n{sampled}"))[0]) == 5
