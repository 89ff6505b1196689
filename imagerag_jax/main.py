"""Command line: ``python -m imagerag_jax.main SUBCOMMAND [--flags]``; each runs one library function.

  generate    prompts -> PNG (generate.text_to_images): --weights P --prompt ... --out FILE.png
  build-db    retrieval database + index (data.build_db.build_db): --config C --workdir W
  precompute  TFRecord shards with retrieved neighbours (data.precompute.precompute): same flags
  train       ImageRAGTurbo training (train.train_and_evaluate): same flags, --config.field=value
  run         the digits miniature, every stage + results (miniature.run.run): same flags
  export      a training run -> diffusers folder (export.export_run): --workdir W --out_dir DIR
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "generate: diffusers pipeline folder or single-file "
                    ".safetensors/.ckpt; unset: a tiny random-weight pipeline (images are noise)")
flags.DEFINE_multi_string("prompt", ["a photograph of an astronaut riding a horse"], "generate: prompt(s)")
flags.DEFINE_string("negative_prompt", "", "generate: the unconditional prompt of CFG")
flags.DEFINE_integer("steps", 1, "generate: denoising steps (1 = SD-Turbo one step at t=999)")
flags.DEFINE_float("guidance", 0.0, "generate: classifier-free guidance scale (<= 1 disables CFG)")
flags.DEFINE_enum("sampler", "euler", ["euler", "ddim"], "generate: multi-step sampler")
flags.DEFINE_integer("seed", 0, "generate: noise seed")
flags.DEFINE_integer("batch", 1, "generate: images to generate (prompts are cycled)")
flags.DEFINE_integer("height", None, "generate: image height (default 512; 64 for the random pipeline)")
flags.DEFINE_integer("width", None, "generate: image width (default: height)")
flags.DEFINE_string("out", "out.png", "generate: the PNG to write (a grid when --batch > 1)")
flags.DEFINE_string("tokenizer", None, "generate, export: tokenizer folder (single-file checkpoints)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "generate: compute dtype")
config_flags.DEFINE_config_file("config", None, "build-db, precompute, train, run: ml_collections "
                                "config file (configs/*.py[:arg])", lock_config=True)
flags.DEFINE_string("workdir", None, "the run's folder: jobs write and resume there; export reads it")
flags.DEFINE_string("out_dir", None, "export: the folder to write the diffusers export to")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest)")
flags.DEFINE_bool("overwrite", False, "export: replace a non-empty --out_dir")


def _job_args(command: str) -> tuple:
    """(--config, --workdir), which every job subcommand needs."""
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError(f"{command} needs --config configs/X.py and --workdir DIR")
    return FLAGS.config, FLAGS.workdir


def generate() -> None:
    from imagerag_jax import generate as generate_lib, images

    pipe = generate_lib.load_pipeline(FLAGS.weights, tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype)
    out = generate_lib.text_to_images(
        pipe, images.caption_list(FLAGS.prompt, FLAGS.batch), seed=FLAGS.seed, steps=FLAGS.steps,
        guidance=FLAGS.guidance, sampler=FLAGS.sampler, negative_prompt=FLAGS.negative_prompt,
        height=FLAGS.height or generate_lib.default_size(FLAGS.weights), width=FLAGS.width)
    print(f"wrote {images.save_images(out, FLAGS.out)}")


def build_db() -> None:
    from imagerag_jax.data import build_db as build_db_lib

    print(f"retrieval database: {build_db_lib.build_db(*_job_args('build-db'))}")


def precompute() -> None:
    from imagerag_jax.data import precompute as precompute_lib

    done = precompute_lib.precompute(*_job_args("precompute")) is not None
    print("precompute done" if done else "this host is done; waiting for others' shards")


def train() -> None:
    from imagerag_jax import sharding, train as train_lib

    config, workdir = _job_args("train")
    sharding.initialize_distributed()
    train_lib.train_and_evaluate(config, workdir)


def run() -> None:
    from imagerag_jax.miniature import run as run_lib

    config, workdir = _job_args("run")
    results = run_lib.run(config, workdir)
    print(open(os.path.join(workdir, "results.md")).read())
    print(f"results: {os.path.join(workdir, 'results.json')} ({results['total_seconds']:.0f} s)")


def export() -> None:
    from imagerag_jax import export as export_lib

    if FLAGS.workdir is None or FLAGS.out_dir is None:
        raise app.UsageError("export needs --workdir DIR (a training workdir) and --out_dir DIR")
    paths = export_lib.export_run(FLAGS.workdir, FLAGS.out_dir, FLAGS.step, overwrite=FLAGS.overwrite,
                                  tokenizer=FLAGS.tokenizer)
    print(f"exported {FLAGS.workdir} to {os.path.dirname(paths['manifest'])}")


SUBCOMMANDS = {"generate": generate, "build-db": build_db, "precompute": precompute, "train": train,
               "run": run, "export": export}


class _QuietLibraries(pylogging.Filter):
    """Drops INFO chatter of libraries that log every checkpoint step (orbax); keeps warnings."""

    NOISY = ("/orbax/", "/etils/", "/jax/_src/xla_bridge")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        extra = f" (unexpected: {' '.join(argv[2:])})" if len(argv) > 2 else ""
        raise app.UsageError(f"usage: python -m imagerag_jax.main {{{'|'.join(SUBCOMMANDS)}}} "
                             f"[--flags]{extra}")
    from imagerag_jax.errors import UserError

    try:
        SUBCOMMANDS[argv[1]]()
    except UserError as e:  # a wrong path, flag or config: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
