"""Models after training: the native export and loading it (`export`), batched decoding with
continuous batching and the sampling parameters (`engine`), sampling (`sampling`), torchao
quantization (`quant`)."""

from generalmodel.infer.engine import Engine, Request, SamplingParams, filter_logits
from generalmodel.infer.export import export_files, load_model, load_state, read_export
from generalmodel.infer.sampling import generate, sample_chat, sample_text

__all__ = [
    "Engine",
    "Request",
    "SamplingParams",
    "export_files",
    "filter_logits",
    "generate",
    "load_model",
    "load_state",
    "read_export",
    "sample_chat",
    "sample_text",
]
