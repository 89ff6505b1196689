"""The machine description that every benchmark prints and stores beside its figures."""

import json
import os
import sys

import pytest

from imagerag_jax.benchmark import common

FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Fake Xeon 9000
stepping\t: 8
microcode\t: 0x2b000590
flags\t\t: fpu avx avx2 fma

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Another CPU
flags\t\t: fpu avx512f
"""


def test_parse_cpuinfo_fake_text():
    cpu = common.parse_cpuinfo(FAKE_CPUINFO)
    assert cpu["model_name"] == "Fake Xeon 9000"
    assert cpu["vendor"] == "GenuineIntel"
    assert (cpu["family"], cpu["model"], cpu["stepping"]) == (6, 143, 8)
    assert cpu["microcode"] == "0x2b000590"
    assert set(cpu["flags"]) == set(common.ISA_FLAGS)
    assert cpu["flags"]["avx2"] is True and cpu["flags"]["fma"] is True
    assert cpu["flags"]["avx512f"] is False and cpu["flags"]["amx_tile"] is False


def test_parse_cpuinfo_empty_text():
    cpu = common.parse_cpuinfo("")
    assert cpu == {"model_name": None, "vendor": None, "family": None, "model": None,
                   "stepping": None, "microcode": None, "flags": None}


def test_machine_info_types():
    info = common.machine_info()
    assert isinstance(info["cpu"], dict)
    assert isinstance(info["python"], str)
    assert isinstance(info["versions"]["numpy"], str)
    assert isinstance(info["versions"]["jax"], str) and "jaxlib" in info["versions"]
    assert isinstance(info["cpus_visible"], int) and info["cpus_visible"] >= 1
    assert isinstance(info["threads"]["env"], dict)
    assert info["jax"]["device_count"] >= 1 and isinstance(info["jax"]["platform"], str)
    assert info["load_avg"] is None or len(info["load_avg"]) == 3
    json.dumps(info)
    if sys.platform.startswith("linux"):
        cpu = info["cpu"]
        assert isinstance(cpu["model_name"], str) and cpu["model_name"]
        assert isinstance(cpu["flags"], dict) and cpu["flags"]
        assert all(isinstance(v, bool) for v in cpu["flags"].values())
        assert isinstance(info["cpus_usable"], int) and info["cpus_usable"] >= 1
        assert isinstance(info["mem_total_gib"], float) and info["mem_total_gib"] > 0
        assert isinstance(info["kernel"], str)


def test_machine_info_without_jax_or_torch():
    info = common.machine_info(frameworks=())
    assert info["jax"] is None
    if "torch" not in sys.modules:
        assert "torch" not in info["versions"] and info["threads"]["torch_intra_op"] is None
        assert "torch" not in sys.modules


def test_machine_info_degrades_without_proc(monkeypatch):
    monkeypatch.setattr(common, "_read", lambda path: None)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "getloadavg", raising=False)
    info = common.machine_info(frameworks=("jax", "no_such_framework"))
    assert info["cpu"]["flags"] is None and info["cpu"]["family"] is None
    assert info["cpus_usable"] is None and info["load_avg"] is None
    assert info["mem_total_gib"] is None and info["cgroup_cpu_max"] is None
    assert info["versions"]["no_such_framework"] is None
    assert isinstance(common.machine_block(info), str)
    assert isinstance(common.machine_description(info), str)


def test_machine_block_and_description():
    info = common.machine_info()
    info["cpu"]["model_name"] = "Fake Xeon 9000"
    info["threads"]["torch_intra_op"], info["threads"]["torch_inter_op"] = 7, 3
    info["threads"]["env"] = {"OMP_NUM_THREADS": "5"}
    block = common.machine_block(info)
    assert "Fake Xeon 9000" in block and len(block.splitlines()) > 5
    assert "torch 7 intra-op/3 inter-op" in block and "OMP_NUM_THREADS=5" in block
    line = common.machine_description(info)
    assert "\n" not in line and "Fake Xeon 9000" in line and "torch 7 intra-op" in line
    assert f"{info['cpus_usable']}/{info['cpus_visible']} cpus usable/visible" in line


def test_input_benchmark_json_has_machine(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from imagerag_jax.benchmark import __main__ as bench_main

    out = tmp_path / "input.json"
    bench_main.main(["input", "--k", "1", "--examples", "16", "--shards", "1", "--batch", "4",
                     "--batches", "2", "--warmup", "1", "--latent", "8", "8", "4",
                     "--embed", "7", "16", "--shuffle_buffer", "8", "--dir", str(tmp_path / "d"),
                     "--json", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("machine:\n")
    assert printed.count("machine:") == 1
    (res,) = json.loads(out.read_text())
    assert res["k"] == 1 and res["examples_per_s"] > 0
    assert res["machine"]["cpu"] == common.machine_info()["cpu"]
    assert res["machine"]["jax"]["platform"]
