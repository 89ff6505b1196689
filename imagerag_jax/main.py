"""Command line: ``python -m imagerag_jax.main SUBCOMMAND [--flags]``; each runs one library function.

  generate    prompts -> PNG (generate.text_to_images): --weights P --prompt ... --out FILE.png;
              with retrieval (rag.RagPipeline): --run W | --export DIR | --weights P --database DB
              --index IDX, [--k --mode --w --neighbours GRID.png]
  evaluate    many prompts -> images, index, FID/CLIP/latency (evaluate.evaluate_prompts):
              the pipeline flags + --prompts FILE --out DIR [--reference DIR --inception F --clip DIR]
  serve       a local demo page (serve.serve): the pipeline flags + [--host --port]
  build-cache the H-space cache of the pipeline's database (rag.RagPipeline.build_cache)
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
flags.DEFINE_string("run", None, "generate, evaluate, serve, build-cache: a training workdir (its "
                    "checkpoint --step or the latest, its database and index)")
flags.DEFINE_string("export", None, "generate, evaluate, serve, build-cache: an `export` folder")
flags.DEFINE_string("database", None, "generate, evaluate, serve, build-cache: a retrieval database "
                    "(build-db); with --weights, or to override the run's")
flags.DEFINE_string("index", None, "generate, evaluate, serve: the database's saved index")
flags.DEFINE_integer("k", None, "generate, evaluate: neighbours to retrieve (default: the run's k; 1)")
flags.DEFINE_enum("mode", None, ["adapter", "inject", "none"], "generate, evaluate: the trained "
                  "adapter, training-free H-space injection, or none (default: adapter when trained)")
flags.DEFINE_float("w", None, "generate, evaluate: the injection weight of --mode inject (0.8)")
flags.DEFINE_bool("cache", True, "generate, evaluate, serve: use the H-space cache when it matches")
flags.DEFINE_string("neighbours", None, "generate: also write a PNG grid of each image beside its "
                    "retrieved neighbours, with their captions and lambda")
flags.DEFINE_string("prompts", None, "evaluate: prompt file (.txt lines, .jsonl or .csv with a "
                    "prompt/caption/text field)")
flags.DEFINE_string("reference", None, "evaluate: a folder of reference images for FID")
flags.DEFINE_string("inception", None, "evaluate: a TorchScript Inception feature network for FID")
flags.DEFINE_string("clip", None, "evaluate: a local CLIP model folder for the CLIP score")
flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on")
flags.DEFINE_integer("port", 7860, "serve: the port")


def _job_args(command: str) -> tuple:
    """(--config, --workdir), which every job subcommand needs."""
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError(f"{command} needs --config configs/X.py and --workdir DIR")
    return FLAGS.config, FLAGS.workdir


def _rag_pipeline(command: str):
    """The RagPipeline of --run, --export or --weights (+ --database/--index)."""
    from imagerag_jax.inference import rag

    given = [n for n in ("run", "export") if FLAGS[n].value is not None]
    if len(given) > 1 or (given and FLAGS.weights is not None):
        raise app.UsageError(f"{command}: pass one of --run, --export or --weights")
    kw = dict(database=FLAGS.database, index=FLAGS.index, k=FLAGS.k, cache=FLAGS.cache)
    if FLAGS.w is not None:
        kw["w"] = FLAGS.w
    if FLAGS.run is not None:
        return rag.RagPipeline.from_run(FLAGS.run, FLAGS.step, **kw)
    if FLAGS.export is not None:
        return rag.RagPipeline.from_export(FLAGS.export, **kw)
    if FLAGS.weights is None or FLAGS.database is None:
        raise app.UsageError(f"{command} needs --run W, --export DIR, or --weights P --database DB "
                             "--index IDX")
    return rag.RagPipeline.from_weights(FLAGS.weights, tokenizer=FLAGS.tokenizer,
                                        **{**kw, "k": FLAGS.k or 1})


def _uses_retrieval() -> bool:
    return any(FLAGS[n].value is not None for n in ("run", "export", "database", "index"))


def generate_with_retrieval() -> None:
    from imagerag_jax import images

    plain_only = [n for n in ("steps", "guidance", "sampler", "negative_prompt", "height", "width",
                              "dtype") if FLAGS[n].present]
    if plain_only:
        raise app.UsageError(f"--{', --'.join(plain_only)}: plain generation only (without --run, "
                             "--export or --database)")
    pipe = _rag_pipeline("generate")
    out = pipe(images.caption_list(FLAGS.prompt, FLAGS.batch), seed=FLAGS.seed, k=FLAGS.k,
               mode=FLAGS.mode, w=FLAGS.w)
    if FLAGS.neighbours is not None:
        neighbours = images.save_png(pipe.neighbour_grid(out), FLAGS.neighbours)  # before --out
    print(f"wrote {images.save_images(out.images, FLAGS.out)} ({out.mode}, "
          f"{out.seconds['total']:.2f} s{', H-space cache' if out.used_cache else ''})")
    for i, prompt in enumerate(out.prompts):
        if out.ids is not None:
            print(f"  {prompt!r}: lambda {out.lam[i]:.3f}, neighbours " + "; ".join(
                f"{int(n)} {c!r} ({s:.3f})" for n, c, s in zip(out.ids[i], out.captions[i], out.scores[i])))
    if FLAGS.neighbours is not None:
        print(f"wrote {neighbours}")


def generate() -> None:
    from imagerag_jax import images
    from imagerag_jax.inference import generate as generate_lib

    if _uses_retrieval():
        return generate_with_retrieval()
    if FLAGS.neighbours is not None:
        raise app.UsageError("--neighbours needs retrieval: --run, --export or --database/--index")
    pipe = generate_lib.load_pipeline(FLAGS.weights, tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype)
    out = generate_lib.text_to_images(
        pipe, images.caption_list(FLAGS.prompt, FLAGS.batch), seed=FLAGS.seed, steps=FLAGS.steps,
        guidance=FLAGS.guidance, sampler=FLAGS.sampler, negative_prompt=FLAGS.negative_prompt,
        height=FLAGS.height or generate_lib.default_size(FLAGS.weights), width=FLAGS.width)
    print(f"wrote {images.save_images(out, FLAGS.out)}")


def build_db() -> None:
    from imagerag_jax import sharding
    from imagerag_jax.data import build_db as build_db_lib

    args = _job_args("build-db")
    sharding.initialize_distributed()  # every host builds its parts of the database
    print(f"retrieval database: {build_db_lib.build_db(*args)}")


def precompute() -> None:
    from imagerag_jax import sharding
    from imagerag_jax.data import precompute as precompute_lib

    args = _job_args("precompute")
    sharding.initialize_distributed()  # each host writes its own shards
    done = precompute_lib.precompute(*args) is not None
    print("precompute done" if done else "this host is done; waiting for others' shards")


def train() -> None:
    from imagerag_jax import sharding
    from imagerag_jax.training import trainer as train_lib

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
    from imagerag_jax.export import to_diffusers as export_lib

    if FLAGS.workdir is None or FLAGS.out_dir is None:
        raise app.UsageError("export needs --workdir DIR (a training workdir) and --out_dir DIR")
    paths = export_lib.export_run(FLAGS.workdir, FLAGS.out_dir, FLAGS.step, overwrite=FLAGS.overwrite,
                                  tokenizer=FLAGS.tokenizer)
    print(f"exported {FLAGS.workdir} to {os.path.dirname(paths['manifest'])}")


def evaluate() -> None:
    from imagerag_jax import sharding
    from imagerag_jax.evaluation import evaluate

    if FLAGS.prompts is None or not FLAGS["out"].present:
        raise app.UsageError("evaluate needs --prompts FILE and --out DIR (and --run/--export/--weights)")
    prompts = evaluate.read_prompts(FLAGS.prompts)  # a bad file fails before loading
    sharding.initialize_distributed()  # each host generates its slice of the prompts
    pipe = _rag_pipeline("evaluate")
    summary = evaluate.evaluate_prompts(
        pipe, prompts, FLAGS.out, batch_size=FLAGS.batch if FLAGS["batch"].present else None,
        seed=FLAGS.seed, mode=FLAGS.mode, k=FLAGS.k, w=FLAGS.w, reference=FLAGS.reference,
        inception=FLAGS.inception, clip=FLAGS.clip)
    if summary["metrics"] is not None:
        print(open(os.path.join(FLAGS.out, "metrics.md")).read())
    print(f"{FLAGS.out}: {summary['generated']} generated, {summary['skipped']} already done, "
          f"{summary['missing']} prompts of other hosts not finished yet")


def serve() -> None:
    from imagerag_jax.inference import serve as serve_lib

    serve_lib.serve(_rag_pipeline("serve"), host=FLAGS.host, port=FLAGS.port)


def build_cache() -> None:
    pipe = _rag_pipeline("build-cache")
    print(f"H-space cache: {pipe.build_cache()}")


SUBCOMMANDS = {"generate": generate, "build-db": build_db, "precompute": precompute, "train": train,
               "run": run, "export": export, "evaluate": evaluate, "serve": serve,
               "build-cache": build_cache}


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
