"""Offline jobs: build the retrieval DB (reload, resume, skips) and precompute TFRecords end to end.

Everything runs on the tiny random pipeline and 16 px digits; one module-scoped workdir holds the
pipeline, the DB and its index, so the jitted batch functions compile once.
"""

import importlib.util
import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from imagerag_jax.weights import towers
from imagerag_jax.data import build_db, encoders, input_stream, precompute, sources, tfrecords
from imagerag_jax import storage
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import database, index as index_lib
from imagerag_jax.weights import random_pipeline

SIZE = 16
DB_LIMIT = 40
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config_module():
    spec = importlib.util.spec_from_file_location(
        "precompute_digits", os.path.join(ROOT, "configs", "precompute_digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(arg: str = "quick", **overrides) -> ml_collections.ConfigDict:
    """The digits config with dotted-key overrides (dict values become ConfigDicts)."""
    config = _config_module().get_config(arg)
    with config.unlocked():
        config.image_size = SIZE
        config.batch_size = 16
        config.db.limit = DB_LIMIT
        config.db.fsync = False
        config.db.source.size = SIZE
        config.source.size = SIZE
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("precompute"))


@pytest.fixture(scope="module")
def built(workdir):
    """The digits DB (first DB_LIMIT entries of the 'database' split) and its index."""
    summary = build_db.build_db(make_config(), workdir)
    return summary


def _png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_build_db_and_reload(workdir, built):
    assert built["count"] == DB_LIMIT and built["added"] == DB_LIMIT
    db = database.Database(os.path.join(workdir, "db"))
    src = sources.DigitsSource("database", size=SIZE)
    assert db.count == DB_LIMIT
    assert db.shapes["latents"] == (SIZE // 2, SIZE // 2, 4)  # tiny VAE: factor 2
    assert db.shapes["prompt_embeds"] == (77, 32) and db.shapes["pooled"] == (32,)
    assert db.latents.dtype == np.float16 and np.isfinite(np.asarray(db.latents, np.float32)).all()
    np.testing.assert_array_equal(db.ids, src.ids[:DB_LIMIT])
    assert db.captions() == [src.caption(i) for i in src.ids[:DB_LIMIT]]
    np.testing.assert_allclose(np.linalg.norm(db.pooled, axis=-1), 1.0, atol=1e-5)
    m = db.manifest
    assert m["text_encoder"].startswith("random:tiny:0#") and m["vae"].startswith("random:tiny:0#")
    assert '"kind": "digits"' in m["source"] and m["extra"]["skipped"] == {}

    # Latents are the VAE's scaled mean (checked against an unjitted encode of two images).
    pipe = towers.load_job_towers(make_config(), workdir).pipe
    images = np.stack([src.image(i) for i in src.ids[:2]])
    mean, _ = pipe.vae.apply({"params": pipe.vae_params}, jnp.asarray(images, jnp.float32) / 127.5 - 1,
                             method=pipe.vae.encode)
    np.testing.assert_allclose(db.latents[:2], np.asarray(mean) * pipe.vae.scaling_factor,
                               atol=2e-3, rtol=2e-3)

    hashes = build_db.load_image_hashes(db.path)
    assert hashes.shape == (DB_LIMIT,)
    assert hashes[5] == build_db.image_hash(src.image(src.ids[5]))

    index = index_lib.Index.load(os.path.join(workdir, "index"))
    assert index.count == DB_LIMIT and built["index"]["count"] == DB_LIMIT
    ids, scores = index.search(np.asarray(db.pooled[3:4]), 1)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert db.captions(db.rows_for_ids(ids[0]))[0] == db.caption(3)


def test_build_db_resume_equals_uninterrupted(workdir, built):
    path = os.path.join(workdir, "db_resume")
    first = build_db.build_db(make_config(**{"db.dir": path, "db.limit": 20}), workdir)
    assert first["count"] == 20
    # A run killed mid-batch leaves uncommitted bytes behind; resuming must drop them.
    for fname in ("latents.bin", "captions.bin", build_db.HASHES_FILE):
        with open(os.path.join(path, fname), "ab") as f:
            f.write(b"\x07" * 37)
    second = build_db.build_db(make_config(**{"db.dir": path}), workdir)
    assert (second["count"], second["added"]) == (DB_LIMIT, DB_LIMIT - 20)
    assert build_db.build_db(make_config(**{"db.dir": path}), workdir)["added"] == 0

    a, b = database.Database(path), database.Database(os.path.join(workdir, "db"))
    assert len(np.unique(a.ids)) == a.count == b.count
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.captions() == b.captions()
    for name in ("latents", "prompt_embeds", "pooled"):
        np.testing.assert_allclose(np.asarray(getattr(a, name), np.float32),
                                   np.asarray(getattr(b, name), np.float32), atol=1e-3)
    np.testing.assert_array_equal(build_db.load_image_hashes(path),
                                  build_db.load_image_hashes(b.path))


def test_two_hosts_build_through_a_bucket_what_one_process_builds(workdir, built, tmp_path,
                                                                   monkeypatch):
    # Two hosts, run as separate jobs, share no folder: each has its own workdir and local copies
    # ($IMAGERAG_STAGING_DIR); the parts, the merged database and the index go through a bucket
    # (a file:// URL: TensorFlow's filesystem layer, as gs:// is reached).
    bucket = f"file://{tmp_path / 'bucket'}"
    remote = {"db.dir": f"{bucket}/db", "index_dir": f"{bucket}/index", "db.num_parts": 2}
    for host in (1, 0):  # process 0 last: it fetches part 1 from the bucket and merges
        monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / f"host{host}"))
        summary = build_db.build_db(make_config(**remote), str(tmp_path / f"work{host}"),
                                    process_index=host, process_count=2)
        assert summary["parts"]["written"] == [host]
    assert summary["path"] == remote["db.dir"] and summary["count"] == DB_LIMIT
    assert summary["index"]["path"] == remote["index_dir"]
    assert not os.path.exists(tmp_path / "host1" / os.path.basename(storage.staging_dir(remote["index_dir"])))

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "reader"))
    got = database.Database(storage.stage(remote["db.dir"]))
    want = database.Database(os.path.join(workdir, "db"))
    assert got.count == want.count == DB_LIMIT
    np.testing.assert_array_equal(got.ids, want.ids)
    assert got.captions() == want.captions()
    np.testing.assert_array_equal(build_db.load_image_hashes(got.path), build_db.load_image_hashes(want.path))
    for name in ("latents", "prompt_embeds", "pooled"):  # other batches: float16 ulps at most
        np.testing.assert_allclose(np.asarray(getattr(got, name), np.float32),
                                   np.asarray(getattr(want, name), np.float32), atol=2e-3, rtol=2e-3)
    index = index_lib.Index.load(storage.stage(remote["index_dir"]))
    ref = index_lib.Index.load(os.path.join(workdir, "index"))
    np.testing.assert_array_equal(index.search(np.asarray(want.pooled), 4)[0],
                                  ref.search(np.asarray(want.pooled), 4)[0])
    assert got.manifest["extra"]["skipped"] == want.manifest["extra"]["skipped"]

    # A rerun of host 0 elsewhere (a fresh local copy) encodes nothing: both parts are published.
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "host0-again"))
    again = build_db.build_db(make_config(**remote), str(tmp_path / "work0b"), process_index=0,
                              process_count=2)
    assert again["added"] == 0 and again["parts"]["written"] == [] and again["count"] == DB_LIMIT


def test_build_db_refuses_to_resume_over_other_weights_at_the_same_path(tmp_path):
    """The towers' label is their path: new weights there must not append to the old rows."""
    weights, path = str(tmp_path / "pipe"), str(tmp_path / "db")
    random_pipeline.write_random_pipeline(weights, preset="tiny", seed=0)
    config = lambda limit: make_config(**{"db.dir": path, "db.limit": limit, "encoder_weights": weights})
    assert build_db.build_db(config(10), str(tmp_path))["count"] == 10
    shutil.rmtree(weights)
    random_pipeline.write_random_pipeline(weights, preset="tiny", seed=1)
    with pytest.raises(database.DatabaseError,
                       match=r"built with text_encoder .*weights .*this job's.*overwrite=True"):
        build_db.build_db(config(20), str(tmp_path))
    assert database.Database(path).count == 10  # the old rows are kept


def test_build_db_counts_unreadable_images(workdir, tmp_path):
    src = sources.DigitsSource("eval", size=SIZE)
    for i in src.ids[:5]:
        _png(tmp_path / f"d{i:04d}.png", src.image(i))
        (tmp_path / f"d{i:04d}.txt").write_text(src.caption(i))
    (tmp_path / "d0002_broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (tmp_path / "d0002_broken.txt").write_text("a broken image")
    cfg = make_config(**{"db.dir": str(tmp_path / "db"), "index_dir": str(tmp_path / "index"),
                         "db.source": {"kind": "folder", "root": str(tmp_path)}})
    summary = build_db.build_db(cfg, workdir)
    db = database.Database(str(tmp_path / "db"))
    assert db.count == 5 and summary["skipped"] == {"unreadable image": 1}
    assert db.manifest["extra"]["skipped"] == {"unreadable image": 1}
    assert "d0002_broken.png" in db.manifest["extra"]["skipped_examples"]["unreadable image"][0]


@pytest.fixture(scope="module")
def pairs(workdir, built, tmp_path_factory):
    """A JSONL source of training pairs that collides with the DB on purpose, plus its roles."""
    root = tmp_path_factory.mktemp("pairs")
    db = database.Database(os.path.join(workdir, "db"))
    dsrc = sources.DigitsSource("database", size=SIZE)
    captions = db.captions()
    unique = [int(i) for i, c in zip(db.ids, captions) if captions.count(c) == 1]
    assert len(unique) >= 6
    rows, roles = [], {}

    def add(example_id, image, caption, role):
        name = f"{len(rows):03d}.png"
        if image is None:
            (root / name).write_bytes(b"not an image")
        else:
            _png(root / name, image)
        rows.append({"path": name, "caption": caption, "id": int(example_id)})
        roles[int(example_id)] = role

    for i in unique[:2]:  # the DB entry itself: same id, image and caption
        add(i, dsrc.image(i), dsrc.caption(i), ("self", i))
    for j, i in enumerate(unique[2:5]):  # exact duplicates under a new id
        add(50_000 + j, dsrc.image(i), dsrc.caption(i), ("duplicate", i))
    other = sources.DigitsSource("train", size=SIZE)
    x = unique[5]  # same id and caption as a DB entry, another image: excluded by id only
    add(x, other.image(other.ids[0]), dsrc.caption(x), ("same id", x))
    add(77_777, None, "unreadable", ("broken", None))
    for i in other.ids[1:7]:
        add(i, other.image(i), other.caption(i), ("train", None))
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"kind": "captions", "path": str(root / "pairs.jsonl"), "id_key": "id"}, roles


def _pairs_config(workdir, pairs, name, **overrides):
    return make_config(**{"source": pairs[0], "data_dir": os.path.join(workdir, name),
                          "num_shards": 3, "max_source_items": 0, "k": 2, **overrides})


@pytest.fixture(scope="module")
def precomputed(workdir, pairs):
    cfg = _pairs_config(workdir, pairs, "data")
    manifest = precompute.precompute(cfg, workdir)
    return cfg, manifest


def _read_split(data_dir):
    """Every example of the split through the training input stream (host-local numpy)."""
    it = input_stream.InputStream(data_dir, "train", 1, num_epochs=1, shuffle_buffer=0,
                                include_prompt=True, process_index=0, process_count=1)
    return {int(b["example_id"][0]): {k: v[0] for k, v in b.items()} for b in it}


def _shard_ids(data_dir, schema):
    out = {}
    for name in sorted(f for f in os.listdir(data_dir) if f.endswith(".tfrecord")):
        records = [r.numpy() for r in tfrecords.tf.data.TFRecordDataset(os.path.join(data_dir, name))]
        out[name] = [int(tfrecords.parse_example_numpy(r, schema)["example_id"]) for r in records]
    return out


def test_precompute_end_to_end(workdir, pairs, precomputed):
    cfg, manifest = precomputed
    _, roles = pairs
    data_dir = cfg.data_dir
    assert manifest is not None
    m = tfrecords.validate_manifest(data_dir, split="train", expected={"k": 2, "has_noise": False})
    split = m["splits"]["train"]
    assert split["num_examples"] == len(roles) - 1 and split["num_shards"] == 3
    assert split["skipped"] == {"unreadable image": 1}
    assert m["index"]["kind"] == "exact" and m["index"]["count"] == DB_LIMIT
    assert m["source"]["config"]["kind"] == "captions" and m["k"] == 2

    db = database.Database(os.path.join(workdir, "db"))
    index = index_lib.Index.load(os.path.join(workdir, "index"))
    examples = _read_split(data_dir)
    assert sorted(examples) == sorted(i for i, r in roles.items() if r[0] != "broken")
    for eid, ex in examples.items():
        role, target = roles[eid]
        got = ex["retrieved_ids"]
        assert eid not in got and len(set(got.tolist())) == 2
        assert np.all(np.diff(ex["retrieval_scores"]) <= 1e-6)
        rows = db.rows_for_ids(got)
        np.testing.assert_array_equal(ex["retrieved_latents"], np.asarray(db.latents[rows], np.float32))
        np.testing.assert_array_equal(ex["retrieved_pooled"], db.pooled[rows])
        np.testing.assert_allclose(np.linalg.norm(ex["pooled"]), 1.0, atol=1e-5)
        assert ex["latent"].shape == (SIZE // 2, SIZE // 2, 4)
        if role in ("self", "duplicate", "same id"):
            assert target not in got
            # Control: without the exclusions the colliding DB entry is the nearest neighbour.
            top, _ = index.search(ex["pooled"][None], 1)
            assert top[0, 0] == target
        if role in ("self", "duplicate"):
            np.testing.assert_allclose(ex["latent"], db.latents[db.rows_for_ids([target])[0]],
                                       atol=2e-3)
            assert ex["prompt"] == db.caption(db.rows_for_ids([target])[0])


def test_neighbours_by_id_are_the_inline_records_less_their_arrays(workdir, pairs, precomputed):
    from imagerag_jax.data import neighbour_feed

    cfg = _pairs_config(workdir, pairs, "data_ids", neighbours="ids")
    manifest = precompute.precompute(cfg, workdir)
    assert manifest["schema"]["neighbours"] == "ids" and manifest["precompute"]["neighbours"] == "ids"
    inline_bytes = sum(f["num_bytes"] for f in precomputed[1]["splits"]["train"]["files"])
    assert sum(f["num_bytes"] for f in manifest["splits"]["train"]["files"]) < inline_bytes / 2
    inline, by_id = _read_split(precomputed[0].data_dir), _read_split(cfg.data_dir)
    assert sorted(by_id) == sorted(inline)
    feed = neighbour_feed.open_feed(manifest, tfrecords.Schema.from_dict(manifest["schema"]), hspace=False)
    for eid, ex in by_id.items():
        assert not set(tfrecords.NEIGHBOUR_ARRAYS) & set(ex)
        filled = feed.fill({k: v[None] for k, v in ex.items() if k != "prompt"})
        for field in ("retrieved_ids", "latent", *tfrecords.NEIGHBOUR_ARRAYS):
            np.testing.assert_array_equal(np.asarray(filled[field][0], np.float32),
                                          np.asarray(inline[eid][field], np.float32), err_msg=field)
    with pytest.raises(UserError, match="config.neighbours must be one of inline, ids"):
        precompute.precompute(_pairs_config(workdir, pairs, "data_bad", neighbours="links"), workdir)


def test_precompute_writes_to_a_non_local_filesystem_and_resumes_there(workdir, pairs, precomputed,
                                                                       tmp_path, monkeypatch):
    # ram:// is TensorFlow's in-memory filesystem: what the job writes goes through tf.io.gfile and
    # jsonfiles' URL paths, as to gs://, and the input stream reads it back there.
    # The database and index are read from URLs too: staged to local disk (storage.stage).
    import tensorflow as tf
    from tests.test_storage import upload

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    urls = {"db.dir": "ram://bucket/precompute/db", "index_dir": "ram://bucket/precompute/index"}
    upload(os.path.join(workdir, "db"), urls["db.dir"])
    upload(os.path.join(workdir, "index"), urls["index_dir"])
    url = "ram://bucket/precompute/data"
    manifest = precompute.precompute(_pairs_config(workdir, pairs, "unused", data_dir=url, **urls), workdir)
    assert manifest is not None and not os.path.exists(os.path.join(workdir, "unused"))
    assert tf.io.gfile.exists(f"{url}/precompute_train.json")
    assert manifest["index"]["database"]["path"] == urls["db.dir"]  # where the trainer finds it
    assert os.path.isdir(storage.staging_dir(urls["db.dir"]))
    local = _read_split(precomputed[0].data_dir)
    remote = _read_split(url)
    assert sorted(remote) == sorted(local)
    for eid, ex in remote.items():
        for field, value in ex.items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(local[eid][field]), err_msg=field)
    names = sorted(f for f in tf.io.gfile.listdir(url) if f.endswith(".tfrecord"))
    assert names and all(precompute.shard_done(url, "train", i, 3) for i in range(3))
    again = precompute.precompute(_pairs_config(workdir, pairs, "unused", data_dir=url, **urls), workdir)
    assert again["splits"] == manifest["splits"]  # every shard was done: nothing rewritten
    with pytest.raises(UserError, match="another configuration"):
        precompute.precompute(_pairs_config(workdir, pairs, "unused", data_dir=url, k=1, **urls), workdir)


def test_rerun_skips_finished_shards(workdir, pairs, precomputed):
    cfg, _ = precomputed
    shards = sorted(f for f in os.listdir(cfg.data_dir) if f.endswith(".tfrecord"))
    assert len(shards) == 3
    mtimes = {s: os.stat(os.path.join(cfg.data_dir, s)).st_mtime_ns for s in shards}
    assert precompute.precompute(cfg, workdir) is not None
    assert {s: os.stat(os.path.join(cfg.data_dir, s)).st_mtime_ns for s in shards} == mtimes

    # A shard without its .done marker (manifest part) is rewritten, the others are kept.
    schema = tfrecords.Schema.from_dict(tfrecords.read_manifest(cfg.data_dir)["schema"])
    before = _shard_ids(cfg.data_dir, schema)
    os.remove(os.path.join(cfg.data_dir, tfrecords.PARTS_DIR, "train-00001.json"))
    assert precompute.precompute(cfg, workdir) is not None
    after = {s: os.stat(os.path.join(cfg.data_dir, s)).st_mtime_ns for s in shards}
    assert [after[s] != mtimes[s] for s in shards] == [False, True, False]
    assert _shard_ids(cfg.data_dir, schema) == before


def test_a_moved_workdir_resumes(workdir, pairs, precomputed, tmp_path):
    """The job description pins the database by identity, not by where it lies."""
    cfg, _ = precomputed
    moved = str(tmp_path / "moved")
    shutil.copytree(workdir, moved)
    mcfg = _pairs_config(moved, pairs, "data")
    shards = sorted(f for f in os.listdir(mcfg.data_dir) if f.endswith(".tfrecord"))
    mtimes = {s: os.stat(os.path.join(mcfg.data_dir, s)).st_mtime_ns for s in shards}
    assert precompute.precompute(mcfg, moved) is not None
    assert {s: os.stat(os.path.join(mcfg.data_dir, s)).st_mtime_ns for s in shards} == mtimes

    # A different job configuration in the same directory is refused.
    with pytest.raises(ValueError, match="another configuration"):
        precompute.precompute(_pairs_config(workdir, pairs, "data", k=1), workdir)


def test_two_processes_write_disjoint_covering_shards(workdir, pairs, precomputed):
    cfg = _pairs_config(workdir, pairs, "data_2proc")
    assert precompute.precompute(cfg, workdir, process_index=0, process_count=2) is None
    first = set(f for f in os.listdir(cfg.data_dir) if f.endswith(".tfrecord"))
    assert first == {tfrecords.shard_name("train", i, 3) for i in (0, 2)}
    assert not os.path.exists(os.path.join(cfg.data_dir, tfrecords.MANIFEST))
    manifest = precompute.precompute(cfg, workdir, process_index=1, process_count=2)
    assert manifest is not None
    second = set(f for f in os.listdir(cfg.data_dir) if f.endswith(".tfrecord")) - first
    assert second == {tfrecords.shard_name("train", 1, 3)}
    single = precomputed[1]
    assert manifest["splits"]["train"]["skipped"] == single["splits"]["train"]["skipped"]
    schema = tfrecords.Schema.from_dict(manifest["schema"])
    assert _shard_ids(cfg.data_dir, schema) == _shard_ids(precomputed[0].data_dir, schema)


def test_teacher_mode_stores_noise(workdir, built):
    cfg = make_config("quick,teacher", **{"data_dir": os.path.join(workdir, "data_teacher"),
                                          "num_shards": 2, "max_source_items": 6, "teacher.steps": 2})
    manifest = precompute.precompute(cfg, workdir)
    assert manifest["schema"]["has_noise"] and manifest["latents"] == "teacher"
    assert manifest["precompute"]["teacher"]["guidance"] == 7.5
    examples = _read_split(cfg.data_dir)
    assert len(examples) == 6
    for eid, ex in examples.items():
        want = encoders.example_noise(cfg.seed, [eid], ex["latent"].shape)[0]
        np.testing.assert_array_equal(ex["noise"], want.astype(np.float32))
        assert np.isfinite(ex["latent"]).all() and not np.allclose(ex["latent"], ex["noise"])
        assert eid not in ex["retrieved_ids"]
