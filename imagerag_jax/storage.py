"""Paths that may be object-storage URLs: the file operations every job uses, and local staging.

A path with a scheme (`gs://bucket/x`, `s3://`, TensorFlow's in-memory `ram://`) goes through
TensorFlow's filesystems (`tf.io.gfile`, imported only then, so the core stays importable without
TensorFlow); any other path is the local filesystem through `os`. The formats that must be local
(the memory-mapped retrieval database and its H-space cache, ScaNN's index files) are read from a
URL by `stage`, which copies the folder to local disk once, resumably, and says so; a job that
builds such a format for a URL builds it locally and uploads it with `publish`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import IO, Any

STAGING_ENV = "IMAGERAG_STAGING_DIR"  # where `stage` copies URLs to (default: the temp dir)


def is_url(path: str) -> bool:
    """True for a path with a scheme (`gs://bucket/x`, `ram://x`): TensorFlow's filesystems own it."""
    return "://" in str(path)


def _gfile() -> Any:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # only for URLs

    return tf.io.gfile


def exists(path: str) -> bool:
    """Whether a file or folder exists at `path`."""
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    """Whether `path` is a folder (an object-store prefix with objects under it)."""
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    """Whether `path` is a file."""
    if is_url(path):
        return _gfile().exists(path) and not _gfile().isdir(path)
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """The names in folder `path` (without a trailing '/' for sub-folders)."""
    if is_url(path):
        return sorted(n.rstrip("/") for n in _gfile().listdir(path))
    return sorted(os.listdir(path))


def makedirs(path: str) -> None:
    """Creates folder `path` and its parents (nothing on object stores, which have no folders)."""
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def size(path: str) -> int:
    """Bytes of the file at `path`."""
    return int(_gfile().stat(path).length) if is_url(path) else os.path.getsize(path)


def open_file(path: str, mode: str = "r") -> IO[Any]:
    """Opens `path` ('r', 'rb', 'w', 'wb'); a URL's writes become visible when the file closes."""
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode)  # noqa: SIM115


def rename(src: str, dst: str) -> None:
    """Moves `src` over `dst` (atomic on local disk; a copy-and-delete on object stores)."""
    if is_url(src) or is_url(dst):
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def remove(path: str) -> None:
    """Deletes the file at `path`."""
    if is_url(path):
        _gfile().remove(path)
    else:
        os.remove(path)


STAGED = ".imagerag-staged.json"  # in a staged copy: what each file was copied from


SMALL = 1 << 20  # files up to this size are also identified by their content's CRC-32


def _walk(root: str) -> list[tuple[str, list[int]]]:
    """(relative path, identity) of every file under the URL folder `root`: [bytes, modification
    time ns, CRC-32 of the content for small files (manifests: rewritten in place, same size)]."""
    out = []
    for parent, _, files in _gfile().walk(root):
        for name in files:
            path = os.path.join(parent, name)
            st = _gfile().stat(path)
            ident = [int(st.length), int(st.mtime_nsec)]
            if st.length <= SMALL:
                with _gfile().GFile(path, "rb") as f:
                    ident.append(zlib.crc32(f.read()))
            out.append((os.path.relpath(path, root), ident))
    return sorted(out)


def staging_dir(url: str) -> str:
    """The local folder `stage(url)` copies to: one per URL under $IMAGERAG_STAGING_DIR (or the
    temp dir), named by the URL's last part and a hash of the whole."""
    root = os.environ.get(STAGING_ENV) or os.path.join(tempfile.gettempdir(), "imagerag-staging")
    name = url.rstrip("/").rsplit("/", 1)[-1] or "root"
    return os.path.join(root, f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:12]}")


def stage(path: str, *, what: str = "folder", progress: bool = True, dest: str | None = None,
          exclude: tuple[str, ...] = ()) -> str:
    """A local copy of the folder at `path` (itself when local): for formats read by memory map.

    Resumable: a file already staged from the same source file (size and modification time, as
    recorded in the copy's `.imagerag-staged.json`) is not copied again, and each file is copied
    under a temporary name first, so a killed staging leaves no truncated file. A file the source
    no longer holds is removed from the copy. Logs what it copies, where and how much.

    Args:
        path: a local folder (returned as is) or a URL.
        what: what it is, for messages.
        progress: show a progress bar.
        dest: the local folder to copy to (default `staging_dir(path)`).
        exclude: top-level names under `path` that are neither copied nor removed from the copy.
    """
    if not is_url(path):
        return path
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    gfile = _gfile()
    if not gfile.isdir(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    local = dest or staging_dir(path)
    excluded = lambda rel: rel.split(os.sep, 1)[0] in exclude  # noqa: E731
    files = [(rel, ident) for rel, ident in _walk(path) if not excluded(rel)]
    try:
        with open(os.path.join(local, STAGED)) as f:
            staged = json.load(f)
    except (OSError, ValueError):
        staged = {}
    todo = [(rel, ident) for rel, ident in files
            if not (staged.get(rel) == ident and os.path.isfile(os.path.join(local, rel))
                    and os.path.getsize(os.path.join(local, rel)) == ident[0])]
    wanted = {rel for rel, _ in files} | {STAGED}
    if os.path.isdir(local):
        for parent, _, names in os.walk(local):
            for name in names:
                rel = os.path.relpath(os.path.join(parent, name), local)
                if rel not in wanted and not excluded(rel):
                    os.remove(os.path.join(parent, name))
    total = sum(ident[0] for _, ident in todo)
    logging.info("Staging the %s %s to %s: %d of %d files to copy (%.1f MB).", what, path, local,
                 len(todo), len(files), total / 1e6)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"staging {what}", disable=not progress,
              leave=False) as bar:
        for rel, ident in todo:
            dst = os.path.join(local, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.staging"
            with gfile.GFile(os.path.join(path, rel), "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
            os.replace(tmp, dst)
            staged[rel] = ident
            with open(os.path.join(local, STAGED), "w") as f:  # after each file: resumable
                json.dump(staged, f)
            bar.update(ident[0])
    os.makedirs(local, exist_ok=True)
    return local


def publish(local: str, url: str, *, last: str | None = None, exclude: tuple[str, ...] = (),
            what: str = "folder") -> None:
    """Copies the local folder `local` to `url`: the inverse of `stage`, for jobs that write there.

    Every file is copied (a rerun copies again: an object store offers no cheap way to tell an
    unchanged file); `last` (a top-level file name, e.g. a done marker) is uploaded after
    everything else, so a reader that sees it sees the rest. `exclude`: top-level names left out.
    """
    gfile = _gfile()
    files = []
    for parent, _, names in os.walk(local):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), local)
            if rel.split(os.sep, 1)[0] not in exclude and rel != STAGED:
                files.append(rel)
    files.sort(key=lambda rel: (rel == last, rel))
    for rel in files:
        dst = os.path.join(url, rel)
        gfile.makedirs(os.path.dirname(dst))
        gfile.copy(os.path.join(local, rel), dst, overwrite=True)
    logging.info("Published the %s %s to %s (%d files).", what, local, url, len(files))
