"""The JSON side files of every on-disk format: canonical form, atomic writes, versioned reads.

`atomic_write` is the one way any file of the package is replaced (JSON, text, `np.save`, msgpack):
a unique temporary name beside the file, fsync, `os.replace`. A path with a scheme (`gs://`,
`ram://`, ...) is written and read through `storage` (TensorFlow's filesystems): the temporary
object is renamed over the file, which object stores commit whole.

Each format (retrieval database, index, TFRecord manifest, export, adapter, judge, iterator
state) names itself with a ``format`` string and a version; `read_versioned` is the one place
that opens such a file and refuses a missing file, bad JSON, another format or another version
with one message naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from imagerag_jax import storage


def _default(o: Any) -> Any:
    """JSON for numpy scalars, tuples and sets (anything else as its string)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def canonical(obj: Any) -> str:
    """A stable JSON string (sorted keys): the form that identities and hashes are taken of."""
    return json.dumps(obj, sort_keys=True, default=_default)


def normalized(obj: Any) -> Any:
    """`obj` as it reads back from its canonical JSON (tuples become lists, numpy scalars numbers)."""
    return json.loads(canonical(obj))


def short_hash(obj: Any, n: int = 12) -> str:
    """The first `n` hex digits of sha256 over the canonical JSON of `obj`."""
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def temp_name(path: str) -> str:
    """A fresh name beside `path` (same directory, so a rename is atomic): pid plus a random part.

    Unique across processes and hosts sharing a folder, and hidden (a leading dot) so globs over
    the folder do not pick up a write in flight.
    """
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", *, fsync: bool = True,
                 encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Opens a temporary file beside `path`; on success it replaces `path`, else it is removed.

    Readers see the old file or the new one, never a half-written one, and an exception inside
    the block leaves the old file intact. With `fsync` (the default) the data reach the disk
    before the rename, so the rename is a commit point that survives a crash.

    Args:
        path: the file to (re)write.
        mode: 'w' (text) or 'wb' (binary, e.g. ``np.save(f, x)``).
        fsync: flush the file to disk before the rename.
        encoding: the text encoding (ignored for binary modes).

    Yields:
        The open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    tmp = temp_name(path)
    if storage.is_url(path):
        try:
            with storage.open_file(tmp, mode) as f:
                yield f
            storage.rename(tmp, path)
        except BaseException:
            if storage.exists(tmp):
                storage.remove(tmp)
            raise
        return
    try:
        # 'x': never another writer's file; plain open keeps the usual (umask) permissions.
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str, *, fsync: bool = True) -> str:
    """Writes `text` (utf-8) to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, fsync=fsync) as f:
        f.write(text)
    return path


def write_atomic(path: str, obj: Any, *, sort_keys: bool = True, indent: int = 2,
                 fsync: bool = True) -> str:
    """Writes `obj` as JSON to `path` atomically (see `atomic_write`); numpy scalars as numbers."""
    with atomic_write(path, fsync=fsync) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=_default)
    return path


def read(path: str, *, what: str = "file", error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `path`; `error` with the path when it is missing or not a JSON object."""
    if not storage.isfile(path):
        raise error(f"{path}: no such {what}")
    try:
        with storage.open_file(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable JSON {what} ({e})") from e
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_version(obj: dict[str, Any], path: str, fmt: str, version: int, *,
                  version_key: str = "version", error: type[Exception] = ValueError,
                  hint: str = "") -> dict[str, Any]:
    """`obj` when its `format` is `fmt` and its `version_key` is `version`; else `error`."""
    hint = f"; {hint}" if hint else ""
    if obj.get("format") != fmt:
        raise error(f"{path}: format {obj.get('format')!r}, expected {fmt!r}{hint}")
    if obj.get(version_key) != version:
        raise error(f"{path}: {version_key.replace('_', ' ')} {obj.get(version_key)!r} is not supported "
                    f"(this code reads {fmt} version {version}){hint}")
    return obj


def read_versioned(path: str, fmt: str, version: int, *, what: str = "file",
                   version_key: str = "version", error: type[Exception] = ValueError,
                   hint: str = "") -> dict[str, Any]:
    """Reads `path` and checks its format and version (see `check_version`)."""
    return check_version(read(path, what=what, error=error), path, fmt, version,
                         version_key=version_key, error=error, hint=hint)
