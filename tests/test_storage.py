"""Paths that may be URLs (`storage`), on TensorFlow's in-memory filesystem (ram://) in process.

ram:// goes through tf.io.gfile as gs:// does: JSON side files written and read atomically there,
and a folder staged to local disk (what the memory-mapped database needs on a training host),
resumably: a second staging copies only what changed, a half-copied file is redone.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from imagerag_jax import jsonfiles, storage
from imagerag_jax.data import neighbour_feed
from imagerag_jax.errors import UserError


def upload(local: str, url: str) -> None:
    """Copies a local folder tree to `url`."""
    for parent, _, names in os.walk(local):
        for name in names:
            src = os.path.join(parent, name)
            dst = os.path.join(url, os.path.relpath(src, local))
            tf.io.gfile.makedirs(os.path.dirname(dst))
            tf.io.gfile.copy(src, dst, overwrite=True)


def test_json_side_files_on_a_url():
    url = "ram://storage-test/json/run.json"
    assert storage.is_url(url) and not storage.is_url("/tmp/x") and not storage.exists(url)
    jsonfiles.write_atomic(url, {"format": "f", "version": 1, "n": np.int64(3)})
    assert jsonfiles.read_versioned(url, "f", 1)["n"] == 3
    assert storage.listdir("ram://storage-test/json") == ["run.json"]  # no temporary left behind
    with pytest.raises(ValueError, match="no such file"):
        jsonfiles.read("ram://storage-test/json/other.json")
    with pytest.raises(RuntimeError):
        with jsonfiles.atomic_write(url) as f:
            f.write("{half")
            raise RuntimeError("killed")
    assert jsonfiles.read(url)["n"] == 3 and storage.listdir("ram://storage-test/json") == ["run.json"]


def test_stage_copies_a_url_folder_once_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {"a.bin": rng.bytes(3000), "sub/b.bin": rng.bytes(10), "manifest.json": b"{}"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    url = "ram://storage-test/db"
    upload(str(src), url)
    local = storage.stage(url, progress=False)
    assert local == storage.staging_dir(url) and local.startswith(str(tmp_path / "staging"))
    for rel, data in files.items():
        assert open(os.path.join(local, rel), "rb").read() == data
    assert storage.stage("/some/local/folder") == "/some/local/folder"

    # A killed staging: one file cut short, a temporary left; the source has grown a file.
    with open(os.path.join(local, "a.bin"), "r+b") as f:
        f.truncate(100)
    open(os.path.join(local, "sub", "c.bin.staging"), "wb").write(b"x")
    before = os.stat(os.path.join(local, "sub", "b.bin")).st_mtime_ns
    with tf.io.gfile.GFile(f"{url}/new.bin", "wb") as f:
        f.write(b"new")
    assert storage.stage(url, progress=False) == local
    assert open(os.path.join(local, "a.bin"), "rb").read() == files["a.bin"]
    assert open(os.path.join(local, "new.bin"), "rb").read() == b"new"
    assert not os.path.exists(os.path.join(local, "sub", "c.bin.staging"))
    assert os.stat(os.path.join(local, "sub", "b.bin")).st_mtime_ns == before  # not copied again
    # A source file rewritten with the same size (a rebuilt database) is copied again.
    tf.io.gfile.remove(f"{url}/sub/b.bin")
    with tf.io.gfile.GFile(f"{url}/sub/b.bin", "wb") as f:
        f.write(b"0123456789")
    storage.stage(url, progress=False)
    assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"0123456789"
    with pytest.raises(FileNotFoundError, match="no such"):
        storage.stage("ram://storage-test/none")

    # publish: the inverse, its marker last; excluded names stay behind.
    (src / "done.json").write_text("{}")
    storage.publish(str(src), "ram://storage-test/published", last="done.json", exclude=("sub",))
    assert storage.listdir("ram://storage-test/published") == ["a.bin", "done.json", "manifest.json"]


def test_neighbours_from_a_database_at_a_url(tmp_path, monkeypatch):
    from imagerag_jax.data import tfrecords
    from tests.test_record_options import stored_batch, write_database

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    schema = tfrecords.Schema((4, 4, 2), (3, 8), 8, k=2, neighbours="ids")
    db = write_database(str(tmp_path / "db"), schema)
    url = "ram://storage-test/bucket/db"
    upload(db.path, url)
    recorded = {"database": {"path": url, "count": db.count, "created": db.manifest["created"]}}
    feed = neighbour_feed.open_feed({"index": recorded}, schema, hspace=False)
    assert feed.database.path == storage.staging_dir(url)
    host = stored_batch(schema, db, 3, seed=1)
    got = feed.fill(host)["retrieved_latents"]
    np.testing.assert_array_equal(got, db.gather(db.rows_for_ids(host["retrieved_ids"]))["latents"])
    with pytest.raises(UserError, match="does not exist"):
        neighbour_feed.open_feed({"index": recorded}, schema, hspace=False,
                                 database="ram://storage-test/bucket/missing")
