"""Input stream (data/input_stream.py) throughput and host memory at SD shapes (TFRecords -> global jax.Arrays).

    python -m imagerag_jax.benchmark input [--k 1,4] [--batch 64]

Writes a temporary TFRecord set per k (64x64x4 latents, 77x1024 prompt embeddings, f16), then
times `InputStream` with shuffling and batching, output float32 `jax.Array`s on a mesh of the
local devices. The files were just written, so they sit in the page cache: this measures the
pipeline's CPU cost (parse, cast, batch, transfer), not the disk. Bar: >= 1000 examples/s per
CPU core with k = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from imagerag_jax.benchmark import common
from imagerag_jax.data import input_stream
from imagerag_jax.data import tfrecords

# What machine_info reports versions and threads of.
FRAMEWORKS = ("jax", "tensorflow")


def write_set(out_dir: str, schema: tfrecords.Schema, n: int, shards: int) -> int:
    """Writes n examples (a few distinct random payloads, unique ids); returns total bytes."""
    rng = np.random.default_rng(0)
    pool = [tfrecords.random_example(schema, rng, i) for i in range(8)]
    with tfrecords.ShardWriter(out_dir, "train", schema, shards) as w:
        for i in tqdm(range(n), desc=f"writing k={schema.k}", leave=False):
            w.write({**pool[i % len(pool)], "example_id": i})
    m = tfrecords.write_manifest(out_dir, schema, source="benchmark")
    # Flush the writes and read the files once, so that timing sees page-cache reads only
    # (and no writeback competing with them).
    os.sync()
    for f in m["splits"]["train"]["files"]:
        with open(os.path.join(out_dir, f["name"]), "rb") as fh:
            while fh.read(64 << 20):
                pass
    return sum(f["num_bytes"] for f in m["splits"]["train"]["files"])


def run_one(k: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Benchmarks the stream for one k."""
    import jax  # pylint: disable=g-import-not-at-top
    schema = tfrecords.Schema(tuple(args.latent), tuple(args.embed), args.embed[-1], k)
    out = os.path.join(root, f"k{k}")
    t0 = time.perf_counter()
    nbytes = write_set(out, schema, args.examples, args.shards)
    write_s = time.perf_counter() - t0
    mesh = None if args.numpy else jax.make_mesh((jax.device_count(),), ("data",))
    cores = len(os.sched_getaffinity(0))
    res: dict[str, Any] = {"k": k, "record_kib": nbytes / args.examples / 1024,
                           "write_examples_per_s": args.examples / write_s,
                           "batch": args.batch, "cores": cores,
                           "output": "numpy" if mesh is None else f"jax.Array on {mesh.shape}"}
    base = common.rss_bytes()
    with common.PeakRSS() as mem:
        it = input_stream.InputStream(out, "train", args.batch, mesh=mesh, seed=0,
                                    shuffle_buffer=args.shuffle_buffer, dtype=args.dtype)
        for _ in range(args.warmup):
            jax.block_until_ready(next(it))
        t0 = time.perf_counter()
        for _ in range(args.batches):
            jax.block_until_ready(next(it))
        elapsed = time.perf_counter() - t0
    res["examples_per_s"] = args.batches * args.batch / elapsed
    res["examples_per_s_per_core"] = res["examples_per_s"] / cores
    res["mib_per_s_read"] = res["examples_per_s"] * res["record_kib"] / 1024
    res["host_peak_extra_gib"] = (mem.peak - base) / 2**30
    res["bar_1000_per_core"] = res["examples_per_s_per_core"] >= 1000
    return res


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the input benchmark for every --k."""
    p = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark input",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--k", default="1,4", help="comma-separated numbers of retrieved neighbours")
    p.add_argument("--examples", type=int, default=2048, help="examples written per k")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=60, help="timed batches")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shuffle_buffer", type=int, default=256)
    p.add_argument("--latent", type=int, nargs=3, default=(64, 64, 4))
    p.add_argument("--embed", type=int, nargs=2, default=(77, 1024))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--numpy", action="store_true", help="host numpy batches (no jax.Array)")
    p.add_argument("--dir", help="where to write the TFRecords (default: a temp dir, removed)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    machine = common.machine_info(FRAMEWORKS)
    print(common.machine_block(machine))
    root = args.dir or tempfile.mkdtemp(prefix="imagerag_input_bench_")
    results = []
    try:
        for k in (int(s) for s in args.k.split(",")):
            if results:
                machine = common.machine_info(FRAMEWORKS)
            res = run_one(k, args, root)
            res["machine"] = machine
            print(f"k={k}: {res['examples_per_s']:,.0f} examples/s "
                  f"({res['examples_per_s_per_core']:,.0f} per core, {res['cores']} cores), "
                  f"{res['mib_per_s_read']:,.0f} MiB/s of records ({res['record_kib']:.0f} KiB each), "
                  f"host peak extra {res['host_peak_extra_gib']:.2f} GiB, batch {res['batch']}, "
                  f"{res['output']}; bar >=1000/core: {res['bar_1000_per_core']}")
            results.append(res)
            if not args.dir:
                shutil.rmtree(os.path.join(root, f"k{k}"), ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results
