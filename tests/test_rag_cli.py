"""``generate`` with retrieval, ``build-cache`` and ``evaluate`` from the CLI on a run trained here.

One call per subcommand runs in a subprocess as a user would, the others in this process
(`main.run_cli`, no interpreter start-up); a wrong run or database is one `error:` line with exit
code 2 and leaves earlier outputs as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import helpers, rag_fixtures

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def run_cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    """`python -m imagerag_jax.main ARGS` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "imagerag_jax.main", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def run_here(capfd, *args: str, cwd: str) -> helpers.CliResult:
    """The same command line in this process (`main.run_cli`)."""
    return helpers.cli_in_process(capfd, *args, cwd=cwd)


def one_error_line(res) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback)."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def made(rag_run):
    return rag_run


def test_generate_with_retrieval_and_neighbour_grid_then_cache(made, tmp_path, capfd):
    out, grid = tmp_path / "out.png", tmp_path / "grid.png"
    db, index = str(tmp_path / "db"), str(tmp_path / "index")  # the cache is written beside the DB
    shutil.copytree(made["db"], db)
    shutil.copytree(made["index"], index)
    args = ["generate", f"--run={made['workdir']}", f"--database={db}", f"--index={index}", "--prompt=a photo of a cat", "--prompt=a red square",
            "--batch=2", "--k=2", f"--out={out}", f"--neighbours={grid}"]
    res = run_cli(*args, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "adapter" in res.stdout and "H-space cache" not in res.stdout.splitlines()[0]
    assert "'a photo of a cat': lambda" in res.stdout and "'a photo of a cat' (1.000)" in res.stdout
    image, grid_image = np.asarray(Image.open(out)), np.asarray(Image.open(grid))
    assert image.ndim == 3 and image.std() > 0
    assert grid_image.shape[0] > 2 * 16 and grid_image.shape[1] > 3 * 16  # 2 rows x (1 + k) cells
    first = image.copy()

    res = run_cli("build-cache", f"--run={made['workdir']}", f"--database={db}", f"--index={index}",
                  cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "hspace_cache" in res.stdout
    res = run_here(capfd, *args, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "H-space cache" in res.stdout.splitlines()[0]
    # The cache holds f16 H-space: the image moves by at most a rounding step or two.
    assert np.abs(np.asarray(Image.open(out)).astype(int) - first.astype(int)).max() <= 2


def test_bad_run_and_database_are_one_error_line(made, tmp_path, capfd):
    out = tmp_path / "out.png"
    out.write_bytes(b"earlier output")
    line = one_error_line(run_here(capfd, "generate", f"--run={tmp_path / 'missing'}", f"--out={out}",
                                   cwd=str(tmp_path)))
    assert "missing" in line and "not a folder" in line
    other = rag_fixtures.write_db(str(tmp_path / "db_other"), rag_fixtures.CAPTIONS, text_seed=3)
    idx = rag_fixtures.write_index(other, str(tmp_path / "idx_other"))
    line = one_error_line(run_here(capfd, "generate", f"--run={made['workdir']}", f"--database={other}",
                                   f"--index={idx}", f"--out={out}", cwd=str(tmp_path)))
    assert "db_other" in line and "text_encoder" in line
    assert out.read_bytes() == b"earlier output"


def test_evaluate_from_the_cli(made, tmp_path, capfd):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na blue circle\n\na red square\n")
    out = tmp_path / "eval"
    res = run_cli("evaluate", f"--run={made['workdir']}", f"--database={made['db']}",
                  f"--index={made['index']}", f"--prompts={prompts}", f"--out={out}",
                  cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a photo of a cat", "a blue circle", "a red square"]
    for r in rows:
        assert (out / r["file"]).is_file() and len(r["ids"]) == 2
    assert json.loads((out / "metrics.json").read_text())["count"] == 3
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    line = one_error_line(run_here(capfd, "evaluate", f"--run={made['workdir']}", f"--prompts={empty}",
                                   f"--out={out}", cwd=str(tmp_path)))
    assert "empty.txt" in line
    assert len((out / "index.jsonl").read_text().splitlines()) == 3
    # MS-COCO's captions file: --num_prompts images drawn with --seed, one caption each.
    from imagerag_jax.evaluation import evaluate as ep

    coco = tmp_path / "captions_val2017.json"
    helpers.write_coco_captions(coco, helpers.COCO)
    line = one_error_line(run_here(capfd, "evaluate", f"--run={made['workdir']}", f"--prompts={coco}",
                                   "--num_prompts=6", f"--out={tmp_path / 'coco'}", cwd=str(tmp_path)))
    assert "--num_prompts 6" in line and "5 captioned images" in line and not (tmp_path / "coco").exists()
    res = run_here(capfd, "evaluate", f"--run={made['workdir']}", f"--database={made['db']}",
                   f"--index={made['index']}", f"--prompts={coco}", "--num_prompts=2", "--seed=1",
                   f"--out={tmp_path / 'coco'}", cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "coco" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ep.read_coco_captions(str(coco), 2, seed=1).prompts
