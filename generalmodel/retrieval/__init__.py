"""Retrieval: a vector index of a corpus' passages (FAISS on the object store) and its embedders."""

from generalmodel.retrieval.embedders import Embedder, ModelEmbedder, TfidfEmbedder
from generalmodel.retrieval.index import (
    Hit,
    Index,
    IndexConfig,
    IndexExistsError,
    build_index,
    chunk,
    context,
    numbered,
    open_index,
    search_tool,
)

__all__ = [
    "Embedder",
    "Hit",
    "Index",
    "IndexConfig",
    "IndexExistsError",
    "ModelEmbedder",
    "TfidfEmbedder",
    "build_index",
    "chunk",
    "context",
    "numbered",
    "open_index",
    "search_tool",
]
