"""The Colab notebooks (colab/*.ipynb) run top to bottom on the tiny configurations.

Each notebook is executed by nbclient in a fresh kernel (this interpreter, via a kernelspec
written to a temporary JUPYTER_PATH) from a temporary working directory, with the repository
root on PYTHONPATH. The notebooks write into the folder named by IMAGERAG_NOTEBOOK_WORKDIR,
which the tests then check. train.ipynb's run is reused by export.ipynb
(IMAGERAG_TRAIN_WORKDIR) so the tiny trainer compiles once.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat", reason="the [test] extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the [test] extra installs nbclient")
pytest.importorskip("ipykernel", reason="the [test] extra installs ipykernel (the notebook kernel)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("demo.ipynb", "train.ipynb", "export.ipynb")
CELL_TIMEOUT_S = 300
KERNEL = "python3"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the kernels: a 'python3' kernelspec running this interpreter, PYTHONPATH."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("jupyter")
    # A kernelspec of our own (found first on JUPYTER_PATH), so the kernel is this interpreter
    # whatever 'python3' spec is installed, or none is.
    write_kernel_spec(str(root / "kernels" / KERNEL))
    env = {
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")])),
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_notebook(name: str, tmp_path, **env: str):
    """Executes colab/<name> with IMAGERAG_NOTEBOOK_WORKDIR = tmp_path/work; returns (nb, workdir)."""
    workdir, cwd = tmp_path / "work", tmp_path / "cwd"
    workdir.mkdir()
    cwd.mkdir()
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    extra = {"IMAGERAG_NOTEBOOK_WORKDIR": str(workdir), **env}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(cwd)}})
        client.execute()  # raises CellExecutionError naming the cell on any error
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    return nb, workdir


def stdout_of(nb) -> str:
    """All stream text the notebook printed."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def count_images(nb) -> int:
    """Number of PNG display outputs."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    """Stored without outputs, with a Colab-guarded install cell first, calling the package."""
    nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} holds outputs"
    assert "'google.colab' in sys.modules" in code[0].source.replace('"', "'")
    assert "import imagerag_jax" in "".join(c.source for c in code)


@pytest.fixture(scope="module")
def trained_run(kernel_env, tmp_path_factory):
    """train.ipynb executed once: (notebook, its workdir)."""
    return run_notebook("train.ipynb", tmp_path_factory.mktemp("train_nb"))


def test_demo_notebook(kernel_env, tmp_path):
    from PIL import Image

    nb, workdir = run_notebook("demo.ipynb", tmp_path)
    out = stdout_of(nb)
    assert "using a tiny random-weight pipeline" in out  # the fallback: no Drive weights here
    assert "images: (4, 16, 16, 3) (4, 16, 16, 3)" in out
    assert count_images(nb) == 1
    grid = np.asarray(Image.open(workdir / "demo_grid.png"))
    # 3 rows (neighbour, no retrieval, direct injection) x 4 prompts of 16 px, 2 px padding.
    assert grid.shape == (3 * 18 - 2, 4 * 18 - 2, 3)
    assert (workdir / "db" / "manifest.json").exists() and (workdir / "index").is_dir()


def test_train_notebook(trained_run):
    nb, workdir = trained_run
    out = stdout_of(nb)
    assert "finished at step 6" in out
    assert "g_loss" in out and "d_loss" in out
    assert count_images(nb) == 1
    assert (workdir / "checkpoints" / "6").is_dir()
    assert (workdir / "samples" / "step_0000006.png").exists()


def test_export_notebook(trained_run, kernel_env, tmp_path):
    _, run_dir = trained_run
    nb, workdir = run_notebook("export.ipynb", tmp_path, IMAGERAG_TRAIN_WORKDIR=str(run_dir))
    assert not (workdir / "train").exists()  # reused the trained run instead of training again
    export = workdir / "export"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "adapter", "lora"):
        assert (export / part).is_dir(), part
    assert (export / "unet" / "config.json").exists()
    with open(export / "imagerag_export.json") as f:
        assert json.load(f)["step"] == 6
    out = stdout_of(nb)
    assert "unet/config.json" in out  # the folder listing
    assert "| eps (1, 4, 8, 8) finite: True" in out
    assert "images (2, 16, 16, 3)" in out
    assert count_images(nb) == 1
