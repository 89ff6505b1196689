"""A minimal .safetensors reader that copies one tensor at a time with ``readinto`` (no mmap).

``safetensors.safe_open`` memory-maps the file, and every page it touches counts towards the
process's resident memory until the mapping closes, so converting a 3.2 GiB UNet through it peaks
near twice the weights' size. Reading each tensor into its own buffer keeps the peak at the
converted params plus one tensor. Format: 8-byte little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data.

The whole header is checked on open (JSON, every entry, the data size it implies against the
file's), so a truncated or damaged file fails at once with one message naming it, not halfway
through a conversion.
"""

from __future__ import annotations

import json
import os
import struct
from typing import IO, Any

import ml_dtypes
import numpy as np

from imagerag_jax.weights.convert import WeightLoadError

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 2**20
AGAIN = "the file is incomplete, download or copy it again"


class SafetensorsError(WeightLoadError):
    """A file that is not a (complete) safetensors file; the message names it."""


def open_weight_file(path: str) -> IO[bytes]:
    """``open(path, 'rb')``, with a WeightLoadError naming the file for every way that fails."""
    try:
        return open(path, "rb")
    except IsADirectoryError as e:
        raise WeightLoadError(f"{path}: is a directory, not a weight file") from e
    except FileNotFoundError as e:
        raise WeightLoadError(f"{path}: does not exist") from e
    except OSError as e:
        raise WeightLoadError(f"{path}: cannot be opened ({e.strerror or e})") from e


def _entry_end(path: str, key: str, entry: Any) -> int:
    """The end offset of one header entry, after checking its fields are well-formed."""
    ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
          and isinstance(entry.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
          and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
          and all(isinstance(o, int) for o in entry["data_offsets"])
          and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1])
    if not ok:
        raise SafetensorsError(f"{path}: not a safetensors file (header entry {key!r} is not "
                               "{dtype, shape, data_offsets: [begin, end]})")
    return entry["data_offsets"][1]


def _read_header(f: IO[bytes], path: str) -> tuple[dict[str, Any], dict[str, str], int]:
    """(entries, metadata, data start) of an open file; SafetensorsError for anything amiss."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise SafetensorsError(f"{path}: empty (0 bytes); {AGAIN}")
    raw = f.read(8)
    if len(raw) < 8:
        raise SafetensorsError(f"{path}: truncated ({size} bytes, shorter than the 8-byte header "
                               f"length); {AGAIN}")
    (length,) = struct.unpack("<Q", raw)
    if not 2 <= length <= MAX_HEADER:
        raise SafetensorsError(f"{path}: not a safetensors file (its first 8 bytes give a header "
                               f"length of {length} bytes)")
    if 8 + length > size:
        raise SafetensorsError(f"{path}: truncated (header says its JSON is {length} bytes, the "
                               f"file has {size - 8} after the length); {AGAIN}")
    try:
        header = json.loads(f.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: not a safetensors file (the header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (the header is a JSON "
                               f"{type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (__metadata__ is not an object)")
    needed = max((_entry_end(path, k, v) for k, v in header.items()), default=0)
    have = size - 8 - length
    if needed > have:
        raise SafetensorsError(f"{path}: truncated (header says {needed} bytes of tensors, the "
                               f"file has {have}); {AGAIN}")
    return header, metadata, 8 + length


class SafetensorsFile:
    """Names, shapes and dtypes from the header; tensors read on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open_weight_file(path)
        try:
            self._entries, self.metadata, self._data_start = _read_header(self._file, path)
        except BaseException:
            self._file.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> str:
        return self._entries[key]["dtype"]

    def get(self, key: str, dtype: Any = None) -> np.ndarray:
        """The tensor as a fresh array (converted to ``dtype`` when given)."""
        entry = self._entries[key]
        if entry["dtype"] not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {key} has unsupported dtype {entry['dtype']}")
        stored = np.dtype(DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        out = np.empty(tuple(entry["shape"]), stored)
        if out.nbytes != end - begin:
            raise SafetensorsError(f"{self.path}: tensor {key} has {end - begin} bytes for shape "
                                   f"{out.shape}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        try:
            self._file.seek(self._data_start + begin)
            got = self._file.readinto(view)
        except OSError as e:
            raise SafetensorsError(f"{self.path}: read failed in tensor {key} "
                                   f"({e.strerror or e})") from e
        if got != out.nbytes:  # the file shrank after the header was checked
            raise SafetensorsError(f"{self.path}: truncated (ends inside tensor {key}); {AGAIN}")
        return out if dtype is None or stored == np.dtype(dtype) else out.astype(dtype)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
