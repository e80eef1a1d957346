"""Which documents a dataset keeps (data.dedup, data.filters, data.decontaminate): duplicates across
the whole corpus, the heuristic quality filters of the Gopher/C4 line, and decontamination against
evaluation sets. Runs in the preparation's Ray Data tasks (data/prepare.py) and on its driver.

- Exact duplicates: the same text after normalising it (lower case, punctuation dropped, whitespace
  collapsed): a 16-byte BLAKE2 digest per document; the first in corpus order is kept.
- Near duplicates: MinHash over word n-gram shingles (`datasketch`, num_perm permutations) and an
  LSH index on the driver (datasketch's MinHashLSH, banded for data.dedup_threshold); a candidate is
  a duplicate when its estimated Jaccard similarity to a kept document is ≥ the threshold.
- Filters, by name (each a list of named checks, thresholds from the papers): `gopher_quality` and
  `gopher_repetition` (Rae et al. 2021, §A.1.1: word count, mean word length, symbol, bullet and
  ellipsis ratios, alphabetic words, stop words; duplicate lines/paragraphs and n-gram shares), `c4`
  (Raffel et al. 2020: lines ending in terminal punctuation, no "lorem ipsum", no curly brace).
- Difficulty (data.difficulty): a score per document (zlib compression ratio, or length) and a
  quantile range of it to keep, so that a curriculum prepares one dataset per difficulty bucket.
- Decontamination: a document sharing any word 13-gram (GPT-3's rule; data.decontaminate_ngram) with
  an evaluation file (.jsonl: every string of every row, e.g. HellaSwag's context and endings; .txt)
  is dropped.

datatrove has these filters too, but its English word splitting needs spaCy; the checks here are
the papers' own definitions over a plain word split, a few lines each. datasketch provides MinHash.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import zlib
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

from generalmodel.config import DataConfig, StorageConfig

MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"  # datasketch >= 2's default, named: signatures travel as bare values
WORD = re.compile(r"\w+")
_PUNCT = str.maketrans("", "", string.punctuation)
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "·", "‣", "◦")
TERMINAL = (".", "!", "?", '"', "'", "”", "’")


def exact_key(text: str) -> bytes:
    """The digest of the text with case, punctuation and spacing normalised away."""
    normal = " ".join(text.lower().translate(_PUNCT).split())
    return hashlib.blake2b(normal.encode(), digest_size=16).digest()


def shingles(text: str, n: int) -> list[bytes]:
    """The word n-grams of the lower-cased text (the whole text when it has fewer than n words)."""
    words = WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode()]
    return [" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)]


def minhash(text: str, n: int, num_perm: int) -> np.ndarray:
    """The document's MinHash signature (num_perm uint64 values)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    m.update_batch(shingles(text, n))
    return m.hashvalues


class NearDuplicates:
    """The driver's LSH index: `seen(signature)` says whether a document is a near duplicate of one
    already kept (and keeps it when it is not)."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        # Candidates from a band layout tuned a little below the threshold, so that pairs just above
        # it are not lost to the banding; the estimated Jaccard decides.
        self.lsh = MinHashLSH(threshold=max(0.05, threshold - 0.1), num_perm=num_perm)
        self.kept: dict[int, object] = {}

    def seen(self, key: int, signature: np.ndarray) -> int | None:
        """The key of a kept document this one nearly duplicates, or None (then it is kept)."""
        from datasketch import LeanMinHash

        m = LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME)
        for other in self.lsh.query(m):
            if m.jaccard(self.kept[other]) >= self.threshold:
                return other
        self.lsh.insert(key, m)
        self.kept[key] = m
        return None


# -- quality filters ---------------------------------------------------------------------------
# Each check returns why the document fails (a short name) or None.


def gopher_quality(text: str) -> str | None:
    words = text.split()
    n = len(words)
    if not 50 <= n <= 100_000:
        return "word_count"
    mean = sum(len(w) for w in words) / n
    if not 3 <= mean <= 10:
        return "mean_word_length"
    if max(text.count("#"), text.count("...") + text.count("…")) / n > 0.1:
        return "symbol_ratio"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and sum(line.startswith(BULLETS) for line in lines) / len(lines) > 0.9:
        return "bullet_lines"
    if lines and sum(line.endswith(("...", "…")) for line in lines) / len(lines) > 0.3:
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / n < 0.8:
        return "alphabetic_words"
    if len(STOP_WORDS & {w.lower().strip(string.punctuation) for w in words}) < 2:
        return "stop_words"
    return None


def _duplicate_share(parts: list[str]) -> tuple[float, float]:
    """(share of the parts that repeat an earlier one, share of the characters in them)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for part in parts:
        if part in seen:
            dup += 1
            dup_chars += len(part)
        seen.add(part)
    total = sum(len(p) for p in parts) or 1
    return dup / max(len(parts), 1), dup_chars / total


def gopher_repetition(text: str) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    paragraphs = [p for p in re.split(r"\n{2,}", text) if p.strip()]
    line_share, line_chars = _duplicate_share(lines)
    if line_share > 0.3 or line_chars > 0.2:
        return "duplicate_lines"
    para_share, para_chars = _duplicate_share(paragraphs)
    if para_share > 0.3 or para_chars > 0.2:
        return "duplicate_paragraphs"
    words = WORD.findall(text.lower())
    chars = sum(len(w) for w in words) or 1
    for n, limit in ((2, 0.2), (3, 0.18), (4, 0.16)):  # the most frequent n-gram's share of the characters
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if grams:
            gram, count = grams.most_common(1)[0]
            if count > 1 and count * sum(len(w) for w in gram) / chars > limit:
                return f"top_{n}gram"
    for n, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)):  # repeated n-grams
        if len(words) < n:
            break
        seen: set[tuple[str, ...]] = set()
        covered = np.zeros(len(words), dtype=bool)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            if gram in seen:
                covered[i : i + n] = True
            seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered, strict=True) if c) / chars > limit:
            return f"duplicate_{n}grams"
    return None


def c4(text: str) -> str | None:
    lower = text.lower()
    if "lorem ipsum" in lower:
        return "lorem_ipsum"
    if "{" in text:
        return "curly_bracket"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if line.endswith(TERMINAL) and len(line.split()) >= 3]
    if not kept:
        return "no_sentence_lines"  # C4 keeps only such lines; a document with none is empty
    return None


FILTERS: dict[str, Callable[[str], str | None]] = {
    "gopher_quality": gopher_quality,
    "gopher_repetition": gopher_repetition,
    "c4": c4,
}


# -- difficulty ----------------------------------------------------------------------------------


def difficulty(text: str, kind: str) -> float:
    """A document's difficulty score: `compression` (zlib-compressed size / size: repetitive text
    compresses well and is easy to predict) or `length` (words)."""
    if kind == "length":
        return float(len(text.split()))
    raw = text.encode()
    return len(zlib.compress(raw, 6)) / max(len(raw), 1)


def difficulty_bounds(sample: list[str], data: DataConfig) -> tuple[float, float]:
    """The scores at data.difficulty_quantiles over the driver's corpus sample (the high end open
    at quantile 1: every document passes it)."""
    scores = np.array([difficulty(t, data.difficulty) for t in sample])
    low, high = data.difficulty_quantiles
    lower = float(np.quantile(scores, low)) if low > 0 else -np.inf
    upper = float(np.quantile(scores, high)) if high < 1 else np.inf
    return lower, upper


# -- decontamination ---------------------------------------------------------------------------


def ngram_keys(text: str, n: int) -> np.ndarray:
    """8-byte keys of the text's lower-cased word n-grams."""
    words = WORD.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    return np.array(
        [int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little") for g in grams],
        dtype=np.uint64,
    )


def eval_ngrams(paths: Iterable[str], n: int, storage: StorageConfig) -> np.ndarray:
    """The sorted n-gram keys of evaluation files: .jsonl (every string in every row) or text."""
    from generalmodel import UserError
    from generalmodel.storage import resolve

    keys = []
    for path in paths:
        loc = resolve(path, storage)
        if not loc.exists():
            raise UserError(f"data.decontaminate: {path!r}: no such file")
        raw = loc.read_bytes().decode("utf-8", errors="replace")
        if path.endswith(".jsonl"):
            for line_no, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        texts = list(_strings(json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise UserError(f"data.decontaminate: {path}:{line_no}: not valid JSON ({e.msg})") from None
                    keys += [ngram_keys(t, n) for t in texts]
        else:
            keys.append(ngram_keys(raw, n))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, dtype=np.uint64)


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def contaminated(text: str, n: int, eval_keys: np.ndarray) -> bool:
    keys = ngram_keys(text, n)
    if not len(keys) or not len(eval_keys):
        return False
    at = np.searchsorted(eval_keys, keys).clip(max=len(eval_keys) - 1)
    return bool((eval_keys[at] == keys).any())


def why_removed(
    text: str, data: DataConfig, eval_keys: np.ndarray | None, bounds: tuple[float, float] | None = None
) -> str | None:
    """The first filter (`name:check`), decontamination or difficulty range the document fails, or None."""
    if bounds is not None and not bounds[0] <= difficulty(text, data.difficulty) < bounds[1]:
        return "difficulty_out_of_range"
    for name in data.filters:
        failed = FILTERS[name](text)
        if failed:
            return f"{name}:{failed}"
    if eval_keys is not None and contaminated(text, data.decontaminate_ngram, eval_keys):
        return "decontaminated"
    return None
