"""Byte-level BPE tokenizers (HF `tokenizers`): train one on a deterministic sample, or load one.

Every tokenizer carries the platform's special tokens (`SPECIAL_TOKENS`: BOS, EOS, PAD at ids
0, 1, 2 when trained here); any byte string encodes, since the 256 byte symbols are in the base
alphabet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from generalmodel import UserError
from generalmodel.config import SPECIAL_TOKENS

BOS, EOS, PAD = SPECIAL_TOKENS


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


def load_tokenizer(text: str, where: str) -> Tokenizer:
    """A tokenizer from its JSON; `where` names the file in errors."""
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise UserError(f"{where}: not a tokenizers JSON file ({e})") from None
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise UserError(f"{where}: tokenizer lacks the special tokens {missing}; it needs {list(SPECIAL_TOKENS)}")
    return tokenizer


def tokenizer_json(tokenizer: Tokenizer) -> str:
    return tokenizer.to_str()


def tokenizer_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
