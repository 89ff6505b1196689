"""Export a training run to PyTorch: a diffusers pipeline folder plus the adapter and the LoRA.

    from imagerag_jax.export import to_diffusers
    paths = to_diffusers.export_run("/tmp/imagerag/train", "/tmp/imagerag/export")   # latest step

or ``python -m imagerag_jax.main export --workdir W --out_dir DIR [--step N] [--overwrite]``.

The run's trainable params (adapter, decoder LoRA) come from its orbax checkpoint
(``checkpoints.restore_trained``); the frozen towers are rebuilt by ``towers.frozen_towers``
exactly as the trainer built them (the config's weight paths, or the random towers of
``random_preset`` and ``random_seed``) and checked against the fingerprint the checkpoint recorded.
Written to ``out_dir``:

  model_index.json, scheduler/   a ``StableDiffusionPipeline`` folder (diffusers ``from_pretrained``)
  unet/                          the student UNet with the decoder LoRA merged (fp32)
  vae/                           the run's VAE
  text_encoder/, tokenizer/      from the student's pipeline folder (or ``text_encoder=``/``tokenizer=``);
                                 for random 'tiny' towers, the tiny random pipeline's of the same
                                 seed (what ``build-db``/``precompute`` use) and its byte tokenizer;
                                 otherwise none (listed as null in model_index.json)
  adapter/                       config.json + adapter.safetensors (``torch_runtime.py``)
  lora/                          pytorch_lora_weights.safetensors: the LoRA unmerged, PEFT format,
                                 for the *base* student (``pipe.load_lora_weights``), lora_config.json;
                                 base_unet/ (the unmerged student) when the run had no student path
  imagerag_export.json           workdir, step, config, what was written, and the frozen towers'
                                 references as the run recorded them (path or hub id with its
                                 commit, ``org/name@<commit>``; fingerprints) and the text
                                 encoder's (path, ``org/name@<commit>`` or ``random:tiny:seed``)

The folder is written beside ``out_dir`` and renamed into place, so a failed export leaves
nothing half-written; an existing non-empty ``out_dir`` is replaced only with ``overwrite``.
This module never imports the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import jax.numpy as jnp
import ml_collections

from imagerag_jax import jsonfiles, storage
from imagerag_jax.training import checkpoints
from imagerag_jax.models import lora
from imagerag_jax.weights import hub, towers
from imagerag_jax.diffusion import schedule as schedule_lib
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


def _trained_k(config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """k of the run's training data (its manifest), None when it cannot be found."""
    from imagerag_jax.data import mixture

    try:
        return int(mixture.run_manifest(config, workdir)["schema"]["k"])
    except (KeyError, ValueError, TypeError):  # no manifest (None), or one without a k
        unset = config.data_dir is None and not config.data_mixture
        return int(config.synthetic.k) if unset else None


def load_run(workdir: str, step: int | None = None, *, check_frozen: bool = True) -> RunWeights:
    """Reads the checkpoint at `step` (default: latest) and rebuilds the run's frozen student and VAE."""
    step, params, json_items = checkpoints.restore_trained(workdir, step, error=ExportError)
    config_json, frozen_refs = json_items["config"], json_items["frozen"]
    config = ml_collections.ConfigDict(config_json)
    frozen = towers.frozen_towers(config, compute_dtype=jnp.float32, teacher=False)
    if check_frozen:
        towers.check_frozen(frozen_refs, frozen.references(), names=("student",), error=ExportError)

    adapter = adapter_lib.from_config(config.adapter)
    lora_params = params["lora"]
    outside = [p for p in lora.lora_pairs(lora_params) if not p.startswith(DECODER_PREFIXES)]
    if outside:
        raise ExportError(f"the run's LoRA touches the UNet encoder ({outside[:3]}...); a merged UNet "
                          "would change the H-space the adapter was trained on, so it cannot be exported")
    timestep = int(schedule_lib.student_timesteps(int(config.student_steps))[0])
    return RunWeights(
        workdir=workdir if storage.is_url(workdir) else os.path.abspath(workdir), step=step, config=config, config_json=config_json,
        frozen_refs=frozen_refs, student=frozen.student.module, student_params=frozen.student.params,
        vae=frozen.vae.module, vae_params=frozen.vae.params, adapter=adapter,
        adapter_params=params["adapter"], lora_params=lora_params,
        lora_alpha=float(config.lora.alpha), lora_rank=int(config.lora.rank), timestep=timestep,
        trained_k=_trained_k(config, workdir))


def _scheduler(run: RunWeights) -> dict[str, Any]:
    """The student folder's (or hub id's) scheduler config when it has one, else SD-Turbo's."""
    sw = run.config.student_weights
    if sw is not None:
        sw = hub.local_path(sw, ("scheduler",))
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
    text, text_p, tok_dir, text_source = towers.text_tower(run.config, text_encoder, tokenizer)
    if text is None:
        logging.warning("the run has no text encoder (random %r towers): exporting without one",
                        run.config.random_preset)
    if base_unet is None:
        base_unet = run.config.student_weights is None

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = jsonfiles.temp_name(out_dir)
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
