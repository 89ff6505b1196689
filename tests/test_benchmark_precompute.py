"""`python -m imagerag_jax.benchmark precompute` on the tiny towers, and its projection arithmetic."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from imagerag_jax.benchmark import __main__ as bench_main
from imagerag_jax.benchmark import precompute as bench_pc
from imagerag_jax.benchmark import records
from imagerag_jax.data import encoders
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_precompute_benchmark_tiny_writes_every_field(tmp_path, capsys):
    out = tmp_path / "precompute.json"
    bench_main.main(["precompute", "--config", "tiny", "--runs", "1", "--teacher-steps-timed", "2",
                     "--scann-n", "2000", "--scann-dim", "64", "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("machine:\n") and printed.count("machine:") == 1
    res = json.loads(out.read_text())
    assert res["benchmark"] == "precompute" and res["config"] == "tiny"
    assert res["devices"] == jax.local_device_count() and res["machine"]["jax"]["platform"] == "cpu"
    stages = res["stages"]
    assert sorted(stages) == sorted(bench_pc.STAGES)
    for name, r in stages.items():
        assert r["call"] == bench_pc.STAGE_CALLS[name]
        assert r["timing"]["runs"] == 1 and r["timing"]["median_s"] > 0
        assert math.isfinite(r["items_per_s_per_device"]) and r["items_per_s_per_device"] > 0
        # CPU's compiled cost analysis counts every op (no custom calls).
        assert r["flops_source"] == "compiled" and r["flops_per_item"] > 0, name
        assert r["compile_s"] > 0 and r["sharding"]["devices"] == res["devices"]
    for name in ("vae_encode", "text_encode"):
        r = stages[name]
        assert math.isclose(r["flops_per_item"], r["flops_per_call_per_device"] / r["per_device_batch"])
    t = stages["teacher"]
    assert (t["timed_steps"], t["job_steps"]) == (2, 25)
    assert math.isclose(t["items_per_s_per_device"], 1 / t["item_s"])
    assert t["flops_per_item"] > 25 * t["flops_per_step"] > 0
    assert "latent [8, 8, 4]" in stages["vae_encode"]["item"]

    proj = res["projection"]
    assert (proj["devices"], proj["peak_tflops"], proj["mfu"]) == (64, 989.0, 0.4)
    assert [r["stage"] for r in proj["rows"]] == list(bench_pc.STAGES) + ["total"]
    assert proj["rows"] == bench_pc.project(
        {s: stages[s]["items_per_s_per_device"] for s in stages},
        {s: stages[s]["flops_per_item"] for s in stages}, bench_pc.PAPER_JOB, 64, 989.0, 0.4)
    assert res["job"]["items"] == {"vae_encode": 1_130_000, "text_encode": 4_130_000,
                                   "teacher": 3_000_000}
    # The record options at SD 2.1 shapes, whatever the timed config (tests/test_record_options.py).
    assert [r["option"] for r in res["records"]] == [o.name for o in records.OPTIONS]
    assert "TRAINING RECORD OPTIONS at SD 2.1 shapes" in printed and "ids_hspace" in printed

    scann = res["scann"]
    assert scann["kind"] == "scann" and scann["n"] == 2000 and scann["build_s"] > 0
    assert scann["build_peak_extra_gib"] >= 0
    assert scann["projected"]["n"] == 10_000_000
    assert math.isclose(scann["projected"]["build_s_linear"], scann["build_s"] * 5000)
    assert scann["projected_params"]["num_leaves"] == round(math.sqrt(10_000_000))

    assert bench_pc.stages_table(stages) in printed
    assert bench_pc.projection_table(proj["rows"], 64) in printed
    assert "PROJECTION ON PAPER" in printed and "ScaNN, N=2,000" in printed


def test_project_matches_hand_arithmetic():
    rates = {"vae_encode": 2.0, "text_encode": 10.0, "teacher": 0.5}  # items/s per device
    flops = {"vae_encode": 1e12, "text_encode": 1e11, "teacher": 4e13}  # per item
    rows = bench_pc.project(rates, flops, bench_pc.PAPER_JOB, devices=64, peak_tflops=1000, mfu=0.5)
    got = {r["stage"]: r for r in rows}
    # Measured rate: items / rate seconds. VAE 1,130,000 / 2 = 565,000 s = 156.944 device-hours.
    assert got["vae_encode"]["device_hours_measured"] == pytest.approx(565_000 / 3600)
    assert got["vae_encode"]["wall_hours_measured"] == pytest.approx(156.94444 / 64)
    # Peak x MFU = 1000e12 x 0.5 = 5e14 FLOP/s: 1.13e6 x 1e12 / 5e14 = 2,260 s.
    assert got["vae_encode"]["device_hours_peak"] == pytest.approx(2260 / 3600)
    # Text: 4,130,000 / 10 = 413,000 s; 4.13e6 x 1e11 / 5e14 = 826 s.
    assert got["text_encode"]["device_hours_measured"] == pytest.approx(413_000 / 3600)
    assert got["text_encode"]["device_hours_peak"] == pytest.approx(826 / 3600)
    # Teacher: 3,000,000 / 0.5 = 6e6 s = 1,666.67 h, 26.04 h on 64; 3e6 x 4e13 / 5e14 = 240,000 s.
    assert got["teacher"]["device_hours_measured"] == pytest.approx(1666.6667)
    assert got["teacher"]["wall_hours_measured"] == pytest.approx(26.041667)
    assert got["teacher"]["device_hours_peak"] == pytest.approx(66.666667)
    assert got["teacher"]["wall_hours_peak"] == pytest.approx(1.0416667)
    # Total: (565,000 + 413,000 + 6,000,000) / 3600 = 1,938.33; (2,260 + 826 + 240,000) / 3600.
    assert got["total"]["device_hours_measured"] == pytest.approx(1938.3333)
    assert got["total"]["wall_hours_measured"] == pytest.approx(1938.3333 / 64)
    assert got["total"]["device_hours_peak"] == pytest.approx(243_086 / 3600)
    # Missing FLOPs (no cost analysis): no peak figure for that stage, nor a total.
    rows = bench_pc.project(rates, {**flops, "teacher": None}, bench_pc.PAPER_JOB, 64, 1000, 0.5)
    assert rows[2]["device_hours_peak"] is None and rows[3]["device_hours_peak"] is None
    assert rows[3]["device_hours_measured"] == pytest.approx(1938.3333)


def test_teacher_item_and_scann_projection_hand_arithmetic():
    # Batch 2, 2 timed steps in 10 s; the text stage takes 0.4 s per batch.
    t = bench_pc.teacher_item(10.0, 0.4, 1000.0, 100.0, batch=2, timed_steps=2, job_steps=25)
    # Text part 0.4 x 3/2 = 0.6 s; a step (10 - 0.6) / 2 = 4.7 s; per item (0.6 + 25 x 4.7) / 2.
    assert t["text_part_s"] == pytest.approx(0.6) and t["step_s"] == pytest.approx(4.7)
    assert t["item_s"] == pytest.approx(59.05) and t["items_per_s_per_device"] == pytest.approx(1 / 59.05)
    # FLOPs: the call counts one step: text 100 x 3/2 = 150, step 850, (150 + 25 x 850) / 2.
    assert t["flops_per_step"] == pytest.approx(850) and t["flops_per_item"] == pytest.approx(10_700)
    assert bench_pc.teacher_item(10.0, 0.4, None, 100.0, 2, 2, 25)["flops_per_item"] is None
    assert t["step_s_clamped"] is False
    # A call faster than its text estimate (noise): no negative step time, and it says so.
    quick = bench_pc.teacher_item(0.5, 0.4, None, None, batch=2, timed_steps=1, job_steps=25)
    assert quick["step_s"] == 0 and quick["step_s_clamped"] is True

    p = bench_pc.project_scann(1_000_000, 200.0, 9e9, 1024, 10_000_000)
    assert p["build_s_linear"] == pytest.approx(2000.0)
    assert p["build_s_n15"] == pytest.approx(200.0 * 10 ** 1.5)  # 6,324.6 s
    assert p["extra_bytes_per_vector"] == pytest.approx(9000.0)
    assert p["peak_extra_gib"] == pytest.approx(9e10 / 2**30)  # 83.8 GiB
    assert p["vectors_gib"] == pytest.approx(1e7 * 1024 * 4 / 2**30)  # 38.1 GiB


def test_teacher_cost_analysis_counts_the_sampler_loop_once():
    # teacher_item's FLOPs rest on this: the compiled sampler loop's body is counted once.
    import numpy as np

    enc = bench_pc.build_encoder("tiny", 1)
    noise = np.zeros((enc.batch_size, 8, 8, 4), np.float32)
    images = np.zeros((enc.batch_size, 16, 16, 3), np.uint8)
    flops = []
    for steps in (1, 3):
        spec = encoders.TeacherSpec("ddim", steps, 7.5, "epsilon")
        fn, args = bench_pc.jitted_calls(enc, images, ["a cat"], "", noise, spec)["teacher"]
        flops.append(bench_pc.compile_with_flops(fn, *args)["flops_compiled"])
    assert flops[0] is not None and flops[0] == pytest.approx(flops[1], rel=1e-3)


def test_timed_batches_are_sharded_over_eight_devices(tmp_path):
    out = tmp_path / "eight.json"
    env = {**os.environ, "XLA_FLAGS": helpers.xla_flags(8),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "imagerag_jax.benchmark", "precompute", "--config",
                           "tiny", "--runs", "1", "--scann-n", "0", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["devices"] == 8 and res["machine"]["jax"]["device_count"] == 8
    assert res["scann"] is None
    for name, r in res["stages"].items():
        assert (r["devices"], r["per_device_batch"], r["global_batch"]) == (8, 1, 8), name
        # The jitted input (images, token ids, noise): one row on each of the 8 devices.
        assert r["sharding"] == {"devices": 8, "spec": "P('batch',)", "rows_per_device": [1] * 8}, name
        assert r["flops_per_item"] > 0
