"""ImageRAGTurbo's cost over plain one-step SD-Turbo, with and without the H-space cache.

    python -m imagerag_jax.benchmark rag --config sd21|tiny [--batch 1 8] [--k 1 4] [--runs N]
        [--e2e-batch 1] [--e2e-no-cache] [--adapter-block transformer|attention] [--json F]

One process, one `rag.RagPipeline` built with its constructor on random towers of the config's
size (the student UNet, VAE and a CLIP text encoder; a byte tokenizer; an `HSpaceAdapter` with
random non-zero weights, by default the paper's transformer block), a database of `--entries` random entries with an exact index, and its
H-space cache (`RagPipeline.build_cache`). Two parts are timed:

* denoiser: retrieval + the neighbours' H-space (cache gather, or the encoder on B*k neighbours)
  + adapter + UNet, i.e. ``RagOutput.seconds`` retrieval + denoise of a ``decode=False`` call
  (the text encoder is excluded), at every --batch and --k;
* end to end: text + retrieval + denoise + VAE decode to images (``seconds['total']``), at
  --e2e-batch and k = 1 only (a 512 px decode costs ~16 s per image on 2 CPU cores).

The modes are 'plain' (mode 'none', no retrieval), 'cache' (mode 'adapter', the cache supplies
the H-space) and 'no_cache' (mode 'adapter', computed on the fly). Every (mode, batch, k) is
warmed up once (compile excluded); then the modes of one batch alternate in rounds, so that load
from other processes hits them alike. Reported: median seconds and ratio = median / plain's
median of the same part and batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from imagerag_jax.inference import rag
from imagerag_jax.diffusion import sampling
from imagerag_jax.weights import towers
from imagerag_jax.benchmark import common
from imagerag_jax.models.adapter import BLOCKS, HSpaceAdapter
from imagerag_jax.models.clip_text import CLIPTextTransformer, Tokenizer
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.retrieval import index as index_lib
from imagerag_jax.weights import convert, random_pipeline

FRAMEWORKS = ("jax",)
MODES = ("plain", "cache", "no_cache")
LATENT_SIZE = {"sd21": 64, "tiny": 8}  # 64x64 latents: SD 2.1's 512 px
ADAPTER_HEADS = 8
# Timed runs per row when --runs is not given: the SD 2.1 default run has to fit ~30 min on 2 cores.
DEFAULT_RUNS_BATCH1, DEFAULT_RUNS_LARGER = 3, 1


# ---------------------------------------------------------------------------------------------
# The pipeline: random towers, adapter, database, index.
# ---------------------------------------------------------------------------------------------


def text_tower(preset: str, seed: int) -> tuple[CLIPTextTransformer, Any]:
    """A random text encoder whose EOS is the byte tokenizer's (SD 2.1's OpenCLIP-H size for 'sd21')."""
    if preset == "tiny":
        return towers.random_tower("text_encoder", "tiny", seed)
    # towers.random_tower has no SD 2.1 text encoder (real runs load one); SD 2.1's vocabulary
    # size, with the byte tokenizer's EOS id so that the pooled token is the prompt's last.
    module = CLIPTextTransformer(eos_token_id=random_pipeline.TINY_VOCAB_SIZE - 1)
    shapes = convert.param_shapes(lambda: module.init(jax.random.PRNGKey(0), *module.dummy_inputs()))
    return module, random_pipeline.random_params(shapes, seed)


def random_adapter(unet: Any, unet_params: Any, latent: tuple[int, int, int], embed: tuple[int, int],
                   seed: int, block: str = "attention") -> tuple[HSpaceAdapter, Any]:
    """An H-space adapter with random non-zero weights (its output projection too, unlike a fresh
    init): 'attention' with 8 heads, or 'transformer' (the paper's block) with heads of 64
    channels as SD's mid block (20 at 1,280)."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    h = jax.eval_shape(lambda p, x, c: sampling.retrieved_hspace(unet, p, x, c), unet_params,
                       spec(1, 1, *latent), spec(1, 1, *embed))
    c = int(h.shape[-1])
    adapter = (HSpaceAdapter(num_heads=ADAPTER_HEADS) if block == "attention" else
               HSpaceAdapter(num_heads=max(1, c // 64), block="transformer", groups=math.gcd(32, c)))
    h_tgt = jnp.zeros(h.shape[:1] + h.shape[2:], jnp.float32)
    shapes = convert.param_shapes(lambda: adapter.init(jax.random.PRNGKey(0), h_tgt, h_tgt[:, None]))
    return adapter, random_pipeline.random_params(shapes, seed)


def write_database(path: str, entries: int, latent: tuple[int, int, int], embed: tuple[int, int],
                   text_identity: str, text_fp: str, vae_identity: str, vae_fp: str,
                   seed: int) -> db_lib.Database:
    """`entries` random entries whose manifest names the pipeline's towers (rag.check_database)."""
    rng = np.random.default_rng(seed)
    spec = db_lib.DatabaseSpec(latent, embed, embed[-1])
    extra = {"text_encoder_fingerprint": text_fp, "vae_fingerprint": vae_fp}
    with db_lib.DatabaseWriter(path, spec, source="benchmark/rag", fsync=False, extra=extra,
                               text_encoder=text_identity, vae=vae_identity) as w:
        w.append([f"random entry {i}" for i in range(entries)],
                 rng.standard_normal((entries, *latent), np.float32),
                 rng.standard_normal((entries, *embed), np.float32),
                 rng.standard_normal((entries, embed[-1]), np.float32),
                 np.arange(1000, 1000 + entries))
    return db_lib.Database(path)


def build_pipeline(preset: str, root: str, *, entries: int = 16, seed: int = 0,
                   adapter_block: str = "transformer") -> rag.RagPipeline:
    """The benchmark's RagPipeline (random towers of `preset`, a DB under `root`), no cache yet."""
    unet, unet_p = towers.random_tower("unet", preset, seed)
    vae, vae_p = towers.random_tower("vae", preset, seed)
    text, text_p = text_tower(preset, seed)
    size = LATENT_SIZE[preset]
    latent = (size, size, int(unet.in_channels))
    embed = (int(text.max_position_embeddings), int(text.hidden_size))
    adapter, adapter_p = random_adapter(unet, unet_p, latent, embed, seed + 1, adapter_block)
    text_label, vae_label = f"random:{preset}:{seed}", f"random:{preset}:{seed}"
    db = write_database(os.path.join(root, "db"), entries, latent, embed,
                        towers.module_identity(text_label, text), towers.fingerprint(text_p),
                        towers.module_identity(vae_label, vae), towers.fingerprint(vae_p), seed)
    index = index_lib.Index.build(db.pooled, {"kind": "exact"}, ids=db.ids)
    tokenizer = Tokenizer.from_pretrained(
        random_pipeline.write_byte_tokenizer(os.path.join(root, "tokenizer")))
    return rag.RagPipeline(unet=unet, unet_params=unet_p, vae=vae, vae_params=vae_p, text=text,
                           text_params=text_p, tokenizer=tokenizer, source=f"benchmark:{preset}",
                           text_label=text_label, vae_label=vae_label, adapter=adapter,
                           adapter_params=adapter_p, database=db, index=index, k=1,
                           latent_size=latent[:2], cache=True)


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def _call(pipe: rag.RagPipeline, cache: Any, mode: str, prompts: list[str], noise: np.ndarray,
          k: int, decode: bool) -> Callable[[], rag.RagOutput]:
    """One pipeline call of a benchmark mode; checks that the cache was (not) used as asked."""
    want_cache = mode == "cache"

    def run() -> rag.RagOutput:
        pipe.cache = cache if want_cache else None
        out = pipe(prompts, noise=noise, k=k, mode="none" if mode == "plain" else "adapter",
                   decode=decode)
        if mode != "plain" and out.used_cache != want_cache:
            raise RuntimeError(f"mode {mode}: the pipeline used_cache={out.used_cache}")
        return out

    return run


def _seconds(out: rag.RagOutput, part: str) -> float:
    """The timed part of one call: denoiser (retrieval + denoise) or end to end (total)."""
    s = out.seconds
    return s["retrieval"] + s["denoise"] if part == "denoiser" else s["total"]


def time_group(calls: dict[tuple[str, int | None], Callable[[], rag.RagOutput]], part: str,
               runs: int, bar: Any = None) -> dict[tuple[str, int | None], dict[str, Any]]:
    """Warm-up of every call, then `runs` rounds alternating them: median/min s, parts, peak RSS."""
    warm = {}
    for key, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        warm[key] = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
    times = {key: [] for key in calls}
    parts = {key: [] for key in calls}
    peak = dict.fromkeys(calls, 0.0)
    used_cache = dict.fromkeys(calls, False)
    finite = dict.fromkeys(calls, True)
    for _ in range(runs):
        for key, fn in calls.items():
            with common.PeakRSS() as mem:
                out = fn()
            times[key].append(_seconds(out, part))
            parts[key].append(out.seconds)
            peak[key] = max(peak[key], mem.extra_gib)
            used_cache[key] = out.used_cache
            # Random towers: a NaN/inf output would still time, but say so.
            finite[key] = finite[key] and bool(np.isfinite(out.latents).all()) and (
                out.images is None or bool(np.isfinite(out.images).all()))
            if bar is not None:
                bar.update(1)
    return {key: {"median_s": statistics.median(times[key]), "min_s": min(times[key]),
                  "times_s": times[key], "warmup_s": warm[key], "runs": runs,
                  "parts_median_s": {p: statistics.median(s[p] for s in parts[key])
                                     for p in parts[key][0]},
                  "peak_extra_gib": peak[key], "used_cache": used_cache[key],
                  "finite_output": finite[key]}
            for key in calls}


def _runs_for(batch: int, runs: int | None) -> int:
    return runs if runs is not None else (DEFAULT_RUNS_BATCH1 if batch == 1 else DEFAULT_RUNS_LARGER)


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The groups to time: (part, batch, ks, modes, runs), in order."""
    groups = [{"part": "denoiser", "batch": b, "ks": list(args.k), "modes": list(MODES),
               "runs": _runs_for(b, args.runs)} for b in args.batch]
    e2e_modes = ["plain", "cache"] + (["no_cache"] if args.e2e_no_cache else [])
    groups += [{"part": "end_to_end", "batch": b, "ks": [1], "modes": e2e_modes,
                "runs": _runs_for(b, args.runs)} for b in args.e2e_batch]
    return groups


def run_group(pipe: rag.RagPipeline, cache: Any, group: dict[str, Any], bar: Any = None
              ) -> list[dict[str, Any]]:
    """Rows of one group: plain once per batch (k-independent), the RAG modes per k."""
    b, part = group["batch"], group["part"]
    prompts = [f"a photo of object number {i}" for i in range(b)]
    noise = pipe.noise(b, 0)
    decode = part == "end_to_end"
    calls = {}
    for mode in group["modes"]:
        for k in ([None] if mode == "plain" else group["ks"]):
            calls[(mode, k)] = _call(pipe, cache, mode, prompts, noise, k or 1, decode)
    timed = time_group(calls, part, group["runs"], bar)
    plain = timed[("plain", None)]["median_s"]
    return [{"part": part, "mode": mode, "batch": b, "k": k, **res,
             "per_image_s": res["median_s"] / b, "ratio_vs_plain": res["median_s"] / plain}
            for (mode, k), res in timed.items()]


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (part, batch, k): plain, cache and no-cache medians and their ratios."""
    lines = ["| part | batch | k | runs | plain (s) | ImageRAGTurbo, cache (s) | ratio | "
             "ImageRAGTurbo, no cache (s) | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keyed = {(r["part"], r["batch"], r["mode"], r["k"]): r for r in rows}
    seen = []
    for r in rows:
        if r["mode"] != "plain" and (r["part"], r["batch"], r["k"]) not in seen:
            seen.append((r["part"], r["batch"], r["k"]))
    for part, b, k in seen:
        plain = keyed[(part, b, "plain", None)]
        cells = [part.replace("_", " "), str(b), str(k), str(plain["runs"]), f"{plain['median_s']:.3f}"]
        for mode in ("cache", "no_cache"):
            r = keyed.get((part, b, mode, k))
            cells += ["-", "-"] if r is None else [f"{r['median_s']:.3f}", f"{r['ratio_vs_plain']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shared_note(start: dict[str, Any], end: dict[str, Any]) -> str | None:
    """A sentence when the load average says other processes shared the CPU, else None."""
    cpus = start.get("cpus_usable") or start.get("cpus_visible") or 1
    l0, l1 = (start.get("load_avg") or [0])[0], (end.get("load_avg") or [0])[0]
    # Before the benchmark starts its own load is ~0; while it runs it adds up to `cpus`.
    if l0 >= 0.5 or l1 > cpus + 0.5:
        return (f"the CPU was shared: 1-min load average {l0:.2f} at the start, {l1:.2f} at the end "
                f"on {cpus} usable CPUs")
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the RAG benchmark; prints the machine, a markdown table, and writes --json."""
    p = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark rag",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(LATENT_SIZE), default="sd21")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--k", type=int, nargs="+", default=[1, 4])
    p.add_argument("--runs", type=int, help=f"timed runs per row (default {DEFAULT_RUNS_BATCH1} at "
                                            f"batch 1, {DEFAULT_RUNS_LARGER} above)")
    p.add_argument("--e2e-batch", type=int, nargs="*", default=[1],
                   help="batches timed end to end (k = 1); none: skip end to end")
    p.add_argument("--e2e-no-cache", action="store_true",
                   help="also time end to end without the cache")
    p.add_argument("--entries", type=int, default=16, help="random database entries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter-block", choices=BLOCKS, default="transformer",
                   help="the adapter timed: the paper's transformer block (default) or the "
                        "cross-attention one (models/adapter.py)")
    p.add_argument("--json", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if min(args.batch + args.e2e_batch + args.k) < 1 or (args.runs is not None and args.runs < 1):
        p.error("--batch, --e2e-batch, --k and --runs must be >= 1")
    if max(args.k) > args.entries:
        p.error(f"--k {max(args.k)} exceeds --entries {args.entries}")

    machine = common.machine_info(FRAMEWORKS)
    print(common.machine_block(machine), flush=True)
    groups = plan(args)
    print("plan: " + "; ".join(
        f"{g['part'].replace('_', ' ')} batch {g['batch']} k {','.join(map(str, g['ks']))} "
        f"({', '.join(g['modes'])}) x {g['runs']} run(s)" for g in groups)
        + " (end to end at k = 1 only; one warm-up per row, not timed)", flush=True)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imagerag-bench-rag-") as root:
        pipe = build_pipeline(args.config, root, entries=args.entries, seed=args.seed,
                              adapter_block=args.adapter_block)
        setup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pipe.build_cache()
        cache_s = time.perf_counter() - t1
        cache = pipe.cache
        if cache is None:
            raise RuntimeError("build_cache left the pipeline without a usable H-space cache")
        total = sum((1 + g["runs"]) * (1 + (len(g["modes"]) - 1) * len(g["ks"])) for g in groups)
        rows = []
        with tqdm(total=total, desc="rag benchmark calls", leave=False) as bar:
            for g in groups:
                rows += run_group(pipe, cache, g, bar)
        describe = pipe.describe()
    end = common.machine_info(FRAMEWORKS)
    note = shared_note(machine, end)
    result = {"benchmark": "rag", "config": args.config, "batches": args.batch, "ks": args.k,
              "e2e_batches": args.e2e_batch, "entries": args.entries, "plan": groups,
              "adapter": describe["adapter"],
              "setup_s": setup_s, "cache_build_s": cache_s, "cache_shape": list(cache.shape),
              "pipeline": describe, "rows": rows, "machine": machine,
              "load_avg_end": end.get("load_avg"), "shared_cpu": note,
              "wall_s": time.perf_counter() - t0}
    print(f"\nrandom {args.config} towers, {args.entries}-entry DB, exact index, H-space cache "
          f"{tuple(cache.shape)} built in {cache_s:.1f} s (setup {setup_s:.1f} s); "
          f"denoiser = retrieval + neighbours' H-space + adapter + UNet (no text encoder, no "
          f"decode); end to end = text + retrieval + denoise + VAE decode, at k = 1 only; "
          f"median seconds, ratio = / plain of the same part and batch")
    print(markdown_table(rows))
    if note:
        print(f"note: {note}")
    print(f"total wall {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
