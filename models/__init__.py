"""The model zoo: a registry of names → (config class, builder, parallelize function).

Pure PyTorch, single-device model code; `parallelize` applies FSDP2 from outside the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models.decoder import Decoder, DecoderConfig
from models.gpt2 import GPT2Config
from models.llama import LlamaConfig


def fsdp_decoder(model: Decoder, mesh=None, mp_policy=None) -> Decoder:
    """FSDP2: shard each block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@dataclass(frozen=True)
class ModelSpec:
    config_cls: type[DecoderConfig]
    build: Callable[[DecoderConfig], nn.Module]
    parallelize: Callable[..., nn.Module]


REGISTRY: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(GPT2Config, Decoder, fsdp_decoder),
    "llama": ModelSpec(LlamaConfig, Decoder, fsdp_decoder),
}


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build_model(cfg: DecoderConfig) -> nn.Module:
    return get_spec(cfg.name).build(cfg)
