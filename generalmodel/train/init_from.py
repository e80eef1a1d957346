"""`train.init_from`: start a run from an existing model instead of a random init.

The source is any model reference the sampler takes — `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
`runs:/ID`, an export directory (local or s3://), or a transformers Llama/GPT-2 directory. The run
takes its model config from the source: a `model.*` key the user gave that disagrees with it is
an error naming the key (only the training-time knobs in `TRAINING_ONLY` may differ). The source's
tokenizer is the run's tokenizer: a dataset prepared for the run uses it, and an existing dataset
tokenized differently is refused (the token ids would mean other things).

The driver loads the source once (`load_init`); the weights reach the workers through the Ray
object store, and every rank loads them before sharding. A run that resumes from its own
checkpoint ignores them (the checkpoint is newer).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from generalmodel import UserError
from generalmodel.config import Config

log = logging.getLogger(__name__)

# Model fields that only shape training, not the weights: these may differ from the source.
TRAINING_ONLY = frozenset({"init_std", "moe_bias_update_rate", "moe_aux_loss_weight", "memory_core_loss_weight"})


@dataclass
class InitSource:
    reference: str
    model: Any  # the source's model config (a registered dataclass)
    state: dict[str, torch.Tensor]
    tokenizer_json: str
    tags: dict[str, str] = field(default_factory=dict)  # lineage for the run that starts from it


def load_init(cfg: Config, tracking_uri: str | None) -> tuple[Config, InitSource | None]:
    """`cfg` with the source's model config (and its tokenizer for a dataset still to be
    prepared), and the loaded source of `cfg.train.init_from`; when it is not set, (cfg, None) — or,
    for a byte model patched by entropy, its initial state with the entropy model (`entropy_init`)."""
    reference = cfg.train.init_from
    if reference is None:
        return cfg, entropy_init(cfg, tracking_uri)
    loaded = load_model_source(reference, tracking_uri, cfg)
    source = dataclasses.replace(loaded, model=merged_model(cfg, loaded.model, reference))
    updates: dict[str, Any] = {"model": source.model}
    if cfg.data.tokenizer is None and cfg.train.dataset is None:
        path = os.path.join(tempfile.mkdtemp(prefix="gm-init-"), "tokenizer.json")
        with open(path, "w") as f:
            f.write(source.tokenizer_json)
        updates["data"] = cfg.data.model_copy(update={"tokenizer": path})
    log.info("initialising from %s (%s)", reference, type(source.model).__name__)
    return cfg.model_copy(update=updates), source


def entropy_init(cfg: Config, tracking_uri: str | None) -> InitSource | None:
    """A byte latent model patched by entropy (models/blt.py) starts from its seed's random init
    with the trained byte LM `model.entropy_model` in its frozen `entropy` part: that full state,
    as a source the workers load like train.init_from's (its tokenizer is the dataset's). None for
    every other model."""
    model = cfg.model
    if getattr(model, "patching", "static") == "static":
        return None
    if model.entropy_model is None:
        raise UserError(
            f"model.patching={model.patching!r} needs model.entropy_model: the trained byte LM that places the "
            "patches (train it first: make blt-entropy, configs/blt-entropy.yaml), or model.patching=static"
        )
    from models import build_model

    source = load_model_source(model.entropy_model, tracking_uri, cfg)
    want = dataclasses.asdict(model.entropy_config())
    got = dataclasses.asdict(source.model)
    differ = [f"{k}={got.get(k)!r} (needs {v!r})" for k, v in want.items() if k != "max_seq_len" and got.get(k) != v]
    if got.get("max_seq_len", 0) < model.max_seq_len:
        differ.append(f"max_seq_len={got.get('max_seq_len')!r} (needs at least {model.max_seq_len})")
    if differ:
        raise UserError(
            f"model.entropy_model {model.entropy_model!r} is not the entropy model this config describes "
            f"(model.entropy_*): {'; '.join(differ)}"
        )
    torch.manual_seed(cfg.train.seed)  # the init every rank builds (TrainingRun seeds the same)
    built = build_model(model)
    from generalmodel.infer.export import load_state

    load_state(built.entropy, source.state, f"model.entropy_model {model.entropy_model!r}")
    tags = {"entropy_model": model.entropy_model}
    log.info("the entropy model is %s", model.entropy_model)
    return InitSource(model.entropy_model, model, built.state_dict(), source.tokenizer_json, tags)


def load_model_source(reference: str, tracking_uri: str | None, cfg: Config) -> InitSource:
    """Any model reference (see the module doc) loaded as it is: its model config, weights,
    tokenizer and lineage tags (train.init_from's start, Rho-1's reference)."""
    from generalmodel.infer.export import read_export
    from generalmodel.tracking import lineage_tags
    from generalmodel.tracking.registry import download_model

    directory = download_model(reference, tracking_uri, cfg.storage.resolved())
    model, state, tokenizer_json, where = read_export(directory)
    log.debug("loaded %s (%s, %s)", reference, where, type(model).__name__)
    return InitSource(reference, model, state, tokenizer_json, lineage_tags(reference, tracking_uri))


def merged_model(cfg: Config, source, reference: str):
    """The source's model config, with the user's training-only model fields; a model field the
    user set explicitly to another value than the source's is an error naming it."""
    user = cfg.model
    given = cfg.explicit_model_keys
    conflicts = []
    if "name" in given and user.name != source.name:
        conflicts.append(f"model.name={user.name!r} (the source is a {source.name!r} model)")
    keep = {}
    for key in sorted(given - {"name"}):
        if not hasattr(source, key):
            conflicts.append(f"model.{key} (a {source.name!r} model has no such field)")
        elif key in TRAINING_ONLY:
            keep[key] = getattr(user, key)
        elif getattr(user, key) != getattr(source, key):
            conflicts.append(f"model.{key}={getattr(user, key)!r} (the source has {getattr(source, key)!r})")
    if conflicts:
        raise UserError(
            f"train.init_from {reference!r} decides the model; these settings disagree with it: "
            f"{'; '.join(conflicts)}. Drop them (a preset's model section counts too)"
        )
    return dataclasses.replace(source, **keep)


def check_tokenizer(source: InitSource, dataset_tokenizer_json: str, dataset_uri: str) -> None:
    """The dataset must be tokenized with the source's tokenizer."""
    from generalmodel.data.tokenizer import tokenizer_hash

    if tokenizer_hash(dataset_tokenizer_json) != tokenizer_hash(source.tokenizer_json):
        raise UserError(
            f"dataset {dataset_uri} was tokenized with another tokenizer than train.init_from "
            f"{source.reference!r}: prepare the corpus with the source's tokenizer (leave data.tokenizer unset "
            f"and let this job prepare a dataset of its own, e.g. --data.output=datasets/NAME)"
        )


def adapter_config(cfg: Config, source: InitSource) -> Config:
    """`cfg` checked for train.adapter before any worker starts: the base must be used as it is (no
    tokens added: their embedding rows would be new weights the adapter does not store), the
    targets must match linears of the model, and train.init_from is pinned to the registered
    version it resolved to (models:/NAME/latest would name another base later)."""
    from models import build_model, svf

    added = sorted(key for key in source.tags if key.endswith("_tokens_added"))
    if added:
        raise UserError(
            f"train.adapter={cfg.train.adapter!r} keeps {source.reference} as it is, but the job added tokens to it "
            f"({', '.join(f'{k}: {source.tags[k]}' for k in added)}): adapt a model that has them (one trained "
            "here reserves the chat tokens), or train without an adapter"
        )
    with torch.device("meta"):
        model = build_model(cfg.model)
    try:
        svf.attach(model, cfg.train.adapter_targets)
    except ValueError as e:
        raise UserError(f"train.adapter_targets: {e}") from None
    name, version = source.tags.get("init_model_name"), source.tags.get("init_model_version")
    if name and version:
        train = cfg.train.model_copy(update={"init_from": f"models:/{name}/{version}"})
        cfg = cfg.model_copy(update={"train": train})
    return cfg
