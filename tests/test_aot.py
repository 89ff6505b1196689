"""`python -m imagerag_jax.benchmark aot`: the tiny config's train step compiled for a TPU slice.

libtpu (the `tpu` extra, installed by `.ci/run`) compiles for a described topology on this CPU;
nothing runs on a TPU, and the test's own JAX stays on the CPU (`JAX_PLATFORMS=cpu`, conftest).
"""

from __future__ import annotations

import json

import jax
import pytest

from imagerag_jax.benchmark import aot


def test_tiny_step_compiles_for_a_v5p_slice(tmp_path, capsys):
    """4 chips of v5p, batch over 'data' and the state over 'fsdp': per-chip HBM and a step-time estimate."""
    out = tmp_path / "aot.jsonl"
    aot.main(["--config", "tiny", "--topology", "v5p:2x2x1", "--per-device-batch", "2",
              "--mesh", '[["data", -1], ["fsdp", 2]]', "--jsonl", str(out)])
    printed = capsys.readouterr().out
    assert "HBM per chip: arguments" in printed and "of 95 GiB" in printed, printed

    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "error" not in result, result
    assert result["chips"] == 4 and result["device_kind"].startswith("TPU v5")
    assert result["mesh"] == {"data": 2, "fsdp": 2}
    assert result["global_batch"] == 2 * 4
    mem = result["memory_gib"]
    for name in ("argument", "temp", "total"):
        assert mem[name] > 0, (name, mem)
    assert mem["total"] < result["hbm_gib"] == aot.CHIPS["v5p"].hbm_gib
    assert result["fits"]
    assert result["optimal_seconds"] > 0 and result["images_per_s_per_chip"] > 0
    assert 0 < result["mfu"] < 1 and result["flops_per_chip_per_step"] > 0
    assert result["libtpu"]
    # Describing and compiling for the topology left this process's own devices alone.
    assert {d.platform for d in jax.devices()} == {"cpu"}


@pytest.mark.parametrize("topology", ["v9x:2x2", "v5p", "v5e:axb"])
def test_bad_topology_is_one_error_line(topology, capsys):
    with pytest.raises(SystemExit) as exit_info:
        aot.main(["--config", "tiny", "--topology", topology])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and topology in err[-1]


def testhost_bounds_fit_slices_smaller_than_a_host():
    assert aot.host_bounds("v5e:1x1") == (1, 1, 1)
    assert aot.host_bounds("v6e:2x4") == (2, 2, 1)
    assert aot.host_bounds("v5p:4x4x4") == (2, 2, 1)
