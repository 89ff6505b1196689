"""The build-db job: an image-text source -> VAE latents + text embeddings -> retrieval DB + index.

`build_db(config, workdir)` takes an ml_collections config (see `configs/precompute_digits.py`
for every field) and a workdir. Default locations: `workdir/db` (database, `config.db.dir`) and
`workdir/index` (its index, `config.index_dir`). Every process of a multi-host launch works:

  * One process (and `config.db.num_parts` unset or 1) writes the database directory itself.
  * Otherwise the build runs in parts (`config.db.num_parts`, default: the process count). Part i
    of n holds the source's raw items [floor(i N / n), floor((i + 1) N / n)) (the position
    numbering of `sources.raw_items`, split as precompute splits its shards), N = len(source), or
    the raw position after the `config.db.limit`-th entry (a decoding-only pass finds it). Process
    p of P writes parts p, p + P, ... into `<db>/parts/part-{i:05d}-of-{n:05d}/`, each a normal
    resumable database with its own image hashes and skip counts; `done.json` in it (written after
    its last commit) marks it complete, and a rerun skips complete parts without writing them.
    Every process iterates the source from the start (decoding is cheap next to the models), so a
    duplicate id is dropped where one process would drop it.
  * Process 0 waits (up to `config.db.wait_timeout_s`) for every part's marker, polling the
    shared filesystem that every host must see (a part built by another configuration is refused
    with one error), concatenates the parts in order into the database directory (ids, rows,
    captions, hashes and skip counts as a one-process build writes them; the manifest's
    `extra.merged_from_parts` records which parts) and builds the index. With `config.db.dir` (and
    `config.index_dir`) at a URL (gs://...), nothing is shared but the bucket: every process
    builds in its local copies (`storage.staging_dir`), publishes each finished part to
    `<url>/parts/` (its done marker last), process 0 fetches the others' parts from there, merges,
    indexes and publishes the database (its manifest last) and the index; a part published by an
    earlier run on another machine is fetched, not encoded again. The other processes wait
    for both, so that a following job on any host can read them. With explicit
    `process_index`/`process_count` (hosts run as separate jobs) nobody waits: process 0, rerun
    after the others finished, concatenates. A part layout is pinned to its configuration (source,
    N, models, image size, limit): change it with `config.db.overwrite=True`.

  * Images are centre-cropped/resized to `config.image_size`, encoded by the VAE (mean latent,
    `(mean - shift) * scaling_factor`, stored f16); captions -> tokenizer -> text encoder (77xD
    hidden states, and the pooled embedding, L2-normalised) -> `DatabaseWriter.append` with the
    source's stable int64 ids.
  * Resumable: the DB manifest's committed `count` says how many accepted examples a previous
    (killed or limited, `config.db.limit`) run wrote; the source is iterated again from the start
    (sources iterate deterministically) and those are skipped. Duplicate ids are dropped (counted).
    A resume whose weights (the text encoder's and VAE's fingerprints), image size or compute
    dtype differ from the rows already written is refused, even when the weights' path is the same.
  * `image_hashes.bin` in the DB directory: one uint64 per row (row-aligned with the DB arrays,
    headerless little-endian like them, appended before each commit and truncated to the committed
    count on resume) = blake2b-64 of the uint8 RGB pixels after resizing, with their shape. It lets
    `precompute` exclude exact image duplicates of an example; read it with `load_image_hashes`.
  * The manifest records the text-encoder and VAE identity (`path#hash` of the module config, or
    `random:preset:seed#hash`), the source (its config and image size) and, in `extra`, the
    source's skip counts by reason ("unreadable image", "missing caption", "duplicate id").
  * The index (`config.index`: kind 'auto'|'scann'|'exact'|'bm25' and its parameters, see
    retrieval/index.py) is built over the pooled embeddings (captions for bm25) into the index
    directory; it is rebuilt only when the DB or the index config changed (`built_from.json`
    records both).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from imagerag_jax import config_args, jsonfiles, storage
from imagerag_jax.weights import towers
from imagerag_jax.data import encoders
from imagerag_jax.data import sources as sources_lib
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib

HASHES_FILE = "image_hashes.bin"
INDEX_STAMP = "built_from.json"
_HASH_DTYPE = np.dtype("<u8")
PARTS_DIR = "parts"  # <db>/parts/part-00003-of-00008/: one database per raw range
PART_DONE = "done.json"  # a part's completion marker, written after its last commit
MERGED_KEY = "merged_from_parts"  # manifest extra: the parts' records the database was made of
_PINNED_EXTRA = ("image_size", "compute_dtype", "text_encoder_fingerprint", "vae_fingerprint")
_POLL_S = 1.0  # how often a waiting process looks at the shared filesystem again


# ------------------------------------------------------------------------------------------------
# Locations.
# ------------------------------------------------------------------------------------------------


def db_dir(config: Any, workdir: str) -> str:
    """The database directory: config.db.dir or workdir/db."""
    return config_args.get(config_args.get(config, "db"), "dir") or os.path.join(workdir, "db")


def index_dir(config: Any, workdir: str) -> str:
    """The index directory: config.index_dir or workdir/index."""
    return config_args.get(config, "index_dir") or os.path.join(workdir, "index")


# ------------------------------------------------------------------------------------------------
# The image-hash sidecar.
# ------------------------------------------------------------------------------------------------


def image_hash(image: np.ndarray) -> int:
    """64-bit blake2b of a uint8 image's shape and pixels (exact-duplicate detection)."""
    image = np.ascontiguousarray(image, np.uint8)
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(image.shape, np.int64).tobytes())
    h.update(image.tobytes())
    return int.from_bytes(h.digest(), "little")


def load_image_hashes(db_path: str, count: int | None = None) -> np.ndarray:
    """The DB's per-row image hashes (uint64 [count]); raises if the sidecar is missing or short."""
    path = os.path.join(db_path, HASHES_FILE)
    if count is None:
        count = db_lib.Database(db_path).count
    if not os.path.exists(path) or os.path.getsize(path) < count * 8:
        raise db_lib.DatabaseError(f"{path}: missing or shorter than {count} hashes; rebuild the "
                                   "database with data.build_db.build_db")
    return np.fromfile(path, _HASH_DTYPE, count=count).astype(np.uint64)


class _HashSidecar:
    """Appends image hashes row-aligned with a DatabaseWriter (written before each DB commit)."""

    def __init__(self, db_path: str, committed: int, fsync: bool):
        self.path, self._fsync = os.path.join(db_path, HASHES_FILE), fsync
        have = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        if have < committed * 8:
            raise db_lib.DatabaseError(
                f"{self.path} holds {have // 8} hashes but the database commits {committed} rows; "
                "rebuild with config.db.overwrite=True")
        with open(self.path, "ab") as f:
            f.truncate(committed * 8)  # drop hashes of a batch a killed run never committed

    def append(self, hashes: Sequence[int]) -> None:
        """Appends one batch's hashes (fsynced when the DB is)."""
        with open(self.path, "ab") as f:
            f.write(np.asarray(hashes, _HASH_DTYPE).tobytes())
            if self._fsync:
                f.flush()
                os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------
# The job's settings and the pieces both layouts share.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """One build_db call's settings, models and source."""

    path: str
    image_size: int | None
    batch_size: int
    limit: int | None
    fsync: bool
    overwrite: bool
    wait_timeout_s: float
    models: towers.JobTowers
    enc: encoders.Encoder
    source_config: Any
    source: sources_lib.Source
    src_id: str
    extra: dict[str, Any]  # the manifest's `extra` before any skip counts

    def new_source(self) -> sources_lib.Source:
        """A fresh source object (its own skip counter) for a pass that must not count skips."""
        return sources_lib.source_from_config(self.source_config)


def _job(config: Any, workdir: str) -> _Job:
    """Reads the config, loads the models and opens the source."""
    get = config_args.get
    dbc = get(config, "db")
    if dbc is None or get(dbc, "source") is None:
        raise UserError("build_db needs config.db.source (e.g. {'kind': 'digits', ...})")
    image_size = get(config, "image_size")
    batch_size = int(get(config, "batch_size", 32))
    models = towers.load_job_towers(config, workdir)
    source = sources_lib.source_from_config(get(dbc, "source"))
    if not source.has_images:
        raise UserError(f"{source.skipped.name} holds prompts only; a retrieval database needs "
                         "images (use it as config.source of precompute with latents='teacher')")
    # Weight fingerprints beside the architecture identities: `db_lib.check_encoders` refuses a DB
    # whose text encoder or VAE had other weights (paths alone move between machines).
    encs = models.encoders()
    extra = {"image_size": image_size, "image_hashes": HASHES_FILE,
             "compute_dtype": get(config, "compute_dtype", "float32"),
             "text_encoder_fingerprint": encs.text_encoder_fingerprint,
             "vae_fingerprint": encs.vae_fingerprint}
    return _Job(path=db_dir(config, workdir), image_size=image_size, batch_size=batch_size,
                limit=int(get(dbc, "limit", 0)) or None, fsync=bool(get(dbc, "fsync", True)),
                overwrite=bool(get(dbc, "overwrite", False)),
                wait_timeout_s=float(get(dbc, "wait_timeout_s", 24 * 3600)),
                models=models, enc=encoders.Encoder(models, batch_size),
                source_config=get(dbc, "source"), source=source,
                src_id=sources_lib.source_identity(get(dbc, "source"), image_size), extra=extra)


def _open_db(job: _Job, path: str, image_shape: Sequence[int],
             extra: dict[str, Any]) -> db_lib.DatabaseWriter:
    """The writer of one database directory (resumed, or wiped with config.db.overwrite)."""
    # Shapes from abstract evaluation on the first image: the writer needs them before any batch.
    spec = db_lib.DatabaseSpec(*job.enc.output_shapes(tuple(image_shape)))
    if not job.overwrite and os.path.exists(os.path.join(path, db_lib.MANIFEST)):
        _check_resumable(path, job)
    if job.overwrite and os.path.exists(os.path.join(path, HASHES_FILE)):
        os.remove(os.path.join(path, HASHES_FILE))
    return db_lib.DatabaseWriter(path, spec, source=job.src_id, text_encoder=job.models.text_encoder_id,
                                 vae=job.models.vae_id, overwrite=job.overwrite, fsync=job.fsync,
                                 extra=extra)


def _check_resumable(path: str, job: _Job) -> None:
    """Refuses to append to a database whose rows came from other weights or settings.

    The encoders are checked as precompute and generation check them (`db_lib.check_encoders`:
    architecture and weight fingerprints, not paths, so a moved workdir resumes): rows of two VAEs
    in one database would be silently wrong. The image size and compute dtype must match too.
    """
    manifest = jsonfiles.read(os.path.join(path, db_lib.MANIFEST), what="database manifest",
                              error=db_lib.DatabaseError)
    db_lib.check_encoders(path, manifest, db_lib.Encoders(
        job.models.text_encoder_id, job.models.vae_id, job.extra["text_encoder_fingerprint"],
        job.extra["vae_fingerprint"]))
    have = manifest.get("extra") or {}
    differ = [k for k in _PINNED_EXTRA if k in have and have[k] != job.extra[k]]
    if differ:
        raise db_lib.DatabaseError(
            f"{path}: cannot resume, its rows were written with "
            f"{', '.join(f'{k} {have[k]!r}' for k in differ)}, this job has "
            f"{', '.join(f'{k} {job.extra[k]!r}' for k in differ)}; set config.db.overwrite=True "
            "to rebuild it, or point config.db.dir elsewhere")


class _Dedup:
    """Keeps the first example of every id; later ones are dropped and counted."""

    def __init__(self):
        self._seen: set[int] = set()
        self.duplicates = 0

    def first(self, example_id: int, log: bool = True) -> bool:
        """True for an id not seen before (and remembers it)."""
        example_id = int(example_id)
        if example_id in self._seen:
            self.duplicates += 1
            if log:
                logging.warning("build_db: duplicate id %d skipped", example_id)
            return False
        self._seen.add(example_id)
        return True


class _Appender:
    """Batches accepted examples, encodes them and appends them to one database (hashes first)."""

    def __init__(self, job: _Job, writer: db_lib.DatabaseWriter, image_shape: Sequence[int],
                 extra: Callable[[], dict[str, Any]]):
        self._job, self.writer, self._shape, self._extra = job, writer, tuple(image_shape), extra
        self._hashes = _HashSidecar(writer.path, writer.count, job.fsync)
        self._batch: list[tuple[int, np.ndarray, str, int]] = []
        self.added = 0

    def add(self, example_id: int, image: np.ndarray, caption: str) -> None:
        """Queues one example (resized); a full batch is encoded and committed."""
        image = sources_lib.prepare_image(image, self._job.image_size)
        if image.shape != self._shape:
            raise ValueError(f"image of id {example_id} has shape {image.shape}, expected "
                             f"{self._shape}; set config.image_size")
        self._batch.append((int(example_id), image, caption, image_hash(image)))
        if len(self._batch) == self._job.batch_size:
            self.flush()

    def flush(self) -> None:
        """Encodes and commits the queued examples."""
        if not self._batch:
            return
        batch, enc = self._batch, self._job.enc
        captions = [b[2] for b in batch]
        latents = enc.images(np.stack([b[1] for b in batch]))
        embeds, pooled = enc.texts(captions)
        self._hashes.append([b[3] for b in batch])
        self.writer.manifest["extra"] = self._extra()
        self.writer.append(captions, latents, embeds, pooled, np.asarray([b[0] for b in batch], np.int64))
        self.added += len(batch)
        batch.clear()

    def finish(self) -> None:
        """Commits the last batch and the final skip counts (including skips after that batch)."""
        self.flush()
        self.writer.manifest["extra"] = self._extra()
        db_lib.write_manifest(self.writer.path, self.writer.manifest)
        self.writer.close()


def _first_image_shape(job: _Job) -> tuple[int, ...]:
    """The shape of the source's first readable image after resizing (fixes the DB's shapes)."""
    source = job.new_source()  # its skips are counted again by the pass that owns them
    first = next(iter(source), None)
    if first is None:
        raise UserError(f"source {source.skipped.name} yielded no readable example")
    return sources_lib.prepare_image(first[1], job.image_size).shape


# ------------------------------------------------------------------------------------------------
# build_db.
# ------------------------------------------------------------------------------------------------


def build_db(config: Any, workdir: str, process_index: int | None = None,
             process_count: int | None = None) -> dict[str, Any]:
    """Builds (or resumes) the retrieval DB from `config.db.source`, then its index.

    Returns a summary: {"path", "count", "added" (rows this process encoded now), "skipped",
    "index"}, plus "parts" for a build in parts; "count", "skipped" and "index" are None where
    this process returns before the database is complete (explicit process_index/process_count).
    """
    distributed = process_index is None and process_count is None and jax.process_count() > 1
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} not in [0, {pc})")
    job = _job(config, workdir)
    num_parts = int(config_args.get(config_args.get(config, "db"), "num_parts", 0)) or pc
    index_cfg, idx_dir = config_args.get(config, "index"), index_dir(config, workdir)
    # A database or index at a URL (gs://...) is built in this host's local copy (memory-mapped
    # files) and published there; the hosts of a build in parts exchange their parts through it.
    remote = _Remote(job.path, idx_dir) if storage.is_url(job.path) or storage.is_url(idx_dir) else None
    if remote is not None:
        job.path, idx_dir = remote.local_db, remote.local_index
    if num_parts == 1 and pc == 1:
        if remote is not None:
            remote.fetch_db(job.path)  # resume from what was published
        summary = _build_one(job, idx_dir, index_cfg)
        return summary if remote is None else remote.publish(job.path, idx_dir, summary)
    return _build_parts(job, num_parts, pi, pc, distributed, idx_dir, index_cfg, remote)


def _build_one(job: _Job, idx_dir: str, index_cfg: Any) -> dict[str, Any]:
    """One process writes `job.path` itself (the layout every build ends in)."""
    path, source, limit = job.path, job.source, job.limit
    it = sources_lib.raw_items(source)
    first = next((r for r in it if r.example is not None), None)
    if first is None:
        raise UserError(f"source {source.skipped.name} yielded no readable example")
    shape = sources_lib.prepare_image(first.example[1], job.image_size).shape
    writer = _open_db(job, path, shape, dict(job.extra))
    committed = writer.count
    dedup = _Dedup()
    rows = _Appender(job, writer, shape,
                     lambda: _db_extra(writer.manifest.get("extra", {}), source, dedup.duplicates))
    target = limit if limit is not None else (len(source) if hasattr(source, "__len__") else None)

    done = limit is not None and committed >= limit
    bar = tqdm.tqdm(total=target, initial=min(committed, target or committed), unit="img",
                    desc=f"build_db {os.path.basename(path)}", disable=done)
    accepted = 0
    for item in ([] if done else _chain_first(first, it)):
        if item.example is None:
            continue
        example_id, image, caption = item.example
        if not dedup.first(example_id):
            continue
        accepted += 1
        if accepted <= committed:  # written by an earlier run (the source order is deterministic)
            continue
        rows.add(example_id, image, caption)
        bar.update(1)
        if limit is not None and accepted >= limit:
            break
    bar.close()
    if done:
        writer.close()
    else:
        rows.finish()
    skipped = writer.manifest["extra"].get("skipped", {})
    logging.info("build_db: %s holds %d entries (%d added this run); skipped inputs: %s",
                 path, writer.count, writer.count - committed, skipped or "none")
    idx = build_index(path, idx_dir, index_cfg)
    return {"path": path, "count": writer.count, "added": writer.count - committed,
            "skipped": skipped, "index": idx}


def _chain_first(first: sources_lib.RawItem, rest: Iterator[sources_lib.RawItem]
                 ) -> Iterator[sources_lib.RawItem]:
    """`first`, then `rest` (the item already taken to read the shapes goes back in front)."""
    yield first
    yield from rest


def _db_extra(extra: Mapping[str, Any], source: sources_lib.Source, dup_ids: int) -> dict[str, Any]:
    """The manifest's `extra` with the source's current skip counts and examples."""
    skipped = dict(source.skipped.as_dict())
    if dup_ids:
        skipped["duplicate id"] = dup_ids
    return {**extra, "skipped": skipped,
            "skipped_examples": {k: list(v) for k, v in source.skipped.examples.items()}}


# ------------------------------------------------------------------------------------------------
# A build in parts: every process encodes its raw ranges, process 0 concatenates them.
# ------------------------------------------------------------------------------------------------


def part_name(index: int, num_parts: int) -> str:
    """The folder name of part `index` of `num_parts` under `<db>/parts/`."""
    return f"part-{index:05d}-of-{num_parts:05d}"


def part_dir(db_path: str, index: int, num_parts: int) -> str:
    """The database directory of one part."""
    return os.path.join(db_path, PARTS_DIR, part_name(index, num_parts))


def _num_raw_items(job: _Job) -> int:
    """N, the raw items that the parts split: the source's length, or up to the limit-th entry."""
    source, limit = job.source, job.limit
    has_len = hasattr(source, "__len__")
    if limit is None:
        if not has_len:
            raise UserError(f"{source.skipped.name} has no length: set config.db.limit (entries) "
                             "to build the database in parts")
        return len(source)
    if has_len and limit >= len(source):
        return len(source)
    # The limit counts entries, not raw items: find the raw position after the limit-th accepted
    # example (decoding only; the same on every host, as the source order is deterministic).
    dedup, accepted, end = _Dedup(), 0, 0
    for item in sources_lib.raw_items(job.new_source()):
        end = item.position + 1
        if item.example is not None and dedup.first(item.example[0], log=False):
            accepted += 1
            if accepted == limit:
                break
    return end


def _job_description(job: _Job, num_items: int, num_parts: int) -> dict[str, Any]:
    """What determines every part's rows; all parts of one database must share it."""
    return jsonfiles.normalized({
        "source": job.src_id, "num_items": num_items, "num_parts": num_parts,
        "limit": job.limit or 0, "text_encoder": job.models.text_encoder_id,
        "vae": job.models.vae_id, **{k: job.extra[k] for k in _PINNED_EXTRA}})


def _read_done(path: str) -> dict[str, Any] | None:
    """A part's completion marker when it matches the part's committed database, else None."""
    try:
        marker = jsonfiles.read(os.path.join(path, PART_DONE), what="part marker")
        db = db_lib.Database(path)
    except ValueError:  # missing, unreadable, or a database that does not open (DatabaseError)
        return None
    if marker.get("count") != db.count or marker.get("created") != db.manifest.get("created"):
        return None
    return marker


def _recorded_job(path: str) -> dict[str, Any] | None:
    """The job description a part was (being) built for: its marker's, else its manifest's."""
    for fname, keys in ((PART_DONE, ("job",)), (db_lib.MANIFEST, ("extra", "part", "job"))):
        try:
            obj: Any = jsonfiles.read(os.path.join(path, fname))
        except ValueError:
            continue
        for key in keys:
            obj = obj.get(key) if isinstance(obj, dict) else None
        if obj is not None:
            return obj
    return None


def _check_parts(job: _Job, paths: Sequence[str], desc: dict[str, Any]) -> None:
    """Raises one error naming every part built by another configuration."""
    bad = []
    for path in paths:
        have = _recorded_job(path)
        if have is not None and have != desc:
            keys = sorted(k for k in set(have) | set(desc) if have.get(k) != desc.get(k))
            bad.append(f"{os.path.basename(path)} differs in {keys}")
    if bad:
        raise db_lib.DatabaseError(
            f"{os.path.join(job.path, PARTS_DIR)}: parts built by another build_db configuration "
            f"({'; '.join(bad)}; e.g. other weights, source, image size or limit): rebuild them "
            "with one configuration (config.db.overwrite=True) or delete that folder")


def _records(job: _Job, paths: Sequence[str], desc: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every part's {"name", "count", "created"} once all are done; None while some are not."""
    _check_parts(job, paths, desc)
    markers = [_read_done(p) for p in paths]
    if any(m is None for m in markers):
        return None
    return [{"name": os.path.basename(p), "count": m["count"], "created": m["created"]}
            for p, m in zip(paths, markers)]


def _merged_current(db_path: str, records: list[dict[str, Any]]) -> bool:
    """True when the database at `db_path` is the concatenation of exactly these parts."""
    try:
        m = jsonfiles.read(os.path.join(db_path, db_lib.MANIFEST))
    except ValueError:
        return False
    return (m.get("count") == sum(r["count"] for r in records)
            and (m.get("extra") or {}).get(MERGED_KEY) == jsonfiles.normalized(records))


class _RangeSkips:
    """The skips of one raw range: counts by reason, and the examples the source kept meanwhile."""

    def __init__(self, source: sources_lib.Source):
        self._examples = source.skipped.examples
        # Every host iterates from position 0, so its counter's state here is the same everywhere:
        # the parts' example lists, concatenated in order, are what one process would keep.
        self._start = {reason: len(v) for reason, v in self._examples.items()}
        self.counts: collections.Counter[str] = collections.Counter()

    def extra(self, duplicates: int) -> dict[str, Any]:
        """The part manifest's "skipped" and "skipped_examples"."""
        skipped = dict(self.counts)
        if duplicates:
            skipped["duplicate id"] = duplicates
        examples = {r: list(v[self._start.get(r, 0):]) for r, v in self._examples.items()
                    if len(v) > self._start.get(r, 0)}
        return {"skipped": skipped, "skipped_examples": examples}


def _encode_parts(job: _Job, todo: Sequence[int], bounds: Sequence[int], num_parts: int,
                  desc: dict[str, Any], pi: int) -> int:
    """Writes this process's unfinished parts; returns the rows encoded."""
    shape = _first_image_shape(job)
    source = job.source
    cursor = sources_lib.RawCursor(sources_lib.raw_items(source, stop=bounds[max(todo) + 1]))
    dedup = _Dedup()  # over every range iterated: an id is kept where it first occurs in the source
    bar = tqdm.tqdm(total=sum(bounds[i + 1] - bounds[i] for i in todo), unit="item",
                    desc=f"build_db p{pi}")
    added = 0
    for i in todo:
        for item in cursor.until(bounds[i]):  # other parts' ranges: only their ids matter here
            if item.example is not None:
                dedup.first(item.example[0], log=False)
        added += _encode_part(job, i, num_parts, (bounds[i], bounds[i + 1]),
                              cursor.until(bounds[i + 1]), dedup, shape, desc, bar)
    bar.close()
    return added


def _encode_part(job: _Job, index: int, num_parts: int, span: tuple[int, int],
                 items: Iterator[sources_lib.RawItem], dedup: _Dedup, shape: Sequence[int],
                 desc: dict[str, Any], bar: tqdm.tqdm) -> int:
    """Writes (or resumes) one part from the raw items of its range, then its done marker."""
    path = part_dir(job.path, index, num_parts)
    done = os.path.join(path, PART_DONE)
    if os.path.exists(done):
        os.remove(done)  # not done until this run commits the whole range again
    part = {"index": index, "num_parts": num_parts, "start": span[0], "stop": span[1], "job": desc}
    writer = _open_db(job, path, shape, {**job.extra, "part": part})
    committed, dups_before, skips = writer.count, dedup.duplicates, _RangeSkips(job.source)
    rows = _Appender(job, writer, shape, lambda: {**writer.manifest["extra"],
                                                  **skips.extra(dedup.duplicates - dups_before)})
    accepted = 0
    for item in items:
        bar.update(1)
        if item.example is None:
            skips.counts[item.skip_reason] += 1
            continue
        example_id, image, caption = item.example
        if not dedup.first(example_id):
            continue
        accepted += 1
        if accepted > committed:  # the first `committed` were written by an earlier run
            rows.add(example_id, image, caption)
    rows.finish()
    jsonfiles.write_atomic(done, {"count": writer.count, "created": writer.manifest["created"],
                                  "job": desc, "part": part})
    logging.info("build_db: %s holds %d entries (%d added this run, raw items [%d, %d)).",
                 path, writer.count, rows.added, *span)
    return rows.added


def _merge(job: _Job, paths: Sequence[str], records: list[dict[str, Any]]) -> db_lib.Database:
    """Concatenates the finished parts, in order, into the database at `job.path`."""
    parts = [db_lib.Database(p) for p in paths]
    skipped: collections.Counter[str] = collections.Counter()
    examples: dict[str, list[str]] = {}
    for p in parts:
        skipped.update(p.manifest["extra"].get("skipped", {}))
        for reason, names in p.manifest["extra"].get("skipped_examples", {}).items():
            examples.setdefault(reason, []).extend(names)
    extra = {**{k: v for k, v in parts[0].manifest["extra"].items() if k != "part"},
             "skipped": dict(skipped), "skipped_examples": examples, MERGED_KEY: records}
    manifest = os.path.join(job.path, db_lib.MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)  # uncommit first: the hashes below are rewritten before the new commit
    db_lib.copy_prefix(os.path.join(job.path, HASHES_FILE),
                       [(os.path.join(p.path, HASHES_FILE), p.count * 8) for p in parts], job.fsync)
    db = db_lib.concatenate(job.path, parts, manifest_extra=extra, fsync=job.fsync)
    logging.info("build_db: concatenated %d parts into %s (%d entries).", len(parts), job.path, db.count)
    return db


def _wait(ready: Callable[[], Any], timeout_s: float, what: Callable[[], str]) -> Any:
    """Polls `ready()` until it returns something other than None; raises after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (got := ready()) is None:
        if time.monotonic() > deadline:
            raise UserError(f"build_db: gave up after {timeout_s:.0f} s waiting for {what()} "
                            "(config.db.wait_timeout_s); rerun to resume")
        time.sleep(_POLL_S)
    return got


def _build_parts(job: _Job, num_parts: int, pi: int, pc: int, distributed: bool, idx_dir: str,
                 index_cfg: Any, remote: _Remote | None = None) -> dict[str, Any]:
    """Every process writes its parts; process 0 concatenates them and builds the index."""
    num_items = _num_raw_items(job)
    desc = _job_description(job, num_items, num_parts)
    paths = [part_dir(job.path, i, num_parts) for i in range(num_parts)]
    mine = sources_lib.host_ranges(num_parts, pi, pc)
    if remote is not None and not job.overwrite:
        remote.fetch_parts(paths, mine)  # finished on another machine: not encoded again
    todo = _todo_parts(job, paths, mine, desc, distributed, remote)
    logging.info("build_db: process %d/%d owns parts %s of %d (raw items %d); %d to write.",
                 pi, pc, mine, num_parts, num_items, len(todo))
    bounds = sources_lib.position_bounds(num_items, num_parts)
    added = _encode_parts(job, todo, bounds, num_parts, desc, pi) if todo else 0
    if remote is not None:
        remote.publish_parts(paths, [i for i in mine if i in todo or not remote.part_published(paths[i])])
    summary = {"path": job.path, "count": None, "added": added, "skipped": None, "index": None,
               "parts": {"num_parts": num_parts, "mine": mine, "written": todo}}
    if remote is not None:
        return _build_parts_remote(job, remote, paths, desc, pi, distributed, idx_dir, index_cfg,
                                   summary)
    if pi == 0:
        db = _concatenate_parts(job, paths, desc, distributed)
        if db is not None:
            build_index(job.path, idx_dir, index_cfg)
    elif distributed:
        # Later jobs (precompute) read the database and index on every host: wait for them.
        db = _wait(lambda: _complete(job, paths, desc, idx_dir, index_cfg), job.wait_timeout_s,
                   lambda: f"process 0 to concatenate the parts of {job.path} and index them")
    else:  # separate jobs: process 0, run after the others, concatenates
        db = None
    if db is None:
        return summary
    skipped = db.manifest["extra"].get("skipped", {})
    logging.info("build_db: %s holds %d entries from %d parts; skipped inputs: %s",
                 job.path, db.count, num_parts, skipped or "none")
    return {**summary, "count": db.count, "skipped": skipped, "index": index_meta(idx_dir)}


def _todo_parts(job: _Job, paths: Sequence[str], mine: Sequence[int], desc: dict[str, Any],
                distributed: bool, remote: _Remote | None = None) -> list[int]:
    """This process's parts to (re)write: the unfinished ones, or all with config.db.overwrite."""
    if not job.overwrite:
        _check_parts(job, [paths[i] for i in mine], desc)
        return [i for i in mine if _read_done(paths[i]) is None]
    for i in mine:
        if os.path.exists(os.path.join(paths[i], PART_DONE)):
            os.remove(os.path.join(paths[i], PART_DONE))
        if remote is not None:
            remote.unpublish_part(paths[i])
    if distributed:  # no host may read another's stale marker before its owner removed it
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        where = remote.url if remote is not None else os.path.abspath(job.path)  # same on every host
        multihost_utils.sync_global_devices(f"build_db overwrite {where}")
    return list(mine)


def _concatenate_parts(job: _Job, paths: Sequence[str], desc: dict[str, Any],
                       distributed: bool, refresh: Callable[[], None] = lambda: None
                       ) -> db_lib.Database | None:
    """Process 0: the database made of every finished part (None: some are not finished yet).

    `refresh` runs before every look at the parts (a remote build fetches the finished ones).
    """
    def missing() -> str:
        return f"parts {[i for i, p in enumerate(paths) if _read_done(p) is None]} of other processes"

    def ready() -> list[dict[str, Any]] | None:
        refresh()
        return _records(job, paths, desc)

    records = _wait(ready, job.wait_timeout_s, missing) if distributed else ready()
    if records is None:
        logging.info("build_db: %s not finished yet; rerun process 0 once they are.", missing())
        return None
    if _merged_current(job.path, records):
        return db_lib.Database(job.path)
    return _merge(job, paths, records)


def _complete(job: _Job, paths: Sequence[str], desc: dict[str, Any], idx_dir: str,
              index_cfg: Any) -> db_lib.Database | None:
    """The concatenated database once it and its index are current, else None."""
    records = _records(job, paths, desc)
    if records is None or not _merged_current(job.path, records):
        return None
    db = db_lib.Database(job.path)
    return db if _index_current(idx_dir, _index_stamp(job.path, db, index_cfg)) else None


def _build_parts_remote(job: _Job, remote: _Remote, paths: Sequence[str], desc: dict[str, Any],
                        pi: int, distributed: bool, idx_dir: str, index_cfg: Any,
                        summary: dict[str, Any]) -> dict[str, Any]:
    """The end of a build in parts at a URL: process 0 fetches the other parts from it, merges,
    indexes and publishes; the others (one launch) wait for the published database."""
    if pi == 0:
        refresh = lambda: remote.fetch_parts(paths, range(len(paths)))  # noqa: E731
        db = _concatenate_parts(job, paths, desc, distributed, refresh)
        if db is None:
            return summary
        build_index(job.path, idx_dir, index_cfg)
        skipped = db.manifest["extra"].get("skipped", {})
        logging.info("build_db: %s holds %d entries from %d parts; skipped inputs: %s",
                     remote.url, db.count, len(paths), skipped or "none")
        return remote.publish(job.path, idx_dir, {**summary, "count": db.count, "skipped": skipped})
    if not distributed:  # separate jobs: process 0, run after the others, merges
        return summary
    m = _wait(lambda: remote.published(paths), job.wait_timeout_s,
              lambda: f"process 0 to publish the database {remote.url}")
    skipped = m["extra"].get("skipped", {})
    return {**summary, "path": remote.url, "count": m["count"], "skipped": skipped,
            "index": index_meta(remote.index_url)}


class _Remote:
    """A database (and index) at a URL, built in this host's local copies (`storage.staging_dir`).

    A part is published (`<url>/parts/part-i/`, its done marker last) when its owner finishes it,
    and fetched by process 0 (or by an owner that lost its local copy) when its marker is there:
    the hosts share no filesystem, only the bucket. The merged database is published with its
    manifest last, after the index.
    """

    def __init__(self, url: str, index_url: str):
        self.url, self.index_url = url, index_url
        self.local_db = storage.staging_dir(url) if storage.is_url(url) else url
        self.local_index = storage.staging_dir(index_url) if storage.is_url(index_url) else index_url

    def _part_url(self, local_part: str) -> str:
        return os.path.join(self.url, PARTS_DIR, os.path.basename(local_part))

    def fetch_db(self, local: str) -> None:
        """The published database (without its parts) into `local`, where there is one."""
        if storage.is_url(self.url) and storage.exists(os.path.join(self.url, db_lib.MANIFEST)):
            storage.stage(self.url, dest=local, exclude=(PARTS_DIR,), what="retrieval database")

    def part_published(self, local_part: str) -> bool:
        return storage.exists(os.path.join(self._part_url(local_part), PART_DONE))

    def fetch_parts(self, paths: Sequence[str], indices: Iterable[int]) -> None:
        """Stages every part of `indices` that is published and not complete locally."""
        for i in indices:
            if _read_done(paths[i]) is None and self.part_published(paths[i]):
                storage.stage(self._part_url(paths[i]), dest=paths[i], what=f"database part {i}")

    def unpublish_part(self, local_part: str) -> None:
        """Removes a part's published marker (it is being rebuilt)."""
        marker = os.path.join(self._part_url(local_part), PART_DONE)
        if storage.exists(marker):
            storage.remove(marker)

    def publish_parts(self, paths: Sequence[str], indices: Sequence[int]) -> None:
        for i in indices:
            if _read_done(paths[i]) is not None:
                storage.publish(paths[i], self._part_url(paths[i]), last=PART_DONE,
                                what=f"database part {i}")

    def published(self, paths: Sequence[str]) -> dict[str, Any] | None:
        """The published database's manifest once it is the merge of the published parts."""
        try:
            m = jsonfiles.read(os.path.join(self.url, db_lib.MANIFEST))
            markers = [jsonfiles.read(os.path.join(self._part_url(p), PART_DONE)) for p in paths]
        except ValueError:  # not there (yet)
            return None
        records = [{"name": os.path.basename(p), "count": marker["count"], "created": marker["created"]}
                   for p, marker in zip(paths, markers)]
        ok = (m.get("extra") or {}).get(MERGED_KEY) == jsonfiles.normalized(records)
        return m if ok else None

    def publish(self, local_db: str, local_index: str, summary: dict[str, Any]) -> dict[str, Any]:
        """Uploads the index, then the database (its manifest last); the summary names the URLs."""
        if storage.is_url(self.index_url):
            storage.publish(local_index, self.index_url, last=INDEX_STAMP, what="index")
        if storage.is_url(self.url):
            storage.publish(local_db, self.url, last=db_lib.MANIFEST, exclude=(PARTS_DIR,),
                            what="retrieval database")
        return {**summary, "path": self.url, "index": index_meta(self.index_url)}


# ------------------------------------------------------------------------------------------------
# The index.
# ------------------------------------------------------------------------------------------------


def build_index(db_path: str, out_dir: str, index_config: Any = None) -> dict[str, Any]:
    """Builds and saves the index over a DB unless `out_dir` is current; returns its meta."""
    db = db_lib.Database(db_path)
    cfg = config_args.plain(index_config)
    stamp = _index_stamp(db_path, db, index_config)
    if _index_current(out_dir, stamp):
        logging.info("Index %s is up to date (%d entries).", out_dir, db.count)
        return index_meta(out_dir)
    if db.count == 0:
        raise UserError(f"{db_path} is empty: nothing to index")
    if cfg.get("kind") == "bm25":
        index = index_lib.Index.build(db.captions(), cfg, ids=np.asarray(db.ids))
    else:
        index = index_lib.Index.build(db.pooled, cfg, ids=np.asarray(db.ids))
    # Save beside, then swap in: readers never see a half-written index.
    tmp = jsonfiles.temp_name(out_dir)
    index.save(tmp)
    jsonfiles.write_atomic(os.path.join(tmp, INDEX_STAMP), stamp)
    old = jsonfiles.temp_name(out_dir)
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    logging.info("Built %s index over %d entries into %s.", index.kind, db.count, out_dir)
    return index_meta(out_dir)


def _index_stamp(db_path: str, db: db_lib.Database, index_config: Any) -> dict[str, Any]:
    """What an index was built from: the database (path, count, creation) and the index config."""
    return {"db_path": os.path.abspath(db_path), "db_count": db.count,
            "db_created": db.manifest.get("created"), "config": config_args.plain(index_config)}


def _index_current(out_dir: str, stamp: dict[str, Any]) -> bool:
    """True when `out_dir` holds a saved index built from `stamp`."""
    stamp_path = os.path.join(out_dir, INDEX_STAMP)
    if not (os.path.exists(stamp_path) and os.path.exists(os.path.join(out_dir, index_lib.META))):
        return False
    try:
        with open(stamp_path) as f:
            return json.load(f) == jsonfiles.normalized(stamp)
    except (OSError, ValueError):  # being swapped in by another process right now
        return False


def index_meta(path: str) -> dict[str, Any]:
    """The saved index's path (a URL as given), kind, count and config (what manifests record)."""
    with storage.open_file(os.path.join(path, index_lib.META)) as f:
        meta = json.load(f)
    return {"path": path if storage.is_url(path) else os.path.abspath(path), "kind": meta["kind"],
            "count": meta["count"], "config": meta["config"]}
