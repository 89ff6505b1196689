"""Retrieval database: write, reload (memory-mapped), append/resume, validation errors."""

import json
import os

import numpy as np
import pytest

from imagerag_jax.retrieval import database as dblib

SPEC = dblib.DatabaseSpec(latent_shape=(4, 4, 3), embed_shape=(5, 8), pooled_dim=8)


def _batch(start, n, seed=0):
    rng = np.random.default_rng(seed + start)
    return dict(
        captions=[f"caption {i} ünïcode" for i in range(start, start + n)],
        latents=rng.standard_normal((n, 4, 4, 3)).astype(np.float32),
        prompt_embeds=rng.standard_normal((n, 5, 8)).astype(np.float32),
        pooled=rng.standard_normal((n, 8)).astype(np.float32),
        ids=np.arange(start, start + n) * 10 + 7)


def _write(path, batches, **kw):
    with dblib.DatabaseWriter(path, SPEC, source="test", text_encoder="te", vae="vae", **kw) as w:
        for b in batches:
            w.append(**b)
    return w


def test_build_and_reload(tmp_path):
    path = str(tmp_path / "db")
    batches = [_batch(0, 5), _batch(5, 3)]
    _write(path, batches)
    db = dblib.Database.open(path)
    assert len(db) == 8
    assert isinstance(db.latents, np.memmap) and db.latents.dtype == np.float16
    assert db.prompt_embeds.dtype == np.float16 and db.pooled.dtype == np.float32
    lat = np.concatenate([b["latents"] for b in batches])
    np.testing.assert_allclose(db.latents[[6, 1]], lat[[6, 1]].astype(np.float16))
    np.testing.assert_allclose(np.linalg.norm(db.pooled, axis=1), 1.0, rtol=1e-6)
    assert db.captions([0, 7]) == ["caption 0 ünïcode", "caption 7 ünïcode"]
    np.testing.assert_array_equal(db.ids, np.arange(8) * 10 + 7)
    np.testing.assert_array_equal(db.rows_for_ids([77, 7, 37]), [7, 0, 3])
    with pytest.raises(KeyError):
        db.rows_for_ids([8])
    g = db.gather(np.array([[3, 1], [3, 3]]))
    assert g["latents"].shape == (2, 2, 4, 4, 3)
    np.testing.assert_array_equal(g["ids"], [[37, 17], [37, 37]])
    m = json.load(open(os.path.join(path, "manifest.json")))
    assert m["schema_version"] == dblib.SCHEMA_VERSION and m["count"] == 8
    assert m["text_encoder"] == "te" and m["vae"] == "vae" and m["source"] == "test"


def test_resume_after_kill(tmp_path):
    path = str(tmp_path / "db")
    _write(path, [_batch(0, 4)])
    # Simulate a writer killed mid-batch: bytes appended to some files, manifest not updated.
    with open(os.path.join(path, "latents.bin"), "ab") as f:
        f.write(b"\x00" * 100)
    with open(os.path.join(path, "captions.bin"), "ab") as f:
        f.write(b"garbage")
    w = dblib.DatabaseWriter(path, SPEC, source="test", text_encoder="te", vae="vae")
    assert w.count == 4
    w.append(**_batch(4, 2))
    db = dblib.Database(path)
    assert len(db) == 6
    assert db.caption(4) == "caption 4 ünïcode" and db.caption(-1) == "caption 5 ünïcode"
    np.testing.assert_allclose(db.latents[4], _batch(4, 2)["latents"][0].astype(np.float16))
    assert os.path.getsize(os.path.join(path, "latents.bin")) == 6 * 4 * 4 * 3 * 2


def test_resume_identity_mismatch_and_overwrite(tmp_path):
    path = str(tmp_path / "db")
    _write(path, [_batch(0, 2)])
    with pytest.raises(dblib.DatabaseError, match="text_encoder"):
        dblib.DatabaseWriter(path, SPEC, source="test", text_encoder="other", vae="vae")
    other = dblib.DatabaseSpec((4, 4, 4), (5, 8), 8)
    with pytest.raises(dblib.DatabaseError, match="shapes"):
        dblib.DatabaseWriter(path, other, source="test", text_encoder="te", vae="vae")
    w = dblib.DatabaseWriter(path, other, source="x", overwrite=True)
    assert w.count == 0


def test_append_validation(tmp_path):
    w = dblib.DatabaseWriter(str(tmp_path / "db"), SPEC)
    b = _batch(0, 3)
    with pytest.raises(dblib.DatabaseError, match="latents has shape"):
        w.append(**{**b, "latents": b["latents"][:, :2]})
    with pytest.raises(dblib.DatabaseError, match="duplicate ids"):
        w.append(**{**b, "ids": [1, 1, 2]})
    w.append(**{**b, "ids": None})
    np.testing.assert_array_equal(dblib.Database(w.path).ids, [0, 1, 2])


def test_reader_errors(tmp_path):
    with pytest.raises(dblib.DatabaseError, match="does not exist"):
        dblib.Database(str(tmp_path / "nope"))
    path = str(tmp_path / "db")
    _write(path, [_batch(0, 3)])
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))

    json.dump({**m, "schema_version": 99}, open(mpath, "w"))
    with pytest.raises(dblib.DatabaseError, match="schema version 99"):
        dblib.Database(path)

    shapes = {**m["shapes"], "latents": [8, 8, 3]}
    json.dump({**m, "shapes": shapes}, open(mpath, "w"))
    with pytest.raises(dblib.DatabaseError, match="truncated or the shapes are wrong"):
        dblib.Database(path)

    json.dump(m, open(mpath, "w"))
    os.remove(os.path.join(path, "pooled.bin"))
    with pytest.raises(dblib.DatabaseError, match="missing file pooled.bin"):
        dblib.Database(path)


def test_empty_database(tmp_path):
    w = dblib.DatabaseWriter(str(tmp_path / "db"), SPEC)
    db = dblib.Database(w.path)
    assert len(db) == 0 and db.latents.shape == (0, 4, 4, 3) and db.captions() == []


def test_concatenate_equals_one_database(tmp_path):
    batches = [_batch(0, 5), _batch(5, 3), _batch(8, 4)]
    whole = dblib.Database(_write(str(tmp_path / "whole"), batches).path)
    # Three parts, the middle one empty, the last one with uncommitted tail bytes (a killed writer).
    parts = [_write(str(tmp_path / "p0"), batches[:2]).path, _write(str(tmp_path / "p1"), []).path,
             _write(str(tmp_path / "p2"), batches[2:]).path]
    with open(os.path.join(parts[2], "captions.bin"), "ab") as f:
        f.write(b"junk")
    out = str(tmp_path / "out")
    _write(out, [_batch(100, 2)])  # an older database there is replaced
    db = dblib.concatenate(out, [dblib.Database(p) for p in parts], manifest_extra={"k": 1}, fsync=False)
    assert db.count == whole.count == 12 and db.manifest["extra"] == {"k": 1}
    assert db.captions() == whole.captions()
    for name in dblib.ARRAYS:
        np.testing.assert_array_equal(getattr(db, name), getattr(whole, name), err_msg=name)
    with pytest.raises(dblib.DatabaseError, match="share ids"):
        dblib.concatenate(str(tmp_path / "dup"), [dblib.Database(parts[0])] * 2, manifest_extra={})
    other = dblib.DatabaseWriter(str(tmp_path / "other"), SPEC, source="test", text_encoder="x", vae="vae")
    with pytest.raises(dblib.DatabaseError, match="their text_encoder differ"):
        dblib.concatenate(str(tmp_path / "mix"), [dblib.Database(parts[0]), dblib.Database(other.path)],
                          manifest_extra={})
