"""Lexical retrieval over captions with BM25 (the maintained `bm25s` package), as an `Index` kind.

    index = Index.build(db.captions(), {"kind": "bm25"}, ids=db.ids)
    ids, scores = index.search(["a handwritten seven"], k=4)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagerag_jax.retrieval import index as index_lib

BM25_DEFAULTS = {"stopwords": "en", "k1": 1.5, "b": 0.75, "method": "lucene"}


def _bm25s() -> Any:
    try:
        import bm25s  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise ImportError("index kind 'bm25' needs the `bm25s` package: pip install bm25s") from e
    return bm25s


class BM25Index(index_lib.Index):
    """BM25 over tokenised captions; queries are strings."""

    kind = "bm25"

    def __init__(self, retriever: Any, config: dict[str, Any], count: int, ids: np.ndarray | None):
        super().__init__(config, count, ids)
        self.retriever = retriever

    @classmethod
    def build_bm25(cls, texts: Sequence[str], cfg: dict[str, Any], ids: Any) -> BM25Index:
        """Tokenises and indexes `texts`."""
        bm25s = _bm25s()
        if isinstance(texts, np.ndarray) and texts.dtype.kind not in "US":
            raise ValueError("index kind 'bm25' indexes strings (captions), not embeddings")
        texts = [str(t) for t in texts]
        cfg = {**BM25_DEFAULTS, **cfg, "kind": "bm25"}
        retriever = bm25s.BM25(k1=cfg["k1"], b=cfg["b"], method=cfg["method"])
        tokens = bm25s.tokenize(texts, stopwords=cfg["stopwords"], show_progress=False)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, cfg, len(texts), ids)

    def _search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        bm25s = _bm25s()
        k = min(k, self.count)
        # Queries are tokenised on their own; the retriever maps tokens to its vocabulary by string
        # and ignores unknown words.
        tokens = bm25s.tokenize([str(q) for q in queries], stopwords=self.config["stopwords"],
                                show_progress=False)
        rows, scores = self.retriever.retrieve(tokens, k=k, show_progress=False,
                                               backend_selection="numpy")
        return np.asarray(rows, np.int64), np.asarray(scores, np.float32)

    def _save(self, path: str) -> None:
        self.retriever.save(os.path.join(path, "bm25"), show_progress=False)

    @classmethod
    def load_bm25(cls, path: str, cfg: dict[str, Any], count: int, ids: Any) -> BM25Index:
        """Loads the retriever saved under `path/bm25`."""
        retriever = _bm25s().BM25.load(os.path.join(path, "bm25"), show_progress=False)
        return cls(retriever, cfg, count, ids)
