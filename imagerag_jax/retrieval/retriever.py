"""Queries -> DB neighbours: index search (with exclusions) -> id-to-row lookup -> gather.

    retr = Retriever.open(db_path, index_path)              # checks the index covers the DB
    got = retr.retrieve(retr.queries(pooled, prompts), k)    # ids, scores, rows, latents, ...
    got = retr.retrieve(queries, k, exclude_ids=retr.exclusions(example_ids, hashes))

This is the one place that turns queries into neighbours, for generation (`inference/rag.py`),
precompute (`data/precompute.py`), the PyTorch runtime (`export/torch_runtime.py`) and the
miniature's reports. It needs numpy only (ScaNN is imported by the index, lazily), so the PyTorch
runtime can use it without TensorFlow or JAX.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib


class NotEnoughNeighbours(db_lib.DatabaseError):
    """The index has fewer than k results for a query (after its exclusions)."""


def check_index(index: index_lib.Index, db: db_lib.Database, index_path: str) -> None:
    """Refuses an index that does not cover exactly the database's entries (same count and ids)."""
    same_ids = index.ids is None or np.array_equal(index.ids, np.asarray(db.ids))
    if index.count != db.count or not same_ids:
        raise db_lib.DatabaseError(f"index {index_path} ({index.count} entries) does not match the "
                                   f"database {db.path} ({db.count}); rebuild the index (build-db)")


class Retriever:
    """Top-k neighbours of queries in one database through its index.

    Args:
        database: the opened database.
        index: the index over the database's pooled embeddings (or captions, for BM25).
        image_hashes: optional [N] uint64 image hash per DB row (``build_db.load_image_hashes``):
            enables `exclusions` of an example's exact image duplicates.
    """

    def __init__(self, database: db_lib.Database, index: index_lib.Index, *,
                 image_hashes: np.ndarray | None = None):
        self.database, self.index = database, index
        self._ids = np.asarray(database.ids)
        self._hash_order = self._sorted_hashes = None
        if image_hashes is not None:
            hashes = np.asarray(image_hashes, np.uint64)
            self._hash_order = np.argsort(hashes, kind="stable")
            self._sorted_hashes = hashes[self._hash_order]

    @classmethod
    def open(cls, database: db_lib.Database | str | os.PathLike,
             index: index_lib.Index | str | os.PathLike, *,
             image_hashes: np.ndarray | None = None) -> Retriever:
        """A retriever over a database and index (paths or opened objects); checks they match."""
        db = database if isinstance(database, db_lib.Database) else db_lib.Database(os.fspath(database))
        if isinstance(index, index_lib.Index):
            idx, index_path = index, "(in memory)"
        else:
            index_path = os.fspath(index)
            idx = index_lib.Index.load(index_path)
        check_index(idx, db, index_path)
        return cls(db, idx, image_hashes=image_hashes)

    def queries(self, pooled: np.ndarray, captions: Sequence[str]) -> Any:
        """What the index searches with: the captions for BM25, else the pooled embeddings."""
        return list(captions) if self.index.kind == "bm25" else pooled

    def duplicates(self, image_hash: int) -> np.ndarray:
        """DB ids whose image hash equals `image_hash` (needs `image_hashes`)."""
        if self._sorted_hashes is None:
            raise ValueError("this retriever was opened without image hashes")
        h = np.uint64(image_hash)
        lo = np.searchsorted(self._sorted_hashes, h, "left")
        hi = np.searchsorted(self._sorted_hashes, h, "right")
        return self._ids[self._hash_order[lo:hi]]

    def exclusions(self, example_ids: Sequence[int] | np.ndarray,
                   image_hashes: Sequence[int | None] | None = None) -> np.ndarray:
        """[Q, m] ids to exclude per query: the example's own id and, with hashes, its image duplicates.

        Rows are padded with -1 (an id no entry has). A None hash (or no hashes, or a retriever
        without image hashes) excludes the example's own id only.
        """
        hashes = [None] * len(example_ids) if image_hashes is None else list(image_hashes)
        excl = [np.concatenate([[eid], self.duplicates(h)])
                if self._sorted_hashes is not None and h is not None else np.asarray([eid])
                for eid, h in zip(example_ids, hashes)]
        width = max((len(e) for e in excl), default=1)
        out = np.full((len(excl), width), -1, np.int64)
        for j, e in enumerate(excl):
            out[j, :len(e)] = e
        return out

    def search(self, queries: Any, k: int, *,
               exclude_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids [Q, k], scores [Q, k]) best first, as `Index.search` returns them.

        Args:
            queries: [Q, D] pooled embeddings, or Q captions for a BM25 index (see `queries`).
            k: neighbours per query.
            exclude_ids: [Q] or [Q, m] ids never returned for that query (-1 pads).

        Raises:
            NotEnoughNeighbours: a query has fewer than k results (the database is too small).
        """
        ids, scores = self.index.search(queries, k, exclude_ids=exclude_ids)
        short = np.reshape(ids, (-1, k)) < 0
        if short.any():
            j = int(np.nonzero(short.any(1))[0][0])
            excluded = ""
            if exclude_ids is not None:
                own = np.asarray(exclude_ids, np.int64).reshape(len(short), -1)[j]
                excluded = f" after excluding ids {own[own >= 0][:5].tolist()}"
            raise NotEnoughNeighbours(
                f"query {j}: only {int((~short[j]).sum())} of k={k} neighbours{excluded} in the "
                f"database {self.database.path} ({self.database.count} entries); lower k or use a "
                "larger database")
        return ids, scores

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The DB rows of `ids` (any shape): rows, latents, prompt_embeds, pooled and ids."""
        rows = self.database.rows_for_ids(ids)
        got = self.database.gather(rows)
        got["rows"] = rows
        return got

    def retrieve(self, queries: Any, k: int, *, exclude_ids: np.ndarray | None = None,
                 captions: bool = False) -> dict[str, Any]:
        """`search` then `gather`: ids, scores, rows, latents, prompt_embeds, pooled ([Q, k, ...]).

        With ``captions=True`` also 'captions': [Q][k] strings.
        """
        ids, scores = self.search(queries, k, exclude_ids=exclude_ids)
        got = self.gather(ids)
        # `gather` returns the DB's ids of the rows, equal to the searched ids; keep the search's.
        got.update(ids=ids, scores=scores)
        if captions:
            got["captions"] = [self.database.captions(r) for r in got["rows"]]
        return got
