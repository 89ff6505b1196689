"""Command line: ``python -m imagerag_jax.main SUBCOMMAND [--flags]``; each runs one library function.

  generate    prompts -> PNG (generate.text_to_images): --weights P --prompt ... --out FILE.png;
              with retrieval (rag.RagPipeline): --run W | --export DIR | --weights P --database DB
              --index IDX, [--k --mode --w --neighbours GRID.png]
  evaluate    many prompts -> images, index, FID/CLIP/latency (evaluate.evaluate_prompts):
              the pipeline flags + --prompts FILE --out DIR [--num_prompts N --reference DIR
              --inception F --clip DIR]; FILE may be MS-COCO's captions_val2017.json
  serve       a local demo page (serve.serve): the pipeline flags + [--host --port]
  build-cache the H-space cache of the pipeline's database (rag.RagPipeline.build_cache)
  build-db    retrieval database + index (data.build_db.build_db): --config C --workdir W
  precompute  TFRecord shards with retrieved neighbours (data.precompute.precompute): same flags
  train       ImageRAGTurbo training (train.train_and_evaluate): same flags, --config.field=value
  run         the digits miniature, every stage + results (miniature.run.run): same flags
  export      a training run -> diffusers folder (export.export_run): --workdir W --out_dir DIR

Every mistake a user can fix (a missing or unknown flag, a flag another subcommand takes, a bad
``--config`` file, arg string or ``--config.field=value`` override, a wrong path, a
`errors.UserError` of the library) ends as one ``error: ...`` line on stderr and exit status 2;
anything else is a bug and keeps its traceback. `run_cli` is the in-process entry point (tests).
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from imagerag_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("weights", None, "generate: diffusers pipeline folder, single-file "
                    ".safetensors/.ckpt or hub id org/name[@revision]; unset: a tiny random-weight "
                    "pipeline (images are noise)")
flags.DEFINE_multi_string("prompt", ["a photograph of an astronaut riding a horse"], "generate: prompt(s)")
flags.DEFINE_string("negative_prompt", "", "generate: the unconditional prompt of CFG")
flags.DEFINE_integer("steps", 1, "generate, evaluate (--weights alone): denoising steps (1 = "
                     "SD-Turbo one step at t=999)")
flags.DEFINE_float("guidance", 0.0, "generate, evaluate (--weights alone): classifier-free guidance "
                   "scale (<= 1 disables CFG)")
flags.DEFINE_enum("sampler", "euler", ["euler", "ddim"], "generate: multi-step sampler")
flags.DEFINE_integer("seed", 0, "generate: noise seed")
flags.DEFINE_integer("batch", 1, "generate: images to generate (prompts are cycled)")
flags.DEFINE_integer("height", None, "generate: image height (default 512; 64 for the random pipeline)")
flags.DEFINE_integer("width", None, "generate: image width (default: height)")
flags.DEFINE_string("out", "out.png", "generate: the PNG to write (a grid when --batch > 1)")
flags.DEFINE_string("tokenizer", None, "generate, export: tokenizer folder or hub id (single-file "
                    "checkpoints)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "generate, evaluate, serve: compute "
                  "dtype (with retrieval: UNet, adapter and VAE; text encoder and search stay float32)")
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
                    "prompt/caption/text field, or MS-COCO's captions_val2017.json)")
flags.DEFINE_integer("num_prompts", None, "evaluate: only the first N prompts (of an MS-COCO "
                     "captions .json: N images drawn with --seed, one caption each)")
flags.DEFINE_string("reference", None, "evaluate: a folder of reference images for FID (with an "
                    "MS-COCO captions file: the prompts' own images in it, e.g. val2017/)")
flags.DEFINE_string("inception", None, "evaluate: a TorchScript Inception feature network for FID "
                    "(a file, or a hub id whose repo holds one)")
flags.DEFINE_multi_string("clip", None, "evaluate: a CLIP model folder or hub id for the CLIP "
                          "score; repeat it for several (e.g. ViT-L/14 and the paper's ViT-bigG-14)")
flags.DEFINE_string("aesthetic", None, "evaluate: LAION's aesthetic predictor "
                    "(sac+logos+ava1-l14-linearMSE.pth) for the aesthetic score; --clip is its "
                    "CLIP ViT-L/14")
flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on")
flags.DEFINE_integer("port", 7860, "serve: the port")


def _job_args(command: str) -> tuple:
    """(--config, --workdir), which every job subcommand needs."""
    if FLAGS.config is None or FLAGS.workdir is None:
        raise UserError(f"{command} needs --config configs/X.py and --workdir DIR")
    return FLAGS.config, FLAGS.workdir


def _rag_pipeline(command: str):
    """The RagPipeline of --run, --export or --weights (+ --database/--index; without them
    --weights is the plain one-step pipeline)."""
    from imagerag_jax.inference import rag
    from imagerag_jax.weights import hub

    given = [n for n in ("run", "export") if FLAGS[n].value is not None]
    if len(given) > 1 or (given and FLAGS.weights is not None):
        raise UserError(f"{command}: pass one of --run, --export or --weights")
    kw = dict(database=FLAGS.database, index=FLAGS.index, k=FLAGS.k, cache=FLAGS.cache)
    if FLAGS["dtype"].present:  # build-cache does not take it: the cache is always float32's
        kw["dtype"] = FLAGS.dtype
    if FLAGS.w is not None:
        kw["w"] = FLAGS.w
    sampled = [n for n in ("steps", "guidance", "sampler") if FLAGS[n].present]
    if sampled:  # the plain baselines (e.g. the SD 2.1 teacher: --steps 50 --guidance 7.5)
        if FLAGS.weights is None or FLAGS.database is not None or FLAGS.index is not None:
            raise UserError(f"{command}: --{', --'.join(sampled)} need --weights without --database "
                            "(plain multi-step sampling; the retrieval modes are one step)")
        kw.update(steps=FLAGS.steps, guidance=FLAGS.guidance, sampler=FLAGS.sampler)
    if FLAGS.run is not None:
        return rag.RagPipeline.from_run(FLAGS.run, FLAGS.step, **kw)
    if FLAGS.export is not None:
        return rag.RagPipeline.from_export(FLAGS.export, **kw)
    if FLAGS.weights is None:
        raise UserError(f"{command} needs --run W, --export DIR, or --weights P [--database DB "
                        "--index IDX]")
    # --weights alone: the plain one-step baseline (the paper's SD-Turbo row), no retrieval.
    if FLAGS.database is None and FLAGS.index is None and FLAGS.mode not in (None, "none"):
        raise UserError(f"{command} --weights without --database/--index runs plain one-step "
                        f"generation (--mode none); --mode {FLAGS.mode} needs --database DB --index IDX")
    # A hub id becomes its snapshot folder here, once (the folder names the repo and commit).
    return rag.RagPipeline.from_weights(hub.local_path(FLAGS.weights), tokenizer=FLAGS.tokenizer,
                                        **{**kw, "k": FLAGS.k or 1})


def _uses_retrieval() -> bool:
    return any(FLAGS[n].value is not None for n in ("run", "export", "database", "index"))


def generate_with_retrieval() -> None:
    from imagerag_jax import images

    plain_only = [n for n in ("steps", "guidance", "sampler", "negative_prompt", "height", "width")
                  if FLAGS[n].present]
    if plain_only:
        raise UserError(f"--{', --'.join(plain_only)}: plain generation only (without --run, "
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
        raise UserError("--neighbours needs retrieval: --run, --export or --database/--index")
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
        raise UserError("export needs --workdir DIR (a training workdir) and --out_dir DIR")
    paths = export_lib.export_run(FLAGS.workdir, FLAGS.out_dir, FLAGS.step, overwrite=FLAGS.overwrite,
                                  tokenizer=FLAGS.tokenizer)
    print(f"exported {FLAGS.workdir} to {os.path.dirname(paths['manifest'])}")


def evaluate() -> None:
    from imagerag_jax import sharding
    from imagerag_jax.evaluation import evaluate

    if FLAGS.prompts is None or not FLAGS["out"].present:
        raise UserError("evaluate needs --prompts FILE and --out DIR (and --run/--export/--weights)")
    # A bad file fails before loading. MS-COCO captions: one caption per image, and those
    # images (in --reference) are the FID reference.
    names = None
    if FLAGS.prompts.lower().endswith(".json"):
        coco = evaluate.read_coco_captions(FLAGS.prompts, FLAGS.num_prompts, FLAGS.seed)
        prompts, names = coco.prompts, coco.file_names
    else:
        prompts = evaluate.read_prompts(FLAGS.prompts)
        if FLAGS.num_prompts is not None:
            if not 1 <= FLAGS.num_prompts <= len(prompts):
                raise UserError(f"--num_prompts {FLAGS.num_prompts}: {FLAGS.prompts} has {len(prompts)} prompts")
            prompts = prompts[:FLAGS.num_prompts]
    sharding.initialize_distributed()  # each host generates its slice of the prompts
    pipe = _rag_pipeline("evaluate")
    summary = evaluate.evaluate_prompts(
        pipe, prompts, FLAGS.out, batch_size=FLAGS.batch if FLAGS["batch"].present else None,
        seed=FLAGS.seed, mode=FLAGS.mode, k=FLAGS.k, w=FLAGS.w, reference=FLAGS.reference,
        inception=FLAGS.inception, clip=FLAGS.clip, aesthetic=FLAGS.aesthetic, reference_names=names)
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

# The flags of this module each subcommand reads; any other one given is a mistake (often another
# subcommand's flag, e.g. generate's --out for export's --out_dir), not something to ignore.
_PIPELINE_FLAGS = frozenset({"run", "export", "weights", "tokenizer", "database", "index", "step",
                             "k", "w", "cache"})
_JOB_FLAGS = frozenset({"config", "workdir"})
ACCEPTED_FLAGS = {
    "generate": _PIPELINE_FLAGS | {"prompt", "negative_prompt", "steps", "guidance", "sampler", "seed",
                                   "batch", "height", "width", "out", "dtype", "mode", "neighbours"},
    "evaluate": _PIPELINE_FLAGS | {"prompts", "num_prompts", "out", "batch", "seed", "mode", "reference",
                                   "inception", "clip", "aesthetic", "dtype", "steps", "guidance",
                                   "sampler"},
    "serve": _PIPELINE_FLAGS | {"host", "port", "dtype"},
    "build-cache": _PIPELINE_FLAGS,
    "build-db": _JOB_FLAGS,
    "precompute": _JOB_FLAGS,
    "train": _JOB_FLAGS,
    "run": _JOB_FLAGS,
    "export": frozenset({"workdir", "out_dir", "step", "overwrite", "tokenizer"}),
}
_OWN_FLAGS = frozenset().union(*ACCEPTED_FLAGS.values())
assert set(ACCEPTED_FLAGS) == set(SUBCOMMANDS)


class _QuietLibraries(pylogging.Filter):
    """Drops INFO chatter of libraries that log every checkpoint step (orbax); keeps warnings."""

    NOISY = ("/orbax/", "/etils/", "/jax/_src/xla_bridge")

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


_QUIET = _QuietLibraries()


def _usage() -> str:
    return f"usage: python -m imagerag_jax.main {{{'|'.join(SUBCOMMANDS)}}} [--flags]"


def _check_flags(command: str) -> None:
    """Refuses a flag of this module that `command` does not read, naming the nearest it does."""
    accepted = ACCEPTED_FLAGS[command]
    for name in sorted(_OWN_FLAGS - accepted):
        if FLAGS[name].present:
            near = difflib.get_close_matches(name, sorted(accepted), n=1, cutoff=0.5)
            hint = f" (did you mean --{near[0]}?)" if near else ""
            raise UserError(f"{command} does not take --{name}{hint}; it takes "
                            f"--{', --'.join(sorted(accepted))}")


def _main(argv: list[str]) -> None:
    """The `app.run` main: checks the subcommand and its flags, then runs it."""
    if _QUIET not in logging.get_absl_handler().filters:
        logging.get_absl_handler().addFilter(_QUIET)
    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        given = f"unexpected {' '.join(argv[2:])!r}" if len(argv) > 2 else (
            f"unknown subcommand {argv[1]!r}" if len(argv) == 2 else "no subcommand")
        raise UserError(f"{given}; {_usage()}")
    _check_flags(argv[1])
    SUBCOMMANDS[argv[1]]()


def _config_spec(argv: Sequence[str]) -> str | None:
    """The value of --config in argv (``--config=X`` or ``--config X``), None when absent."""
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=(.*))?$", arg)
        if match:
            return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _missing_override(argv: Sequence[str]) -> str | None:
    """For a ``--config.a.b=v`` naming no field of the config: that field and the nearest names."""
    spec = _config_spec(argv)
    if spec is None:
        return None
    from imagerag_jax import config_args

    try:  # as config_flags loads it: everything after the first ':' is get_config's argument
        path, *arg = spec.split(":", 1)
        config = config_args.load_module(path).get_config(*arg)
    except Exception:  # pylint: disable=broad-except  # the config itself fails: not an override
        return None
    for arg in argv:
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if not match:
            continue
        node: Any = config
        for depth, key in enumerate(match.group(1).split(".")):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                parent = ".".join(match.group(1).split(".")[:depth])
                near = difflib.get_close_matches(key, keys, n=3, cutoff=0.0)
                where = f"config.{parent}" if parent else "the config"
                return (f"--config.{match.group(1)}: {where} of {spec} has no field {key!r}"
                        + (f"; nearest: {', '.join(near)}" if near else ""))
            node = node[key]
    return None


def _one_line(message: str) -> str:
    """A flag error in one line: a config file's traceback text reduced to its final message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", lines[-1])
    head = lines[0].split(": Error whilst parsing config file")[0]
    return f"{head}: {last}"


def _reset_flags() -> None:
    """Back to the defined defaults, so that one process can parse many command lines."""
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)  # --config.field flags are defined by the parse that sees them


def _parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flag parser: every user mistake is raised as a `UserError` (one line)."""
    _reset_flags()
    saved, sys.argv = sys.argv, list(argv)  # config_flags finds --config.field in sys.argv
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise UserError(_one_line(str(e))) from e
    except (AttributeError, KeyError) as e:  # config_flags on an override naming no field
        missing = _missing_override(argv)
        if missing is None:
            raise
        raise UserError(missing) from e
    finally:
        sys.argv = saved
    if FLAGS["config"].present:
        try:
            getattr(FLAGS.config, "keys", None)  # a file that failed to load raises on any access
        except OSError as e:
            spec = FLAGS["config"].config_filename
            path = spec.split(":", 1)[0]
            why = "no such file" if not os.path.isfile(path) else str(e).splitlines()[0]
            raise UserError(f"--config={spec}: {why}") from e
    if FLAGS["verbosity"].using_default_value:
        FLAGS.verbosity = 0  # INFO, as app.run sets it on its first parse
    return rest


def run_cli(argv: Sequence[str]) -> int:
    """Runs one command line in this process and returns its exit status.

    `argv` is as `sys.argv` (program name first), e.g. ``run_cli(["main", "train", "--config",
    "configs/tiny.py", "--workdir", str(w)])``. Flags are reset to their defaults before each
    parse, so tests call it repeatedly in one process (another --config included). A user's
    mistake prints one ``error: ...`` line to `sys.stderr` and returns 2 (tests read it with
    pytest's `capsys`: ``capsys.readouterr().err``); success returns 0; a bug raises.

    Args:
      argv: the program name, the subcommand and its flags.

    Returns:
      The exit status: 0 on success, 2 for a user error, else what the command exited with.
    """
    try:
        app.run(_main, argv=list(argv), flags_parser=_parse_flags)
    except UserError as e:  # a wrong path, flag or config: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # app.run always ends with sys.exit(main's result)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(run_cli(sys.argv))
