"""The config tree: presets, dotted overrides, errors that name the key, --help."""

from pathlib import Path

import pytest

from generalmodel.cli import help_text, parse_args
from generalmodel.config import Config, ConfigError, field_types, load_config, section_class

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_embedded_default():
    cfg = parse_args([])
    assert cfg.data.source == "sotu"
    assert cfg.storage.root == ".generalmodel/store"


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_preset_validates(preset):
    assert isinstance(load_config(preset), Config)


def test_preset_then_overrides_in_both_spellings(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  seq_len: 128\n  vocab_size: 1000\n")
    cfg = parse_args(["--config", str(preset), "--data.seq_len=512", "--data.val_fraction", "0.1", "--data.overwrite"])
    assert cfg.data.seq_len == 512  # the override wins over the preset
    assert cfg.data.vocab_size == 1000  # the preset wins over the default
    assert cfg.data.val_fraction == 0.1
    assert cfg.data.overwrite is True


def test_unknown_override_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        parse_args(["--data.seqlen=5"])
    assert "'data.seqlen'" in str(e.value) and "data.seq_len" in str(e.value)
    with pytest.raises(
        ConfigError, match="'dta.seq_len'.*valid keys: data, model, optim, train, storage, ray, parallel, tracking"
    ):
        parse_args(["--dta.seq_len=5"])


def test_unknown_key_in_a_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("data:\n  vocab: 1000\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.vocab'.*data.vocab_size"):
        load_config(preset)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--data.seq_len=0", "data.seq_len = 0: Input should be greater than 0"),
        ("--data.seq_len=-3", "data.seq_len = -3"),
        ("--data.vocab_size=200", "data.vocab_size = 200: Value error, must be at least 263"),
        ("--data.val_fraction=1.5", "data.val_fraction = 1.5"),
        ("--data.seq_len=abc", "data.seq_len = 'abc'"),
        ("--tracking.uri=file:///tmp/mlruns", "MLflow 3 retired the file store"),
        ("--tracking.uri=mlruns", "give http(s)://HOST:PORT (a tracking server) or sqlite:///"),
    ],
)
def test_invalid_values_name_key_value_and_rule(override, fragment):
    with pytest.raises(ConfigError) as e:
        parse_args([override])
    assert fragment in str(e.value)


def test_missing_preset_lists_presets():
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args(["--config", "configs/nope.yaml"])


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for section, annotation in field_types(Config).items():
        for name in field_types(section_class(annotation)):
            assert f"--{section}.{name} " in out
    assert out == help_text(Config) + "\n"


def test_secrets_are_masked_when_dumped():
    cfg = parse_args(["--storage.secret_access_key=hunter2"])
    assert "hunter2" not in str(cfg.model_dump(mode="json"))
    assert "hunter2" not in repr(cfg)
    assert cfg.storage.secret_access_key.get_secret_value() == "hunter2"


def test_a_check_across_the_whole_config_is_one_plain_line():
    from jobs.eval import EvalConfig

    with pytest.raises(ConfigError) as e:
        load_config(overrides={"models": "models:/x/1"}, cls=EvalConfig)
    assert (
        str(e.value).splitlines()[1].strip()
        == "nothing to evaluate: give --dataset, --corpus, --tasks, --problems or --harness_tasks"
    )
