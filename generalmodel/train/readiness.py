"""Is the run's dataset there and current? Prepared with Ray Data first when it is missing, refused
when its source changed since (unless data.overwrite), checked against the model and the tokenizer
of train.init_from."""

from __future__ import annotations

import dataclasses
from typing import Any

from generalmodel.config import Config
from generalmodel.errors import UserError
from generalmodel.storage import MANIFEST, RunLayout, resolve
from generalmodel.train.init_from import InitSource
from generalmodel.train.loop import check_compatible


def ensure_dataset(cfg: Config, layout: RunLayout, init: InitSource | None = None) -> tuple[Config, Any]:
    """(cfg, the run's TokenDataset): the dataset prepared with Ray Data first when train.dataset
    is not given and the data section's output is missing — or, with mixture.datasets, a
    MixedDataset of those (published already: a mixture prepares nothing); `model.vocab_size`
    follows the dataset's tokenizer unless the config sets it. Needs a Ray session. With `init` (the loaded
    train.init_from), the dataset must be tokenized with its tokenizer."""
    from generalmodel.data.loader import TokenDataset
    from generalmodel.data.prepare import build_dataset, describe, plan_dataset

    if layout.mixture:
        return _checked(cfg, open_mixture(layout), init)
    uri, storage = layout.dataset, layout.storage
    exists = resolve(uri, storage).join(MANIFEST).exists()
    if exists and not cfg.train.dataset:
        manifest = TokenDataset.open(uri, storage).manifest
        changed = source_changed(cfg, manifest) or tokenizer_changed(cfg, manifest)
    else:
        changed = None
    if changed and not cfg.data.overwrite:
        raise UserError(
            f"dataset {uri} was prepared from {changed}: pass --data.overwrite=true to prepare it again "
            "(or --data.output=URI for another dataset)"
        )
    if not exists or changed:
        if cfg.train.dataset:
            raise UserError(f"train.dataset {uri} is not a published dataset (no {MANIFEST})")
        print(f"dataset {uri} is {'stale' if changed else 'missing'}: preparing it")
        print(describe(build_dataset(plan_dataset(cfg, layout)), uri))
    return _checked(cfg, TokenDataset.open(uri, storage), init)


def open_mixture(layout: RunLayout):
    """The mixture's datasets, all published already (a mixture prepares nothing: each dataset is
    prepared on its own, with one tokenizer)."""
    from generalmodel.data.mixture import MixedDataset

    ds = MixedDataset.open(layout.mixture, layout.storage)
    if ds.format == "preference":
        raise UserError(f"{ds.uri}: preference pairs are not mixed (DPO reads one dataset: train.dataset)")
    return ds


def _checked(cfg: Config, ds, init: InitSource | None) -> tuple[Config, Any]:
    """The dataset (or mixture) against train.init_from's tokenizer and the model; the model's
    vocabulary follows the dataset's unless the config sets it."""
    from generalmodel.train.init_from import check_tokenizer

    if init is not None:
        check_tokenizer(init, ds.tokenizer_json(), ds.uri)
    if "vocab_size" not in cfg.explicit_model_keys and cfg.model.vocab_size != ds.vocab_size:
        model = dataclasses.replace(cfg.model, vocab_size=ds.vocab_size)
        cfg = cfg.model_copy(update={"model": model})  # keeps the explicit keys (a private attribute)
    for part in ds.parts.values():
        check_compatible(cfg, part)
    return cfg, ds


def tokenizer_changed(cfg: Config, manifest: dict[str, Any]) -> str | None:
    """The byte tokenizer asked for and another one in the dataset, or a trained BPE asked for and
    the byte tokenizer in it (a byte-level model must not train on BPE tokens, nor a BPE run on
    bytes), or None. A tokenizer file given by path is not judged (it may be the byte one)."""
    from generalmodel.data.tokenizer import BYTES, byte_tokenizer, tokenizer_hash

    if cfg.data.tokenizer not in (None, BYTES):
        return None
    is_bytes = manifest.get("tokenizer", {}).get("sha256") == tokenizer_hash(byte_tokenizer().to_str())
    if (cfg.data.tokenizer == BYTES) == is_bytes:
        return None
    if is_bytes:
        return f"{cfg.data.source} with the byte tokenizer, and data.tokenizer is {cfg.data.tokenizer!r}"
    return f"{cfg.data.source} with another tokenizer than the byte one (data.tokenizer=bytes)"


def source_changed(cfg: Config, manifest: dict[str, Any]) -> str | None:
    """How the source differs from the one the dataset was prepared from (its files' count or
    total size changed), or None: a job must not train on a stale dataset."""
    from generalmodel.data.sources import list_pieces

    before = manifest.get("source", {})
    if cfg.data.source == "sotu" or "files" not in before:
        return None  # the built-in corpus does not change under a user
    pieces = list_pieces(cfg.data, cfg.storage.resolved())
    now = (len(pieces), sum(p.size for p in pieces))
    if now != (before["files"], before["bytes"]):
        return (
            f"{cfg.data.source} when it had {before['files']} files of {before['bytes']} bytes; "
            f"it now has {now[0]} files of {now[1]} bytes"
        )
    return None
