"""Neighbours by id: fills a host batch's neighbour arrays from the database and its H-space cache.

    feed = open_feed(manifest, schema, hspace=True, student_params=params)   # or None
    batch = feed.fill(batch)        # retrieved_ids [B, k] -> retrieved_hspace, retrieved_pooled
    step_schema = feed.schema(schema)

Records that store their neighbours by id (`tfrecords.Schema.neighbours == 'ids'`, ~0.23 MB per
example at SD 2.1 shapes instead of ~1.0 MB) carry only `retrieved_ids` and `retrieval_scores`;
every training host reads the rest from its own copy of the retrieval database, memory-mapped,
gathering only the batch's rows. With ``hspace`` the feed gathers each neighbour's H-space (the
frozen student encoder's mid-block output at t = 0, `retrieval.hspace_cache`) instead of its latent
and prompt embeddings, so the train step does not run the encoder on the k neighbours; this works
for records of either kind (inline records carry the ids too).

Both are pure functions of the ids, so a resumed stream gathers the same arrays. A database at a
URL (`gs://...`, as config.database or as recorded) is staged to each host's local disk first
(`storage.stage`: once, resumably). The database must
be the one the records were retrieved from (same entry count and creation time, checked), and
the cache must be the one of the run's frozen student encoder (its fingerprint, checked).
Numpy only: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from imagerag_jax import storage
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database as db_lib


class NeighbourFeed:
    """Gathers neighbour arrays by id from a database and, optionally, its H-space cache.

    Args:
        database: the retrieval database the records' neighbours come from.
        cache: its H-space cache for the run's student encoder (`retrieval.hspace_cache`), or None.
        with_latents: with a cache, also deliver the neighbours' latents and prompt embeddings (the
            trainer's sample grids show neighbour 0 as an image).
    """

    def __init__(self, database: db_lib.Database, cache: Any = None, *, with_latents: bool = False):
        self.database, self.cache, self.with_latents = database, cache, with_latents

    def schema(self, stored: Any) -> Any:
        """The schema of the batches `fill` makes from records of `stored` (neighbours inline)."""
        hspace = None if self.cache is None else tuple(self.cache.shape)
        return dataclasses.replace(stored, neighbours="inline", hspace_shape=hspace)

    def fields(self, stored: Any) -> tuple[str, ...]:
        """The neighbour fields `fill` adds to a batch of `stored` records."""
        out = ["retrieved_pooled"]
        if self.cache is not None:
            out.append("retrieved_hspace")
        if self.cache is None or self.with_latents:
            out.extend(("retrieved_latents", "retrieved_prompt_embeds"))
        return tuple(f for f in out if f not in stored.fields or f == "retrieved_hspace")

    def fill(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` with its neighbours' arrays gathered by `batch['retrieved_ids']` ([B, k])."""
        ids = np.asarray(batch["retrieved_ids"], np.int64)
        try:
            rows = self.database.rows_for_ids(ids)
        except KeyError as e:
            raise UserError(f"the training records name neighbours that the database "
                            f"{self.database.path} does not hold ({e.args[0]}); is it the database "
                            "the records were retrieved from?") from e
        out = dict(batch)
        arrays = {"retrieved_pooled": "pooled"}
        if self.cache is None or self.with_latents:
            arrays.update(retrieved_latents="latents", retrieved_prompt_embeds="prompt_embeds")
        arrays = {field: name for field, name in arrays.items() if field not in out}
        got = self.database.gather(rows, names=tuple(arrays.values()))  # reads only these
        out.update({field: got[name] for field, name in arrays.items()})
        if self.cache is not None:
            out["retrieved_hspace"] = self.cache.gather(rows)
        return out


def database_path(manifest: Mapping[str, Any], override: str | None) -> str:
    """The database a TFRecord set's neighbours came from: `override`, else the recorded path."""
    recorded = ((manifest.get("index") or {}).get("database") or {}).get("path")
    path = override or recorded
    if not path:
        raise UserError("the training records do not say which database their neighbours come from; "
                        "set config.database to it")
    if storage.is_url(path):  # memory-mapped: every host reads a local copy
        if not storage.isdir(path):
            raise UserError(f"the retrieval database {path} does not exist")
        return storage.stage(path, what="retrieval database")
    if not os.path.isdir(path):
        raise UserError(f"the retrieval database {path} does not exist on this host"
                        + ("" if override else " (the path the records were precomputed with); copy "
                           "it to local disk and set config.database")
                        + ": neighbours by id and the H-space branch read it here")
    return path


def check_same_database(db: db_lib.Database, manifest: Mapping[str, Any]) -> None:
    """Refuses a database other than the one the records were retrieved from (count, creation)."""
    recorded = (manifest.get("index") or {}).get("database") or {}
    for key, have in (("count", db.count), ("created", db.manifest.get("created"))):
        if key in recorded and recorded[key] != have:
            raise UserError(f"the database {db.path} has {key} {have!r}, the training records were "
                            f"retrieved from one with {key} {recorded[key]!r}; use that database")


def open_feed(manifest: Mapping[str, Any], stored: Any, *, hspace: bool,
              student_params: Any = None, database: str | None = None,
              with_latents: bool = False, hspace_dtype: str = "float16") -> NeighbourFeed | None:
    """The feed a TFRecord set's batches need, or None where its records carry everything.

    Args:
        manifest: the set's TFRecord manifest (says which database the neighbours came from).
        stored: its `tfrecords.Schema`.
        hspace: deliver each neighbour's H-space from the database's H-space cache.
        student_params: the run's frozen student UNet params (the cache is the one of its encoder).
        database: the database's path on this host (default: the path recorded in the manifest).
        with_latents: see `NeighbourFeed`.
        hspace_dtype: the cache's storage dtype (float32 caches are for exactness checks).
    """
    if not hspace and stored.neighbours == "inline":
        return None
    if stored.k < 1:
        raise UserError("the records have no neighbours (k = 0): there is nothing to feed")
    path = database_path(manifest, database)
    db = db_lib.Database.open(path)
    check_same_database(db, manifest)
    cache = None
    if hspace:
        from imagerag_jax.retrieval import hspace_cache  # pylint: disable=g-import-not-at-top

        fp = hspace_cache.encoder_fingerprint(student_params)
        cache = hspace_cache.open_cache(path, fingerprint=fp, dtype=hspace_dtype)
        if cache is None:
            raise UserError(
                f"retrieved_branch='hspace' needs the H-space cache of {path} for the student's "
                f"encoder ({fp}); build it once with: python -m imagerag_jax.main build-cache "
                f"--weights <the student weights> --database {path} --index <its index>")
    return NeighbourFeed(db, cache, with_latents=with_latents)
