"""Export a training run to PyTorch: a diffusers pipeline folder plus the adapter and the LoRA.

    from imagerag_jax import export
    paths = export.export_run("/tmp/imagerag/train", "/tmp/imagerag/export")   # latest step

or ``python -m imagerag_jax.main export --workdir W --out DIR [--step N] [--overwrite]``.

The run's trainable params (adapter, decoder LoRA) come from its orbax checkpoint; the frozen
towers are rebuilt the way ``train.Trainer`` built them (the config's weight paths, or the random
towers of ``random_preset`` and ``seed``) and checked against the fingerprint the checkpoint
recorded. Written to ``out_dir``:

  model_index.json, scheduler/   a ``StableDiffusionPipeline`` folder (diffusers ``from_pretrained``)
  unet/                          the student UNet with the decoder LoRA merged (fp32)
  vae/                           the run's VAE
  text_encoder/, tokenizer/      from the student's pipeline folder (or ``text_encoder=``/``tokenizer=``);
                                 for random 'tiny' towers, the tiny random pipeline's of the same
                                 seed (what ``build-db``/``precompute`` use) and its byte tokenizer;
                                 otherwise none (listed as null in model_index.json)
  adapter/                       config.json + adapter.safetensors (``weights/torch_runtime.py``)
  lora/                          pytorch_lora_weights.safetensors: the LoRA unmerged, PEFT format,
                                 for the *base* student (``pipe.load_lora_weights``), lora_config.json;
                                 base_unet/ (the unmerged student) when the run had no student path
  imagerag_export.json           workdir, step, config, frozen-tower references, what was written

The folder is written beside ``out_dir`` and renamed into place, so a failed export leaves
nothing half-written; an existing non-empty ``out_dir`` is replaced only with ``overwrite``.
This module sits at train.py's floor (DESIGN section 10): it imports train, nothing imports it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from imagerag_jax import checkpoints, lora, train
from imagerag_jax import schedule as schedule_lib
from imagerag_jax.models import adapter as adapter_lib
from imagerag_jax.weights import to_torch
from imagerag_jax.weights.convert import WeightLoadError

EXPORT_FORMAT = "imagerag-jax-export"
EXPORT_VERSION = 1
MANIFEST = "imagerag_export.json"
# Parts of the UNet the decoder LoRA may touch: the H-space and everything before it must stay
# the frozen student's, as in training (the runtime encodes target and neighbours with one UNet).
DECODER_PREFIXES = ("up_blocks", "conv_norm_out", "conv_out")


class ExportError(WeightLoadError):
    """A workdir, step or output folder that cannot be exported (one-line message for the CLI)."""


@dataclasses.dataclass
class RunWeights:
    """What a run trained, with the frozen student and VAE rebuilt as its Trainer built them."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    config_json: dict[str, Any]
    frozen_refs: dict[str, Any]
    student: Any  # models.unet.UNet
    student_params: dict[str, Any]
    vae: Any  # models.vae.AutoencoderKL
    vae_params: dict[str, Any]
    adapter: adapter_lib.HSpaceAdapter
    adapter_params: dict[str, Any]
    lora_params: dict[str, Any]
    lora_alpha: float
    lora_rank: int
    timestep: int
    trained_k: int | None

    def merged_unet_params(self) -> dict[str, Any]:
        """The student's params with the decoder LoRA merged (``lora.merge``, as the train step)."""
        return lora.merge(self.student_params, self.lora_params, self.lora_alpha, self.lora_rank)


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of workdir/checkpoints (never creates, cleans or deletes anything)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(workdir):
        raise ExportError(f"workdir {workdir} does not exist")
    if not os.path.isdir(directory):
        raise ExportError(f"{workdir} has no checkpoints/ folder: not a training workdir, or the run "
                          "saved no checkpoint yet")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False, save_interval_steps=0,
                                           max_to_keep=None)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=checkpoints.STATE_ITEMS + checkpoints.JSON_ITEMS)


def _pick_step(manager: ocp.CheckpointManager, workdir: str, step: int | None) -> int:
    """`step`, or the latest complete checkpoint; ExportError when absent."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise ExportError(f"{workdir}/checkpoints holds no complete checkpoint")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"{workdir} has no checkpoint at step {step}; available: {steps}")
    return int(step)


def _host_tree(tree: Any) -> Any:
    """Restored arrays as host numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x), tree)


def _trained_k(config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """k of the run's training data (its manifest), None when it cannot be found."""
    from imagerag_jax.data import tfrecords

    data_dir = config.get("data_dir") or os.path.join(workdir, "data")
    try:
        with open(os.path.join(data_dir, tfrecords.MANIFEST)) as f:
            return int(json.load(f)["schema"]["k"])
    except (OSError, KeyError, ValueError, TypeError):
        synthetic = config.get("synthetic")
        return int(synthetic["k"]) if config.get("data_dir") is None and synthetic else None


def _vae_path(config: ml_collections.ConfigDict) -> str | None:
    """The VAE path exactly as Trainer.__init__ resolves it."""
    path, student = config.vae_weights, config.student_weights
    if path is None and student is not None and os.path.isdir(os.path.join(student, "vae")):
        return student  # the SD-Turbo pipeline folder has the VAE
    return path


def load_run(workdir: str, step: int | None = None, *, check_frozen: bool = True) -> RunWeights:
    """Reads the checkpoint at `step` (default: latest) and rebuilds the run's frozen student and VAE."""
    manager = _read_only_manager(workdir)
    try:
        step = _pick_step(manager, workdir, step)
        json_items = manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), frozen=ocp.args.JsonRestore()))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))["params"]
    finally:
        manager.close()
    config_json, frozen_refs = dict(json_items["config"]), dict(json_items["frozen"])
    config = ml_collections.ConfigDict(config_json)
    params = _host_tree(params)

    param_dtype = train.DTYPES[config.frozen_param_dtype]
    common = dict(preset=config.random_preset, compute_dtype=jnp.float32, param_dtype=param_dtype,
                  prediction_type=config.random_prediction_type)
    student, student_p, _ = train.load_tower("unet", config.student_weights, seed=config.seed, **common)
    if check_frozen:
        want = frozen_refs.get("student", {}).get("fingerprint")
        have = train.fingerprint(student_p)
        if want is not None and want != have:
            raise ExportError(
                f"the student weights ({frozen_refs['student']}) differ from those the run trained "
                f"with (fingerprint {have} != {want}); export with the run's frozen weights")
    vae, vae_p, _ = train.load_tower("vae", _vae_path(config), seed=config.seed, **common)

    ad = config.adapter
    adapter = adapter_lib.HSpaceAdapter(num_heads=ad.num_heads, head_dim=ad.head_dim or None)
    lora_params = params["lora"]
    outside = [p for p in lora.lora_pairs(lora_params) if not p.startswith(DECODER_PREFIXES)]
    if outside:
        raise ExportError(f"the run's LoRA touches the UNet encoder ({outside[:3]}...); a merged UNet "
                          "would change the H-space the adapter was trained on, so it cannot be exported")
    timestep = int(schedule_lib.student_timesteps(int(config.student_steps))[0])
    return RunWeights(
        workdir=os.path.abspath(workdir), step=step, config=config, config_json=config_json,
        frozen_refs=frozen_refs, student=student, student_params=student_p, vae=vae, vae_params=vae_p,
        adapter=adapter, adapter_params=params["adapter"], lora_params=lora_params,
        lora_alpha=float(config.lora.alpha), lora_rank=int(config.lora.rank), timestep=timestep,
        trained_k=_trained_k(config, workdir))


def _text_parts(run: RunWeights, text_encoder: str | None, tokenizer: str | None):
    """(text module, params, tokenizer folder or None, source description) for the export."""
    from imagerag_jax import weights

    cfg = run.config
    source = text_encoder
    if source is None and cfg.student_weights is not None:
        sw = cfg.student_weights
        if os.path.isfile(sw) or os.path.isdir(os.path.join(sw, "text_encoder")):
            source = sw
    if source is not None:
        text, text_p = weights.load_text_encoder(source)
        if tokenizer is None and os.path.isdir(os.path.join(source, "tokenizer")):
            tokenizer = os.path.join(source, "tokenizer")
        return text, text_p, tokenizer, os.path.abspath(source)
    if cfg.student_weights is None and cfg.random_preset == "tiny":
        # The tiny random pipeline of the run's seed: its UNet is the student, its text encoder
        # the one build-db/precompute encode with (random_seed = seed).
        # pylint: disable-next=protected-access
        text, text_p = train._random_tower("text_encoder", "tiny", int(cfg.seed))
        return text, text_p, tokenizer, f"random:tiny:{int(cfg.seed)}"
    return None, None, tokenizer, None


def _scheduler(run: RunWeights) -> dict[str, Any]:
    """The student folder's scheduler config when it has one, else SD-Turbo's (Euler trailing)."""
    sw = run.config.student_weights
    base = None
    if sw is not None and os.path.isdir(sw):
        for cand in (os.path.join(sw, "scheduler"), os.path.join(sw, "..", "scheduler")):
            path = os.path.join(cand, "scheduler_config.json")
            if os.path.isfile(path):
                with open(path) as f:
                    base = json.load(f)
                break
    return to_torch.scheduler_config(run.student.prediction_type, base)


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuses an existing non-empty folder (or a file) unless overwrite."""
    if os.path.isfile(out_dir):
        raise ExportError(f"{out_dir} is a file; give a folder for the export")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; choose another --out or pass --overwrite")


def export_run(workdir: str, out_dir: str, step: int | None = None, *, overwrite: bool = False,
               text_encoder: str | None = None, tokenizer: str | None = None,
               base_unet: bool | None = None, check_frozen: bool = True) -> dict[str, str]:
    """Exports the checkpoint at `step` (default: latest) of `workdir` to `out_dir`; returns the paths.

    ``text_encoder``/``tokenizer``: folders to take them from when the run's student folder has
    none. ``base_unet``: also write the unmerged student to lora/base_unet (default: only when
    the run used random towers, whose base exists nowhere else).
    """
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir, overwrite)  # before the (slow) loading: fail fast, touch nothing
    run = load_run(workdir, step, check_frozen=check_frozen)
    text, text_p, tok_dir, text_source = _text_parts(run, text_encoder, tokenizer)
    if text is None:
        logging.warning("the run has no text encoder (random %r towers): exporting without one",
                        run.config.random_preset)
    if base_unet is None:
        base_unet = run.config.student_weights is None

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = _write_export(run, tmp, text, text_p, tok_dir, text_source, base_unet)
        _swap_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: os.path.join(out_dir, os.path.relpath(p, tmp)) for name, p in written.items()}


def _write_export(run: RunWeights, out: str, text, text_p, tok_dir: str | None,
                  text_source: str | None, base_unet: bool) -> dict[str, str]:
    """Writes every part of the export into `out` (a fresh folder)."""
    from imagerag_jax.weights import random_pipeline

    byte_tokenizer = tok_dir is None and text_source is not None and text_source.startswith("random:")
    paths = to_torch.save_pipeline(out, run.student, run.merged_unet_params(), run.vae, run.vae_params,
                                   text, text_p, tokenizer_dir=tok_dir, scheduler=_scheduler(run))
    if byte_tokenizer:
        paths["tokenizer"] = random_pipeline.write_byte_tokenizer(os.path.join(out, "tokenizer"))
        with open(paths["model_index"]) as f:
            index = json.load(f)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        with open(paths["model_index"], "w") as f:
            json.dump(index, f, indent=2)
    if text is not None and "tokenizer" not in paths:
        logging.warning("no tokenizer found for the text encoder: pass tokenizer=... (--tokenizer)")

    base_ref = run.frozen_refs.get("student", {})
    channels = int(run.student.block_out_channels[-1])
    paths["adapter"] = to_torch.save_adapter(
        run.adapter, run.adapter_params, channels, os.path.join(out, "adapter"),
        extra={"timestep": run.timestep, "k": run.trained_k,
               "prediction_type": run.student.prediction_type, "trained_step": run.step})
    lora_dir = os.path.join(out, "lora")
    to_torch.save_lora_peft(run.lora_params, run.lora_alpha, run.lora_rank, lora_dir,
                            extra={"base_model": base_ref,
                                   "base_unet": "base_unet" if base_unet else None})
    paths["lora"] = lora_dir
    if base_unet:
        paths["base_unet"] = to_torch.save_unet(run.student, run.student_params,
                                                os.path.join(lora_dir, "base_unet"))
    manifest = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "workdir": run.workdir, "step": run.step,
        "timestep": run.timestep, "prediction_type": run.student.prediction_type,
        "text_encoder": text_source, "frozen": run.frozen_refs, "config": run.config_json,
        "parts": sorted(os.path.relpath(p, out) for p in paths.values()),
    }
    paths["manifest"] = os.path.join(out, MANIFEST)
    with open(paths["manifest"], "w") as f:
        json.dump(manifest, f, indent=2)
    return paths


def _swap_into_place(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Renames the finished `tmp` to `out_dir`; an old non-empty folder only goes with overwrite."""
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            if not overwrite:  # it appeared while we were writing
                raise ExportError(f"{out_dir} exists and is not empty; choose another --out or pass "
                                  "--overwrite")
            old = f"{tmp}.old"
            os.rename(out_dir, old)
        else:
            os.rmdir(out_dir)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
