"""Several ``evaluate`` folders -> the paper's Table 1 (method, NFE, FID, CLIP) and Table 2 (AES, TIFA).

    python -m imagerag_jax.evaluation.tables /eval/sd21 /eval/sd_turbo /eval/imageragturbo \
        [--names "SD 2.1" "SD-Turbo" "ImageRAGTurbo"] [--out tables.md]

Each folder is one `main evaluate` run (its metrics.json). NFE (UNet evaluations per image) comes
from the run's pipeline: one for the one-step modes; steps, twice with classifier-free guidance,
for the plain multi-step sampler. CLIP columns: one per CLIP model the runs were scored with.
TIFA has no column value: it is not wired in (docs/recipes.md says what blocks it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from imagerag_jax.errors import UserError


def read_metrics(folder: str) -> dict[str, Any]:
    """metrics.json of an `evaluate` folder (UserError when it has none)."""
    path = os.path.join(folder, "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}: no readable metrics.json of a finished evaluate run ({e})") from e


def nfe(metrics: dict[str, Any]) -> int:
    """UNet evaluations per image of the run's pipeline."""
    pipe = metrics.get("pipeline", {})
    steps, guidance = int(pipe.get("steps", 1)), float(pipe.get("guidance", 0.0))
    if steps == 1 and guidance <= 1.0:
        return 1
    return steps * (2 if guidance > 1.0 else 1)


def _cell(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def tables(folders: Sequence[str], names: Sequence[str] | None = None) -> str:
    """Markdown: Table 1 (method, NFE, FID, a CLIP score per model) and Table 2 (AES, TIFA)."""
    if not folders:
        raise UserError("give at least one evaluate folder")
    if names is not None and len(names) != len(folders):
        raise UserError(f"{len(names)} names for {len(folders)} folders")
    runs = [read_metrics(f) for f in folders]
    names = list(names) if names is not None else [os.path.basename(os.path.normpath(f)) for f in folders]
    clips = list(dict.fromkeys(label for m in runs for label in m.get("clip_scores", {})))
    short = [os.path.basename(c.rstrip("/")) for c in clips]
    lines = ["Table 1", "", "| Method | NFE | FID | " + " | ".join(f"CLIP ({s})" for s in short)
             + (" |" if clips else "") + " Images |",
             "|---|---|---|" + "---|" * len(clips) + "---|"]
    for name, m in zip(names, runs):
        cells = [name, str(nfe(m)), _cell(m.get("fid"))]
        cells += [_cell(m.get("clip_scores", {}).get(c)) for c in clips]
        lines.append("| " + " | ".join(cells + [str(m.get("count", "-"))]) + " |")
    lines += ["", "Table 2", "", "| Method | AES | TIFA |", "|---|---|---|"]
    for name, m in zip(names, runs):
        lines.append(f"| {name} | {_cell(m.get('aesthetic_score'), '{:.3f}')} | - |")
    lines += ["", "FID against each run's reference images (`fid_reference_count` in its "
              "metrics.json); TIFA: not available (docs/recipes.md)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """Prints (and with --out writes) the tables of the given evaluate folders."""
    p = argparse.ArgumentParser(prog="python -m imagerag_jax.evaluation.tables",
                                description="the paper's Tables 1 and 2 from evaluate folders")
    p.add_argument("folders", nargs="+", help="evaluate output folders (each with metrics.json)")
    p.add_argument("--names", nargs="+", help="one method name per folder (default: folder names)")
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args(argv)
    text = tables(args.folders, args.names)
    print(text, end="")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
