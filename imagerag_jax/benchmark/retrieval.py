"""ScaNN vs exact search on normalised 1024-d vectors: recall@10, queries/s, latency, build, memory.

    python -m imagerag_jax.benchmark retrieval --n 100000,1000000 [--data clustered|random]

Data: "clustered" (default) draws embedding-like vectors: Zipf-sized topics around random centres
plus low-rank anisotropic noise, so that a query's nearest neighbours are genuinely close (as with
text embeddings of captions). "random" draws i.i.d. Gaussian directions, the worst case for any
partitioned index: in 1024-d the top-10 are barely closer than the bulk, so a tree that searches
a small fraction of leaves cannot find them. Queries are fresh draws from the same distribution.

Bars: recall@10 >= 0.95 at N=1M, batch-256 throughput >= 10x exact, single-query
latency < 2 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from imagerag_jax.benchmark import common
from imagerag_jax.retrieval import index as index_lib

# What machine_info reports versions of (the benchmark does not use JAX).
FRAMEWORKS = ("scann",)


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_vectors(n: int, dim: int, kind: str, seed: int, chunk: int = 65_536) -> np.ndarray:
    """n normalised float32 vectors ("clustered" embedding-like, or i.i.d. "random")."""
    rng = np.random.default_rng(seed)
    # The generative model is shared by database and queries (fixed structure seed).
    srng = np.random.default_rng(1234)
    n_topics, rank = 2000, 64
    centres = _normalise(srng.standard_normal((n_topics, dim)).astype(np.float32))
    basis = (srng.standard_normal((rank, dim)) / np.sqrt(dim)).astype(np.float32)
    spectrum = (np.arange(1, rank + 1, dtype=np.float32) ** -0.5) * 2.0
    weights = 1.0 / (np.arange(n_topics) + 10.0)
    weights /= weights.sum()
    out = np.empty((n, dim), np.float32)
    for start in tqdm(range(0, n, chunk), desc=f"vectors {kind} {n}x{dim}", leave=False):
        m = min(chunk, n - start)
        if kind == "random":
            out[start:start + m] = rng.standard_normal((m, dim), np.float32)
        else:
            topics = rng.choice(n_topics, size=m, p=weights)
            low_rank = (rng.standard_normal((m, rank), np.float32) * spectrum) @ basis
            iso = rng.standard_normal((m, dim), np.float32) * (0.3 / np.sqrt(dim))
            out[start:start + m] = centres[topics] + low_rank + iso
        _normalise(out[start:start + m])
    return out


def _time_batches(search, queries: np.ndarray, batch: int, min_time: float = 2.0,
                  max_batches: int | None = None) -> float:
    """Queries per second of `search` at a batch size (repeats until `min_time` elapsed)."""
    search(queries[:batch])  # warm-up
    done, t0 = 0, time.perf_counter()
    i = 0
    while True:
        lo = (i * batch) % max(1, len(queries) - batch + 1)
        search(queries[lo:lo + batch])
        done += batch
        i += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time or (max_batches is not None and i >= max_batches):
            return done / elapsed


def _latency_ms(search, queries: np.ndarray, n: int) -> float:
    """Median single-query latency in ms."""
    search(queries[0])
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


SCANN_PARAM_KEYS = ("num_leaves", "leaves_to_search", "reorder_k", "dims_per_block",
                    "training_sample_size")


def timed_build(data: np.ndarray, cfg: dict[str, Any]) -> tuple[index_lib.Index, dict[str, Any]]:
    """An index over `data`, with its build seconds, peak and resident extra RSS and params."""
    rss0 = common.rss_bytes()
    with common.PeakRSS() as mem:
        t0 = time.perf_counter()
        index = index_lib.Index.build(data, cfg)
        build_s = time.perf_counter() - t0
    return index, {"build_s": build_s, "peak_extra_bytes": mem.peak - mem.start,
                   "resident_extra_gib": (common.rss_bytes() - rss0) / 2**30,
                   "params": {k: index.config.get(k) for k in SCANN_PARAM_KEYS}}


def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Benchmarks one database size."""
    base = common.rss_bytes()
    data = make_vectors(n, args.dim, args.data, seed=0)
    queries = make_vectors(args.queries, args.dim, args.data, seed=1)
    data_gib = data.nbytes / 2**30
    res: dict[str, Any] = {"n": n, "dim": args.dim, "data": args.data, "data_gib": data_gib}

    exact = index_lib.Index.build(data, {"kind": "exact"})
    t0 = time.perf_counter()
    exact_ids, _ = exact.search(queries, args.k)
    res["exact_ground_truth_s"] = time.perf_counter() - t0

    cfg = {"kind": "scann", "num_neighbors": args.k}
    for key in ("num_leaves", "leaves_to_search", "reorder_k", "dims_per_block"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    scann, build = timed_build(data, cfg)
    res["scann_build_s"] = build["build_s"]
    res["scann_build_peak_extra_gib"] = build["peak_extra_bytes"] / 2**30
    res["scann_resident_extra_gib"] = build["resident_extra_gib"]
    res["scann_params"] = build["params"]
    if scann.kind != "scann":
        raise SystemExit("ScaNN is not importable here; nothing to compare")

    ids, _ = scann.search(queries, args.k)
    res["recall_at_k"] = index_lib.recall_at_k(ids, exact_ids, args.k)
    res["k"] = args.k

    def s_search(q):
        return scann.search(q, args.k)

    def e_search(q):
        return exact.search(q, args.k)

    # Rounds alternate ScaNN and exact so that load from other processes hits both alike.
    rounds = {"scann_qps_b256": [], "exact_qps_b256": [], "scann_latency_ms": [],
              "exact_latency_ms": []}
    for _ in tqdm(range(args.rounds), desc="timing rounds", leave=False):
        rounds["scann_qps_b256"].append(_time_batches(s_search, queries, 256))
        rounds["exact_qps_b256"].append(
            _time_batches(e_search, queries, 256, min_time=2.0, max_batches=2))
        rounds["scann_latency_ms"].append(_latency_ms(s_search, queries, 300))
        rounds["exact_latency_ms"].append(_latency_ms(e_search, queries, 5 if n >= 500_000 else 20))
    res.update({key: statistics.median(v) for key, v in rounds.items()})
    res["scann_qps_b1"] = _time_batches(s_search, queries, 1)
    res["exact_qps_b1"] = 1e3 / res["exact_latency_ms"]
    res["speedup_b256"] = res["scann_qps_b256"] / res["exact_qps_b256"]
    res["speedup_b1"] = res["scann_qps_b1"] / res["exact_qps_b1"]
    res["process_rss_gib"] = (common.rss_bytes() - base) / 2**30
    sweep = []
    for leaves in (int(s) for s in args.sweep.split(",") if s):
        # leaves_to_search is a query-time parameter: reuse the built searcher.
        scann.config = {**scann.config, "leaves_to_search": leaves}
        ids, _ = scann.search(queries, args.k)
        sweep.append({"leaves_to_search": leaves,
                      "recall_at_k": index_lib.recall_at_k(ids, exact_ids, args.k),
                      "qps_b256": _time_batches(s_search, queries, 256),
                      "latency_ms": _latency_ms(s_search, queries, 300)})
    res["sweep"] = sweep
    res["bars"] = {"recall_ge_0.95": res["recall_at_k"] >= 0.95,
                   "b256_speedup_ge_10x": res["speedup_b256"] >= 10,
                   "latency_lt_2ms": res["scann_latency_ms"] < 2.0}
    return res


def _print(res: dict[str, Any]) -> None:
    print(f"N={res['n']:,} d={res['dim']} data={res['data']} ({res['data_gib']:.2f} GiB f32) "
          f"params={res['scann_params']}")
    print(f"  ScaNN build {res['scann_build_s']:.1f} s, peak extra RSS "
          f"{res['scann_build_peak_extra_gib']:.2f} GiB, resident extra "
          f"{res['scann_resident_extra_gib']:.2f} GiB")
    print(f"  recall@{res['k']} {res['recall_at_k']:.4f}")
    print(f"  batch 256: ScaNN {res['scann_qps_b256']:,.0f} q/s, exact {res['exact_qps_b256']:,.1f} "
          f"q/s -> {res['speedup_b256']:.1f}x")
    print(f"  batch 1:   ScaNN {res['scann_latency_ms']:.3f} ms ({res['scann_qps_b1']:,.0f} q/s), "
          f"exact {res['exact_latency_ms']:.1f} ms -> {res['speedup_b1']:.0f}x")
    print(f"  bars: {res['bars']}")
    for s in res["sweep"]:
        print(f"  leaves_to_search {s['leaves_to_search']:4d}: recall@{res['k']} "
              f"{s['recall_at_k']:.4f}, batch 256 {s['qps_b256']:,.0f} q/s "
              f"({s['qps_b256'] / res['exact_qps_b256']:.1f}x exact), "
              f"single {s['latency_ms']:.3f} ms")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the retrieval benchmark for every --n."""
    p = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark retrieval",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="100000,1000000", help="comma-separated database sizes")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=("clustered", "random"), default="clustered")
    p.add_argument("--num_leaves", type=int)
    p.add_argument("--leaves_to_search", type=int)
    p.add_argument("--reorder_k", type=int)
    p.add_argument("--dims_per_block", type=int)
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (median)")
    p.add_argument("--sweep", default="", help="also evaluate these leaves_to_search values")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    machine = common.machine_info(FRAMEWORKS)
    print(common.machine_block(machine))
    results = []
    for n in (int(float(s)) for s in args.n.split(",")):
        if results:
            machine = common.machine_info(FRAMEWORKS)
        res = run_one(n, args)
        res["machine"] = machine
        _print(res)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results
