"""The frozen towers: loaded from weights or rebuilt as random presets, fingerprinted, resolved.

Both config families name a tower's weights ``<tower>_weights`` (a path or a Hugging Face hub id
``org/name[@revision]``, `hub.resolve`; unset: random towers of ``random_preset``, seeded by
``random_seed``); ``seed`` is the job's own randomness, never the towers'. What a run records of a
tower names the weights exactly (the absolute path, or ``org/name@<commit>``), but every
compatibility check compares fingerprints, so a local folder and the same weights by hub id agree:

* a training config (``configs/base.py``): ``student_weights``, ``teacher_weights``,
  ``vae_weights`` (unset: the student's pipeline folder's ``vae/``), or random towers of
  ``random_preset`` ('tiny' | 'sd21') seeded by ``random_seed`` (student, VAE) and
  ``random_seed + 1`` (teacher). `frozen_towers` resolves all of them; the trainer, export and
  the inference paths call it, so a run's towers are rebuilt the same way everywhere and checked
  by `fingerprint`.
* an offline-job config (``configs/precompute_*.py``): ``encoder_weights``, the pipeline whose
  VAE and text encoder encode the database and the examples (unset: the tiny random pipeline of
  ``random_seed``, written under the workdir), and an optional ``teacher_weights``.
  `load_job_towers` loads them with the identity strings that the database and TFRecord
  manifests record.

The 'tiny' random pipeline of seed s is the same towers in both families: a training run with
``random_preset='tiny'`` and ``random_seed=s`` trains on data encoded by ``random_seed=s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from imagerag_jax import config_args, jsonfiles, sharding
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.weights import hub

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The UNet parts after the H-space that the teacher (discriminator backbone) never runs.
DECODER_KEYS = ("conv_norm_out", "conv_out")
RANDOM_PIPELINE_DIR = "random_pipeline"

# Kept per process (a few MB): building them traces every tower, seconds per call.
_TINY_CACHE: dict[int, dict[str, tuple[Any, PyTree]]] = {}


# ---------------------------------------------------------------------------------------------
# One tower.
# ---------------------------------------------------------------------------------------------


def random_tower(name: str, preset: str, seed: int) -> tuple[Any, PyTree]:
    """(module, random params) of 'unet' | 'vae' | 'text_encoder' for preset 'tiny' or 'sd21'."""
    from imagerag_jax.weights import random_pipeline

    if preset == "tiny":
        if seed not in _TINY_CACHE:
            _TINY_CACHE[seed] = random_pipeline.random_modules("tiny", seed)
        return _TINY_CACHE[seed][name]
    if preset == "none":
        raise UserError(f"no weights path for the {name} and random_preset='none': set the config's "
                         f"weight paths (or random_preset='sd21'/'tiny' for random towers)")
    if preset != "sd21":
        raise UserError(f"unknown random_preset {preset!r}; expected 'tiny', 'sd21' or 'none'")
    if name == "text_encoder":
        raise UserError("random_preset='sd21' has no text encoder; set the student's weights path")
    from imagerag_jax.models.unet import UNet
    from imagerag_jax.models.vae import AutoencoderKL
    from imagerag_jax.weights import convert
    from imagerag_jax.weights.from_torch import unet_dummy_inputs

    if name == "unet":
        module = UNet()  # the defaults are SD 2.1-base / SD-Turbo
        inputs = unet_dummy_inputs(module)
    else:
        module = AutoencoderKL()
        inputs = module.dummy_inputs()
    shapes = convert.param_shapes(lambda: module.init(jax.random.PRNGKey(0), *inputs))
    return module, random_pipeline.random_params(shapes, seed)


def load_tower(name: str, path: str | None, *, preset: str, seed: int, compute_dtype: Any,
               param_dtype: Any, prediction_type: str = "epsilon") -> tuple[Any, PyTree, dict[str, Any]]:
    """(module, params, reference) of 'unet' | 'vae' from a weights path or hub id, or random when None.

    The reference is `hub.Weights.reference`: the absolute path, and for hub weights the snapshot
    folder, ``hub`` (``org/name@<commit>``) and the revision asked for.
    """
    from imagerag_jax import weights
    from imagerag_jax.weights import from_torch

    if path is not None:
        resolved = hub.resolve(path, from_torch.HUB_PARTS[name])
        if name == "unet":
            module, params = weights.load_unet(resolved.path, dtype=compute_dtype,
                                               param_dtype=param_dtype)
        else:
            module, params = weights.load_vae(resolved.path, dtype=compute_dtype,
                                              param_dtype=param_dtype)
        ref = resolved.reference()
    else:
        module, params = random_tower(name, preset, seed)
        changes = {"dtype": compute_dtype}
        if name == "unet":
            changes["prediction_type"] = prediction_type
        module = module.clone(**changes)
        params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
        ref = {"path": None, "random_preset": preset, "seed": seed}
    return module, params, ref


def encoder_params(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet's params without the decoder (up blocks, output head): all the teacher needs."""
    return {k: v for k, v in unet_params.items()
            if not k.startswith("up_blocks") and k not in DECODER_KEYS}


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """[sum x, sum x^2] per leaf, in float32 (module level: traced once per tree structure)."""
    return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(x.astype(jnp.float32)))])
            for x in leaves]


def fingerprint(params: PyTree) -> str:
    """Content hash of a param tree from its paths, shapes and per-leaf sums (cheap, on device)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    sums = _leaf_sums([x for _, x in leaves])
    h = hashlib.sha256()
    for (path, x), s in zip(leaves, sums):
        s = sharding.host_value(s)
        h.update(f"{sharding.path_str(path)}:{tuple(x.shape)}:{x.dtype}:{s[0]:.6e}:{s[1]:.6e};".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Every frozen tower of a training config.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tower:
    """A module, its params and where they came from (path, or random preset + seed)."""

    module: Any
    params: PyTree
    ref: dict[str, Any]


@dataclasses.dataclass
class FrozenTowers:
    """The student UNet, the teacher UNet (encoder params only) and the VAE of a training config."""

    student: Tower
    teacher: Tower | None
    vae: Tower

    def references(self) -> dict[str, Any]:
        """Provenance (`load_tower`'s references) and fingerprints of the towers the objective uses."""
        refs = {"student": {**self.student.ref, "fingerprint": fingerprint(self.student.params)},
                "vae": dict(self.vae.ref)}
        if self.teacher is not None:
            refs["teacher"] = {**self.teacher.ref, "fingerprint": fingerprint(self.teacher.params)}
        return refs


def vae_path(config: Mapping[str, Any]) -> str | None:
    """config.vae_weights, else the student's pipeline folder (or hub id) when it has a vae/
    (SD-Turbo's has)."""
    path, student = config["vae_weights"], config["student_weights"]
    if path is None and student is not None:
        if os.path.isdir(os.path.join(hub.resolve(student, ("vae",)).path, "vae")):
            return student
    return path


def frozen_towers(config: Mapping[str, Any], *, compute_dtype: Any = None, teacher: bool = True
                  ) -> FrozenTowers:
    """Loads (or rebuilds) the student, teacher encoder and VAE exactly as the trainer uses them.

    ``compute_dtype`` defaults to the config's; params are stored in ``frozen_param_dtype``.
    ``teacher=False`` skips the teacher (inference and export never run it).
    """
    compute = compute_dtype if compute_dtype is not None else DTYPES[config["compute_dtype"]]
    common = dict(preset=config["random_preset"], compute_dtype=compute,
                  param_dtype=DTYPES[config["frozen_param_dtype"]],
                  prediction_type=config["random_prediction_type"])
    seed = int(config["random_seed"])
    student = Tower(*load_tower("unet", config["student_weights"], seed=seed, **common))
    teacher_tower = None
    if teacher:
        module, params, ref = load_tower("unet", config["teacher_weights"], seed=seed + 1, **common)
        teacher_tower = Tower(module, encoder_params(params), ref)
    vae = Tower(*load_tower("vae", vae_path(config), seed=seed, **common))
    return FrozenTowers(student, teacher_tower, vae)


def check_frozen(saved: Mapping[str, Any], current: Mapping[str, Any],
                 names: tuple[str, ...] = ("student", "teacher"), error: type[Exception] = ValueError
                 ) -> None:
    """Refuses towers whose fingerprint differs from the one a checkpoint recorded."""
    for name in names:
        want = saved.get(name, {}).get("fingerprint")
        have = current.get(name, {}).get("fingerprint")
        if want is not None and have is not None and want != have:
            raise error(f"the {name} weights ({current[name]}) differ from those the run trained with "
                        f"({saved[name]}); use the run's frozen weights")


def text_tower(config: Mapping[str, Any], text_encoder: str | None = None,
               tokenizer: str | None = None) -> tuple[Any, PyTree, str | None, str | None]:
    """(module, params, tokenizer folder, source) of the text encoder a training run's data used.

    ``text_encoder`` overrides; else the student's pipeline folder (or single file); else, for
    random 'tiny' towers, the tiny random pipeline of the run's random_seed (what the offline jobs
    encode with). (None, None, tokenizer, None) when there is none. Each may be a hub id; the
    tokenizer comes back as a local folder, the source as `hub.label` (``org/name@<commit>``).
    """
    from imagerag_jax import weights

    parts = ("text_encoder", "tokenizer")
    source = None if text_encoder is None else hub.local_path(text_encoder, parts)
    student = config["student_weights"]
    if source is None and student is not None:
        local = hub.local_path(student, parts)
        if os.path.isfile(local) or os.path.isdir(os.path.join(local, "text_encoder")):
            source = local
    if tokenizer is not None:
        tokenizer = hub.tokenizer_dir(tokenizer)
    if source is not None:
        module, params = weights.load_text_encoder(source)
        if tokenizer is None and os.path.isdir(os.path.join(source, "tokenizer")):
            tokenizer = os.path.join(source, "tokenizer")
        return module, params, tokenizer, hub.label(source)
    if student is None and config["random_preset"] == "tiny":
        seed = int(config["random_seed"])
        module, params = random_tower("text_encoder", "tiny", seed)
        return module, params, tokenizer, f"random:tiny:{seed}"
    return None, None, tokenizer, None


# ---------------------------------------------------------------------------------------------
# The towers of an offline-job config.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class JobTowers:
    """An offline job's loaded towers (`weights.SDTowers`) plus the identities its manifests record."""

    pipe: Any  # weights.SDTowers
    label: str  # absolute weights path, org/name@<commit> (hub), or random:preset:seed
    text_encoder_id: str
    vae_id: str
    unet_id: str

    def encoders(self) -> db_lib.Encoders:
        """The text encoder and VAE as a retrieval database records them (identities, fingerprints)."""
        return db_lib.Encoders(self.text_encoder_id, self.vae_id, fingerprint(self.pipe.text_params),
                               fingerprint(self.pipe.vae_params))


def module_identity(label: str, module: Any) -> str:
    """`label#hash` with the hash of the module's architecture fields (not dtype or kernels)."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.name not in ("parent", "name", "dtype", "param_dtype", "attention_impl")}
    return f"{label}#{jsonfiles.short_hash({'class': type(module).__name__, **fields})}"


def random_pipeline_path(workdir: str, preset: str = "tiny", seed: int = 0) -> str:
    """Writes (once) the tiny random pipeline under workdir and returns its path."""
    from imagerag_jax.weights import random_pipeline

    path = os.path.join(workdir, f"{RANDOM_PIPELINE_DIR}_{preset}_{seed}")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        # Write beside and rename: concurrent hosts never see a half-written folder.
        tmp = jsonfiles.temp_name(path)
        random_pipeline.write_random_pipeline(tmp, preset=preset, seed=seed)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_job_towers(config: Any, workdir: str, weights: str | None = None) -> JobTowers:
    """Loads `weights` (default `config.encoder_weights`; unset: the random pipeline) with identities.

    Either may be a path or a hub id; the identities' label is then ``org/name@<commit>``.
    """
    from imagerag_jax import weights as weights_lib

    get = config_args.get
    path = weights or get(config, "encoder_weights")
    if path is None:
        preset, seed = get(config, "random_preset", "tiny"), int(get(config, "random_seed", 0))
        logging.warning("No weights configured: using a tiny random-weight pipeline (%s, seed %d); "
                        "the latents and embeddings mean nothing.", preset, seed)
        label = f"random:{preset}:{seed}"
        path = random_pipeline_path(workdir, preset, seed)
    else:
        resolved = hub.resolve(path, hub.PIPELINE)
        path, label = resolved.path, resolved.label
    dtype = jnp.bfloat16 if get(config, "compute_dtype", "float32") == "bfloat16" else jnp.float32
    pipe = weights_lib.load_pipeline(path, dtype=dtype, tokenizer_path=get(config, "tokenizer"))
    if pipe.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer/ folder: set config.tokenizer to a CLIP tokenizer")
    return JobTowers(pipe, label, module_identity(label, pipe.text_encoder),
                          module_identity(label, pipe.vae), module_identity(label, pipe.unet))
