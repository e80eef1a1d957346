"""The transformers config of a GeneralModel export that no native transformers class reproduces.

Written into the export beside `modeling_generalmodel.py` and the zoo's own modules (remote code:
`AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`). `zoo_config` holds every
field of the model's `DecoderConfig` as it was trained; the usual transformers names are filled
from it for the tools that read them. Tested with transformers 5.25 and torch 2.13.
"""

from transformers import PretrainedConfig


class GeneralModelConfig(PretrainedConfig):
    model_type = "generalmodel"
    zoo_config: dict | None = None

    def __post_init__(self, **kwargs):
        fields = self.zoo_config or {}
        if fields:
            self.vocab_size = fields["vocab_size"]
            self.hidden_size = fields["d_model"]
            self.num_hidden_layers = fields["n_layers"]
            self.num_attention_heads = fields["n_heads"]
            self.max_position_embeddings = fields["max_seq_len"]
        # The decoder ties its head to its embedding itself (or not): transformers must not.
        self.tie_word_embeddings = False
        super().__post_init__(**kwargs)
