"""The JSON side files of every on-disk format: canonical form, atomic writes, versioned reads.

Each format (retrieval database, index, TFRecord manifest, export, adapter, judge, iterator
state) names itself with a ``format`` string and a version; `read_versioned` is the one place
that opens such a file and refuses a missing file, bad JSON, another format or another version
with one message naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np


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


def write_atomic(path: str, obj: Any, *, sort_keys: bool = True) -> str:
    """Writes JSON to a per-process temporary name, then renames it over `path` (never half-written)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=sort_keys, default=_default)
    os.replace(tmp, path)
    return path


def read(path: str, *, what: str = "file", error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `path`; `error` with the path when it is missing or not a JSON object."""
    if not os.path.isfile(path):
        raise error(f"{path}: no such {what}")
    try:
        with open(path) as f:
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
