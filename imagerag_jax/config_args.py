"""The config arg-string convention shared by ``configs/*.py`` (``configs/x.py:a=1,b``)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'a=1,b' -> the defaults updated with typed values; a bare name sets a boolean to True."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(out)}")
        kind = type(out[key])
        if kind is bool:
            out[key] = (value.lower() in ("1", "true", "yes")) if eq else True
        else:
            out[key] = kind(value)
    return out
