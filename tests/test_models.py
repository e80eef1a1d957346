"""Model registry, sequence limit, parameter and FLOP counts (numerics: test_model_zoo.py)."""

import pytest
import torch

from generalmodel.cli import parse_args
from generalmodel.config import ConfigError
from models import build_model, get_spec
from models.gpt2 import GPT2Config


def test_registry_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gpt3'; registered models: blt, deepseek, gpt2, llama, moeut"):
        get_spec("gpt3")
    with pytest.raises(ConfigError, match="unknown model 'gpt3'.*deepseek, gpt2, llama"):
        parse_args(["--model.name=gpt3"])


def test_sequence_longer_than_max_is_refused():
    model = build_model(GPT2Config(vocab_size=97, max_seq_len=40, n_layers=1, n_heads=2, d_model=16))
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_parameter_and_flop_counts():
    gpt2 = build_model(GPT2Config(vocab_size=50304, max_seq_len=1024, n_layers=12, n_heads=12, d_model=768))
    assert 123e6 < gpt2.num_params() < 125e6  # nanoGPT's 124M (tied embeddings counted once)
    n = gpt2.num_params(embeddings=False)
    assert gpt2.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
