"""The README's Python API section runs as written (in a scratch folder, with the repo's configs)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def api_block() -> str:
    """The first ```python block under the README's '## Python API' heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python API section has no python block"
    return blocks[0]


def test_readme_python_api_runs(tmp_path, monkeypatch):
    # In this process (no interpreter, JAX or TensorFlow start-up), from a scratch folder.
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    script = tmp_path / "api.py"
    script.write_text(api_block())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "api" / "export").is_dir()
