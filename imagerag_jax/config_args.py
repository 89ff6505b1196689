"""The config arg-string convention shared by ``configs/*.py`` (``configs/x.py:a=1,b``)."""

from __future__ import annotations

from typing import Any

import ml_collections

from imagerag_jax.errors import UserError


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'a=1,b' -> the defaults updated with typed values; a bare name sets a boolean to True."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key not in out:
            raise UserError(f"unknown config arg {key!r}; known: {sorted(out)}")
        kind = type(out[key])
        if kind is bool:
            out[key] = (value.lower() in ("1", "true", "yes")) if eq else True
        else:
            out[key] = kind(value)
    return out


def get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for a dict or ConfigDict (None-safe); `default` when missing or None."""
    if cfg is None:
        return default
    value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def plain(cfg: Any) -> dict[str, Any]:
    """A plain dict (None values dropped) from a ConfigDict or mapping; {} for None."""
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in d.items() if v is not None}


def load_module(path: str) -> Any:
    """Imports a config file by path (``configs/`` is a folder of files, not a package)."""
    import importlib.util  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    name = "_imagerag_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sibling(config_file: str, name: str) -> Any:
    """The config file `name`.py in the folder of `config_file` (a config's ``__file__``).

    Args:
      config_file: the path of the config that asks, usually its ``__file__``.
      name: the sibling's file name without ``.py``, e.g. 'base'.

    Returns:
      The sibling config module (call its ``get_config``).
    """
    import os  # pylint: disable=g-import-not-at-top

    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py"))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> its ``get_config(arg)``, as ``--config`` reads it (for notebooks)."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    return load_module(path).get_config(arg or None)
