"""The house rules of docs/design.md: import floors, no upward arrows, nothing outside the repo."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagerag_jax"

# docs/design.md, "Layout and import floors": a module may import only its floor or below.
FLOORS = {
    "errors": 0, "jsonfiles": 0, "storage": 0, "config_args": 0, "images": 0,
    "models": 1, "sharding": 1,
    "weights": 2, "retrieval": 2, "diffusion": 2,
    "data": 4,
    "training": 5,
    "export": 6,
    "inference": 7,
    "evaluation": 8,
    "miniature": 9, "benchmark": 9,
    "main": 10,
}


def room(module: str) -> str:
    """'imagerag_jax.data.sources' -> 'data'; 'imagerag_jax.training.trainer' -> 'train'."""
    return module.split(".")[1]


def project_imports(path: Path) -> set[str]:
    """Every imagerag_jax module a file imports (top level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("imagerag_jax."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "imagerag_jax":
                out.update(f"imagerag_jax.{a.name}" for a in node.names)
            elif node.module.startswith("imagerag_jax."):
                out.add(node.module)
    return out


def modules() -> dict[str, Path]:
    """imagerag_jax module name -> file."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def test_every_room_has_a_floor():
    rooms = {room(m) for m in modules() if m != "imagerag_jax"}
    assert rooms <= set(FLOORS), f"rooms without a floor in docs/design.md: {rooms - set(FLOORS)}"


def test_imports_never_point_upward():
    upward = []
    for name, path in modules().items():
        if name == "imagerag_jax":
            continue
        here = FLOORS[room(name)]
        for target in project_imports(path):
            if room(target) != room(name) and FLOORS[room(target)] > here:
                upward.append(f"{name} (floor {here}) imports {target} (floor {FLOORS[room(target)]})")
    assert not upward, "\n".join(upward)


def test_export_and_runtime_do_not_import_the_trainer():
    for name in ("imagerag_jax.export.to_diffusers", "imagerag_jax.export.torch_runtime"):
        imports = project_imports(modules()[name])
        assert not imports & {"imagerag_jax.training.trainer", "imagerag_jax.training.step"}, (name, imports)


def test_the_design_lists_every_room():
    design = (ROOT / "docs" / "design.md").read_text()
    missing = [r for r in FLOORS if f"`{r}" not in design]
    assert not missing, f"docs/design.md does not name {missing}"


def test_nothing_points_outside_the_repository():
    res = subprocess.run(["git", "grep", "-n", "-I", r"\.\./shared", "--", ".", ":!tests/test_layout.py"],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode not in (0, 1):  # not a git checkout (e.g. an sdist): search the files
        hits = [str(p) for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".ipynb")
                and "../shared" in p.read_text(errors="ignore") and p.name != "test_layout.py"]
    else:
        hits = res.stdout.splitlines()
    assert not hits, "\n".join(hits)


def test_the_top_level_holds_only_the_shared_base():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "main"))
    assert len(top) <= 8, f"{len(top)} top-level modules (at most 8 besides __init__ and main): {top}"


def test_no_module_reaches_into_another_modules_private_names():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "protected-access" in line]
    assert not hits, "shared names become public API:\n" + "\n".join(hits)
