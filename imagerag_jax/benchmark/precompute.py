"""The offline jobs' model throughput per device, and on paper the paper's precompute on 64 devices.

    python -m imagerag_jax.benchmark precompute --config sd21|tiny [--batch 1] [--runs 3]
        [--teacher-steps-timed 1] [--scann-n 1000000] [--devices-projected 64]
        [--peak-tflops 989] [--mfu 0.4] [--json F] [--records-only]

Also printed (alone with ``--records-only``): the training record options at SD 2.1 shapes, bytes
per example, train FLOPs per example and the paper's disk (`benchmark/records.py`).

Timed: the production `data.encoders.Encoder` (what build-db and precompute run), built over every
local device on random towers of the config's size (SD 2.1: UNet, VAE, the 23-layer OpenCLIP-H
text encoder, a byte tokenizer), `--batch` rows per device:

* VAE encode: `Encoder.images`, uint8 512 px images -> 64x64x4 latents (tiny: 16 px -> 8x8x4);
* text encode: `Encoder.texts`, 77 tokens -> prompt embeds and pooled embedding;
* teacher: `Encoder.teacher`, DDIM with CFG 7.5 (one UNet call on 2B rows per step) over
  `--teacher-steps-timed` steps, scaled to the job's 25. One call also encodes the prompts and
  the negative prompt (one row per device); that part is not scaled: it is estimated as the
  text stage's batch time x (b + 1) / b, the rest of the call is the steps.

Every function is compiled ahead of the timed calls (compile excluded; the calls reuse it), and
its FLOPs are read from XLA's cost analysis of the compiled per-device program. The cost analysis
counts a while loop's body once, so the teacher's figure is its text encodes plus one CFG step
whatever the timed steps; the GPU's compiled analysis omits cuDNN convolutions, so there (or
where the compiled one is missing) the unpartitioned lowered HLO's count / devices is used.

Projection (on paper, not a measurement): the paper's job is VAE-encoding 0.63M DB images and
0.5M real training images, text-encoding those 1.13M captions and the 3M teacher prompts, and
sampling the teacher for the 3M prompts (25 steps, CFG). Device-hours = items / rate, (a) at the
per-device rate measured here and (b) at `--peak-tflops` x `--mfu` from the FLOPs per item; wall
hours = device-hours / `--devices-projected`: perfect data-parallel scaling, no input pipeline,
I/O, retrieval or host overhead. ScaNN: build time and peak extra RSS over `--scann-n` clustered
`--scann-dim`-d vectors (`benchmark.retrieval.make_vectors`, default index parameters), projected
to 10M with build time linear in N (a lower bound: with num_leaves = sqrt(N) assigning N points
to the leaves grows as N^1.5, also given) and memory = extra bytes per vector x 10M, beside the
10M float32 vectors themselves.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from imagerag_jax import weights
from imagerag_jax.weights import towers
from imagerag_jax.benchmark import common
from imagerag_jax.benchmark import records
from imagerag_jax.benchmark import rag as bench_rag
from imagerag_jax.benchmark import retrieval as bench_retrieval
from imagerag_jax.data import encoders
from imagerag_jax.models.clip_text import Tokenizer
from imagerag_jax.retrieval import index as index_lib
from imagerag_jax.weights import random_pipeline

FRAMEWORKS = ("jax", "scann")
STAGES = ("vae_encode", "text_encode", "teacher")
STAGE_TITLES = {"vae_encode": "VAE encode", "text_encode": "text encode",
                "teacher": "teacher synthesis"}
STAGE_CALLS = {"vae_encode": "Encoder.images", "text_encode": "Encoder.texts",
               "teacher": "Encoder.teacher"}
# The paper's precompute job, in items per stage.
DB_ENTRIES, REAL_IMAGES, TEACHER_PROMPTS = 630_000, 500_000, 3_000_000
PAPER_JOB = {"vae_encode": DB_ENTRIES + REAL_IMAGES,
             "text_encode": DB_ENTRIES + REAL_IMAGES + TEACHER_PROMPTS,
             "teacher": TEACHER_PROMPTS}
JOB_PARTS = {"vae_encode": "0.63M DB + 0.5M real images",
             "text_encode": "0.63M DB + 0.5M real + 3M prompts",
             "teacher": "3M prompts x 25 steps x CFG"}
JOB_TEACHER_STEPS, JOB_GUIDANCE = 25, 7.5  # configs/precompute_*.py's teacher
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCANN_PROJECTED_N = 10_000_000
SCANN_K = 10


# ---------------------------------------------------------------------------------------------
# The encoder on random towers.
# ---------------------------------------------------------------------------------------------


def build_encoder(preset: str, per_device_batch: int, *, compute_dtype: Any = jnp.float32,
                  seed: int = 0, devices: Sequence[jax.Device] | None = None) -> encoders.Encoder:
    """The production Encoder over random `preset` towers, `per_device_batch` rows per device."""
    unet, unet_p = towers.random_tower("unet", preset, seed)
    vae, vae_p = towers.random_tower("vae", preset, seed)
    text, text_p = bench_rag.text_tower(preset, seed)
    unet, vae, text = (m.clone(dtype=compute_dtype) for m in (unet, vae, text))
    with tempfile.TemporaryDirectory(prefix="imagerag-bench-precompute-") as root:
        tokenizer = Tokenizer.from_pretrained(random_pipeline.write_byte_tokenizer(root))
    pipe = weights.SDTowers(unet=unet, unet_params=unet_p, vae=vae, vae_params=vae_p,
                            text_encoder=text, text_params=text_p, tokenizer=tokenizer,
                            prediction_type=unet.prediction_type, source=f"benchmark:{preset}")
    label = f"random:{preset}:{seed}"
    models = towers.JobTowers(pipe, label, towers.module_identity(label, text),
                                   towers.module_identity(label, vae),
                                   towers.module_identity(label, unet))
    devices = list(devices) if devices is not None else jax.local_devices()
    return encoders.Encoder(models, per_device_batch * len(devices), devices)


def image_size(enc: encoders.Encoder, preset: str) -> int:
    """Pixels of the images whose latents are the config's (512 for SD 2.1's 64x64)."""
    return bench_rag.LATENT_SIZE[preset] * 2 ** (len(enc.pipe.vae.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# FLOPs from XLA's cost analysis.
# ---------------------------------------------------------------------------------------------


def _cost_flops(analysis: Any) -> float | None:
    """The 'flops' of a cost analysis (a dict, or a one-per-program list); None when absent."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def compile_with_flops(jitted: Any, *args: Any) -> dict[str, Any]:
    """Compiles `jitted` on `args` (the last: the batch split over the devices); its FLOPs per device."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    try:
        from_compiled = _cost_flops(compiled.cost_analysis())
    except Exception:  # pylint: disable=broad-except
        from_compiled = None
    try:
        from_lowered = _cost_flops(lowered.cost_analysis())
    except Exception:  # pylint: disable=broad-except
        from_lowered = None
    n = len(args[-1].sharding.device_set)
    # The lowered HLO is the global program, before partitioning over the devices.
    lowered_per_device = None if from_lowered is None else from_lowered / n
    flops, source, note = from_compiled, "compiled", None
    if from_compiled is None:
        flops, source = lowered_per_device, "lowered" if lowered_per_device is not None else None
        note = ("the compiled cost analysis is missing on this backend"
                + ("; used the lowered HLO's / devices" if flops is not None else
                   " and so is the lowered one"))
    elif lowered_per_device is not None and lowered_per_device > 1.1 * from_compiled:
        # Custom calls (cuDNN convolutions on GPU) carry no FLOPs in the compiled analysis.
        flops, source = lowered_per_device, "lowered"
        note = (f"the compiled cost analysis counts {from_compiled:.3g} FLOPs, under the lowered "
                f"HLO's {lowered_per_device:.3g} per device (custom calls uncounted); used the latter")
    return {"flops_per_call_per_device": flops, "flops_source": source, "flops_note": note,
            "flops_compiled": from_compiled, "flops_lowered_per_device": lowered_per_device,
            "compile_s": compile_s}


def _sharding(x: jax.Array) -> dict[str, Any]:
    """Where a jitted input lives: device count, partition spec, rows per device."""
    return {"devices": len(x.sharding.device_set),
            "spec": str(getattr(x.sharding, "spec", None)),
            "rows_per_device": sorted(int(s.data.shape[0]) for s in x.addressable_shards)}


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def _counted(fn: Callable[[], Any], bar: Any) -> Callable[[], Any]:
    """`fn` that ticks the progress bar after each call."""
    def run() -> Any:
        out = fn()
        bar.update(1)
        return out
    return run


def jitted_calls(enc: encoders.Encoder, images: np.ndarray, captions: Sequence[str], negative: str,
                 noise: np.ndarray, spec: encoders.TeacherSpec
                 ) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """Per stage the jitted function and its arguments, placed exactly as the Encoder's methods do.

    Compiling these first, the methods' calls reuse the compilations (same shapes and shardings).
    """
    pipe, params, rows = enc.pipe, enc.placed_params, enc.sharded_rows
    ids = rows(pipe.tokenizer(list(captions)))
    uncond = jax.device_put(pipe.tokenizer([negative]), enc.replicated)
    return {
        "vae_encode": (encoders.encode_images, (pipe.vae, params("vae_params"), rows(images))),
        "text_encode": (encoders.encode_text, (pipe.text_encoder, params("text_params"), ids)),
        "teacher": (encoders.teacher_latents,
                    (spec, pipe.unet, pipe.text_encoder, params("unet_params"),
                     params("text_params"), ids, uncond, rows(noise.astype(np.float32)))),
    }


def measure_stages(enc: encoders.Encoder, preset: str, runs: int, teacher_steps: int,
                   bar: Any) -> dict[str, dict[str, Any]]:
    """Compile, FLOPs and median time of the Encoder's three batch functions on random inputs."""
    pipe, n, b = enc.pipe, len(enc.devices), enc.batch_size // len(enc.devices)
    rng = np.random.default_rng(0)
    size = image_size(enc, preset)
    images = rng.integers(0, 256, (enc.batch_size, size, size, 3), dtype=np.uint8)
    captions = [f"a photo of object number {i} on a table, studio light" for i in range(enc.batch_size)]
    latent, embed, _ = enc.output_shapes((size, size, 3))
    noise = encoders.example_noise(0, range(enc.batch_size), latent)
    spec = encoders.TeacherSpec("ddim", teacher_steps, JOB_GUIDANCE, pipe.prediction_type)
    negative = ""

    jitted = jitted_calls(enc, images, captions, negative, noise, spec)
    compiled = {stage: compile_with_flops(fn, *args) for stage, (fn, args) in jitted.items()}
    # The batch that each function splits over the devices: images, token ids, noise.
    inputs = {stage: args[-1] for stage, (_, args) in jitted.items()}
    calls = {"vae_encode": lambda: enc.images(images),
             "text_encode": lambda: enc.texts(captions),
             "teacher": lambda: enc.teacher(spec, captions, negative, noise)}
    shapes = {"vae_encode": f"uint8 [{size}, {size}, 3] -> latent {list(latent)}",
              "text_encode": f"{embed[0]} tokens -> embeds {list(embed)} + pooled",
              "teacher": f"{JOB_TEACHER_STEPS} DDIM steps x CFG {JOB_GUIDANCE} (2 UNet rows per "
                         f"step) -> latent {list(latent)}"}
    out = {}
    for stage in STAGES:
        bar.set_postfix_str(stage)
        timing = common.time_fn(_counted(calls[stage], bar), runs)
        out[stage] = {"stage": stage, "call": STAGE_CALLS[stage], "per_device_batch": b,
                      "global_batch": enc.batch_size, "devices": n,
                      "item": shapes[stage], "timing": timing, **compiled[stage],
                      "sharding": _sharding(inputs[stage])}
    for stage in ("vae_encode", "text_encode"):
        r, f = out[stage], out[stage]["flops_per_call_per_device"]
        r["items_per_s_per_device"] = b / r["timing"]["median_s"]
        r["flops_per_item"] = None if f is None else f / b
    out["teacher"].update(teacher_item(out["teacher"]["timing"]["median_s"],
                                       out["text_encode"]["timing"]["median_s"],
                                       out["teacher"]["flops_per_call_per_device"],
                                       out["text_encode"]["flops_per_call_per_device"],
                                       b, teacher_steps, JOB_TEACHER_STEPS))
    return out


def teacher_item(call_s: float, text_call_s: float, call_flops: float | None,
                 text_call_flops: float | None, batch: int, timed_steps: int, job_steps: int
                 ) -> dict[str, Any]:
    """Per-item seconds, rate and FLOPs of a `job_steps` teacher from a `timed_steps` call.

    The call encodes `batch` prompts plus one negative-prompt row per device (the text stage's
    batch x (batch + 1) / batch), then runs the steps; only the steps scale. Its FLOPs count the
    sampler loop's body once (XLA's while-loop cost), i.e. one step.
    """
    fixed_s = text_call_s * (batch + 1) / batch
    step_s = max(call_s - fixed_s, 0.0) / timed_steps
    item_s = (fixed_s + job_steps * step_s) / batch
    out = {"timed_steps": timed_steps, "job_steps": job_steps, "call_s": call_s,
           "text_part_s": fixed_s, "step_s": step_s, "step_s_clamped": call_s < fixed_s, "item_s": item_s,
           "items_per_s_per_device": 1.0 / item_s, "flops_per_item": None, "flops_per_step": None}
    if call_flops is not None and text_call_flops is not None:
        fixed = text_call_flops * (batch + 1) / batch
        step = max(call_flops - fixed, 0.0)
        out["flops_per_step"] = step
        out["flops_per_item"] = (fixed + job_steps * step) / batch
    return out


# ---------------------------------------------------------------------------------------------
# Projection (pure arithmetic).
# ---------------------------------------------------------------------------------------------


def project(rates: Mapping[str, float | None], flops: Mapping[str, float | None],
            job: Mapping[str, int], devices: int, peak_tflops: float, mfu: float
            ) -> list[dict[str, Any]]:
    """Per stage and in total: device-hours and wall hours on `devices`, at each rate and at peak x MFU."""
    rows = []
    for stage, items in job.items():
        rate, f = rates.get(stage), flops.get(stage)
        measured = items / rate / 3600 if rate else None
        at_peak = items * f / (peak_tflops * 1e12 * mfu) / 3600 if f else None
        rows.append({"stage": stage, "items": items, "items_per_s_per_device": rate,
                     "flops_per_item": f, "device_hours_measured": measured,
                     "wall_hours_measured": None if measured is None else measured / devices,
                     "device_hours_peak": at_peak,
                     "wall_hours_peak": None if at_peak is None else at_peak / devices})
    total: dict[str, Any] = {"stage": "total", "items": None, "items_per_s_per_device": None,
                             "flops_per_item": None}
    for key in ("device_hours_measured", "wall_hours_measured", "device_hours_peak",
                "wall_hours_peak"):
        values = [r[key] for r in rows]
        total[key] = None if any(v is None for v in values) else sum(values)
    return rows + [total]


def project_scann(n: int, build_s: float, peak_extra_bytes: float, dim: int, target_n: int
                  ) -> dict[str, Any]:
    """ScaNN at `target_n` from a build over `n`: time linear (and N^1.5) in N, bytes per vector."""
    scale = target_n / n
    per_vector = peak_extra_bytes / n
    return {"n": target_n, "build_s_linear": build_s * scale, "build_s_n15": build_s * scale ** 1.5,
            "extra_bytes_per_vector": per_vector, "peak_extra_gib": per_vector * target_n / 2**30,
            "vectors_gib": target_n * dim * 4 / 2**30}


# ---------------------------------------------------------------------------------------------
# ScaNN.
# ---------------------------------------------------------------------------------------------


def measure_scann(n: int, dim: int, target_n: int = SCANN_PROJECTED_N, seed: int = 0
                  ) -> dict[str, Any]:
    """Build time and peak extra RSS of the default ScaNN index over n clustered vectors."""
    data = bench_retrieval.make_vectors(n, dim, "clustered", seed=seed)
    cfg = {"kind": "scann", "num_neighbors": SCANN_K}
    index_lib.import_scann()  # its import (seconds, hundreds of MB) is not the build's
    print(f"building ScaNN over {n:,} x {dim} ...", flush=True)
    index, build = bench_retrieval.timed_build(data, cfg)
    res: dict[str, Any] = {"n": n, "dim": dim, "data": "clustered", "kind": index.kind,
                           "vectors_gib": data.nbytes / 2**30}
    if index.kind != "scann":
        res["note"] = ("ScaNN is not importable here" if n >= index_lib.MIN_SCANN_SIZE else
                       f"fewer than {index_lib.MIN_SCANN_SIZE} vectors build an exact index")
        return res
    extra = build["peak_extra_bytes"]
    res.update({"build_s": build["build_s"], "build_peak_extra_gib": extra / 2**30,
                "resident_extra_gib": build["resident_extra_gib"], "params": build["params"],
                "projected": project_scann(n, build["build_s"], extra, dim, target_n),
                "projected_params": index_lib.resolve_scann_params(target_n, cfg)})
    return res


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _hours(x: float | None) -> str:
    """Hours with three significant digits, thousands separated."""
    return "n/a" if x is None else f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def stages_table(stages: Mapping[str, dict[str, Any]]) -> str:
    """Per stage: batch, items/s per device here, FLOPs per item, achieved GFLOP/s here."""
    lines = ["| stage | batch / device | items/s per device (here) | FLOPs per item | "
             "FLOPs from | GFLOP/s per device (here) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for stage in STAGES:
        r = stages[stage]
        rate, f = r["items_per_s_per_device"], r["flops_per_item"]
        achieved = None if f is None else rate * f / 1e9
        lines.append(f"| {STAGE_TITLES[stage]} | {r['per_device_batch']} | {rate:.4g} | "
                     f"{_num(f)} | {r['flops_source'] or 'n/a'} | {_num(achieved, '.4g')} |")
    return "\n".join(lines)


def projection_table(rows: Sequence[dict[str, Any]], devices: int) -> str:
    """The projection: per stage device-hours and wall hours at the measured rate and at peak x MFU."""
    lines = [f"| stage | items | device-hours (rate here) | wall h on {devices} (rate here) | "
             f"device-hours (peak x MFU) | wall h on {devices} (peak x MFU) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        title = STAGE_TITLES.get(r["stage"], r["stage"])
        items = "" if r["items"] is None else f"{r['items'] / 1e6:g}M ({JOB_PARTS[r['stage']]})"
        cells = [title, items] + [_hours(r[k]) for k in
                                  ("device_hours_measured", "wall_hours_measured",
                                   "device_hours_peak", "wall_hours_peak")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scann_text(res: dict[str, Any]) -> str:
    """The ScaNN build at N and its projection, with the assumptions."""
    if "build_s" not in res:
        return f"ScaNN at N={res['n']:,}: not built ({res['note']})"
    p = res["projected"]
    return "\n".join([
        f"ScaNN, N={res['n']:,} clustered {res['dim']}-d vectors ({res['vectors_gib']:.2f} GiB "
        f"f32), params {res['params']}:",
        f"  build {res['build_s']:.1f} s, peak extra RSS {res['build_peak_extra_gib']:.2f} GiB "
        f"({p['extra_bytes_per_vector']:,.0f} B/vector), resident extra "
        f"{res['resident_extra_gib']:.2f} GiB",
        f"  projected to N={p['n']:,} (on paper; params there {res['projected_params']}): build "
        f"{p['build_s_linear']:,.0f} s assuming time linear in N ({p['build_s_n15']:,.0f} s if "
        f"it grows as N^1.5, the sqrt(N)-leaf assignment); peak extra RSS "
        f"{p['peak_extra_gib']:.1f} GiB (B/vector x N), beside {p['vectors_gib']:.1f} GiB of f32 "
        f"vectors"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the precompute benchmark; prints the machine, the tables, and writes --json."""
    p = argparse.ArgumentParser(prog="python -m imagerag_jax.benchmark precompute",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(bench_rag.LATENT_SIZE), default="sd21")
    p.add_argument("--batch", type=int, default=1, help="rows per device")
    p.add_argument("--runs", type=int, default=3, help="timed calls per stage (median)")
    p.add_argument("--teacher-steps-timed", type=int, default=1,
                   help=f"teacher DDIM+CFG steps per timed call, scaled to {JOB_TEACHER_STEPS}")
    p.add_argument("--compute-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--scann-n", type=int, default=1_000_000, help="ScaNN build size (0: skip)")
    p.add_argument("--scann-dim", type=int, default=1024)
    p.add_argument("--scann-projected-n", type=int, default=SCANN_PROJECTED_N)
    p.add_argument("--devices-projected", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the projected accelerator's dense peak TFLOP/s")
    p.add_argument("--peak-name", default="H100 SXM, dense bf16")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--records-only", action="store_true",
                   help="print the training record options alone (no towers, nothing timed)")
    args = p.parse_args(argv)
    if args.records_only:
        rows = records.table()
        print(records.text(rows))
        result = {"benchmark": "precompute", "records": rows}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return result
    if min(args.batch, args.runs, args.teacher_steps_timed, args.devices_projected) < 1:
        p.error("--batch, --runs, --teacher-steps-timed and --devices-projected must be >= 1")
    if args.scann_n < 0 or not 0 < args.mfu <= 1 or args.peak_tflops <= 0:
        p.error("--scann-n must be >= 0, --mfu in (0, 1], --peak-tflops > 0")

    machine = common.machine_info(FRAMEWORKS)
    print(common.machine_block(machine), flush=True)
    n_dev = jax.local_device_count()
    print(f"plan: random {args.config} towers ({args.compute_dtype}), Encoder over {n_dev} "
          f"device(s) x batch {args.batch}; VAE encode, text encode, teacher "
          f"{args.teacher_steps_timed} step(s) (scaled to {JOB_TEACHER_STEPS}), 1 warm-up + "
          f"{args.runs} timed call(s) each"
          + (f"; ScaNN build at N={args.scann_n:,}" if args.scann_n else "; no ScaNN"), flush=True)
    t0 = time.perf_counter()
    scann = None
    if args.scann_n:
        # First, while the process is small: the towers' freed memory would hide the build's.
        scann = measure_scann(args.scann_n, args.scann_dim, args.scann_projected_n, args.seed)
        gc.collect()

    t1 = time.perf_counter()
    enc = build_encoder(args.config, args.batch, compute_dtype=DTYPES[args.compute_dtype],
                        seed=args.seed)
    setup_s = time.perf_counter() - t1
    with tqdm(total=len(STAGES) * (1 + args.runs), desc="precompute benchmark calls",
              leave=False) as bar:
        stages = measure_stages(enc, args.config, args.runs, args.teacher_steps_timed, bar)
    del enc
    rates = {s: stages[s]["items_per_s_per_device"] for s in STAGES}
    flops = {s: stages[s]["flops_per_item"] for s in STAGES}
    rows = project(rates, flops, PAPER_JOB, args.devices_projected, args.peak_tflops, args.mfu)
    end = common.machine_info(FRAMEWORKS)
    note = bench_rag.shared_note(machine, end)
    notes = [f"teacher: timed {args.teacher_steps_timed} DDIM+CFG step(s) per call and scaled "
             f"to {JOB_TEACHER_STEPS}; the call's prompt + negative-prompt encodes (text stage x "
             f"(b+1)/b) are not scaled"]
    if stages["teacher"]["step_s_clamped"]:
        notes.append("teacher: the call took less than the text estimate of its encodes (timing "
                     "noise or dispatch-bound towers): its step time is taken as 0")
    notes += [f"{s}: {stages[s]['flops_note']}" for s in STAGES if stages[s]["flops_note"]]
    result = {"benchmark": "precompute", "config": args.config, "compute_dtype": args.compute_dtype,
              "devices": n_dev, "per_device_batch": args.batch, "runs": args.runs,
              "teacher_steps_timed": args.teacher_steps_timed, "setup_s": setup_s,
              "stages": stages,
              "job": {"items": PAPER_JOB, "parts": JOB_PARTS, "teacher_steps": JOB_TEACHER_STEPS,
                      "guidance": JOB_GUIDANCE},
              "projection": {"devices": args.devices_projected, "peak_tflops": args.peak_tflops,
                             "peak_name": args.peak_name, "mfu": args.mfu, "rows": rows},
              "scann": scann, "notes": notes, "machine": machine,
              "load_avg_end": end.get("load_avg"), "shared_cpu": note,
              "wall_s": time.perf_counter() - t0}

    print(f"\nmeasured here: random {args.config} towers ({args.compute_dtype}), "
          f"data.encoders.Encoder over {n_dev} {machine['jax']['platform']} device(s), batch "
          f"{args.batch} per device, median of {args.runs} (compile excluded; setup "
          f"{setup_s:.1f} s); teacher per item = {JOB_TEACHER_STEPS} DDIM steps x CFG "
          f"{JOB_GUIDANCE}")
    print(stages_table(stages))
    print(f"\nPROJECTION ON PAPER (not measured): the paper's precompute job on "
          f"{args.devices_projected} devices, (a) at the per-device rate measured above, (b) at "
          f"{args.peak_tflops:g} TFLOP/s ({args.peak_name}) x MFU {args.mfu:g} from the FLOPs "
          f"per item; wall = device-hours / {args.devices_projected} (perfect scaling; no input, "
          f"I/O, retrieval or host overhead)")
    print(projection_table(rows, args.devices_projected))
    for line in notes + ([note] if note else []):
        print(f"note: {line}")
    if scann is not None:
        print()
        print(scann_text(scann))
    result["records"] = records.table()
    print()
    print(records.text(result["records"]))
    print(f"total wall {result['wall_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
