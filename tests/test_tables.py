"""evaluation/tables.py: evaluate folders -> the paper's Tables 1 and 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imagerag_jax.errors import UserError
from imagerag_jax.evaluation import tables


def write_run(folder, **metrics) -> str:
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def test_tables_have_the_papers_columns_and_nfe(tmp_path, capsys):
    l14, big_g = "/m/clip-vit-large-patch14", "/m/CLIP-ViT-bigG-14-laion2B-39B-b160k"
    teacher = write_run(tmp_path / "sd21", count=5, fid=20.5, clip_scores={l14: 31.0, big_g: 35.5},
                        aesthetic_score=5.5, pipeline={"steps": 50, "guidance": 7.5})
    turbo = write_run(tmp_path / "turbo", count=5, fid=22.25, clip_scores={l14: 30.0},
                      pipeline={"steps": 1, "guidance": 0.0})
    unguided = write_run(tmp_path / "ddim4", count=5, pipeline={"steps": 4, "guidance": 1.0})
    text = tables.main([teacher, turbo, unguided, "--names", "SD 2.1", "SD-Turbo", "DDIM 4",
                        "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == text == capsys.readouterr().out
    assert "| Method | NFE | FID | CLIP (clip-vit-large-patch14) | CLIP (CLIP-ViT-bigG-14-laion2B-39B-b160k) | Images |" in text
    assert "| SD 2.1 | 100 | 20.50 | 31.00 | 35.50 | 5 |" in text  # 50 steps x 2 with CFG
    assert "| SD-Turbo | 1 | 22.25 | 30.00 | - | 5 |" in text
    assert "| DDIM 4 | 4 | - | - | - | 5 |" in text  # guidance <= 1: no CFG pass
    assert "| SD 2.1 | 5.500 | - |" in text and "| SD-Turbo | - | - |" in text


def test_bad_folders_are_one_error_line(tmp_path):
    with pytest.raises(UserError, match="no readable metrics.json"):
        tables.tables([str(tmp_path)])
    run = write_run(tmp_path / "a", count=1)
    with pytest.raises(UserError, match="2 names for 1 folders"):
        tables.tables([run], ["x", "y"])
    res = subprocess.run([sys.executable, "-m", "imagerag_jax.evaluation.tables", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
