"""The prepared GPU check (benchmark/gpu.py): its guard and budget, and a tiny run of every section on
CPU with TensorFlow, ScaNN and clu unimportable, as on an accelerator image that lacks them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from imagerag_jax.benchmark import gpu

# Blocked the way a missing package fails: `import x` raises ImportError (sys.modules[x] = None).
BLOCKED = ("tensorflow", "scann", "clu")


def test_a_failing_section_is_recorded_and_the_rest_run(tmp_path):
    written = []

    def boom():
        raise RuntimeError("no GPU here")

    result = gpu.run_sections({"a": boom, "b": lambda: {"x": 1}}, {}, 1e9,
                              lambda r: written.append(json.dumps(r)), start=time.perf_counter())
    a, b = result["sections"]["a"], result["sections"]["b"]
    assert a["status"] == "error" and "RuntimeError: no GPU here" in a["error"] and "Traceback" in a["traceback"]
    assert b == {"status": "ok", "x": 1, "seconds": b["seconds"]}
    assert len(written) == 2  # the JSON is rewritten after every section
    skipped = gpu.run_sections({"c": lambda: {}}, {}, -1.0, lambda r: None, start=0.0)
    assert skipped["sections"]["c"]["status"] == "skipped"


def test_tiny_check_runs_every_section_without_tensorflow_scann_or_clu(tmp_path):
    out = tmp_path / "gpu.json"
    code = ("import runpy, sys\n"
            f"sys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
            f"sys.argv = ['imagerag_jax.benchmark', 'gpu', '--tiny', '--json', {str(out)!r}]\n"
            "runpy.run_module('imagerag_jax.benchmark', run_name='__main__')\n"
            f"leaked = [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]\n"
            "assert not leaked, leaked\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert {n: s["status"] for n, s in sections.items()} == dict.fromkeys(gpu.SECTIONS, "ok"), \
        {n: s.get("error") for n, s in sections.items()}
    for name in ("unet", "pipeline"):
        sec = sections[name]
        assert sec["reference"]["status"] == "ok", sec["reference"].get("error")
        assert sec["flops"] > 0 and sec["ours"]["median_s"] > 0 and sec["ratio_ours_over_reference"] > 0
        # Same random weights on both sides (fp32 on CPU): the outputs agree.
        assert sec["reference"]["relative_diff_vs_ours"] < 0.1
    assert set(sections["rag"]["cache_ratio_vs_plain_by_k"]) == {"1"}
    (variant,) = sections["train"]["variants"]
    assert variant["status"] == "ok" and variant["finite"] and variant["flops_per_example"] > 0
    assert variant["mfu"] is None and result["peak_tflops"] is None  # a CPU has no known peak
    assert "GPU check (tiny)" in proc.stdout
