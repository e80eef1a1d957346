"""What turns passages and queries into vectors for the index (generalmodel.retrieval.index).

    tfidf        TF-IDF over the corpus' words (scikit-learn), fitted by the index job on the corpus
                 itself (no download), projected to `dim` dimensions by a sparse random matrix: a
                 lexical retriever, passages that share the query's rarer words score highest.
    lsa          the same TF-IDF reduced by a truncated SVD to the corpus' top `dim` directions
                 (latent semantic analysis): related words meet, rare ones fade.
                 Both store their vocabulary, IDF weights and projection with the index (plain
                 arrays, no pickle).
    models:/…    a registered language model of this platform: the mean of its last hidden states
                 (the final norm's output) over the text's tokens, truncated to its context.

Every embedding is float32 and L2-normalised (a text with no known word is the zero vector), so
the index's inner product is the cosine similarity.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from generalmodel import UserError

FITTED = ("tfidf", "lsa")  # the embedders the index job fits on the corpus (the others: model references)


class Embedder(Protocol):
    spec: dict[str, Any]  # what the manifest records (kind, dim, and how to load it again)
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows of unit length (or zero)."""

    def files(self) -> dict[str, bytes]:
        """The files stored with the index (name → bytes) that `load_embedder` reads back."""


def normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class TfidfEmbedder:
    """TF-IDF weights of a text's words (sublinear term frequency, scikit-learn) times a projection
    to `dim` dimensions: a sparse random one (`tfidf`: inner products kept within ~1/sqrt(dim),
    every word counts, however rare) or the corpus' top SVD components (`lsa`)."""

    def __init__(self, kind: str, vocabulary: dict[str, int], idf: np.ndarray, projection):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(vocabulary=vocabulary, sublinear_tf=True, dtype=np.float32)
        self.vectorizer.idf_ = idf
        self.projection = projection  # (vocabulary, dim): scipy sparse (tfidf) or dense (lsa)
        self.dim = int(projection.shape[1])
        self.spec = {"kind": kind, "dim": self.dim, "vocabulary": len(vocabulary)}

    @classmethod
    def fit(cls, texts: list[str], kind: str, dim: int, seed: int = 0) -> TfidfEmbedder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.exceptions import DataDimensionalityWarning
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.random_projection import SparseRandomProjection

        if len(texts) < 2:
            raise UserError(f"the {kind} embedder needs at least 2 passages to fit, the corpus has {len(texts)}")
        vectorizer = TfidfVectorizer(
            sublinear_tf=True, dtype=np.float32, min_df=2 if len(texts) >= 1000 else 1, max_features=1 << 18
        )
        try:
            x = vectorizer.fit_transform(texts)
        except ValueError as e:  # no word at all (sklearn: "empty vocabulary")
            raise UserError(f"the {kind} embedder found no words in the corpus: {e}") from None
        if kind == "lsa":
            dim = min(dim, x.shape[1] - 1, len(texts) - 1)
            if dim < 1:
                raise UserError(f"the corpus has too few distinct words ({x.shape[1]}) for an lsa embedding")
            projection = TruncatedSVD(dim, algorithm="randomized", random_state=seed).fit(x).components_.T
            projection = np.ascontiguousarray(projection, dtype=np.float32)
        else:
            with warnings.catch_warnings():  # dim above a small corpus' vocabulary: no reduction, and fine
                warnings.simplefilter("ignore", DataDimensionalityWarning)
                rp = SparseRandomProjection(dim, dense_output=True, random_state=seed).fit(x[:1])
            projection = rp.components_.T.tocsr().astype(np.float32)
        vocabulary = {w: int(i) for w, i in vectorizer.vocabulary_.items()}
        return cls(kind, vocabulary, vectorizer.idf_.astype(np.float32), projection)

    def embed(self, texts: list[str]) -> np.ndarray:
        x = self.vectorizer.transform(texts) @ self.projection
        return normalized(x.toarray() if hasattr(x, "toarray") else x)

    def files(self) -> dict[str, bytes]:
        import scipy.sparse

        vocabulary = json.dumps(self.vectorizer.vocabulary, sort_keys=True).encode()
        out = {"vocabulary.json": vocabulary, "idf.npy": npy_bytes(self.vectorizer.idf_)}
        if scipy.sparse.issparse(self.projection):
            buf = io.BytesIO()
            scipy.sparse.save_npz(buf, self.projection)
            out["projection.npz"] = buf.getvalue()
        else:
            out["projection.npy"] = npy_bytes(self.projection)
        return out

    @classmethod
    def from_files(cls, kind: str, read: Callable[[str], bytes]) -> TfidfEmbedder:
        import scipy.sparse

        if kind == "lsa":
            projection = load_npy(read("projection.npy"))
        else:
            projection = scipy.sparse.load_npz(io.BytesIO(read("projection.npz"))).tocsr()
        return cls(kind, json.loads(read("vocabulary.json")), load_npy(read("idf.npy")), projection)


class ModelEmbedder:
    """The mean of a language model's last hidden states over a text's tokens (`reference`: the
    pinned model reference the manifest records)."""

    def __init__(self, reference: str, model, tokenizer, batch: int = 32):
        self.model, self.tokenizer, self.batch = model.eval(), tokenizer, batch
        self.dim = int(self.model.cfg.d_model)
        self.context = int(self.model.cfg.max_seq_len)
        self.spec = {"kind": "model", "model": reference, "dim": self.dim}

    @classmethod
    def from_directory(cls, reference: str, directory: str) -> ModelEmbedder:
        from generalmodel.infer.export import load_model

        return cls(reference, *load_model(directory, "cpu"))

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch):
            ids = [e.ids[: self.context] or [0] for e in self.tokenizer.encode_batch(texts[i : i + self.batch])]
            width = max(len(x) for x in ids)
            idx = torch.tensor([x + [0] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1.0] * len(x) + [0.0] * (width - len(x)) for x in ids])
            with torch.inference_mode():  # causal: the padding on the right changes no real position
                h = self.model(idx, hidden=True).float()
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy())
        return normalized(np.concatenate(out) if out else np.zeros((0, self.dim)))

    def files(self) -> dict[str, bytes]:
        return {}
