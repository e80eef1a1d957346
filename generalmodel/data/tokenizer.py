"""Byte-level BPE tokenizers (HF `tokenizers`): train one on a deterministic sample, or load one.

A tokenizer trained here carries the platform's special tokens (`SPECIAL_TOKENS`: BOS, EOS, PAD
at ids 0, 1, 2); any byte string encodes, since the 256 byte symbols are in the base alphabet.
Other tokenizers (any Hugging Face `tokenizer.json`) are used as they are: their special tokens
are found by role (`special_ids`) among the names common tokenizers use, and only an
end-of-sequence token is required (it separates documents and stops generation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from generalmodel import UserError
from generalmodel.tokens import SPECIAL_TOKENS

BOS, EOS, PAD = SPECIAL_TOKENS[:3]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens included) on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


BYTES = "bytes"  # data.tokenizer's value for the byte tokenizer


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte: the special tokens at ids 0, 1, 2, ... and the 256 bytes after
    them (GPT-2's byte-to-symbol alphabet, in byte order), no merges. Any text encodes to exactly
    its bytes, and decodes back. The vocabulary of byte-level models (`data.tokenizer: bytes`)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *symbols))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _byte_of(symbol: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to `symbol` (printable bytes are themselves)."""
    code = ord(symbol)
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


# Special tokens by role: ours first, then the names of common tokenizers (GPT-2, Llama 2 and 3,
# Gemma, Mistral, BERT-style pads).
ROLE_NAMES = {
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos": (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>"),
    "pad": (PAD, "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"),
}


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """bos/eos/pad token ids by role: the first of ROLE_NAMES the vocabulary has; None where there
    is none. (Only the tokenizer.json travels with datasets and models, so roles are found by the
    names themselves, not by a tokenizer_config.json.)"""
    ids: dict[str, int | None] = {}
    for role, names in ROLE_NAMES.items():
        ids[role] = next((tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None), None)
    return ids


def eos_id(tokenizer: Tokenizer) -> int:
    """The end-of-sequence id (load_tokenizer made sure there is one)."""
    eos = special_ids(tokenizer)["eos"]
    if eos is None:
        raise UserError(f"the tokenizer has no end-of-sequence token (looked for {', '.join(ROLE_NAMES['eos'])})")
    return eos


def load_tokenizer(text: str, where: str) -> Tokenizer:
    """A tokenizer from its JSON; `where` names the file in errors. It needs an end-of-sequence
    token (ours or one of the common names)."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise UserError(f"{where}: not a tokenizers JSON file ({e})") from None
    if special_ids(tokenizer)["eos"] is None:
        raise UserError(
            f"{where}: the tokenizer has no end-of-sequence token; looked for {', '.join(ROLE_NAMES['eos'])} "
            f"(add one, e.g. {EOS!r}, as a special token)"
        )
    return tokenizer


def read_tokenizer_file(loc, what: str) -> tuple[str, str]:
    """(tokenizer JSON, where) of a `tokenizer.json` location, of a directory holding one (a
    Hugging Face model or tokenizer directory), or of a prepared dataset (the tokenizer its
    manifest names: another corpus tokenized alike, e.g. for a mixture)."""
    if not loc.path.rstrip("/").endswith(".json"):
        manifest = loc.join("manifest.json")
        if manifest.exists():
            try:
                loc = loc.join(json.loads(manifest.read_bytes())["tokenizer"]["path"])
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{what} {manifest.uri!r}: not a dataset manifest naming its tokenizer") from None
        elif loc.join("tokenizer.json").exists():
            loc = loc.join("tokenizer.json")
    if not loc.exists():
        raise UserError(f"{what} {loc.uri!r}: no such file (a tokenizer.json, or a directory holding one)")
    return loc.read_bytes().decode(), loc.uri


def tokenizer_json(tokenizer: Tokenizer) -> str:
    return tokenizer.to_str()


def tokenizer_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
