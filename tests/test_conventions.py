"""Unit tests of the conventions every job and model follows: the init of every parameter kind,
the model protocol, the parallelization order, honest MFU, one run layout, one command line."""

import math

import pytest
import torch
from torch import nn

from generalmodel.cli import help_text, parse_args, split_args
from generalmodel.config import Config, ConfigError, load_config
from generalmodel.storage import RunLayout
from generalmodel.train.mfu import peak_flops
from generalmodel.train.parallelize import parallelize
from models import LanguageModel, build_model
from models.attention import GroupedQueryAttention, MultiHeadLatentAttention
from models.decoder import MLP, DecoderConfig
from models.deepseek import DeepSeekConfig
from models.llama import LlamaConfig
from models.memory import ProductKeyMemory, UltraMemory
from models.moe import MoE, SharedExperts
from models.moeut import MoEUTConfig, SwitchHeadAttention


def expected_stds(model, cfg: DecoderConfig) -> dict[str, float | None]:
    """Parameter name → intended std, derived from the module each parameter belongs to (None: not
    a normal init, checked by its module's own test — UltraMem's rank-one cores)."""
    std, residual = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    out = {"embed.weight": std}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, GroupedQueryAttention):
            out[prefix + "q_proj.weight"] = std
            if module.owns_kv:
                out[prefix + "k_proj.weight"] = out[prefix + "v_proj.weight"] = std
            out[prefix + "out_proj.weight"] = residual
            if module.memory is not None:  # the gate starts at 0 (tests/test_long_memory.py)
                out[prefix + "memory.gate"] = None
        elif isinstance(module, SwitchHeadAttention):
            for part in ("q_proj", "k_proj", "v_select", "o_select"):
                out[f"{prefix}{part}.weight"] = std
            out[prefix + "v_experts"], out[prefix + "o_experts"] = std, residual
        elif isinstance(module, MultiHeadLatentAttention):
            for part in ("q_down", "q_up", "q_proj", "kv_down", "kv_up"):
                if hasattr(module, part):
                    out[f"{prefix}{part}.weight"] = std
            out[prefix + "out_proj.weight"] = residual
        elif isinstance(module, MLP | SharedExperts):
            out[prefix + "up.weight"], out[prefix + "down.weight"] = std, residual
            if getattr(module, "gate", None) is not None:
                out[prefix + "gate.weight"] = std
        elif isinstance(module, MoE):
            out[prefix + "router.weight"], out[prefix + "experts.w_up"], out[prefix + "experts.w_down"] = (
                std,
                std,
                residual,
            )
        elif isinstance(module, ProductKeyMemory):
            out[prefix + "query.weight"], out[prefix + "values"] = std, residual
            out[prefix + "sub_keys"] = 1 / math.sqrt(module.key_dim // 2)
            if module.down is not None:
                out[prefix + "down"] = std
        elif isinstance(module, UltraMemory):
            out[prefix + "query.weight"], out[prefix + "expand"], out[prefix + "core"] = std, residual, None
            out[prefix + "sub_keys"] = 1 / math.sqrt(module.key_dim // 2)
            out[prefix + "values"] = 1 / math.sqrt(module.heads * module.top_k)
    if getattr(model, "mixer", None) is not None:  # Quiet-STaR: starts out trusting the thought-free prediction
        out["mixer.hidden.weight"], out["mixer.out.weight"], out["mixer.bias"] = std, None, None
    if not cfg.tie_embeddings:
        out["head.weight"] = std
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2),
        DeepSeekConfig(
            vocab_size=2048,
            d_model=256,
            n_layers=6,
            n_heads=4,
            q_lora_rank=128,
            kv_lora_rank=128,
            moe_experts=8,
            moe_hidden=256,
        ),
        LlamaConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, memory_layers=(1, 4), memory_kind="peer"),
        LlamaConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, memory_layers=(2,), memory_kind="ultramem"),
        LlamaConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, quiet_star_thoughts=4),
        LlamaConfig(
            vocab_size=2048, d_model=256, n_layers=6, n_heads=4, window=16, long_memory="knn", long_memory_layers=(2,)
        ),
        MoEUTConfig(vocab_size=2048, d_model=256, n_layers=6, n_heads=4, moe_hidden=256),
    ],
    ids=[
        "llama",
        "deepseek-mla-moe",
        "llama-peer-memory",
        "llama-ultramem",
        "llama-quiet-star",
        "llama-knn-memory",
        "moeut",
    ],
)
def test_every_parameter_kind_has_its_intended_std(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    expected = expected_stds(model, cfg)
    for name, p in model.named_parameters():
        if p.dim() < 2 and expected.get(name, 1) is not None:  # norms start at one
            assert torch.all(p == 1), name
            continue
        assert name in expected, f"{name}: no intended init for this parameter kind"
        if expected[name] is None:
            continue
        assert p.std().item() == pytest.approx(expected[name], rel=0.05), name
        assert abs(p.mean().item()) < 0.1 * expected[name], name


def test_registered_models_follow_the_protocol():
    model = build_model(LlamaConfig(vocab_size=300, max_seq_len=16, n_layers=2, n_heads=2, d_model=32))
    assert isinstance(model, LanguageModel)
    assert not isinstance(nn.Linear(2, 2), LanguageModel)


def test_activation_checkpointing_keeps_names_and_gradients():
    cfg = LlamaConfig(vocab_size=300, max_seq_len=16, n_layers=3, n_heads=2, d_model=32)
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    wrapped = build_model(cfg)
    parallelize(
        wrapped,
        Config().train.model_copy(update={"activation_checkpointing": "full"}),
        torch.device("cpu"),
    )
    assert type(wrapped.blocks[0]).__name__ == "CheckpointWrapper"
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # checkpoints and exports unchanged
    x = torch.randint(0, 300, (2, 16))
    for model in (plain, wrapped):
        model(x).float().square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
        ("NVIDIA H100", None),  # unknown variant: no guess
    ],
)
def test_peak_flops_by_card(name, peak):
    assert peak_flops(name) == peak


def test_run_layout_is_decided_once(tmp_path):
    cfg = load_config(
        None, {"storage.root": str(tmp_path), "data.source": "/data/my corpus.txt", "train.run_name": "r1"}
    )
    layout = RunLayout.of(cfg)
    assert layout.data_output == layout.dataset == f"{tmp_path}/datasets/my_corpus"
    assert layout.checkpoints == f"{tmp_path}/checkpoints/r1"
    assert layout.export == f"{tmp_path}/checkpoints/r1/export"
    given = RunLayout.of(
        load_config(
            None, {"storage.root": "s3://b/store", "train.dataset": "datasets/x", "train.checkpoint_dir": "s3://c/ckpt"}
        )
    )
    assert given.dataset == "s3://b/store/datasets/x" and given.checkpoints == "s3://c/ckpt"


def test_command_line_positional_flags_and_print_config(capsys):
    line = split_args(["up", "--workers=2", "--cpus_per_node", "3", "--verbose"], positional=("command",))
    assert line.overrides == {"command": "up", "workers": 2, "cpus_per_node": 3, "verbose": True}
    with pytest.raises(SystemExit) as e:
        parse_args(["--train.steps=7", "--storage.secret_access_key=hunter2", "--print-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "hunter2" not in out
    with pytest.raises(ConfigError, match="unexpected argument 'extra'"):
        split_args(["--a=1", "extra"])
    # a multi-line value (a prompt with paragraphs) stays as typed; YAML would fold "\n\n" to "\n"
    assert split_args(['--prompt=Q?\n\n"A passage."\n']).overrides == {"prompt": 'Q?\n\n"A passage."\n'}


def test_help_describes_every_model_field():
    text = help_text(Config)
    for name in DecoderConfig.__dataclass_fields__:
        line = next(i for i, ln in enumerate(text.splitlines()) if ln.startswith(f"  --model.{name} "))
        assert text.splitlines()[line + 1].startswith("      "), f"model.{name} has no description"


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "jobs.pretrain", "--print-config", "--train.steps=3"],
        ["-m", "jobs", "pretrain", "--print-config", "--train.steps=3"],
        ["jobs/pretrain.py", "--print-config", "--train.steps=3"],  # as `ray job submit -- python jobs/...` runs it
    ],
    ids=["module", "gm", "script"],
)
def test_every_way_to_start_a_job(argv):
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "steps: 3" in out.stdout


def test_a_user_error_is_a_message_and_exit_code_2():
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run(
        [sys.executable, "-m", "jobs.sample", "--sampling.top_p=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert (
        out.stderr.startswith("error: ")
        and "model: Field required" in out.stderr
        and "top_p = 2" in out.stderr
        and "Traceback" not in out.stderr
    )


@pytest.mark.parametrize(
    "error, code",
    [
        ("user", 2),
        ("run", 1),
        ("interrupt", 130),
    ],
)
def test_exit_codes(error, code, capsys):
    from generalmodel import RunFailed, UserError
    from generalmodel.cli import clean_exit

    raised = {"user": UserError("bad key"), "run": RunFailed("diverged"), "interrupt": KeyboardInterrupt()}[error]
    with pytest.raises(SystemExit) as e, clean_exit():
        raise raised
    assert e.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
