"""Every way a weight file can be unreadable is one WeightLoadError naming it; the CLI prints one line.

Files of a tiny random pipeline (``random_pipeline.write_random_pipeline``) are damaged in place:
truncated, a garbage header, zero bytes, a directory in their place, torch pickles that hold code.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest

from imagerag_jax import weights
from imagerag_jax.weights import WeightLoadError, random_pipeline, safetensors_io
from imagerag_jax.weights import single_file as sf
from tests import helpers

UNET = os.path.join("unet", "diffusion_pytorch_model.safetensors")
UNET_BIN = os.path.join("unet", "diffusion_pytorch_model.bin")
RAN = "payload-ran"  # the file a pickle's payload writes if it is ever unpickled


class Opaque:
    """A custom class: a weights-only load must refuse an instance of it."""


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: code in a pickle, which must never run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")  # a builtin, so any process could resolve and run it


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    return random_pipeline.write_random_pipeline(str(tmp_path_factory.mktemp("pristine")))


@pytest.fixture
def pipe(pristine, tmp_path) -> str:
    """A fresh copy of the random pipeline for a test to damage."""
    return shutil.copytree(pristine, str(tmp_path / "pipe"))


def _header_length(path: str) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _error(call) -> str:
    with pytest.raises(WeightLoadError) as info:
        call()
    message = str(info.value)
    assert "weights_only=False" not in message, message
    return message


def run_cli(capfd, *args: str, cwd: str) -> helpers.CliResult:
    """The command line in this process (`main.run_cli`; tests/test_cli.py runs it as a user would)."""
    return helpers.cli_in_process(capfd, *args, cwd=cwd)


def _assert_one_error_line(res: helpers.CliResult, path: str, *needles: str) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and path in errors[0], res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "weights_only=False" not in res.stderr + res.stdout
    return errors[0]


# ---------------------------------------------------------------------------- safetensors


def test_truncated_safetensors_is_found_on_open_with_both_sizes(pipe):
    path = os.path.join(pipe, UNET)
    size, length = os.path.getsize(path), _header_length(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    expected = f"header says {size - 8 - length} bytes of tensors, the file has {size // 2 - 8 - length}"
    with pytest.raises(WeightLoadError) as info:
        safetensors_io.SafetensorsFile(path)  # on open, not halfway through a conversion
    assert str(info.value).startswith(f"{path}: truncated ({expected})")
    message = _error(lambda: weights.load_unet(pipe))
    assert path in message and expected in message and "download or copy it again" in message


def _cut_in_header(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(8 + _header_length(path) // 2)


def _garbage_header(path: str) -> None:
    length = _header_length(path)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#" * length)


def _huge_length(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**62))


def _length_beyond_file(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", os.path.getsize(path) + 1000))


def _bad_entry(path: str) -> None:
    header = json.dumps({"conv_in.weight": {"dtype": "F32", "shape": [4]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(16))


def _not_an_object(path: str) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2) + b"[]")


def _short(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(5)


def _zero_bytes(path: str) -> None:
    open(path, "wb").close()


def _directory(path: str) -> None:
    os.remove(path)
    os.mkdir(path)


@pytest.mark.parametrize("damage, needle", [
    (_cut_in_header, "truncated (header says its JSON is"),
    (_garbage_header, "not a safetensors file (the header is not JSON"),
    (_huge_length, "not a safetensors file (its first 8 bytes give a header length of"),
    (_length_beyond_file, "truncated (header says its JSON is"),
    (_bad_entry, "header entry 'conv_in.weight'"),
    (_not_an_object, "the header is a JSON list"),
    (_short, "truncated (5 bytes"),
    (_zero_bytes, "empty (0 bytes)"),
    (_directory, "is a directory"),
], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_damaged_safetensors_is_one_error_naming_the_file(pipe, damage, needle):
    path = os.path.join(pipe, UNET)
    damage(path)
    message = _error(lambda: weights.load_pipeline(pipe))
    assert message.startswith(path + ": ") and needle in message, message
    assert "\n" not in message


def test_a_folder_without_weights_or_with_a_broken_index_names_the_folder(pipe):
    os.remove(os.path.join(pipe, UNET))
    folder = os.path.join(pipe, "unet")
    assert folder in _error(lambda: weights.load_unet(pipe)) and "no weight file" in _error(
        lambda: weights.load_unet(pipe))
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    with open(index, "w") as f:
        f.write('{"weight_map": ')
    message = _error(lambda: weights.load_unet(pipe))
    assert message.startswith(index) and "weight index" in message
    with open(index, "w") as f:
        json.dump({"weight_map": {"conv_in.weight": "shard-1.safetensors"}}, f)
    shard = os.path.join(folder, "shard-1.safetensors")
    assert _error(lambda: weights.load_unet(pipe)) == f"{shard}: does not exist"


def test_a_broken_config_names_its_file(pipe):
    config = os.path.join(pipe, "vae", "config.json")
    with open(config, "w") as f:
        f.write("{not json")
    message = _error(lambda: weights.load_pipeline(pipe))
    assert message.startswith(config) and "not a readable JSON config" in message
    with open(config, "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "down_block_types": ["Bogus2D"]}, f)
    message = _error(lambda: weights.load_vae(pipe))
    assert message.startswith(config + ": ") and "Bogus2D" in message, message
    with open(config, "w") as f:
        json.dump({"_class_name": "AutoencoderKL"}, f)  # defaults: a VAE the weights do not fit
    message = _error(lambda: weights.load_vae(pipe))
    assert message.startswith(f"{os.path.dirname(config)} (vae): checkpoint does not match"), message


# ---------------------------------------------------------------------------- torch pickles


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def _bin_pipe(pipe: str) -> str:
    """The pipeline with its UNet weights to be written as a .bin; returns that path."""
    os.remove(os.path.join(pipe, UNET))
    return os.path.join(pipe, UNET_BIN)


def test_a_pickle_holding_objects_is_refused_without_unpickling(torch, pipe, tmp_path):
    path = _bin_pipe(pipe)
    marker = str(tmp_path / RAN)
    for payload, name in ((Opaque(), "Opaque"), (Payload(marker), "open")):
        torch.save({"conv_in.weight": torch.zeros(1), "extra": payload}, path)
        with pytest.raises(WeightLoadError) as info:
            weights.load_unet(pipe)
        message = str(info.value)
        assert message.startswith(path + ": ") and name in message, message
        for needle in ("weights-only load", "never unpickles code", "safetensors"):
            assert needle in message, (needle, message)
        assert "weights_only=False" not in message
        # torch's own error (advising weights_only=False) is kept out of the traceback as well.
        assert info.value.__cause__ is None and info.value.__suppress_context__
        assert not os.path.exists(marker)


def test_damaged_pickles_are_one_error_naming_the_file(torch, pipe):
    path = _bin_pipe(pipe)
    state = {"conv_in.weight": torch.zeros(1000)}
    cases = []
    torch.save(state, path)
    blob = open(path, "rb").read()
    cases.append((blob[: len(blob) // 2], "zip container is truncated or damaged"))
    torch.save(state, path, _use_new_zipfile_serialization=False)
    legacy = open(path, "rb").read()
    cases.append((legacy[: len(legacy) // 2], "truncated"))
    cases.append((b"\x80\x02" + bytes(range(200, 256)) * 4, "damaged pickle"))
    cases.append((b"hello, not weights", "not a PyTorch weight file"))
    cases.append((b"", "empty (0 bytes)"))
    for data, needle in cases:
        with open(path, "wb") as f:
            f.write(data)
        message = _error(lambda: weights.load_unet(pipe))
        assert message.startswith(path + ": ") and needle in message, (needle, message)
    torch.save(torch.zeros(3), path)
    assert "not a dict of tensors" in _error(lambda: weights.load_unet(pipe))


# ---------------------------------------------------------------------------- single files


def _single_file(path: str) -> str:
    """A small file with the original-layout UNet and VAE anchor keys (enough to be detected)."""
    from safetensors.numpy import save_file

    tensors = {sf.UNET_PREFIX + sf.UNET_ANCHOR: np.ones((32, 4, 3, 3), np.float32),
               sf.VAE_PREFIX + sf.VAE_ANCHOR: np.ones((16, 3, 3, 3), np.float32)}
    save_file(tensors, path)
    return path


def test_single_files_go_through_the_same_checks(torch, tmp_path):
    path = _single_file(str(tmp_path / "model.safetensors"))
    assert sf.detect_components(path) == {"unet", "vae"}
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    for call in (lambda: weights.load_pipeline(path), lambda: sf.infer_unet_config(path),
                 lambda: sf.iter_component_tensors(path, "unet")):
        message = _error(call)
        assert message.startswith(f"{path}: truncated (header says") and "the file has" in message
    assert not sf.is_single_file_checkpoint(path)
    _zero_bytes(path)
    assert _error(lambda: weights.load_pipeline(path)) == (
        f"{path}: empty (0 bytes); {safetensors_io.AGAIN}")
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {sf.UNET_PREFIX + sf.UNET_ANCHOR: torch.zeros(1)},
                "callback": Opaque()}, ckpt)
    message = _error(lambda: weights.load_pipeline(ckpt))
    assert message.startswith(ckpt + ": ") and "never unpickles code" in message
    with open(ckpt, "wb") as f:
        f.write(b"GARBAGE!" * 4)
    assert "not a checkpoint" in _error(lambda: weights.load_pipeline(ckpt))


# ---------------------------------------------------------------------------- the CLI


def test_cli_truncated_safetensors_is_one_error_line(pipe, tmp_path, capfd):
    path = os.path.join(pipe, UNET)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    out = tmp_path / "out.png"
    res = run_cli(capfd, "generate", f"--weights={pipe}", "--height=32", f"--out={out}", cwd=str(tmp_path))
    _assert_one_error_line(res, path, "truncated (header says", "the file has")
    assert not out.exists()


def test_cli_pickle_with_code_is_one_error_line_and_never_runs(torch, pipe, tmp_path, capfd):
    path = _bin_pipe(pipe)
    marker = str(tmp_path / RAN)
    torch.save({"conv_in.weight": torch.zeros(1), "hook": Payload(marker)}, path)
    out = tmp_path / "out.png"
    res = run_cli(capfd, "generate", f"--weights={pipe}", "--height=32", f"--out={out}", cwd=str(tmp_path))
    _assert_one_error_line(res, path, "never unpickles code", "weights-only load")
    assert not out.exists() and not os.path.exists(marker)
