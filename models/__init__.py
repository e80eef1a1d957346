"""The model zoo: pure PyTorch, single-device models picked by name from a registry.

`decoder.py` assembles one decoder from interchangeable parts (`attention.py`, `moe.py`,
`common.py`); `gpt2.py`, `llama.py`, `deepseek.py` are its named defaults; `registry.py` maps
names to (config class, builder, FSDP2 sharding) and holds the presets.
"""

from models.registry import (
    PRESETS,
    REGISTRY,
    LanguageModel,
    ModelSpec,
    build_model,
    fsdp_decoder,
    get_spec,
)

__all__ = ["PRESETS", "REGISTRY", "LanguageModel", "ModelSpec", "build_model", "fsdp_decoder", "get_spec"]
