"""Shared test helpers: layout conversion, the fp32 parity tolerance (docs/design.md, "Numerics"),
the compositional miniature's smoke run (the session fixture `compose_smoke`) and an MS-COCO
captions file in its real layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPOSE_ARG = "smoke,novel=9,arms"


def nhwc(x: np.ndarray) -> jnp.ndarray:
    """NCHW numpy (PyTorch layout) -> NHWC jax array."""
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def nchw(x) -> np.ndarray:
    """NHWC jax array -> NCHW numpy, for comparison with PyTorch outputs."""
    return np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))


def parity_error(out, ref) -> tuple[float, float]:
    """(max |out - ref|, allowed) with allowed = 1e-4 * max(1, max |ref|)."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference {ref.shape}"
    return float(np.abs(out - ref).max()), 1e-4 * max(1.0, float(np.abs(ref).max()))


def assert_parity(out, ref) -> None:
    """Fail unless max |out - ref| <= 1e-4 * max(1, max |ref|) (fp32 parity bar)."""
    err, allowed = parity_error(out, ref)
    assert err <= allowed, f"max |diff| {err:.3g} exceeds {allowed:.3g}"


def compose_run(workdir, arg: str = COMPOSE_ARG) -> tuple[dict, str]:
    """`python -m imagerag_jax.main run --config configs/compose.py:ARG --workdir W` in a
    subprocess: (results.json, stdout); fails with the end of stderr unless it exits 0."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "imagerag_jax.main", "run", "--config",
           os.path.join(REPO, "configs", "compose.py") + f":{arg}", "--workdir", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text()), proc.stdout


def compose_smoke_run(workdir) -> tuple:
    """The session's one compositional smoke run in `workdir`: (workdir, results.json, stdout)."""
    results, stdout = compose_run(workdir)
    (workdir / "stdout.txt").write_text(stdout)
    return workdir, results, stdout


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` fake CPU devices, keeping the session's own flags
    (conftest's compile-time flag), so that it compiles as the test process does."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"  # conftest's compile-time flag


def rerun_with_default_emitters(request) -> bool:
    """Runs the calling test again in a fresh pytest process compiling with XLA's default (fusion)
    emitters, when this process compiles with conftest's faster legacy ones, and fails with its
    output unless it passed. Returns whether it did so (the caller then stops: its checks ran
    there). For tests that compare two different programs bit for bit."""
    if LEGACY_EMITTERS not in os.environ.get("XLA_FLAGS", ""):
        return False
    flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if f != LEGACY_EMITTERS)
    env = {**os.environ, "XLA_FLAGS": flags, "IMAGERAG_TEST_DEFAULT_EMITTERS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", request.node.nodeid.split("@")[0], "-q",
           "-p", "no:cacheprovider", "-p", "no:xdist"]
    res = subprocess.run(cmd, cwd=str(request.config.rootpath), env=env, capture_output=True,
                         text=True, timeout=600)
    passed = res.returncode == 0 and re.search(r"^1 passed\b", res.stdout, re.M)
    assert passed, res.stdout[-4000:] + res.stderr[-2000:]
    return True


class CliResult(NamedTuple):
    """What a command line left: as subprocess.CompletedProcess's fields of the same names."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(capfd, *args: str, cwd: str) -> CliResult:
    """`python -m imagerag_jax.main ARGS` run in this process (`main.run_cli`, in `cwd`), its
    stdout and stderr read from pytest's `capfd`: no interpreter, JAX or TensorFlow start-up."""
    from imagerag_jax import main  # pylint: disable=g-import-not-at-top

    capfd.readouterr()  # only this command's output
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main.run_cli(["imagerag_jax.main", *args])
    finally:
        os.chdir(old)
    out, err = capfd.readouterr()
    return CliResult(code, out, err)


def write_coco_captions(path, images: dict[int, tuple[str, list[str]]]) -> None:
    """A captions_*.json in MS-COCO's layout: info, licenses, images, annotations."""
    anns, n = [], 0
    for image_id, (_, caps) in images.items():
        for c in caps:
            n += 1
            anns.append({"image_id": image_id, "id": 1000 + n, "caption": c})
    data = {"info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                          "name": "Attribution-NonCommercial-ShareAlike License"}],
            "images": [{"license": 1, "file_name": f, "coco_url": f"http://images.cocodataset.org/val2017/{f}",
                        "height": 480, "width": 640, "date_captured": "2013-11-14 17:02:52",
                        "flickr_url": "", "id": i} for i, (f, _) in images.items()],
            "annotations": anns}
    with open(path, "w") as f:
        json.dump(data, f)


COCO = {139: ("000000000139.jpg", ["A woman stands in the dining area at the table.",
                                   "A room with chairs, a table, and a woman in it. "]),
        285: ("000000000285.jpg", ["A big brown bear standing in a field."]),
        632: ("000000000632.jpg", ["Bedroom scene with a bookcase, blue comforter and window.",
                                   "A bedroom with a bookshelf full of books."]),
        724: ("000000000724.jpg", ["A stop sign is mounted upside-down on its post."]),
        776: ("000000000776.jpg", ["Three teddy bears, each a different color, snuggling together."])}
