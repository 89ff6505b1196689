"""Nearest-neighbour search over pooled text embeddings: ScaNN, exact, and BM25 (lexical).

    index = Index.build(db.pooled, {"kind": "scann"}, ids=db.ids)
    ids, scores = index.search(queries, k=4, exclude_ids=example_ids)   # self-matches dropped
    index.save(path); index = Index.load(path)

Config (a dict or `ml_collections.ConfigDict`; every key optional):

  kind              'auto' (exact below `exact_below` entries, else ScaNN) | 'scann' | 'exact' | 'bm25'
                    ('scann' over fewer than MIN_SCANN_SIZE = 256 entries builds 'exact')
  exact_below       10_000
  num_neighbors     10      default k baked into the ScaNN searcher (search(k) overrides it)
  num_leaves        round(sqrt(N))               ScaNN tree size
  leaves_to_search  ceil(leaves_factor * sqrt(num_leaves)), at least min_leaves_to_search: ~7% of
                    the leaves at N = 1M, ~13% at 100k (leaves grow with N, so a smaller share
                    suffices); measured by `python -m imagerag_jax.benchmark retrieval --sweep`
  leaves_factor     2.2;  min_leaves_to_search 8
  reorder_k         max(200, 10 * k): candidates re-scored exactly after asymmetric hashing
  dims_per_block    2       AH sub-space size (2 -> 16-centre codebooks per 2 dims, LUT16)
  anisotropic_quantization_threshold  0.2   (score-aware quantization; dot product)
  training_sample_size  min(N, 250_000)
  parallel          True    multi-threaded batched ScaNN search
  num_threads       None    ScaNN search threads (None: the CPUs this process may use)
  block_size        32_768  database rows per matmul block of the exact search
  bm25: stopwords 'en', k1 1.5, b 0.75, method 'lucene'

Scores are dot products of the (normalised) embeddings, higher is closer; BM25 scores for 'bm25'.
`search` returns stable ids (those passed to `build`, else row positions) and -1 / -inf padding
where fewer than k results exist. ScaNN is imported lazily; where it is not importable, 'scann'
falls back to the exact search with a one-line warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from imagerag_jax import jsonfiles

INDEX_FORMAT = "imagerag-jax-index"
INDEX_VERSION = 1
META = "index.json"

DEFAULTS: dict[str, Any] = {
    "kind": "auto",
    "exact_below": 10_000,
    "num_neighbors": 10,
    "num_leaves": None,
    "leaves_to_search": None,
    "leaves_factor": 2.2,
    "min_leaves_to_search": 8,
    "reorder_k": None,
    "dims_per_block": 2,
    "anisotropic_quantization_threshold": 0.2,
    "training_sample_size": None,
    "parallel": True,
    "num_threads": None,
    "block_size": 32_768,
}

MIN_SCANN_SIZE = 256  # below this, kind 'scann' builds an exact index
_warned_no_scann = False


def _as_dict(config: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """A plain dict from a dict, ConfigDict or None; None values (unset placeholders) dropped."""
    if config is None:
        return {}
    d = dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if v is not None}


def import_scann() -> Any | None:
    """The `scann_ops_pybind` module, or None with a one-line warning when ScaNN is unavailable."""
    global _warned_no_scann
    try:
        from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=g-import-not-at-top
        return scann_ops_pybind
    except ImportError as e:
        if not _warned_no_scann:
            logging.warning("ScaNN is not importable (%s); using exact search instead.", e)
            _warned_no_scann = True
        return None


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int | None = None) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    k = k or exact_ids.shape[1]
    hits = [len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k)


def exact_search(database: np.ndarray, queries: np.ndarray, k: int,
                 block_size: int = 32_768, query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product with blocked matmuls; works on memmaps without loading them.

    Returns (rows [Q, k'], scores [Q, k']) sorted by decreasing score, k' = min(k, N).
    """
    queries = np.ascontiguousarray(queries, np.float32)
    n, q = database.shape[0], queries.shape[0]
    k = min(k, n)
    rows = np.zeros((q, k), np.int64)
    scores = np.zeros((q, k), np.float32)
    if k == 0:
        return rows, scores
    for q0 in range(0, q, query_block):
        qb = queries[q0:q0 + query_block]
        best_s = np.full((len(qb), 0), -np.inf, np.float32)
        best_i = np.zeros((len(qb), 0), np.int64)
        for start in range(0, n, block_size):
            block = np.asarray(database[start:start + block_size], np.float32)
            s = qb @ block.T
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            # Merge this block's candidates with the running best k.
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
            cand_i = np.concatenate([best_i, part + start], axis=1)
            if cand_s.shape[1] > k:
                keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
                cand_s = np.take_along_axis(cand_s, keep, 1)
                cand_i = np.take_along_axis(cand_i, keep, 1)
            best_s, best_i = cand_s, cand_i
        order = np.argsort(-best_s, axis=1, kind="stable")
        rows[q0:q0 + len(qb)] = np.take_along_axis(best_i, order, 1)
        scores[q0:q0 + len(qb)] = np.take_along_axis(best_s, order, 1)
    return rows, scores


class Index:
    """Base class: id mapping, exclusion and persistence; subclasses implement `_search_rows`."""

    kind = "base"

    def __init__(self, config: dict[str, Any], count: int, ids: np.ndarray | None):
        self.config = config
        self.count = count
        self.ids = None if ids is None else np.asarray(ids, np.int64)
        if self.ids is not None and self.ids.shape != (count,):
            raise ValueError(f"ids has shape {self.ids.shape}, expected ({count},)")

    # --- construction -------------------------------------------------------------------------

    @staticmethod
    def build(data: np.ndarray | Sequence[str], config: Mapping[str, Any] | Any | None = None,
              ids: np.ndarray | Sequence[int] | None = None) -> Index:
        """Builds an index over `data` ([N, D] embeddings, or N strings for kind='bm25')."""
        cfg = {**DEFAULTS, **_as_dict(config)}
        kind = cfg["kind"]
        if kind == "bm25":
            from imagerag_jax.retrieval import bm25  # pylint: disable=g-import-not-at-top
            return bm25.BM25Index.build_bm25(data, cfg, ids)
        if kind not in ("auto", "scann", "exact"):
            raise ValueError(f"unknown index kind {kind!r}; expected auto|scann|exact|bm25")
        data = np.asarray(data) if not isinstance(data, np.memmap) else data
        if data.ndim != 2:
            raise ValueError(f"embeddings must be [N, D], got shape {data.shape}")
        if kind == "auto":
            kind = "exact" if data.shape[0] < cfg["exact_below"] else "scann"
        if kind == "scann":
            if data.shape[0] < MIN_SCANN_SIZE:
                # AH codebooks need more points than centres; exact is instant at this size anyway.
                logging.info("Index: %d entries, using exact search instead of ScaNN.", len(data))
                kind = "exact"
            elif import_scann() is None:
                kind = "exact"
        if kind == "scann":
            return ScannIndex.build_scann(data, cfg, ids)
        return ExactIndex(np.asarray(data, np.float32), {**cfg, "kind": "exact"}, ids)

    # --- search -------------------------------------------------------------------------------

    def _search_rows(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k row positions and scores, [Q, <=k] each, best first."""
        raise NotImplementedError

    def search(self, queries: Any, k: int, *, exclude_ids: np.ndarray | Sequence | None = None,
               drop_score_above: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (ids [Q, k] int64, scores [Q, k] float32), best first.

        Args:
            queries: [Q, D] embeddings (or Q strings for BM25); a single [D] query is promoted to [1, D].
            k: neighbours per query.
            exclude_ids: [Q] or [Q, m] ids to drop per query (e.g. the example's own id; -1 pads).
            drop_score_above: also drop results scoring >= this (exact duplicates of the query, e.g.
              the same caption under another id); e.g. 1 - 1e-4 for normalised embeddings.
        Rows with fewer than k survivors are padded with id -1 and score -inf.
        """
        single = isinstance(queries, str) or (
            not isinstance(queries, (list, tuple)) and np.ndim(queries) == 1)
        if single:
            queries = [queries] if isinstance(queries, str) else np.asarray(queries)[None]
        nq = len(queries)
        excl = None
        if exclude_ids is not None:
            excl = np.asarray(exclude_ids, np.int64).reshape(nq, -1)
        filtering = excl is not None or drop_score_above is not None
        extra = (excl.shape[1] if excl is not None else 0) + (4 if drop_score_above is not None else 0)
        k_search = min(self.count, k + extra)
        out_ids = np.full((nq, k), -1, np.int64)
        out_scores = np.full((nq, k), -np.inf, np.float32)
        todo = np.arange(nq)
        while len(todo):
            sub = [queries[i] for i in todo] if isinstance(queries, (list, tuple)) else queries[todo]
            rows, scores = self._search_rows(sub, k_search)
            ids = self._rows_to_ids(rows)
            keep = rows >= 0
            if excl is not None:
                keep &= ~(ids[:, :, None] == excl[todo][:, None, :]).any(-1)
            if drop_score_above is not None:
                keep &= scores < drop_score_above
            n_keep = keep.sum(1)
            # Rows that lost too many results to filtering get a wider search on the next round.
            done = (n_keep >= k) | (k_search >= self.count) | (not filtering)
            for j in np.nonzero(done)[0]:
                sel = np.nonzero(keep[j])[0][:k]
                out_ids[todo[j], :len(sel)] = ids[j, sel]
                out_scores[todo[j], :len(sel)] = scores[j, sel]
            todo = todo[~done]
            k_search = min(self.count, 2 * k_search)
        if single:
            return out_ids[0], out_scores[0]
        return out_ids, out_scores

    def _rows_to_ids(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self.ids is None:
            return rows
        return np.where(rows >= 0, self.ids[np.clip(rows, 0, None)], -1)

    # --- persistence --------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """Writes the index to directory `path` (index.json + the kind's artifacts)."""
        os.makedirs(path, exist_ok=True)
        self._save(path)
        if self.ids is not None:
            np.save(os.path.join(path, "ids.npy"), self.ids)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": self.kind,
                "count": self.count, "has_ids": self.ids is not None,
                "config": _jsonable(self.config)}
        with open(os.path.join(path, META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    def _save(self, path: str) -> None:
        raise NotImplementedError

    @staticmethod
    def load(path: str) -> Index:
        """Loads an index written by `save` (a ScaNN index loads as exact where ScaNN is missing)."""
        mpath = os.path.join(path, META)
        if not os.path.exists(mpath):
            raise FileNotFoundError(f"{path!r} is not a saved index (no {META})")
        meta = jsonfiles.read_versioned(mpath, INDEX_FORMAT, INDEX_VERSION, what="index metadata",
                                        hint="rebuild the index")
        ids = np.load(os.path.join(path, "ids.npy")) if meta["has_ids"] else None
        cfg, count = meta["config"], meta["count"]
        if meta["kind"] == "exact":
            return ExactIndex(np.load(os.path.join(path, "embeddings.npy"), mmap_mode="r"), cfg, ids)
        if meta["kind"] == "scann":
            scann = import_scann()
            if scann is None:
                data = np.load(os.path.join(path, "scann", "dataset.npy"), mmap_mode="r")
                return ExactIndex(data, {**cfg, "kind": "exact"}, ids)
            searcher = scann.load_searcher(os.path.join(path, "scann"))
            return ScannIndex(searcher, cfg, count, ids)
        if meta["kind"] == "bm25":
            from imagerag_jax.retrieval import bm25  # pylint: disable=g-import-not-at-top
            return bm25.BM25Index.load_bm25(path, cfg, count, ids)
        raise ValueError(f"{mpath}: unknown index kind {meta['kind']!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count}, config={self.config})"


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in cfg.items()}


class ExactIndex(Index):
    """Brute-force dot-product search (numpy blocked matmul); the recall reference."""

    kind = "exact"

    def __init__(self, embeddings: np.ndarray, config: dict[str, Any], ids: np.ndarray | None):
        super().__init__(config, embeddings.shape[0], ids)
        self.embeddings = embeddings

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_search(self.embeddings, queries, k, block_size=self.config["block_size"])

    def _save(self, path: str) -> None:
        np.save(os.path.join(path, "embeddings.npy"), np.asarray(self.embeddings, np.float32))


def resolve_scann_params(n: int, cfg: Mapping[str, Any]) -> dict[str, int]:
    """ScaNN parameters from the config, derived from N where unset."""
    num_leaves = cfg.get("num_leaves") or max(2, int(round(math.sqrt(n))))
    num_leaves = min(num_leaves, max(2, n // 2))  # ScaNN wants a few points per leaf.
    leaves = cfg.get("leaves_to_search") or max(
        cfg.get("min_leaves_to_search", 8),
        math.ceil(cfg.get("leaves_factor", 2.2) * math.sqrt(num_leaves)))
    k = cfg.get("num_neighbors", 10)
    return {
        "num_leaves": int(num_leaves),
        "leaves_to_search": int(min(leaves, num_leaves)),
        "reorder_k": int(cfg.get("reorder_k") or max(200, 10 * k)),
        "training_sample_size": int(cfg.get("training_sample_size") or min(n, 250_000)),
        "dims_per_block": int(cfg.get("dims_per_block", 2)),
    }


class ScannIndex(Index):
    """ScaNN: k-means tree + anisotropic asymmetric hashing + exact reordering, dot product."""

    kind = "scann"

    def __init__(self, searcher: Any, config: dict[str, Any], count: int, ids: np.ndarray | None):
        super().__init__(config, count, ids)
        self.searcher = searcher
        # ScaNN searches batches with one thread unless told otherwise (measured: 2x on 2 cores).
        threads = config.get("num_threads") or (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        searcher.set_num_threads(int(threads or 1))

    @classmethod
    def build_scann(cls, data: np.ndarray, cfg: dict[str, Any], ids: Any) -> ScannIndex:
        """Trains and builds a ScaNN searcher over [N, D] float embeddings."""
        scann = import_scann()
        data = np.ascontiguousarray(data, np.float32)
        p = resolve_scann_params(data.shape[0], cfg)
        cfg = {**cfg, **p, "kind": "scann"}
        logging.info("Building ScaNN index over %s: %s", data.shape, p)
        searcher = (
            scann.builder(data, cfg["num_neighbors"], "dot_product")
            .tree(num_leaves=p["num_leaves"], num_leaves_to_search=p["leaves_to_search"],
                  training_sample_size=p["training_sample_size"])
            .score_ah(p["dims_per_block"],
                      anisotropic_quantization_threshold=cfg["anisotropic_quantization_threshold"])
            .reorder(p["reorder_k"])
            .build())
        return cls(searcher, cfg, data.shape[0], ids)

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        kw = {"final_num_neighbors": k,
              "pre_reorder_num_neighbors": max(self.config["reorder_k"], k),
              "leaves_to_search": self.config["leaves_to_search"]}
        if len(queries) == 1:  # The single-query path skips the batching overhead (latency).
            rows, scores = self.searcher.search(queries[0], **kw)
            rows, scores = np.asarray(rows)[None], np.asarray(scores)[None]
        elif self.config.get("parallel", True):
            rows, scores = self.searcher.search_batched_parallel(queries, **kw)
        else:
            rows, scores = self.searcher.search_batched(queries, **kw)
        rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
        if rows.shape[1] < k:  # Too few candidates in the searched leaves: pad.
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        return rows, scores

    def _save(self, path: str) -> None:
        sdir = os.path.join(path, "scann")
        os.makedirs(sdir, exist_ok=True)
        # Relative asset paths so the saved index can be moved or copied to other hosts.
        self.searcher.serialize(sdir, relative_path=True)
