"""The one atomic write (jsonfiles.atomic_write): unique temporaries, old file kept on failure."""

import json
import os

import numpy as np
import pytest

from imagerag_jax import jsonfiles


def test_temp_names_are_unique_and_beside_the_file(tmp_path):
    path = str(tmp_path / "out.json")
    names = {jsonfiles.temp_name(path) for _ in range(100)}
    assert len(names) == 100
    assert all(os.path.dirname(n) == str(tmp_path) and str(os.getpid()) in n for n in names)


def test_json_text_and_binary_writes(tmp_path):
    path = str(tmp_path / "a.json")
    jsonfiles.write_atomic(path, {"b": np.float32(1.5), "a": (1, 2)})
    assert json.loads(open(path).read()) == {"a": [1, 2], "b": 1.5}
    jsonfiles.write_text(str(tmp_path / "t.md"), "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"
    with jsonfiles.atomic_write(str(tmp_path / "x.npy"), "wb") as f:
        np.save(f, np.arange(5))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(5))
    assert sorted(os.listdir(tmp_path)) == ["a.json", "t.md", "x.npy"]  # no temporaries left


def test_an_exception_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = str(tmp_path / "state.json")
    jsonfiles.write_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with jsonfiles.atomic_write(path) as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(open(path).read()) == {"v": 1}
    loop = {"v": 3}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular"):  # json.dump fails part way
        jsonfiles.write_atomic(path, loop, sort_keys=False)
    assert json.loads(open(path).read()) == {"v": 1}
    assert os.listdir(tmp_path) == ["state.json"]


def test_two_writers_never_share_a_temporary(tmp_path):
    """Interleaved writers (as two processes would be) each commit a whole file."""
    path = str(tmp_path / "shared.json")
    with jsonfiles.atomic_write(path) as first:
        first.write('{"who": "first"}')
        with jsonfiles.atomic_write(path) as second:
            assert second.name != first.name
            second.write('{"who": "second"}')
        assert json.loads(open(path).read()) == {"who": "second"}
    assert json.loads(open(path).read()) == {"who": "first"}
    assert os.listdir(tmp_path) == ["shared.json"]


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with jsonfiles.atomic_write(str(tmp_path / "f"), "a"):
            pass
