"""A minimal .safetensors reader that copies one tensor at a time with ``readinto`` (no mmap).

``safetensors.safe_open`` memory-maps the file, and every page it touches counts towards the
process's resident memory until the mapping closes, so converting a 3.2 GiB UNet through it peaks
near twice the weights' size. Reading each tensor into its own buffer keeps the peak at the
converted params plus one tensor. Format: 8-byte little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import ml_dtypes
import numpy as np

from imagerag_jax.errors import UserError

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
MAX_HEADER = 100 * 2**20


class SafetensorsError(UserError):
    """A file that is not a (complete) safetensors file; the message names it."""


class SafetensorsFile:
    """Names, shapes and dtypes from the header; tensors read on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot be opened ({e.strerror})") from e
        try:
            raw = self._file.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER:
                raise ValueError(f"header length {size} is implausible")
            header = json.loads(self._file.read(size))
        except Exception as e:
            self._file.close()
            raise SafetensorsError(f"{path}: not a safetensors file ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + size

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
        self._file.seek(self._data_start + begin)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self._file.readinto(view) != out.nbytes:
            raise SafetensorsError(f"{self.path}: truncated (ends inside tensor {key}); the file is "
                                   "incomplete, download or copy it again")
        return out if dtype is None or stored == np.dtype(dtype) else out.astype(dtype)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
