"""``python -m imagerag_jax.benchmark unet|vae|text|pipeline|retrieval|input|train|rag|precompute|gpu|aot [flags]``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

MODEL_BENCHMARKS = ("unet", "vae", "text", "pipeline")
# Benchmarks with their own flags live in their own modules, each exposing main(argv).
OTHER_BENCHMARKS = {
    "retrieval": "imagerag_jax.benchmark.retrieval",
    "input": "imagerag_jax.benchmark.input",
    "train": "imagerag_jax.benchmark.train",
    "rag": "imagerag_jax.benchmark.rag",
    "precompute": "imagerag_jax.benchmark.precompute",
    "gpu": "imagerag_jax.benchmark.gpu",  # the prepared GPU check (one JSON, <= 8 min on an H100)
    "aot": "imagerag_jax.benchmark.aot",  # the train step compiled for a TPU topology (libtpu)
}


def main(argv: list[str] | None = None) -> None:
    """Dispatch to the named benchmark."""
    argv = sys.argv[1:] if argv is None else argv
    names = MODEL_BENCHMARKS + tuple(OTHER_BENCHMARKS)
    if not argv or argv[0] not in names:
        sys.exit(f"usage: python -m imagerag_jax.benchmark {{{'|'.join(names)}}} [flags]")
    name, rest = argv[0], argv[1:]
    if name in OTHER_BENCHMARKS:
        importlib.import_module(OTHER_BENCHMARKS[name]).main(rest)
        return
    from imagerag_jax.benchmark import models

    parser = argparse.ArgumentParser(prog=f"python -m imagerag_jax.benchmark {name}")
    models.add_arguments(parser)
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(rest)
    from imagerag_jax.benchmark import common

    print(common.machine_block(common.machine_info(models.FRAMEWORKS)), flush=True)
    result = models.BENCHMARKS[name](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
