"""img2dataset's outputs as sources: webdataset tar shards (KEY.{jpg,png,webp} + .txt + .json) and parquet.

    WebDatasetSource("/data/laion/*.tar", image_size=512, min_side=512, max_pwatermark=0.5,
                     max_punsafe=0.1, min_aesthetic=5.0)

Shards are read in sorted path order with the standard library's `tarfile` in stream mode (one
member at a time: a shard is never listed or held whole), and a sample is the run of consecutive
members sharing a key, as img2dataset writes them. Ids are img2dataset's numeric keys. Every item
that does not become an example is counted by reason in `skipped`: 'unreadable image',
'missing caption', 'missing image', 'bad metadata', one 'corrupt shard' per shard that cannot be
read to its end (the samples before the damage are kept; a plain `.tar` must end in its
end-of-archive block, since `tarfile` stops silently at a cut header), and one reason per filter
('min_side', 'pwatermark', 'punsafe', 'aesthetic'; an item whose metadata lacks a filtered field
fails it).
`ParquetSource` reads img2dataset's parquet output (the image bytes in a column) with pyarrow.
`tarfile` rather than the `webdataset` package: the layout needs no more than the standard
library, and the package's own readers stop or retry on a damaged shard instead of counting it.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from imagerag_jax.data import sources

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# (config field, metadata key, reason, keep(value, bound)); min_side is checked on the image.
FILTERS = (("max_pwatermark", "pwatermark", "pwatermark", lambda v, b: v <= b),
           ("max_punsafe", "punsafe", "punsafe", lambda v, b: v <= b),
           ("min_aesthetic", "aesthetic", "aesthetic", lambda v, b: v >= b))


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Sorted shard paths of a glob (or of a list of paths and globs); FileNotFoundError if none."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    found = sorted({p for pattern in patterns for p in (glob.glob(pattern) or
                                                       ([pattern] if os.path.isfile(pattern) else []))})
    if not found:
        raise FileNotFoundError(f"no webdataset shards match {paths!r}")
    return found


def _clean_end(path: str, offset: int) -> bool:
    """True when a plain tar holds its end-of-archive zero block at `offset` (where reading stopped).

    Compressed shards are left to the decompressor's own checks (the offset is not a file offset).
    """
    if not path.lower().endswith(".tar"):
        return True
    with open(path, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def _samples(path: str, read: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of one shard, streamed; raises on damage."""
    key, members = None, {}
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            stem, _, ext = base.partition(".")
            if stem != key and key is not None:
                yield key, members
                members = {}
            key = stem
            f = tar.extractfile(info) if read else None
            members[ext.lower()] = f.read() if f is not None else b""
            tar.members = []  # tarfile keeps every header it read; a shard's worth only grows
        end = tar.offset
    if not _clean_end(path, end):
        # tarfile ends silently at a cut or garbled header; the sample being read is dropped.
        raise tarfile.ReadError(f"no end-of-archive block at byte {end}: truncated or corrupt")
    if key is not None:
        yield key, members


class _FilteredSource(sources.Source):
    """An img2dataset source: its metadata filters and the checks every item goes through."""

    def __init__(self, name: str, image_size: int | None, min_side: int | None,
                 max_pwatermark: float | None, max_punsafe: float | None,
                 min_aesthetic: float | None):
        super().__init__(name, image_size)
        self.min_side = min_side
        self.bounds = {"max_pwatermark": max_pwatermark, "max_punsafe": max_punsafe,
                       "min_aesthetic": min_aesthetic}

    def _checked(self, name: str, image_bytes: bytes | None, caption: str | None,
                 meta: Mapping[str, Any], key: str, position: int) -> sources.Example | None:
        """The example of one item after its checks and filters (skips counted)."""
        if not image_bytes:
            self.skipped.skip(name, "missing image")
            return None
        caption = (caption or "").strip()
        if not caption:
            self.skipped.skip(name, "missing caption")
            return None
        for field, meta_key, reason, keep in FILTERS:
            bound = self.bounds[field]
            if bound is None:
                continue
            value = meta.get(meta_key)
            if not isinstance(value, (int, float)) or not keep(float(value), float(bound)):
                self.skipped.skip(name, reason)
                return None
        try:
            image = sources.decode_image(image_bytes)
        except Exception as e:  # pylint: disable=broad-except
            self.skipped.skip(name, "unreadable image", e)
            return None
        if self.min_side is not None and min(image.shape[:2]) < self.min_side:
            self.skipped.skip(name, "min_side")
            return None
        key_id = str(meta.get("key") or key)
        example_id = int(key_id) if key_id.isdigit() else position
        return example_id, self._finish(image), caption


def stats_path(shard: str) -> str:
    """img2dataset's stats file of a shard: `00042.tar` -> `00042_stats.json`."""
    folder, name = os.path.split(shard)
    return os.path.join(folder, name.split(".", 1)[0] + "_stats.json")


def _shard_len(path: str) -> int:
    """A shard's raw items: from its stats file when it has a readable one, else streamed."""
    try:
        with open(stats_path(path)) as f:
            successes = json.load(f).get("successes")
        if isinstance(successes, int) and successes >= 0:
            return successes
    except (OSError, ValueError, AttributeError):
        pass
    n = 0
    try:
        for _ in _samples(path, read=False):
            n += 1
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        n += 1  # the shard's 'corrupt shard' item
    return n


class WebDatasetSource(_FilteredSource):
    """Examples of img2dataset webdataset shards (see the module docstring)."""

    def __init__(self, paths: str | Sequence[str], *, image_size: int | None = None,
                 min_side: int | None = None, max_pwatermark: float | None = None,
                 max_punsafe: float | None = None, min_aesthetic: float | None = None):
        super().__init__("webdataset", image_size, min_side, max_pwatermark, max_punsafe,
                         min_aesthetic)
        self.shards = expand_paths(paths)
        self._len: int | None = None

    def __len__(self) -> int:
        """Raw items, shard by shard: the samples img2dataset wrote (`successes` in the shard's
        `<shard>_stats.json`), read without opening the shard; a shard without stats is streamed
        (members' headers only): its samples plus one item if it is damaged. An upper bound where
        a shard was damaged after img2dataset wrote it, or is cut inside a sample."""
        if self._len is None:
            self._len = sum(_shard_len(path) for path in self.shards)
        return self._len

    def __iter__(self) -> Iterator[sources.Example]:
        position = 0
        for path in self.shards:
            try:
                for key, members in _samples(path):
                    name = f"{path}:{key}"
                    example = self._example(name, key, members, position)
                    position += 1
                    if example is not None:
                        yield example
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                self.skipped.skip(path, "corrupt shard", e)
                position += 1

    def _example(self, name: str, key: str, members: Mapping[str, bytes],
                 position: int) -> sources.Example | None:
        """One sample as an example, or None after counting why it is skipped."""
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            self.skipped.skip(name, "missing image")
            return None
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except (ValueError, UnicodeDecodeError) as e:
                self.skipped.skip(name, "bad metadata", e)
                return None
        caption = members.get("txt", b"").decode("utf-8", "replace")
        return self._checked(name, members[ext], caption, meta, key, position)


class ParquetSource(_FilteredSource):
    """img2dataset's parquet output (`--output_format parquet`): rows with the image bytes.

    Files in sorted order, read by record batch with pyarrow; a row whose `status` is not
    'success' is skipped ('status'), the rest as `WebDatasetSource` (same filters and reasons,
    read from the row's columns).
    """

    def __init__(self, paths: str | Sequence[str], *, image_column: str = "jpg",
                 caption_column: str = "caption", image_size: int | None = None,
                 min_side: int | None = None, max_pwatermark: float | None = None,
                 max_punsafe: float | None = None, min_aesthetic: float | None = None):
        super().__init__("parquet", image_size, min_side, max_pwatermark, max_punsafe, min_aesthetic)
        self.files = expand_paths(paths)
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        """Raw items: rows over every file, from the footers (an unreadable file counts one)."""
        return sum(n if (n := _num_rows(f)) is not None else 1 for f in self.files)

    def __iter__(self) -> Iterator[sources.Example]:
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

        position = 0
        for path in self.files:
            try:
                f = pq.ParquetFile(path)
            except Exception as e:  # pylint: disable=broad-except  # pyarrow raises several kinds
                self.skipped.skip(path, "corrupt shard", e)  # one raw item, as __len__ counts it
                position += 1
                continue
            names = f.schema_arrow.names
            for column in (self.image_column, self.caption_column):
                if column not in names:
                    raise KeyError(f"{path}: no column {column!r} (have {names}); a list of "
                                   "captions without images is source kind 'prompts'")
            end = position + f.metadata.num_rows
            try:
                for row in _rows(f):
                    key = str(row.get("key") or position)
                    name = f"{path}:{key}"
                    if row.get("status", "success") != "success":
                        self.skipped.skip(name, "status")
                    else:
                        example = self._checked(name, row.get(self.image_column),
                                                row.get(self.caption_column), row, key, position)
                        if example is not None:
                            yield example
                    position += 1
            except Exception as e:  # pylint: disable=broad-except
                # A damaged row group: every row not read is one raw item, so positions match len().
                for _ in range(end - position):
                    self.skipped.skip(path, "corrupt shard", e)
                position = end


def _num_rows(path: str) -> int | None:
    """Rows of a parquet file from its footer; None when the file cannot be opened."""
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # pylint: disable=broad-except
        return None


def _rows(f: Any) -> Iterator[dict[str, Any]]:
    """The rows of an open pyarrow ParquetFile, a bounded record batch at a time."""
    for batch in f.iter_batches(batch_size=256):
        yield from batch.to_pylist()
