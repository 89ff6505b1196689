"""The input stream (data/input_stream.py): per-process file split, determinism, resume, errors, sharding on a mesh."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from imagerag_jax.data import input_stream
from imagerag_jax.data import tfrecords
from tests import helpers

SCHEMA = tfrecords.Schema(latent_shape=(4, 4, 2), embed_shape=(3, 8), pooled_dim=8, k=2,
                          has_noise=True)
N, SHARDS = 48, 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(i):
    return tfrecords.random_example(SCHEMA, np.random.default_rng(i), example_id=i)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tfrecords"))
    tfrecords.write_examples(out, "train", (_example(i) for i in range(N)), SCHEMA, SHARDS,
                             source="test")
    return out


def _ids(it, n=None):
    batches = [next(it) for _ in range(n)] if n is not None else list(it)
    return [b["example_id"].tolist() for b in batches]


def test_files_split_by_process(data_dir):
    files = [f"f{i}" for i in range(SHARDS)]
    parts = [input_stream.host_files(files, p, 2) for p in range(2)]
    assert sorted(parts[0] + parts[1]) == files and not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="at least one shard per host"):
        input_stream.host_files(files[:1], 0, 2)

    seen = []
    for p in range(2):
        it = input_stream.InputStream(data_dir, "train", 8, seed=3, num_epochs=1,
                                    process_index=p, process_count=2)
        assert it.per_host_batch == 4 and len(it.files) == 3
        ids = sum(_ids(it), [])
        # Round-robin writing puts example i in shard i % SHARDS; this host reads shards p, p+2, ...
        assert sorted(i % SHARDS for i in set(ids)) == sorted(
            i % SHARDS for i in ids) and {i % SHARDS for i in ids} == {p, p + 2, p + 4}
        assert len(ids) == len(set(ids)) == N // 2
        seen.append(set(ids))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N))


def test_batch_contents_and_dtypes(data_dir):
    it = input_stream.InputStream(data_dir, "train", 5, seed=0, include_prompt=True)
    b = next(it)
    assert set(b) == set(SCHEMA.fields)
    assert b["latent"].shape == (5, 4, 4, 2) and b["latent"].dtype == np.float32
    assert b["retrieved_prompt_embeds"].shape == (5, 2, 3, 8)
    assert b["example_id"].dtype == np.int64 and b["retrieved_ids"].shape == (5, 2)
    for j, i in enumerate(b["example_id"]):
        ex = _example(int(i))
        assert b["prompt"][j] == ex["prompt"]
        for name in SCHEMA.fields:
            if name != "prompt":
                np.testing.assert_array_equal(b[name][j], np.asarray(ex[name], b[name].dtype))
    b16 = next(input_stream.InputStream(data_dir, "train", 5, dtype=np.float16,
                                      fields=["latent", "pooled"]))
    assert set(b16) == {"latent", "pooled"} and b16["pooled"].dtype == np.float16


def test_determinism_and_seed(data_dir):
    a = _ids(input_stream.InputStream(data_dir, "train", 8, seed=0), 8)
    b = _ids(input_stream.InputStream(data_dir, "train", 8, seed=0), 8)
    c = _ids(input_stream.InputStream(data_dir, "train", 8, seed=1), 8)
    assert a == b and a != c
    assert sorted(sum(a[:6], [])) == list(range(N))  # the first epoch is a permutation
    assert a[6] != a[0]  # the second epoch is shuffled differently


def test_resume_from_state(data_dir):
    it = input_stream.InputStream(data_dir, "train", 10, seed=5, shuffle_buffer=16)
    _ids(it, 7)  # crosses the epoch boundary (48 examples per epoch)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["batches_consumed"] == 7
    expected = _ids(it, 6)
    fresh = input_stream.InputStream(data_dir, "train", 10, seed=5, shuffle_buffer=16)
    fresh.set_state(state)
    assert _ids(fresh, 6) == expected
    other = input_stream.InputStream(data_dir, "train", 10, seed=6, shuffle_buffer=16)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_num_epochs_stop(data_dir):
    it = input_stream.InputStream(data_dir, "train", 8, num_epochs=2)
    ids = sum(_ids(it), [])
    assert len(ids) == 2 * N and np.all(np.bincount(ids) == 2)
    with pytest.raises(StopIteration):
        next(it)


def _record_offsets(path):
    """Byte offset of each record in a TFRecord file (8-byte length, 4 CRC, data, 4 CRC)."""
    data, offsets, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + int.from_bytes(data[pos:pos + 8], "little")
    return offsets


def test_corrupt_record_names_file_and_index(data_dir, tmp_path):
    bad_dir = str(tmp_path / "bad")
    shutil.copytree(data_dir, bad_dir)
    shard = os.path.join(bad_dir, tfrecords.shard_name("train", 2, SHARDS))
    raw = bytearray(open(shard, "rb").read())
    raw[_record_offsets(shard)[3] + 40] ^= 0xFF  # flip a payload byte of record 3: CRC fails
    open(shard, "wb").write(bytes(raw))  # same size: the manifest check cannot see it
    it = input_stream.InputStream(bad_dir, "train", 4, shuffle_buffer=1)
    with pytest.raises(tfrecords.RecordError, match=r"train-00002-of-00006.tfrecord: record 3"):
        for _ in range(N):
            next(it)


def test_unparsable_record(tmp_path):
    out = str(tmp_path / "mixed")
    other = tfrecords.Schema((2, 4, 2), (3, 8), 8, 2, has_noise=True)
    with tfrecords.ShardWriter(out, "train", SCHEMA, 1) as w:
        w.write(_example(0))
        w.write_serialized(tfrecords.serialize_example(
            tfrecords.random_example(other, np.random.default_rng(0), 1), other))
        w.write(_example(2))
    tfrecords.write_manifest(out, SCHEMA)
    it = input_stream.InputStream(out, "train", 3, shuffle_buffer=1)
    with pytest.raises(tfrecords.RecordError, match=r"train-00000-of-00001.tfrecord: record 1: "
                                                    r"cannot parse \(latent: 32 bytes"):
        next(it)


def test_manifest_checked_before_reading(data_dir, tmp_path):
    with pytest.raises(tfrecords.ManifestError, match="k is 2 but 4 was expected"):
        input_stream.InputStream(data_dir, "train", 4, expected={"k": 4})
    bad_dir = str(tmp_path / "v0")
    shutil.copytree(data_dir, bad_dir)
    m = json.load(open(os.path.join(bad_dir, "manifest.json")))
    json.dump({**m, "schema_version": 0}, open(os.path.join(bad_dir, "manifest.json"), "w"))
    with pytest.raises(tfrecords.ManifestError, match="schema version 0"):
        input_stream.InputStream(bad_dir, "train", 4)
    json.dump(m, open(os.path.join(bad_dir, "manifest.json"), "w"))
    shard = os.path.join(bad_dir, tfrecords.shard_name("train", 4, SHARDS))
    open(shard, "r+b").truncate(100)
    with pytest.raises(tfrecords.ManifestError, match="train-00004-of-00006.tfrecord.*truncated"):
        input_stream.InputStream(bad_dir, "train", 4)
    with pytest.raises(ValueError, match="not divisible"):
        input_stream.InputStream(data_dir, "train", 5, process_count=2, process_index=0)


def _run(script, env_extra, timeout=120):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2", **env_extra}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


MESH_SCRIPT = """
    import sys
    import jax, numpy as np
    from imagerag_jax.data import input_stream
    data_dir = sys.argv[1] if len(sys.argv) > 1 else {data_dir!r}
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    it = input_stream.InputStream(data_dir, "train", 16, mesh=mesh, seed=2)
    ref = next(input_stream.InputStream(data_dir, "train", 16, seed=2))
    b = next(it)
    for name, x in b.items():
        assert isinstance(x, jax.Array), name
        assert x.shape == ref[name].shape, (name, x.shape)
        assert x.sharding.spec[0] == ("data", "fsdp"), x.sharding
        assert {{s.data.shape[0] for s in x.addressable_shards}} == {{2}}
        np.testing.assert_array_equal(np.asarray(x), ref[name].astype(np.asarray(x).dtype))
    assert b["latent"].dtype == np.float32 and b["example_id"].dtype == np.int32
    b = next(input_stream.InputStream(data_dir, "train", 16, mesh=mesh, batch_axes=("data",)))
    assert {{s.data.shape[0] for s in b["latent"].addressable_shards}} == {{8}}
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    b = next(input_stream.InputStream(data_dir, "train", 16, sharding=sharding, dtype=jax.numpy.bfloat16))
    assert b["latent"].sharding == sharding and b["latent"].dtype == jax.numpy.bfloat16
    assert {{s.data.shape[0] for s in b["latent"].addressable_shards}} == {{4}}
    print("MESH OK")
"""


def test_sharded_output_on_mesh(data_dir):
    proc = _run(MESH_SCRIPT.format(data_dir=data_dir),
                {"XLA_FLAGS": helpers.xla_flags(8)})
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0 and "MESH OK" in out, out[-3000:]


TWO_PROCESS_SCRIPT = """
    import sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                               process_id=int(sys.argv[1]))
    from imagerag_jax.data import input_stream
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    it = input_stream.InputStream({data_dir!r}, "train", 16, mesh=mesh, seed=1)
    assert it.per_host_batch == 8 and len(it.files) == 3
    b = next(it)
    assert b["latent"].shape == (16, 4, 4, 2)
    local = np.concatenate([np.asarray(s.data) for s in b["example_id"].addressable_shards])
    shards = sorted({{int(i) % 6 for i in local}})
    assert shards == [jax.process_index(), jax.process_index() + 2, jax.process_index() + 4]
    print("PROCESS", jax.process_index(), "OK", sorted(local.tolist()))
"""


def test_two_processes(data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = TWO_PROCESS_SCRIPT.format(port=port, data_dir=data_dir)
    env = {"XLA_FLAGS": helpers.xla_flags(4)}
    procs = [subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(p)],
        env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
             **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and " OK " in out, out[-3000:]
    ids = [set(json.loads(out.split(" OK ")[1].splitlines()[0])) for out in outs]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 16
