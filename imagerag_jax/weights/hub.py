"""Weights named by a local path or a Hugging Face hub id: the one place a weights spec is resolved.

A spec is what a user writes wherever weights are taken (``--weights``, a config's
``<tower>_weights``, ``encoder_weights``, ``tokenizer``, ``--clip``, ``--inception``):

* a local path (a diffusers folder, a model folder or a single file), as before: a string that
  exists on disk is always a path;
* ``org/name`` or ``org/name@revision`` (a branch, tag or commit), when no such path exists: the
  snapshot is taken from the hub cache, downloaded through ``huggingface_hub`` when it is missing
  and the hub can be reached. Only the files the towers read are fetched: the configs, the
  tokenizer and scheduler files and the fp32 ``.safetensors`` weights (``.bin`` only for a model
  folder that has no ``.safetensors``);
* anything else that does not exist stays a path, so the loaders' "does not exist" errors name it.

``huggingface_hub`` itself reads ``HF_TOKEN`` (and the stored login); the cache folder
(``HF_HUB_CACHE``, else ``HF_HOME/hub``) and offline mode (``HF_HUB_OFFLINE``) are read from the
environment at each call, since ``huggingface_hub`` reads them once, when it is first imported.

A resolution (`Weights`) records its provenance: the repo id, the revision asked for, the commit
it resolved to and the local snapshot folder; `Weights.label` (``org/name@<commit>``) is what
runs, manifests and exports record. A snapshot folder names its repo and commit, so `describe`
recovers the same provenance from a path that was resolved earlier (``.../models--org--name/
snapshots/<commit>/...``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from imagerag_jax.weights.convert import WeightLoadError

# The parts a tower reads (diffusers pipeline subfolders; 'clip' is a transformers CLIPModel folder,
# 'torchscript' a repo holding one TorchScript file). A tower's part also matches at the repo root:
# a repo of one model (a VAE, a text encoder) keeps config.json and its weights there.
PIPELINE = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_PARTS = ("unet", "vae", "text_encoder", "clip")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# The fp32 weight names diffusers and transformers save (no .fp16/.bf16 variants), whole or sharded.
SAFETENSORS_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                     "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
                     "diffusion_pytorch_model-*-of-*.safetensors", "model-*-of-*.safetensors")
BIN_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin",
             "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json",
             "diffusion_pytorch_model-*-of-*.bin", "pytorch_model-*-of-*.bin")
TORCHSCRIPT_SUFFIXES = (".pt", ".pth")

# A repo id as the hub accepts it (letters, digits, '-', '_', '.'; no '--' or '..'), one '/'.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"
_SPEC = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^@\s]+))?$")
_SNAPSHOT = re.compile(r"(?:^|/)models--(?P<repo>[^/]+?)/snapshots/(?P<commit>[0-9a-f]{40})(?:/(?P<sub>.*))?$")
_TRUE = {"1", "ON", "YES", "TRUE"}

# (cache folder, repo id, revision asked) -> commit: a process resolves a moving revision (main)
# once, so its student, VAE and text encoder all come from the same commit.
_COMMITS: dict[tuple[str, str, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Weights:
    """A resolved weights spec: the local path to read, and where it came from.

    Attributes:
      spec: the string as given.
      path: the local file or folder to load (the spec itself for a local path).
      repo_id: the hub repo (``org/name``), None for a local path.
      revision: the revision asked for (``main`` when none was), None for a local path.
      commit: the 40-hex commit the revision resolved to, None for a local path.
    """

    spec: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        """``org/name@<commit>`` for hub weights, else the absolute path: what a run records."""
        if self.repo_id is not None:
            return f"{self.repo_id}@{self.commit}"
        return self.path if "://" in self.path else os.path.abspath(self.path)

    def reference(self) -> dict[str, Any]:
        """The provenance a run records for a tower: its path, and for hub weights repo and commit."""
        ref: dict[str, Any] = {"path": self.label if self.repo_id is None else self.path}
        if self.repo_id is not None:
            ref.update(hub=self.label, revision=self.revision)
        return ref


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` has the form ``org/name[@revision]``, else None.

    The form alone: whether a local path of that name exists is `resolve`'s question.
    """
    match = _SPEC.match(spec)
    if match is None or ".." in spec.split("@", 1)[0] or "--" in match.group("repo"):
        return None
    return match.group("repo"), match.group("revision")


def is_hub_id(spec: str | os.PathLike[str]) -> bool:
    """Whether `spec` names hub weights: the ``org/name[@revision]`` form and no such local path."""
    spec = os.fspath(spec)
    return not os.path.exists(spec) and parse_hub_id(spec) is not None


def hub_cache_dir() -> str:
    """The hub cache folder huggingface_hub would use if it read the environment now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now: only the cache is read."""
    return any((os.environ.get(k) or "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def allow_patterns(parts: Iterable[str]) -> list[str]:
    """The first download's patterns for `parts`: configs, tokenizer/scheduler files, safetensors.

    Every part's files match both in its pipeline subfolder and at the repo root. ``.bin`` weights
    are never here: `bin_patterns` asks for them, per folder, only where no safetensors came.
    """
    patterns = ["model_index.json"]
    for part in parts:
        if part in MODEL_PARTS:
            names = ("config.json", *SAFETENSORS_FILES)
            if part == "clip":  # the CLIPProcessor's image and text sides
                names += ("preprocessor_config.json", *TOKENIZER_FILES)
            patterns += [p for name in names for p in (name, f"{part}/{name}")]
        elif part == "tokenizer":
            patterns += [p for name in TOKENIZER_FILES for p in (name, f"tokenizer/{name}")]
        elif part == "scheduler":
            patterns.append("scheduler/scheduler_config.json")
        elif part == "torchscript":
            patterns += [f"*{suffix}" for suffix in TORCHSCRIPT_SUFFIXES]
        else:
            raise ValueError(f"unknown weights part {part!r}")
    return list(dict.fromkeys(patterns))


def bin_patterns(folders: Iterable[str]) -> list[str]:
    """The ``.bin`` weight patterns of model folders (relative to the repo root; '' is the root)."""
    return [f"{folder}/{name}" if folder else name for folder in folders for name in BIN_FILES]


def _has_safetensors(folder: str) -> bool:
    return any(name.endswith(".safetensors") and not re.search(r"\.(fp16|bf16)\.", name)
               for name in os.listdir(folder))


def _folders_without_safetensors(snapshot: str, parts: Iterable[str]) -> list[str]:
    """The model folders (with a config.json) of `parts` in a snapshot that hold no safetensors."""
    out = []
    for folder in dict.fromkeys(f for part in parts if part in MODEL_PARTS for f in ("", part)):
        path = os.path.join(snapshot, folder)
        if os.path.isfile(os.path.join(path, "config.json")) and not _has_safetensors(path):
            out.append(folder)
    return out


def _hub_error(spec: str, repo_id: str, revision: str, cache: str, error: Exception) -> WeightLoadError:
    """One sentence naming the id for anything huggingface_hub raises while resolving it."""
    from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top

    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, hub_errors.RevisionNotFoundError):
        why = f"the Hugging Face Hub has no revision {revision!r} of {repo_id}"
    elif isinstance(error, hub_errors.GatedRepoError):
        why = f"{repo_id} is gated on the Hugging Face Hub: accept its licence and set HF_TOKEN"
    elif isinstance(error, hub_errors.RepositoryNotFoundError):
        why = (f"no model repository {repo_id} on the Hugging Face Hub (or it is private: set "
               "HF_TOKEN)")
    elif isinstance(error, hub_errors.LocalEntryNotFoundError):
        mode = "HF_HUB_OFFLINE is set" if offline() else f"the hub could not be reached: {first}"
        why = f"revision {revision!r} of {repo_id} is not in the hub cache {cache} ({mode})"
    else:
        why = f"cannot fetch {repo_id}@{revision} from the Hugging Face Hub ({first})"
    return WeightLoadError(f"{spec}: {why}; pass a local path or a hub id that exists")


def _download(repo_id: str, revision: str, cache: str, patterns: Sequence[str], spec: str) -> str:
    """snapshot_download of `patterns` at `revision` into `cache`; the snapshot folder."""
    import huggingface_hub  # pylint: disable=g-import-not-at-top  # only for hub ids
    from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top

    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=list(patterns),
            local_files_only=offline())
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError,
            hub_errors.OfflineModeIsEnabled) as e:
        raise _hub_error(spec, repo_id, revision, cache, e) from e


def resolve(spec: str | os.PathLike[str], parts: Sequence[str] = PIPELINE) -> Weights:
    """A weights spec -> the local path to load and its provenance; hub weights fetched if needed.

    Args:
      spec: a local path, or ``org/name`` / ``org/name@revision`` (see the module docstring).
      parts: what the caller will read from a hub snapshot (`PIPELINE` for every SD tower; a
        subset, or 'clip' / 'torchscript'); a local path is returned as it is.

    Returns:
      `Weights`: for a hub id, ``path`` is the snapshot folder of the resolved commit.

    Raises:
      WeightLoadError: a hub id that is not in the cache (offline, or the hub unreachable), or that
        the hub does not have (repo or revision), named in one sentence.
    """
    spec = os.fspath(spec)
    parsed = parse_hub_id(spec) if not os.path.exists(spec) else None
    if parsed is None:
        return Weights(spec, spec)
    repo_id, asked = parsed
    revision = asked or "main"
    cache = hub_cache_dir()
    key = (cache, repo_id, revision)
    snapshot = _download(repo_id, _COMMITS.get(key, revision), cache, allow_patterns(parts), spec)
    commit = os.path.basename(os.path.normpath(snapshot))
    _COMMITS[key] = commit
    # .bin only for the model folders that came without safetensors, from the same commit.
    missing = _folders_without_safetensors(snapshot, parts)
    if missing:
        _download(repo_id, commit, cache, bin_patterns(missing), spec)
    return Weights(spec, snapshot, repo_id, revision, commit)


def local_path(spec: str | os.PathLike[str] | None, parts: Sequence[str] = PIPELINE) -> str | None:
    """`resolve(spec, parts).path`; None stays None."""
    return None if spec is None else resolve(spec, parts).path


def tokenizer_dir(spec: str | os.PathLike[str]) -> str:
    """The local folder of a tokenizer spec: a tokenizer folder, or a pipeline folder or hub id,
    which stands for its ``tokenizer/`` (a folder without the files is the loader's to refuse)."""
    folder = resolve(spec, ("tokenizer",)).path
    nested = os.path.join(folder, "tokenizer")
    if os.path.isdir(nested) and not any(
            os.path.isfile(os.path.join(folder, name)) for name in ("vocab.json", "tokenizer.json")):
        return nested
    return folder


def describe(path: str | os.PathLike[str]) -> Weights:
    """The provenance of a local path: a hub cache snapshot (or a file in one) names its repo and
    commit; any other path is just itself (``Weights.label``: its absolute path)."""
    path = os.fspath(path)
    match = _SNAPSHOT.search(os.path.abspath(path).replace(os.sep, "/"))
    if match is None:
        return Weights(path, path)
    repo_id = match.group("repo").replace("--", "/")
    return Weights(path, path, repo_id, None, match.group("commit"))


def label(path: str | os.PathLike[str]) -> str:
    """What a run records for weights at a local path: ``org/name@<commit>`` (with ``/sub`` for a
    part of a snapshot) for a hub snapshot, else the absolute path."""
    path = os.fspath(path)
    described = describe(path)
    if described.repo_id is None:
        return described.label
    sub = _SNAPSHOT.search(os.path.abspath(path).replace(os.sep, "/")).group("sub")
    return described.label + (f"/{sub}" if sub else "")


def torchscript_file(spec: str | os.PathLike[str]) -> Weights:
    """A TorchScript feature network: a local file, or a hub repo holding exactly one .pt/.pth."""
    weights = resolve(spec, ("torchscript",))
    if weights.repo_id is None:
        return weights
    files = sorted(os.path.relpath(os.path.join(d, n), weights.path)
                   for d, _, names in os.walk(weights.path) for n in names
                   if n.endswith(TORCHSCRIPT_SUFFIXES))
    if len(files) != 1:
        raise WeightLoadError(f"{spec}: expected one TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)}) "
                              f"in {weights.label}, found {len(files)}" +
                              (f" ({', '.join(files[:5])})" if files else ""))
    return dataclasses.replace(weights, path=os.path.join(weights.path, files[0]))
