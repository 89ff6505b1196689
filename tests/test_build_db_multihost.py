"""build_db on 2 processes x 4 fake CPU devices (jax.distributed) equals 1 process x 1 device.

The source is a JSONL file of 24 digits with, in each half of the raw range (so in each part),
one unreadable image, and in the second half a duplicate of an id of the first half: the parts
must drop the duplicate where one process drops it and sum the skips as one process counts them.
Each child runs `build_db.build_db` on the tiny random pipeline: the reference in one process
with one device (the one-database layout), then two processes (jax.distributed, 4 devices each)
that write a part each, process 0 concatenating them and building the index while process 1
waits for both. Compared: ids, captions, latents, prompt embeddings, pooled embeddings, image
hashes, skip counts and every row's top-k neighbours from the index (latents up to float16
ulps: the rows are encoded in other batches on other devices).

Resume: part 1 is rolled back to 5 committed rows (its done marker removed, rows past 5 left as a
killed writer leaves them) and the concatenated manifest removed (a crash during the merge); a
second two-process run re-encodes only part 1's missing rows, leaves part 0's files untouched
(mtimes), merges again and equals the reference. With config.db.overwrite every part is rebuilt
(after a barrier: no host may read another's stale marker). A part built by another
configuration is refused with one error naming it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagerag_jax.data import build_db, sources
from imagerag_jax.retrieval import database, index as index_lib
from tests.test_multihost import env, free_port, run_all

NUM_ROWS = 24
K = 4

DRIVER = r"""
import json, os, sys
mode, pid, port, root, overwrite = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if mode == "multi":
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
import ml_collections
from imagerag_jax.config_args import load_module
from imagerag_jax.data import build_db

assert jax.local_device_count() == (4 if mode == "multi" else 1), jax.local_devices()
assert jax.process_count() == (2 if mode == "multi" else 1)
cfg = load_module(os.path.join("configs", "precompute_digits.py")).get_config("quick")
with cfg.unlocked():
    cfg.image_size, cfg.batch_size = 16, 8
    cfg.db.source = ml_collections.ConfigDict(
        {"kind": "captions", "path": os.path.join(root, "pairs.jsonl"), "id_key": "id"})
    cfg.db.limit, cfg.db.fsync, cfg.db.wait_timeout_s = 0, False, 200
    cfg.db.overwrite = overwrite == "overwrite"
    cfg.db.dir, cfg.index_dir = os.path.join(root, mode, "db"), os.path.join(root, mode, "index")
    cfg.index.kind = "exact"
summary = build_db.build_db(cfg, os.path.join(root, "work"))  # shared work: one random pipeline
with open(os.path.join(root, f"summary_{mode}_{pid}.json"), "w") as f:
    json.dump(summary, f)
print("DRIVER_DONE", mode, pid)
"""


def _write_source(root: Path) -> None:
    """24 digits as PNG + JSONL rows (unique captions); rows 3 and 17 unreadable, row 20 repeats
    row 5's id."""
    src = sources.DigitsSource("eval", size=16)
    (root / "imgs").mkdir()
    rows = []
    for j, i in enumerate(src.ids[:NUM_ROWS]):
        Image.fromarray(src.image(i)).save(root / "imgs" / f"{j}.png")
        rows.append({"path": f"imgs/{j}.png", "caption": f"{src.caption(i)}, number {j}",
                     "id": int(i)})
    rows[3]["path"], rows[17]["path"] = "imgs/missing-a.png", "imgs/missing-b.png"
    rows[20]["id"] = rows[5]["id"]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _launch(root: Path, mode: str, tag: str, overwrite: bool = False) -> list[dict]:
    """Runs the driver (ref: one process, 1 device; multi: two processes, 4 devices each)."""
    driver = [sys.executable, "-c", DRIVER]
    cache = str(root / "jax_cache")
    n = 2 if mode == "multi" else 1
    port = str(free_port())
    flag = "overwrite" if overwrite else "resume"
    run_all([driver + [mode, str(i), port, str(root), flag] for i in range(n)],
            [env(4 if mode == "multi" else 1, cache)] * n,
            [root / f"{tag}{i}.log" for i in range(n)])
    return [json.loads((root / f"summary_{mode}_{i}.json").read_text()) for i in range(n)]


def _assert_same_database(ref_root: Path, got_root: Path) -> None:
    """Equal ids, captions, arrays, hashes, skips and top-k neighbours."""
    a, b = database.Database(str(ref_root / "db")), database.Database(str(got_root / "db"))
    assert a.count == b.count == NUM_ROWS - 3  # two unreadable images, one duplicate id
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.captions() == b.captions()
    # Rows are encoded in other batches on other devices: XLA's conv kernels may round the last
    # bit of a latent differently (float16 ulps); the text tower comes out equal in practice.
    for name, atol in (("latents", 2e-4), ("prompt_embeds", 1e-5), ("pooled", 1e-6)):
        np.testing.assert_allclose(np.asarray(getattr(a, name), np.float32),
                                   np.asarray(getattr(b, name), np.float32), atol=atol, rtol=2e-3,
                                   err_msg=name)
    np.testing.assert_array_equal(build_db.load_image_hashes(a.path), build_db.load_image_hashes(b.path))
    for key in ("skipped", "skipped_examples"):
        assert a.manifest["extra"][key] == b.manifest["extra"][key], key
    assert a.manifest["extra"]["skipped"] == {"unreadable image": 2, "duplicate id": 1}
    ia, ib = index_lib.Index.load(str(ref_root / "index")), index_lib.Index.load(str(got_root / "index"))
    (ids_a, scores_a), (ids_b, scores_b) = (ix.search(np.asarray(a.pooled), K) for ix in (ia, ib))
    np.testing.assert_array_equal(ids_a, ids_b)  # unique captions: no tied scores to reorder
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-6)


def _mtimes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The reference (1 process x 1 device) and the two-process build of the same source."""
    root = tmp_path_factory.mktemp("build_db_multihost")
    _write_source(root)
    ref = _launch(root, "ref", "ref")
    multi = _launch(root, "multi", "multi")
    return root, ref, multi


def test_two_processes_build_the_one_process_database(built):
    root, ref, multi = built
    assert "parts" not in ref[0] and ref[0]["count"] == NUM_ROWS - 3
    parts = root / "multi" / "db" / build_db.PARTS_DIR
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000-of-00002", "part-00001-of-00002"]
    # Each process encoded its own part (12 raw items each); both report the whole database.
    assert [s["parts"]["written"] for s in multi] == [[0], [1]]
    assert sum(s["added"] for s in multi) == NUM_ROWS - 3 and all(s["added"] for s in multi)
    assert [s["count"] for s in multi] == [NUM_ROWS - 3] * 2
    assert multi[0]["index"] == multi[1]["index"] and multi[0]["index"]["count"] == NUM_ROWS - 3
    _assert_same_database(root / "ref", root / "multi")
    first = database.Database(str(parts / "part-00000-of-00002"))
    assert first.manifest["extra"]["skipped"] == {"unreadable image": 1}
    assert database.Database(str(parts / "part-00001-of-00002")).manifest["extra"]["skipped"] == {
        "unreadable image": 1, "duplicate id": 1}


def test_killed_build_resumes_unfinished_rows_only(built):
    root, _, multi = built
    db_path = root / "multi" / "db"
    parts = db_path / build_db.PARTS_DIR
    p0, p1 = parts / "part-00000-of-00002", parts / "part-00001-of-00002"
    before = _mtimes(p0)
    # Part 1 killed after 5 committed rows (bytes past them stay, as a killed writer leaves them),
    # and process 0 killed while concatenating (no committed top-level manifest).
    (p1 / build_db.PART_DONE).unlink()
    manifest = json.loads((p1 / database.MANIFEST).read_text())
    count1, manifest["count"] = manifest["count"], 5
    (p1 / database.MANIFEST).write_text(json.dumps(manifest))
    (db_path / database.MANIFEST).unlink()

    again = _launch(root, "multi", "resume")
    assert [s["parts"]["written"] for s in again] == [[], [1]]
    assert [s["added"] for s in again] == [0, count1 - 5]
    assert _mtimes(p0) == before  # the finished part was not reopened
    _assert_same_database(root / "ref", root / "multi")


def test_overwrite_rebuilds_every_part(built):
    root, _, multi = built
    parts = root / "multi" / "db" / build_db.PARTS_DIR
    created = [json.loads((p / database.MANIFEST).read_text())["created"] for p in sorted(parts.iterdir())]
    again = _launch(root, "multi", "overwrite", overwrite=True)  # the hosts meet at a barrier first
    assert [s["parts"]["written"] for s in again] == [[0], [1]]
    assert sum(s["added"] for s in again) == NUM_ROWS - 3
    now = [json.loads((p / database.MANIFEST).read_text())["created"] for p in sorted(parts.iterdir())]
    assert all(a != b for a, b in zip(created, now))
    _assert_same_database(root / "ref", root / "multi")


def test_parts_of_another_configuration_are_refused(built):
    from tests.test_precompute import make_config

    root, _, _ = built
    cfg = make_config(**{"db.source": {"kind": "captions", "path": str(root / "pairs.jsonl"),
                                       "id_key": "id"},
                         "db.dir": str(root / "multi" / "db"), "index_dir": str(root / "x"),
                         "db.limit": 10, "batch_size": 8})
    # (This process also computes another VAE fingerprint: its XLA flags differ from the drivers'.)
    with pytest.raises(database.DatabaseError, match=r"part-00000-of-00002 differs in \['limit', "
                                                     r"'num_items'.*config.db.overwrite=True"):
        build_db.build_db(cfg, str(root / "work"), process_index=0, process_count=2)
