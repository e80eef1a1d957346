"""A GeneralModel decoder as a transformers causal LM (remote code, written into the export).

The model is the zoo's own `Decoder` (`decoder.py` and the modules beside it are the platform's
`models/` files, copied flat at export time): no second implementation to keep in sync. Generation
keeps the zoo's KV cache (`cache.py`: sliding-window rings, cross-layer sharing, MLA latents) as
`past_key_values`; each step feeds only the tokens the cache has not seen. Rows must be unpadded
(one prompt, or prompts of one length). Tested with transformers 5.25 and torch 2.13.
"""

import dataclasses

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import KVCache
from .configuration_generalmodel import GeneralModelConfig
from .decoder import Decoder, DecoderConfig
from .moeut import MoEUT, MoEUTConfig

# transformers 5.x names the cache `cache` (`past_key_values` before, still accepted with a warning).
CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


# The families with a model class of their own (the others are the plain Decoder's defaults).
FAMILIES = {"moeut": (MoEUTConfig, MoEUT)}


def build_decoder(fields: dict) -> Decoder:
    config_cls, model_cls = FAMILIES.get(fields.get("name"), (DecoderConfig, Decoder))
    return model_cls(config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}))


class GeneralModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GeneralModelConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: GeneralModelConfig):
        super().__init__(config)
        self.model = build_decoder(config.zoo_config)
        self.post_init()

    def _init_weights(self, module):
        """Loading overwrites the weights; the RoPE tables (buffers, not saved) are computed again."""
        if isinstance(module, Decoder) and module.cfg.positions == "rope":
            module.reset_rope()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the zoo's KVCache, made by the first forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: KVCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded rows are not supported: pass one prompt, or prompts of one length")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = KVCache(self.model, input_ids.shape[0])
        if cache is not None:
            cache.reserve(input_ids.shape[1])
        logits = self.model(input_ids, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, use_cache=True, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:  # only the tokens the cache has not seen
            input_ids = input_ids[:, cache.host_lengths[0] :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache, CACHE: cache}
