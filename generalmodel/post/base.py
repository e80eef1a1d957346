"""The job-side set-up of a post-training run (SFT or DPO) from a base model: the chat tokens, the
dataset's name, the registered name and the run name.

    BASE → BASE-sft → BASE-dpo       (models:/llama-tiny/3 → llama-tiny-sft → llama-tiny-dpo)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile

from generalmodel import UserError
from generalmodel.config import Config, TrackingConfig, TrainConfig
from generalmodel.data.chat import add_special_tokens, resize_embeddings
from generalmodel.data.tokenizer import tokenizer_hash
from generalmodel.storage import source_name
from generalmodel.tokens import CHAT_TOKENS, TOOL_TOKENS
from generalmodel.tracking.registry import ModelRef
from generalmodel.train.init_from import InitSource

log = logging.getLogger(__name__)

STAGE_SUFFIXES = ("-sft", "-dpo", "-rl", "-coconut", "-quiet-star")
ADAPTER_STAGES = ("sft", "dpo", "rl")  # the jobs that may train an adapter (train.adapter)


def base_name(reference: str, default: str) -> str:
    """The base model's registered name, without a post-training stage's suffix (`default` for a
    reference that is not models:/NAME/...)."""
    ref = ModelRef.parse(reference)
    if ref.kind != "registered":
        return default
    name = ref.name
    for suffix in STAGE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def start(cfg: Config, stage: str, fmt: str) -> tuple[Config, str, InitSource]:
    """A post-training job's start: its config (`post_training_config`), the tracking URI (checked
    reachable) and the base model loaded, with its chat tokens."""
    from generalmodel.cluster import refuse_ephemeral_paths
    from generalmodel.tracking import check_reachable, tracking_uri
    from generalmodel.train.init_from import load_init

    cfg = post_training_config(cfg, stage, fmt)
    refuse_ephemeral_paths(cfg)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    cfg, init = with_chat_tokens(*load_init(cfg, uri))
    if cfg.train.adapter != "none" and stage not in ADAPTER_STAGES:
        raise UserError(
            f"train.adapter={cfg.train.adapter!r}: the {stage.upper()} job trains the whole model (it adds "
            f"weights); adapters train with {', '.join(s.upper() for s in ADAPTER_STAGES)}"
        )
    thoughts = getattr(cfg.model, "continuous_thoughts", 0)
    if thoughts and stage != "coconut":
        raise UserError(
            f"{cfg.train.init_from} decodes with {thoughts} continuous thoughts (a Coconut model): the {stage.upper()} "
            "job trains without them, so its model would think at decoding what it never learned to; train it "
            "further with jobs/coconut.py, or start from the model it was trained from"
        )
    return cfg, uri, init


def post_training_config(cfg: Config, stage: str, fmt: str) -> Config:
    """`cfg` for a post-training stage ("sft", "dpo"): train.init_from required; data.format
    `fmt`; the registered name BASE-<stage> and run name the same, unless set."""
    if cfg.train.init_from is None:
        raise UserError(
            f"the {stage.upper()} job starts from a model: set --train.init_from (e.g. models:/llama-tiny/1, "
            "the model `make pretrain` registers)"
        )
    if cfg.data.tokenizer is not None:
        raise UserError(
            f"data.tokenizer is set, but {stage.upper()} data is tokenized with the model's own tokenizer "
            "(train.init_from's, with its chat tokens): drop data.tokenizer"
        )
    if cfg.data.format != fmt:
        if cfg.data.format != "text":
            raise UserError(f"data.format={cfg.data.format!r}: the {stage.upper()} job reads {fmt!r} data")
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"format": fmt})})
    tracking, train = cfg.tracking, cfg.train
    if tracking.registered_model == TrackingConfig().registered_model:
        name = f"{base_name(train.init_from, tracking.registered_model)}-{stage}"
        tracking = tracking.model_copy(update={"registered_model": name})
    if train.run_name == TrainConfig().run_name:
        train = train.model_copy(update={"run_name": tracking.registered_model})
    return cfg.model_copy(update={"tracking": tracking, "train": train})


def with_chat_tokens(cfg: Config, init: InitSource) -> tuple[Config, InitSource]:
    """The base with the chat tokens (and the tool tokens, for data.tools): a model trained here
    has the chat tokens reserved; another one gets them added (`with_tokens`). The data section
    then uses that tokenizer, and its dataset is named after the source file, the source's URI
    (hashed) and the tokenizer."""
    cfg, init = with_tokens(cfg, init, CHAT_TOKENS.values(), "chat")
    if cfg.data.tools:
        cfg, init = with_tokens(cfg, init, TOOL_TOKENS.values(), "tool")
    data = cfg.data
    if cfg.train.dataset is None:
        path = os.path.join(tempfile.mkdtemp(prefix="gm-chat-"), "tokenizer.json")
        with open(path, "w") as f:
            f.write(init.tokenizer_json)
        name = source_name(data.source)
        name += "" if data.format in name else f"-{data.format}"  # sft-chat-…, preference-…
        # Two sources with one file name (sotu-qa/sft.jsonl, arithmetic/sft.jsonl) are two datasets.
        where = hashlib.sha256(data.source.encode()).hexdigest()[:6]
        output = data.output or f"datasets/{name}-{where}-{tokenizer_hash(init.tokenizer_json)[:8]}"
        cfg = cfg.model_copy(update={"data": data.model_copy(update={"tokenizer": path, "output": output})})
    return cfg, init


def with_tokens(cfg: Config, init: InitSource, tokens, kind: str) -> tuple[Config, InitSource]:
    """The base with the special `tokens` it lacks added to its tokenizer and embeddings
    (mean-initialised rows; tagged KIND_tokens_added) and cfg.model grown to match."""
    tokenizer_json, added = add_special_tokens(init.tokenizer_json, tokens)
    if not added:
        return cfg, init
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    log.warning(
        "%s has no %s tokens: added %s (vocabulary %d -> %d, new embedding rows = the mean embedding)",
        init.reference,
        kind,
        " ".join(added),
        init.model.vocab_size,
        vocab,
    )
    model = dataclasses.replace(init.model, vocab_size=max(vocab, init.model.vocab_size))
    init = dataclasses.replace(
        init,
        model=model,
        state=resize_embeddings(init.state, model.vocab_size),
        tokenizer_json=tokenizer_json,
        tags={**init.tags, f"{kind}_tokens_added": " ".join(added)},
    )
    return cfg.model_copy(update={"model": model}), init
