"""`python -m imagerag_jax.benchmark rag` on the tiny towers: every row, finite positive figures."""

import json
import math

from imagerag_jax.benchmark import __main__ as bench_main
from imagerag_jax.benchmark import rag as bench_rag


def test_rag_benchmark_tiny_writes_every_row(tmp_path, capsys):
    out = tmp_path / "rag.json"
    bench_main.main(["rag", "--config", "tiny", "--runs", "1", "--batch", "1", "2", "--k", "1", "2",
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("machine:\n") and printed.count("machine:") == 1
    res = json.loads(out.read_text())
    rows = res["rows"]
    keys = [(r["part"], r["mode"], r["batch"], r["k"]) for r in rows]
    expected = {("denoiser", "plain", b, None) for b in (1, 2)}
    expected |= {("denoiser", m, b, k) for m in ("cache", "no_cache") for b in (1, 2) for k in (1, 2)}
    expected |= {("end_to_end", "plain", 1, None), ("end_to_end", "cache", 1, 1)}
    assert sorted(keys, key=str) == sorted(expected, key=str)  # each row once, nothing missing
    for r in rows:
        for field in ("median_s", "min_s", "per_image_s", "ratio_vs_plain", "warmup_s"):
            assert math.isfinite(r[field]) and r[field] > 0, (r["part"], r["mode"], field, r[field])
        assert r["runs"] == 1 and len(r["times_s"]) == 1
        assert r["used_cache"] == (r["mode"] == "cache")
        assert r["finite_output"] is True
        assert math.isclose(r["per_image_s"], r["median_s"] / r["batch"])
        if r["mode"] == "plain":
            assert r["ratio_vs_plain"] == 1.0
        # End to end contains the text encoder; the denoiser part does not.
        parts = r["parts_median_s"]
        assert parts["total"] >= parts["denoise"] > 0
    assert res["cache_shape"][-1] > 0 and res["pipeline"]["hspace_cache"]
    assert res["machine"]["jax"]["platform"] and res["config"] == "tiny"
    assert res["adapter"]["block"] == "transformer" and res["adapter"]["parameters"] > 0
    table = bench_rag.markdown_table(rows)
    assert table in printed and len(table.splitlines()) == 2 + 4 + 1  # header, 4 denoiser, 1 e2e


def test_shared_note_reads_the_load_average():
    quiet = {"cpus_usable": 2, "load_avg": [0.1, 0.1, 0.1]}
    assert bench_rag.shared_note(quiet, {"load_avg": [2.0, 1.5, 1.0]}) is None  # our own load
    assert "shared" in bench_rag.shared_note({"cpus_usable": 2, "load_avg": [3.0, 3, 3]},
                                             {"load_avg": [2.0, 2, 2]})
    assert "shared" in bench_rag.shared_note(quiet, {"load_avg": [5.0, 4, 3]})
