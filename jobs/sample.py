"""Sample text from a trained model, streamed to the terminal.

python -m jobs.sample --model=models:/llama-tiny/1 --prompt="Fellow citizens"
python -m jobs.sample --model=models:/llama-tiny@champion --sampling.temperature=0.7 --sampling.top_p=0.9
python -m jobs.sample --model=runs:/<run_id> | --model=.generalmodel/store/checkpoints/llama-tiny/export
python -m jobs.sample --model=... --prompt='["Fellow citizens", "In the year"]'   # several prompts
python -m jobs.sample --model=models:/llama-tiny-sft/1 --chat --prompt="Which president said: ..."
python -m jobs.sample --model=models:/llama-tiny/1 --quant=int8-weight      # torchao (see --help)
python -m jobs.sample --model=models:/llama-tiny/1 --chat --prompt="What is 3 plus 4?" \
    --experts='[models:/llama-tiny-qa-svf/1, models:/llama-tiny-arith-svf/1]'   # Transformer²'s two passes
python -m jobs.sample --model=models:/llama-tiny-rag/1 --chat --index=.generalmodel/indexes/sotu-qa \
    --prompt='Which president delivered this passage of a State of the Union address? "..."'  # retrieval
"""

from __future__ import annotations

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section, StorageConfig, Strings, TrackingConfig
from generalmodel.errors import UserError
from generalmodel.infer import SamplingParams, load_model, sample_chat, sample_text
from generalmodel.infer.experts import Mix
from generalmodel.infer.quant import Quant, check_quant
from generalmodel.retrieval import context, open_index
from generalmodel.tracking import tracking_uri
from generalmodel.tracking.registry import download_model, load_experts


class SampleConfig(Section):
    """What to sample from, and how."""

    model: str = Field(..., description="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID or an export URI.")
    prompt: Strings = Field([""], description="A prompt, or a YAML list of prompts.")
    chat: bool = Field(
        False, description="Each prompt is a user's message, answered in the chat format (an SFT/DPO model)."
    )
    system: str | None = Field(None, description="chat: a system message before each prompt.")
    quant: Quant = Field(
        "none", description="torchao quantization: int8-weight, int8-dynamic; on a CUDA card also fp8-*, int4-weight."
    )
    device: str = Field("cpu", description="cpu or cuda.")
    experts: Strings = Field(
        [],
        description="SVF adapters of --model (versions trained with train.adapter=svf): each prompt is scored "
        "under each expert first, then answered with the base adapted by their mix (docs/adapters.md).",
    )
    experts_mix: Mix = Field("top1", description="experts: top1 (the expert the prompt is likeliest under) or softmax.")
    experts_temperature: float = Field(0.1, gt=0, description="experts_mix=softmax: softmax(-prompt loss / this).")
    index: str | None = Field(
        None,
        description="chat: a retrieval index (python -m jobs.index): each prompt's best passages go in a system "
        "turn before it, as the served API's `retrieval` option does (docs/retrieval.md).",
    )
    retrieval_k: int = Field(3, gt=0, description="index: passages per prompt.")
    retrieval_words: int | None = Field(None, gt=0, description="index: words kept of each passage (default all).")
    sampling: SamplingParams = SamplingParams()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()


def main(cfg: SampleConfig) -> list[str]:
    check_quant(cfg.quant, cfg.device)  # before any download
    if cfg.index and not cfg.chat:
        raise UserError("--index puts passages in a system turn: it needs --chat")
    index = open_index(cfg.index, cfg.storage.resolved(), tracking_uri(cfg)) if cfg.index else None
    experts = None
    if cfg.experts:
        if cfg.quant != "none" or cfg.device != "cpu":
            raise UserError("--experts runs on the CPU without quantization (each prompt adapts the weights)")
        uri, storage = tracking_uri(cfg), cfg.storage.resolved()
        experts = load_experts(cfg.model, cfg.experts, uri, storage, cfg.experts_mix, cfg.experts_temperature)
        model, tokenizer = experts.model, experts.tokenizer
    else:
        directory = download_model(cfg.model, tracking_uri(cfg), cfg.storage.resolved())
        model, tokenizer = load_model(directory, cfg.device, cfg.quant)
    outputs = []
    for prompt in cfg.prompt:
        print(f"--- {prompt!r}", flush=True)
        messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
        if index is not None:
            hits = index.search([prompt], cfg.retrieval_k)[0]
            print("passages: " + "; ".join(f"[{r}] {h.title} ({h.score:.2f})" for r, h in enumerate(hits, 1)))
            messages.append({"role": "system", "content": context(hits, cfg.retrieval_words)})
        messages.append({"role": "user", "content": prompt})
        if experts is not None:
            model, alpha = experts.adapt(experts.prompt_ids(messages if cfg.chat else prompt))
            print("experts: " + ", ".join(f"{name} {a:.2f}" for name, a in alpha.items()), flush=True)
        if cfg.chat:
            stream = sample_chat(model, tokenizer, messages, cfg.sampling)
        else:
            print(prompt, end="", flush=True)
            stream = sample_text(model, tokenizer, prompt, cfg.sampling)
        pieces = []
        for piece in stream:
            print(piece, end="", flush=True)
            pieces.append(piece)
        print(flush=True)
        outputs.append("".join(pieces) if cfg.chat else prompt + "".join(pieces))
    return outputs


def cli() -> None:
    run_job(main, SampleConfig, __doc__)


if __name__ == "__main__":
    cli()
