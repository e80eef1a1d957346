"""Loading exported models and sampling from them (`sampling`)."""

from generalmodel.infer.sampling import (
    SamplingParams,
    fetch,
    filter_logits,
    generate,
    load_model,
    sample_text,
)

__all__ = ["SamplingParams", "fetch", "filter_logits", "generate", "load_model", "sample_text"]
