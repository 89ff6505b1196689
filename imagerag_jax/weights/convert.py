"""PyTorch state dicts -> Flax parameter trees, by name, with one clear error for any mismatch.

Flax modules in this package name their submodules after the PyTorch state-dict keys with
``name.N`` written ``name_N``, so a key maps to a parameter path mechanically:
``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/kernel``.
Tensors are streamed one at a time so that peak host memory stays near the converted size.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from imagerag_jax.errors import UserError

TensorStream = Iterable[tuple[str, np.ndarray]]
MAX_LISTED = 20
WEIGHT_NAMES = ("kernel", "scale", "embedding")
# PyTorch ModuleList names (``resnets.0``) become ``resnets_0`` in Flax; other names that end in
# ``_<digit>`` (``linear_1``) are plain attribute names and must stay as they are on export.
LIST_CONTAINERS = (
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "layers", "to_out", "net",
)
_LIST_ITEM = re.compile(r"^(%s)_(\d+)$" % "|".join(LIST_CONTAINERS))


class WeightLoadError(UserError):
    """Raised when a checkpoint does not match the module it is loaded into."""


def _listing(title: str, items: Sequence[str]) -> str:
    """Format up to MAX_LISTED items and the total count."""
    shown = "\n    ".join(items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``a.b.0.c.weight`` -> ('a', 'b_0', 'c', 'weight'): numeric parts join their parent."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return tuple(parts)


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    """Reorder a PyTorch weight into the Flax layout of the given leaf kind."""
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    if leaf == "kernel" and array.ndim == 2:
        return array.T  # (out, in) -> (in, out)
    return array


def _from_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    """Inverse of ``_to_flax`` (Flax layout -> PyTorch layout)."""
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {path tuple: leaf}."""
    out: dict[tuple[str, ...], Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """{path tuple: leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def torch_to_flax(
    tensors: TensorStream,
    target: Mapping[str, Any],
    *,
    component: str,
    ignore: Sequence[str] = (),
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Convert a stream of (torch key, array) into a param tree shaped like ``target``.

    ``target`` is the module's parameter tree (arrays or ``jax.ShapeDtypeStruct`` from
    ``jax.eval_shape``). Keys matching a regex in ``ignore`` are skipped (buffers such as
    ``position_ids``). Every missing, unexpected or mis-shaped tensor is collected and reported
    together in one ``WeightLoadError``.
    """
    wanted = flatten(target)
    by_prefix: dict[tuple[str, ...], list[str]] = {}
    for path in wanted:
        by_prefix.setdefault(path[:-1], []).append(path[-1])
    ignore_re = [re.compile(p) for p in ignore]
    params: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    seen_mismatched: set[tuple[str, ...]] = set()
    for key, array in tensors:
        if any(r.search(key) for r in ignore_re):
            continue
        path = torch_key_to_path(key)
        leaves = by_prefix.get(path[:-1], ())
        if path[-1] == "weight":
            leaf = next((n for n in WEIGHT_NAMES if n in leaves), None)
        else:
            leaf = path[-1] if path[-1] in leaves else None
        if leaf is None:
            unexpected.append(f"{key} {tuple(array.shape)}")
            continue
        flax_path = path[:-1] + (leaf,)
        expected = tuple(wanted[flax_path].shape)
        array = np.asarray(array)
        if leaf == "kernel" and array.ndim == 4 and len(expected) == 2 and array.shape[2:] == (1, 1):
            array = array[:, :, 0, 0]  # a linear layer stored as a 1x1 conv (LDM VAE attention)
        value = _to_flax(array, leaf)
        if value.shape != expected:
            mismatched.append(f"{key}: checkpoint {tuple(array.shape)} vs module {expected}")
            seen_mismatched.add(flax_path)
            continue
        # Converted per tensor so only one temporary copy is alive at a time.
        params[flax_path] = jax.numpy.asarray(value, dtype=dtype)
    missing = [
        "/".join(p) + f" {tuple(wanted[p].shape)}"
        for p in wanted if p not in params and p not in seen_mismatched
    ]
    if missing or unexpected or mismatched:
        parts = [f"{component}: checkpoint does not match the module"]
        if missing:
            parts.append(_listing("missing from checkpoint", missing))
        if unexpected:
            parts.append(_listing("unexpected in checkpoint", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatch", mismatched))
        raise WeightLoadError("\n".join(parts))
    return unflatten(params)


def flax_to_torch(params: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (torch key, array) pairs for a Flax param tree (inverse of ``torch_to_flax``)."""
    for path, value in flatten(params).items():
        leaf = path[-1]
        value = _from_flax(np.asarray(value), leaf)
        names = [_LIST_ITEM.sub(r"\1.\2", p) for p in path[:-1]]
        names.append("weight" if leaf in WEIGHT_NAMES else leaf)
        yield ".".join(names), value


# ---------------------------------------------------------------------------- reading files


def _np_from_any(value: Any) -> np.ndarray:
    """A torch tensor, jax array or numpy array as a float32-or-native numpy array."""
    if hasattr(value, "detach"):
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    array = np.asarray(value)
    if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
        array = array.astype(np.float32)
    return array


def iter_safetensors(path: str, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Stream tensors from a .safetensors file, read one at a time (fp16/bf16 widened to fp32)."""
    from imagerag_jax.weights.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        for key in keys if keys is not None else f.keys():
            floating = f.dtype(key) in ("F16", "BF16", "F64")
            yield key, f.get(key, np.float32 if floating else None)


# Phrases of torch's weights-only unpickler when it meets a global, a call or a custom object:
# the file holds code or objects, as opposed to being damaged.
_REFUSED = ("GLOBAL", "unrecognized function", "Can only build", "Can only create new object",
            "persistent")
_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _pickle_error(path: str, error: Exception) -> WeightLoadError:
    """A weights-only refusal (code/objects) or a damaged pickle, said without torch's advice."""
    # torch re-raises the unpickler's error with advice to load with weights_only=False, that is
    # to run the file's code; the original message is the context of the re-raised one.
    raw = str(error.__context__ if error.__context__ is not None else error)
    if any(phrase in raw for phrase in _REFUSED):
        found = _GLOBAL.search(raw)
        what = f" ({found.group(1).rstrip('.')})" if found else ""
        return WeightLoadError(
            f"{path}: the pickle holds code or objects{what} besides tensors and plain containers; "
            "a weights-only load (torch.load weights_only=True) refuses it, and this program never "
            "unpickles code: convert the file to safetensors with a tool you trust")
    return WeightLoadError(f"{path}: not a readable PyTorch weight file (damaged pickle: "
                           f"{_first_line(raw)})")


def _first_line(text: str) -> str:
    """The first sentence of a library's message (torch appends paragraphs of advice)."""
    line = text.strip().split("\n")[0]
    return line.split(". ")[0].rstrip(".") or "no details"


def load_torch_pickle(path: str) -> Any:
    """torch.load of tensors and plain containers only; WeightLoadError naming the file otherwise."""
    import pickle

    from imagerag_jax.weights.safetensors_io import AGAIN, open_weight_file

    with open_weight_file(path) as f:
        head = f.read(4)
    if not head:
        raise WeightLoadError(f"{path}: empty (0 bytes); {AGAIN}")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save zip, or a legacy pickle
        raise WeightLoadError(f"{path}: not a PyTorch weight file (neither a torch.save zip nor a "
                              f"pickle; it starts with {head!r})")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise WeightLoadError(f"{path} is a PyTorch pickle; install the [torch] extra to read it, "
                              "or convert it to safetensors") from e
    try:
        try:  # mmap: tensors stay on disk until touched
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Pre-zip (torch < 1.6) pickles cannot be mmapped: this path reads the whole file.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _pickle_error(path, e) from None  # `from None`: torch's advice stays out of tracebacks
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError... for damaged files
        message = _first_line(str(e))
        if not isinstance(e, (RuntimeError, OSError)):
            message = f"{type(e).__name__}: {message}"
        if "zip archive" in message:
            message = f"its zip container is truncated or damaged: {message}; copy it again"
        elif isinstance(e, EOFError) or "EOF" in message:
            message = f"truncated: {message}; {AGAIN}"
        raise WeightLoadError(f"{path}: not a readable PyTorch weight file ({message})") from e


def iter_torch_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Stream tensors from a PyTorch pickle (.bin/.ckpt/.pt), memory-mapped."""
    state = load_torch_pickle(path)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightLoadError(f"{path}: holds a {type(state).__name__}, not a dict of tensors")
    for key, value in state.items():
        if hasattr(value, "detach"):
            yield key, _np_from_any(value)


def iter_weight_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Stream tensors from a .safetensors or PyTorch weight file."""
    if path.endswith(".safetensors"):
        return iter_safetensors(path)
    return iter_torch_file(path)


WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


def find_weight_files(folder: str) -> list[str]:
    """The weight file(s) of a diffusers/transformers model folder (sharded or not)."""
    for base in WEIGHT_BASENAMES:
        for variant in ("", ".fp16", ".bf16"):
            for ext in (".safetensors", ".bin"):
                index = os.path.join(folder, f"{base}{variant}{ext}.index.json")
                if os.path.exists(index):
                    return [os.path.join(folder, s) for s in _index_shards(index)]
                single = os.path.join(folder, f"{base}{variant}{ext}")
                if os.path.exists(single):
                    return [single]
    raise WeightLoadError(
        f"no weight file in {folder}: expected one of "
        + ", ".join(f"{b}.safetensors/.bin" for b in WEIGHT_BASENAMES)
    )


def _index_shards(index: str) -> list[str]:
    """The shard file names a sharded checkpoint's ``*.index.json`` lists."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightLoadError(f"{index}: not a readable weight index (expected JSON with a "
                              f"'weight_map' object of tensor -> shard file; {type(e).__name__}: "
                              f"{e})") from e
    if not shards or not all(isinstance(s, str) for s in shards):
        raise WeightLoadError(f"{index}: its 'weight_map' names no shard files")
    return shards


def iter_folder_tensors(folder: str) -> Iterator[tuple[str, np.ndarray]]:
    """Stream every tensor of a model folder's weight file(s)."""
    for path in find_weight_files(folder):
        yield from iter_weight_file(path)


def renamed(tensors: TensorStream, rules: Sequence[tuple[str, str]]) -> Iterator[tuple[str, np.ndarray]]:
    """Apply regex (pattern, replacement) rules to every key of a tensor stream."""
    compiled = [(re.compile(p), r) for p, r in rules]
    for key, value in tensors:
        for pattern, repl in compiled:
            key = pattern.sub(repl, key)
        yield key, value


def param_shapes(init: Callable[[], Any]) -> Any:
    """Shapes of a module's params without allocating them (``jax.eval_shape`` of init)."""
    return jax.eval_shape(init)["params"]
