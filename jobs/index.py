"""Index a corpus for retrieval: passages of whole sentences, embedded, in a FAISS index on the
object store (see generalmodel/retrieval/index.py), searched by the served API's `retrieval`
option and the `search` tool.

    python -m jobs.index --source=sotu --out=.generalmodel/indexes/sotu
    python -m jobs.index --source=s3://corpora/wiki/ --out=s3://indexes/wiki --kind=hnsw
    python -m jobs.index --source=docs.jsonl --title_field=title --out=... --embedder=models:/llama-tiny/1
    python -m jobs.index --out=.generalmodel/indexes/sotu --query="the Louisiana purchase"   # search it

Prints the manifest's summary, or a query's top passages; exits non-zero, publishing nothing, on
bad input.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from generalmodel.cli import run_job
from generalmodel.cluster import ray_session
from generalmodel.config import RayConfig, StorageConfig, TrackingConfig
from generalmodel.retrieval import IndexConfig, build_index, open_index
from generalmodel.retrieval.embedders import FITTED
from generalmodel.tracking import tracking_uri
from generalmodel.tracking.registry import pinned


class IndexJobConfig(IndexConfig):
    query: str | None = Field(None, description="Search the index at --out for this text instead of building.")
    k: int = Field(3, gt=0, description="With --query: passages to print.")
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()


def main(cfg: IndexJobConfig) -> dict[str, Any]:
    storage = cfg.storage.resolved()
    if cfg.query is not None:
        index = open_index(cfg.out, storage, tracking_uri(cfg))
        hits = index.search([cfg.query], cfg.k)[0]
        for rank, hit in enumerate(hits, 1):
            print(f"[{rank}] {hit.score:.3f} {hit.title}: {hit.text}")
        return {"hits": [h.cited(r) for r, h in enumerate(hits, 1)]}
    if cfg.embedder not in FITTED:  # the version `latest` or an alias names now
        cfg = cfg.model_copy(update={"embedder": pinned(cfg.embedder, tracking_uri(cfg))})
    with ray_session(cfg.ray):
        manifest = build_index(cfg, storage, tracking_uri(cfg))
    print(
        f"indexed {manifest['passages']} passages of {manifest['documents']} documents from {cfg.source} "
        f"({manifest['embedder']['kind']}, {manifest['index']['dim']} dims, {manifest['index']['kind']}) "
        f"in {manifest['seconds']}s: {cfg.out}"
    )
    return manifest


def cli() -> None:
    run_job(main, IndexJobConfig, __doc__)


if __name__ == "__main__":
    cli()
