"""Model registry and numerics: KV-cache decoding == full forward, config errors."""

import pytest
import torch

from generalmodel.config import ConfigError, parse_args
from models import build_model, get_spec
from models.common import KVCache
from models.gpt2 import GPT2Config
from models.llama import LlamaConfig

CASES = {
    "gpt2": GPT2Config(vocab_size=97, max_seq_len=40, n_layers=2, n_heads=4, d_model=32),
    "llama-mha": LlamaConfig(vocab_size=97, max_seq_len=40, n_layers=2, n_heads=4, d_model=32),
    "llama-gqa": LlamaConfig(vocab_size=97, max_seq_len=40, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32),
    "llama-mqa-tied": LlamaConfig(vocab_size=97, max_seq_len=40, n_layers=2, n_heads=4, n_kv_heads=1, d_model=32,
                                  tie_embeddings=True),
}


@pytest.mark.parametrize("name", CASES)
def test_kv_cache_decoding_reproduces_full_forward_logits(name):
    torch.manual_seed(0)
    model = build_model(CASES[name]).eval()
    idx = torch.randint(0, 97, (3, 30))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg.n_layers)
        steps = [model(idx[:, :11], cache)] + [model(idx[:, t : t + 1], cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.keys[0].shape == (3, model.cfg.kv_heads, 30, model.cfg.head_dim)


def test_registry_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'gpt3'; registered models: deepseek, gpt2, llama"):
        get_spec("gpt3")
    with pytest.raises(ConfigError, match="unknown model 'gpt3'.*deepseek, gpt2, llama"):
        parse_args(["--model.name=gpt3"])


def test_sequence_longer_than_max_is_refused():
    model = build_model(CASES["gpt2"])
    with pytest.raises(ValueError, match="exceeds max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_parameter_and_flop_counts():
    gpt2 = build_model(GPT2Config(vocab_size=50304, max_seq_len=1024, n_layers=12, n_heads=12, d_model=768))
    assert 123e6 < gpt2.num_params() < 125e6  # nanoGPT's 124M (tied embeddings counted once)
    n = gpt2.num_params(embeddings=False)
    assert gpt2.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024
