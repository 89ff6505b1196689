"""TFRecord schema: round trip of every field, shard writer, manifest validation."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from imagerag_jax.data import tfrecords

SCHEMA = tfrecords.Schema(latent_shape=(4, 4, 2), embed_shape=(3, 8), pooled_dim=8, k=2,
                          has_noise=True)


def _example(i, schema=SCHEMA):
    ex = tfrecords.random_example(schema, np.random.default_rng(i), example_id=i)
    ex["prompt"] = f"prompt {i} ünïcode"
    ex["retrieved_ids"] = np.array([2**40 + i, 7], np.int64)  # int64 range survives
    return ex


def _assert_same(parsed, ex):
    for name in ex:
        got = parsed[name]
        if name == "prompt":
            got = got.decode("utf-8") if isinstance(got, bytes) else got
            assert got == ex[name]
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ex[name]))
            assert np.asarray(got).dtype == np.dtype(tfrecords.STORED_DTYPES[name]), name


def test_schema_fields_and_shapes():
    shapes = SCHEMA.shapes()
    assert set(shapes) == set(tfrecords.STORED_DTYPES) - {"retrieved_hspace"}
    assert shapes["retrieved_latents"] == (2, 4, 4, 2) and shapes["retrieval_scores"] == (2,)
    baseline = tfrecords.Schema((4, 4, 2), (3, 8), 8, k=0)
    assert set(baseline.fields) == {"prompt", "latent", "prompt_embeds", "pooled", "example_id"}
    assert tfrecords.Schema.from_dict(SCHEMA.to_dict()) == SCHEMA
    assert tfrecords.schema_of(_example(0)) == SCHEMA


def test_neighbours_by_id_and_as_hspace():
    by_id = dataclasses.replace(SCHEMA, neighbours="ids")
    assert set(SCHEMA.fields) - set(by_id.fields) == set(tfrecords.NEIGHBOUR_ARRAYS)
    hspace = dataclasses.replace(SCHEMA, hspace_shape=(1, 1, 6))
    assert set(SCHEMA.fields) - set(hspace.fields) == {"retrieved_latents", "retrieved_prompt_embeds"}
    assert hspace.shapes()["retrieved_hspace"] == (2, 1, 1, 6)
    for schema in (by_id, hspace):
        assert tfrecords.Schema.from_dict(schema.to_dict()) == schema
        ex = tfrecords.random_example(schema, np.random.default_rng(1), example_id=5)
        assert tfrecords.schema_of(ex) == schema
        data = tfrecords.serialize_example(ex, schema)
        _assert_same(tfrecords.parse_example_numpy(data, schema), ex)
        _assert_same({k: v.numpy() for k, v in tfrecords.parse_example(data, schema).items()}, ex)
    # Manifests written before the options store their neighbours inline.
    old = {k: v for k, v in SCHEMA.to_dict().items() if k != "neighbours"}
    assert tfrecords.Schema.from_dict(old) == SCHEMA
    with pytest.raises(ValueError, match="neighbours must be one of"):
        dataclasses.replace(SCHEMA, neighbours="links")
    with pytest.raises(ValueError, match="by id carry no H-space"):
        dataclasses.replace(by_id, hspace_shape=(1, 1, 6))


def test_roundtrip_every_field():
    ex = _example(3)
    ex_f32 = {k: (v.astype(np.float32) if getattr(v, "dtype", None) == np.float16 else v)
              for k, v in ex.items()}
    data = tfrecords.serialize_example(ex_f32, SCHEMA)  # float32 inputs are cast to f16
    assert data == tfrecords.serialize_example(ex)
    _assert_same({k: v.numpy() for k, v in tfrecords.parse_example(data, SCHEMA).items()}, ex)
    _assert_same(tfrecords.parse_example_numpy(data, SCHEMA), ex)
    batch = tfrecords.parse_example(tf.constant([data, tfrecords.serialize_example(_example(4))]),
                                    SCHEMA)
    assert batch["retrieved_prompt_embeds"].shape == (2, 2, 3, 8)
    _assert_same({k: v[1].numpy() for k, v in batch.items()}, _example(4))

    baseline = tfrecords.Schema((4, 4, 2), (3, 8), 8, k=0)
    ex0 = {k: v for k, v in ex.items() if k in baseline.fields}
    _assert_same(tfrecords.parse_example_numpy(tfrecords.serialize_example(ex0), baseline), ex0)


def test_serialize_validation():
    ex = _example(0)
    with pytest.raises(ValueError, match="latent.*shape"):
        tfrecords.serialize_example({**ex, "latent": np.zeros((4, 4, 3))}, SCHEMA)
    with pytest.raises(ValueError, match="missing fields"):
        tfrecords.serialize_example({k: v for k, v in ex.items() if k != "noise"}, SCHEMA)
    small = tfrecords.Schema((2, 4, 2), (3, 8), 8, 2, has_noise=True)
    wrong = tfrecords.serialize_example(_example(0, small), small)
    with pytest.raises(ValueError, match="latent: 32 bytes, expected 64"):
        tfrecords.parse_example_numpy(wrong, SCHEMA)


def _write_set(out_dir, n=10, num_shards=3, split="train"):
    with tfrecords.ShardWriter(str(out_dir), split, SCHEMA, num_shards) as w:
        for i in range(n):
            w.write(_example(i))
        w.skip("unreadable image", 2)
    return tfrecords.write_manifest(str(out_dir), SCHEMA, source={"kind": "digits"},
                                    index_params={"kind": "scann", "num_leaves": 10})


def test_writer_and_manifest(tmp_path):
    m = _write_set(tmp_path)
    names = sorted(f for f in os.listdir(tmp_path) if f.endswith(".tfrecord"))
    assert names == [f"train-{i:05d}-of-00003.tfrecord" for i in range(3)]
    split = m["splits"]["train"]
    assert split["num_examples"] == 10 and [f["num_examples"] for f in split["files"]] == [4, 3, 3]
    assert split["skipped"] == {"unreadable image": 2}
    on_disk = json.load(open(tmp_path / "manifest.json"))
    assert on_disk["schema_version"] == tfrecords.SCHEMA_VERSION and on_disk["k"] == 2
    assert on_disk["shapes"]["latent"] == [4, 4, 2] and on_disk["dtypes"]["latent"] == "float16"
    assert on_disk["index"]["num_leaves"] == 10 and on_disk["source"] == {"kind": "digits"}
    tfrecords.validate_manifest(str(tmp_path), split="train", expected=SCHEMA)
    tfrecords.validate_manifest(str(tmp_path), expected={"k": 2, "latent_shape": (4, 4, 2)})
    # Every record of every shard parses back, in round-robin order.
    ids = []
    for path, count in tfrecords.split_files(str(tmp_path), m, "train"):
        recs = [r.numpy() for r in tf.data.TFRecordDataset(path)]
        assert len(recs) == count
        ids += [int(tfrecords.parse_example_numpy(r, SCHEMA)["example_id"]) for r in recs]
    assert sorted(ids) == list(range(10))
    assert tfrecords.find_bad_record([p for p, _ in tfrecords.split_files(
        str(tmp_path), m, "train")], SCHEMA) is None


def test_multi_writer_parts(tmp_path):
    # Two "hosts" write disjoint shards of one split; one merges the manifest.
    for p in range(2):
        with tfrecords.ShardWriter(str(tmp_path), "eval", SCHEMA, 4, range(p, 4, 2)) as w:
            for i in range(p, 8, 2):
                w.write(_example(i))
    m = tfrecords.write_manifest(str(tmp_path), SCHEMA)
    assert m["splits"]["eval"]["num_examples"] == 8
    os.remove(tmp_path / tfrecords.PARTS_DIR / "eval-00001.json")
    with pytest.raises(tfrecords.ManifestError, match="missing"):
        tfrecords.write_manifest(str(tmp_path), SCHEMA)


def test_validate_manifest_errors(tmp_path):
    with pytest.raises(tfrecords.ManifestError, match="no manifest.json"):
        tfrecords.validate_manifest(str(tmp_path))
    m = _write_set(tmp_path)
    mpath = tmp_path / "manifest.json"
    with pytest.raises(tfrecords.ManifestError, match="k is 2 but 4 was expected"):
        tfrecords.validate_manifest(str(tmp_path), expected={"k": 4})
    with pytest.raises(tfrecords.ManifestError, match="latent_shape"):
        tfrecords.validate_manifest(str(tmp_path), expected={"latent_shape": [8, 8, 4]})
    with pytest.raises(tfrecords.ManifestError, match="no split 'eval'"):
        tfrecords.validate_manifest(str(tmp_path), split="eval")
    json.dump({**m, "schema_version": 0}, open(mpath, "w"))
    with pytest.raises(tfrecords.ManifestError, match="schema version 0"):
        tfrecords.validate_manifest(str(tmp_path))
    json.dump({**m, "shapes": {**m["shapes"], "pooled": [9]}}, open(mpath, "w"))
    with pytest.raises(tfrecords.ManifestError, match="inconsistent"):
        tfrecords.validate_manifest(str(tmp_path))
    json.dump(m, open(mpath, "w"))
    shard = tmp_path / "train-00001-of-00003.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(tfrecords.ManifestError, match="train-00001-of-00003.tfrecord.*truncated"):
        tfrecords.validate_manifest(str(tmp_path))
    os.remove(shard)
    with pytest.raises(tfrecords.ManifestError, match="missing"):
        tfrecords.validate_manifest(str(tmp_path))
    tfrecords.validate_manifest(str(tmp_path), check_files=False)
