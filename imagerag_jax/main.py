"""Command-line entry: ``python -m imagerag_jax.main SUBCOMMAND [--flags]``.

Subcommands:
  generate   text-to-image with a local SD 2.x / SD-Turbo checkpoint (diffusers folder or single file)
  build-db   encode an image-text source into the retrieval database and index:
             --config configs/precompute_digits.py --workdir DIR
  precompute TFRecord shards of training pairs with their retrieved neighbours (same flags)
  train      ImageRAGTurbo training: --config configs/X.py --workdir DIR [--config.field=value]
  run        the CPU miniature on scikit-learn's digits, every stage then the comparison table:
             --config configs/digits.py[:quick] --workdir DIR (reruns resume)
  export     a training run to PyTorch (diffusers folder, LoRA merged, adapter, PEFT LoRA):
             --workdir DIR --out EXPORT_DIR [--step N] [--overwrite]
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "diffusers pipeline folder or single-file .safetensors/.ckpt; "
                    "unset: a tiny random-weight pipeline (checks the install; images are noise)")
flags.DEFINE_multi_string("prompt", ["a photograph of an astronaut riding a horse"], "prompt(s)")
flags.DEFINE_string("negative_prompt", "", "prompt for the unconditional branch of CFG")
flags.DEFINE_integer("steps", 1, "denoising steps (1 = SD-Turbo one step at t=999)")
flags.DEFINE_float("guidance", 0.0, "classifier-free guidance scale (<= 1 disables CFG)")
flags.DEFINE_enum("sampler", "euler", ["euler", "ddim"], "multi-step sampler")
flags.DEFINE_integer("seed", 0, "noise seed")
flags.DEFINE_integer("batch", 1, "images to generate (prompts are cycled)")
flags.DEFINE_integer("height", None, "image height in pixels (default 512, 64 for the random pipeline)")
flags.DEFINE_integer("width", None, "image width in pixels (default: height)")
flags.DEFINE_string("out", "out.png", "output PNG (a grid when --batch > 1); export: the folder to write")
flags.DEFINE_string("tokenizer", None, "tokenizer folder (needed with a single-file checkpoint)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
config_flags.DEFINE_config_file("config", None, "build-db/precompute/train: ml_collections config "
                                "file (configs/*.py[:arg])", lock_config=True)
flags.DEFINE_string("workdir", None, "build-db/precompute/train: outputs go here (reruns resume); "
                    "export: the training workdir to read")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest)")
flags.DEFINE_bool("overwrite", False, "export: replace a non-empty --out folder")

SUBCOMMANDS = ("generate", "build-db", "precompute", "train", "export", "run")


def _config_and_workdir(command: str):
    """The --config and --workdir every job subcommand needs, or a usage error."""
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError(f"{command} needs --config configs/X.py and --workdir DIR")
    return FLAGS.config, FLAGS.workdir


def build_db() -> None:
    """Encode the configured source into workdir/db and index it (resumable)."""
    from imagerag_jax.data import precompute as precompute_lib

    result = precompute_lib.build_db(*_config_and_workdir("build-db"))
    print(f"retrieval database: {result}")


def precompute() -> None:
    """Write this host's TFRecord shards of training pairs (resumable, multi-host)."""
    from imagerag_jax.data import precompute as precompute_lib

    manifest = precompute_lib.precompute(*_config_and_workdir("precompute"))
    print("precompute done" if manifest is not None else "this host is done; waiting for others' shards")


def train() -> None:
    """Run train_and_evaluate(config, workdir); SIGTERM saves a checkpoint and exits cleanly."""
    config, workdir = _config_and_workdir("train")
    from imagerag_jax import train as train_lib

    train_lib.initialize_distributed()
    train_lib.train_and_evaluate(config, workdir)


def run() -> None:
    """Every stage of the digits miniature, then results.{json,md} and sample grids in workdir."""
    config, workdir = _config_and_workdir("run")
    from imagerag_jax.miniature import run as run_lib

    results = run_lib.run(config, workdir)
    print(open(os.path.join(workdir, "results.md")).read())
    print(f"results: {os.path.join(workdir, 'results.json')} ({results['total_seconds']:.0f} s)")


def export() -> None:
    """Export a training workdir's checkpoint to a PyTorch/diffusers folder (imagerag_jax.export)."""
    if FLAGS.workdir is None or not FLAGS["out"].present:
        raise app.UsageError("export needs --workdir DIR (a training workdir) and --out EXPORT_DIR")
    from imagerag_jax import export as export_lib

    paths = export_lib.export_run(FLAGS.workdir, FLAGS.out, FLAGS.step, overwrite=FLAGS.overwrite,
                                  tokenizer=FLAGS.tokenizer)
    print(f"exported {FLAGS.workdir} to {os.path.dirname(paths['manifest'])}")


def generate() -> str:
    """Load the pipeline, run the jitted sampler and write the PNG; returns its path."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from imagerag_jax import images, sampling, weights

    weights_path, height = FLAGS.weights, FLAGS.height
    if weights_path is None:
        logging.warning("no --weights given: using a tiny random-weight pipeline; images are noise")
        from imagerag_jax.weights import random_pipeline

        tmp = tempfile.TemporaryDirectory(prefix="imagerag-random-")
        weights_path = random_pipeline.write_random_pipeline(tmp.name)
        height = height or 64
    height = height or 512
    width = FLAGS.width or height
    dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
    t0 = time.perf_counter()
    pipe = weights.load_pipeline(weights_path, dtype=dtype, tokenizer_path=FLAGS.tokenizer)
    if pipe.tokenizer is None:
        raise app.UsageError(f"{weights_path} has no tokenizer/ folder: pass --tokenizer DIR")
    logging.info("loaded %s in %.1f s", weights_path, time.perf_counter() - t0)
    factor = pipe.vae.downsample_factor
    if height % (factor * 2 ** (len(pipe.unet.block_out_channels) - 1)) or width % factor:
        raise app.UsageError(f"--height/--width must be multiples of {factor * 2 ** (len(pipe.unet.block_out_channels) - 1)}")
    prompts = images.caption_list(FLAGS.prompt, FLAGS.batch)
    ids = jnp.asarray(pipe.tokenizer(prompts))
    uncond_ids = jnp.asarray(pipe.tokenizer([FLAGS.negative_prompt] * len(prompts)))
    noise = jax.random.normal(
        jax.random.PRNGKey(FLAGS.seed), (len(prompts), height // factor, width // factor, 4)
    )
    t0 = time.perf_counter()
    out = sampling.text_to_image(
        pipe, ids, uncond_ids, noise, steps=FLAGS.steps, guidance=FLAGS.guidance,
        sampler=FLAGS.sampler,
    )
    out = np.asarray(jax.device_get(out))
    logging.info("generated %d image(s) in %.1f s (incl. compile)", len(out), time.perf_counter() - t0)
    path = images.save_images(out, FLAGS.out)
    print(f"wrote {path}")
    return path


class _QuietLibraries(pylogging.Filter):
    """Drops INFO chatter of libraries that log every checkpoint step (orbax); keeps warnings."""

    NOISY = ("/orbax/", "/etils/", "/jax/_src/xla_bridge")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def main(argv: list[str]) -> None:
    """Dispatch the subcommand."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"usage: python -m imagerag_jax.main {{{'|'.join(SUBCOMMANDS)}}} [--flags]")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[2:])}")
    from imagerag_jax.weights import WeightLoadError

    try:
        {"generate": generate, "build-db": build_db, "precompute": precompute, "train": train,
         "export": export, "run": run}[argv[1]]()
    except WeightLoadError as e:
        # A wrong path or checkpoint is a user error: one clear message, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
