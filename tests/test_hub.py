"""Weights by Hugging Face hub id (``weights/hub.py``), offline, from a hub cache in its real layout.

The cache is written as huggingface_hub writes it: ``<HF_HOME>/hub/models--org--name/`` with
``blobs/<etag>`` (git blob sha1 for small files, sha256 for LFS weights), ``refs/<branch>``
holding the commit and ``snapshots/<commit>/<repo path>`` as relative symlinks into ``blobs/``.
Its repos hold the tiny random pipeline (``random_pipeline.write_random_pipeline``).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from imagerag_jax import weights
from imagerag_jax.weights import WeightLoadError, convert, hub, random_pipeline, towers
from tests import helpers

REPO = "tiny-org/tiny-sd"
BOTH = "tiny-org/both-formats"  # text encoder as .safetensors and .bin; UNet as .bin only
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def _blob_id(data: bytes, lfs: bool) -> str:
    """The etag huggingface_hub names a blob by: sha256 for LFS files, git's blob sha1 otherwise."""
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_cached_repo(cache: str, repo_id: str, folder: str, commit: str,
                      refs: tuple[str, ...] = ("main",)) -> str:
    """Adds `folder`'s files to the hub cache `cache` as `repo_id` at `commit`; its snapshot."""
    storage = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            blob = os.path.join(storage, "blobs", _blob_id(data, name.endswith(LFS_SUFFIXES)))
            if not os.path.exists(blob):
                with open(blob, "wb") as f:
                    f.write(data)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(storage, "refs", ref), "w") as f:
            f.write(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> str:
    return random_pipeline.write_random_pipeline(str(tmp_path_factory.mktemp("local") / "tiny-sd"))


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, pipeline_dir) -> str:
    """HF_HOME with REPO at COMMIT (main, v1) and at OLD_COMMIT (another seed), and BOTH."""
    home = str(tmp_path_factory.mktemp("hf_home"))
    cache = os.path.join(home, "hub")
    write_cached_repo(cache, REPO, pipeline_dir, COMMIT, refs=("main", "v1"))
    old = random_pipeline.write_random_pipeline(str(tmp_path_factory.mktemp("old")), seed=1)
    write_cached_repo(cache, REPO, old, OLD_COMMIT, refs=())

    import torch  # a .bin as transformers and diffusers save it: a torch pickle of the state dict
    from safetensors.numpy import load_file

    both = str(tmp_path_factory.mktemp("both"))
    shutil.copytree(pipeline_dir, both, dirs_exist_ok=True)
    text = os.path.join(both, "text_encoder")
    # Not a pickle at all: loading it would fail, so a load that works read the safetensors.
    with open(os.path.join(text, "pytorch_model.bin"), "wb") as f:
        f.write(b"not the weights to read")
    unet = os.path.join(both, "unet", "diffusion_pytorch_model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(unet).items()},
               os.path.join(both, "unet", "diffusion_pytorch_model.bin"))
    os.remove(unet)
    write_cached_repo(cache, BOTH, both, COMMIT)
    return home


@pytest.fixture
def offline_hub(hf_home, monkeypatch) -> str:
    """The cache in the environment, offline; huggingface_hub read its constants at import, so
    `hub` must read them at call time."""
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_COMMITS", {})
    return os.path.join(hf_home, "hub")


def test_spec_forms():
    assert hub.parse_hub_id("stabilityai/sd-turbo") == ("stabilityai/sd-turbo", None)
    assert hub.parse_hub_id("stabilityai/stable-diffusion-2-1-base@refs/pr/1") == (
        "stabilityai/stable-diffusion-2-1-base", "refs/pr/1")
    for not_id in ("sd-turbo", "./org/name", "/org/name", "a/b/c", "org/../x", "org/na--me",
                   "gs://bucket/x", "org/name@", "org/name@a@b", "org /name"):
        assert hub.parse_hub_id(not_id) is None, not_id


def test_local_path_wins_and_stays_a_path(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/name")
    assert hub.resolve("org/name") == hub.Weights("org/name", "org/name")
    # Not the id form and missing: the loaders' own "does not exist".
    with pytest.raises(WeightLoadError, match=r"^missing/a/b does not exist$"):
        weights.load_pipeline("missing/a/b")


def test_generate_by_hub_id_offline_matches_local_folder(offline_hub, pipeline_dir, tmp_path, capfd):
    args = ("generate", "--prompt", "a red square", "--height", "64", "--seed", "3")
    local = helpers.cli_in_process(capfd, *args, "--weights", pipeline_dir, "--out", "local.png",
                                   cwd=str(tmp_path))
    assert local.returncode == 0, local.stderr
    by_id = helpers.cli_in_process(capfd, *args, "--weights", REPO, "--out", "hub.png",
                                   cwd=str(tmp_path))
    assert by_id.returncode == 0, by_id.stderr
    assert (tmp_path / "hub.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_revisions(offline_hub):
    snapshots = os.path.join(offline_hub, "models--tiny-org--tiny-sd", "snapshots")
    for spec, commit in ((REPO, COMMIT), (f"{REPO}@main", COMMIT), (f"{REPO}@v1", COMMIT),
                         (f"{REPO}@{COMMIT}", COMMIT), (f"{REPO}@{OLD_COMMIT}", OLD_COMMIT)):
        w = hub.resolve(spec)
        assert (w.repo_id, w.commit, w.label) == (REPO, commit, f"{REPO}@{commit}"), spec
        assert os.path.samefile(w.path, os.path.join(snapshots, commit)), spec
        assert w.revision == (spec.split("@")[1] if "@" in spec else "main")
    # The pinned commit is other weights: the same tower, another fingerprint.
    new = weights.load_vae(f"{REPO}@main")[1]
    old = weights.load_vae(f"{REPO}@{OLD_COMMIT}")[1]
    assert towers.fingerprint(new) != towers.fingerprint(old)
    pipe = weights.load_pipeline(f"{REPO}@{OLD_COMMIT}")
    assert pipe.source == f"{REPO}@{OLD_COMMIT}"
    assert towers.fingerprint(pipe.vae_params) == towers.fingerprint(old)


@pytest.mark.parametrize("spec, why", [
    ("nobody/no-such-model", "not in the hub cache"),
    (f"{REPO}@v9", "revision 'v9'"),
    ("nobody/no-such-model@0123456789abcdef0123456789abcdef01234567", "not in the hub cache"),
])
def test_missing_id_offline_is_one_error_line(offline_hub, tmp_path, capfd, spec, why):
    result = helpers.cli_in_process(capfd, "generate", "--weights", spec, "--height", "64",
                                    cwd=str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {spec}: "), result.stderr
    assert why in lines[0] and "HF_HUB_OFFLINE" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_config_weight_fields_record_repo_and_commit(offline_hub, pipeline_dir):
    common = dict(preset="tiny", seed=0, compute_dtype=np.float32, param_dtype=np.float32)
    module, params, ref = towers.load_tower("unet", REPO, **common)
    assert ref["hub"] == f"{REPO}@{COMMIT}" and ref["revision"] == "main"
    assert os.path.basename(ref["path"]) == COMMIT
    _, local_params, local_ref = towers.load_tower("unet", pipeline_dir, **common)
    assert local_ref == {"path": os.path.abspath(pipeline_dir)}
    # Compatibility is by fingerprint: the local folder and the hub id are the same weights.
    assert towers.fingerprint(params) == towers.fingerprint(local_params)
    towers.check_frozen({"student": {**local_ref, "fingerprint": towers.fingerprint(local_params)}},
                        {"student": {**ref, "fingerprint": towers.fingerprint(params)}})

    config = {"student_weights": REPO, "teacher_weights": f"{REPO}@{COMMIT}", "vae_weights": None,
              "random_preset": "tiny", "random_seed": 0, "compute_dtype": "float32",
              "frozen_param_dtype": "float32", "random_prediction_type": "epsilon"}
    refs = towers.frozen_towers(config).references()
    assert refs["student"]["hub"] == refs["vae"]["hub"] == f"{REPO}@{COMMIT}"  # VAE: student's vae/
    assert refs["teacher"]["hub"] == f"{REPO}@{COMMIT}" and refs["teacher"]["revision"] == COMMIT
    _, _, tok, source = towers.text_tower(config)
    assert source == f"{REPO}@{COMMIT}" and os.path.isfile(os.path.join(tok, "vocab.json"))

    job = towers.load_job_towers({"encoder_weights": REPO}, workdir="unused")
    assert job.label == f"{REPO}@{COMMIT}" and job.text_encoder_id.startswith(f"{REPO}@{COMMIT}#")
    # A database written from the local folder (its label a path) is these weights' database.
    from imagerag_jax.retrieval import database

    mine = job.encoders()
    local_label = os.path.abspath(pipeline_dir)
    database.check_encoders("db", {
        "text_encoder": towers.module_identity(local_label, job.pipe.text_encoder),
        "vae": towers.module_identity(local_label, job.pipe.vae),
        "extra": {"text_encoder_fingerprint": mine.text_encoder_fingerprint,
                  "vae_fingerprint": towers.fingerprint(weights.load_vae(pipeline_dir)[1])}}, mine)


def test_safetensors_first_bin_only_where_none(offline_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls, read = [], []
    real_download, real_read = huggingface_hub.snapshot_download, convert.iter_weight_file

    def recording_download(repo_id, **kwargs):
        calls.append(kwargs["allow_patterns"])
        return real_download(repo_id, **kwargs)

    def recording_read(path, *args, **kwargs):
        read.append(os.path.relpath(path, snapshot))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording_download)
    monkeypatch.setattr(convert, "iter_weight_file", recording_read)
    snapshot = hub.resolve(BOTH).path
    weights.load_pipeline(BOTH)

    listing = sorted(os.path.relpath(os.path.join(d, n), snapshot)
                     for d, _, names in os.walk(snapshot) for n in names)
    # What an online download would take: the library's own filter over the repo's listing.
    first = set(filter_repo_objects(listing, allow_patterns=calls[0]))
    assert "text_encoder/model.safetensors" in first and "vae/diffusion_pytorch_model.safetensors" in first
    assert not any(f.endswith(".bin") for f in first)
    assert "tokenizer/vocab.json" in first and "scheduler/scheduler_config.json" in first
    # The UNet alone has no safetensors: its .bin, and nothing else, is fetched second.
    assert set(filter_repo_objects(listing, allow_patterns=calls[1])) == {
        "unet/diffusion_pytorch_model.bin"}
    assert all(set(filter_repo_objects(listing, allow_patterns=c)) <= first for c in calls[2:] if
               not any(p.endswith(".bin") for p in c))
    assert sorted(set(read)) == ["text_encoder/model.safetensors",
                                 "unet/diffusion_pytorch_model.bin",
                                 "vae/diffusion_pytorch_model.safetensors"]


def test_describe_a_snapshot_path(offline_hub):
    w = hub.resolve(REPO)
    assert hub.label(w.path) == f"{REPO}@{COMMIT}"
    assert hub.label(os.path.join(w.path, "vae")) == f"{REPO}@{COMMIT}/vae"
    assert hub.describe(w.path).repo_id == REPO
    assert hub.label("relative/dir") == os.path.abspath("relative/dir")


@pytest.mark.parametrize("error, why", [
    ("RepositoryNotFoundError", "no model repository nobody/private-model on the Hugging Face Hub"),
    ("RevisionNotFoundError", "has no revision 'main' of nobody/private-model"),
])
def test_online_errors_name_the_id(hf_home, monkeypatch, error, why):
    """Online (no HF_HUB_OFFLINE), what the hub answers for a repo or revision it does not have."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    def not_found(repo_id, **kwargs):
        assert kwargs["local_files_only"] is False and kwargs["cache_dir"].startswith(hf_home)
        cls = getattr(hub_errors, error)
        raised = cls.__new__(cls)  # without the HTTP response its constructor wants (which
        Exception.__init__(raised, "404 Client Error")  # differs between huggingface_hub versions)
        raise raised

    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(WeightLoadError) as info:
        towers.load_tower("vae", "nobody/private-model", preset="tiny", seed=0,
                          compute_dtype=np.float32, param_dtype=np.float32)
    message = str(info.value)
    assert message.startswith("nobody/private-model: ") and why in message and "\n" not in message


def test_tokenizer_by_hub_id(offline_hub, pipeline_dir):
    """--tokenizer / config.tokenizer as a pipeline's hub id: its tokenizer/ folder."""
    folder = hub.tokenizer_dir(REPO)
    assert hub.label(folder) == f"{REPO}@{COMMIT}/tokenizer"
    assert hub.tokenizer_dir(os.path.join(pipeline_dir, "tokenizer")) == os.path.join(
        pipeline_dir, "tokenizer")
    ids = weights.load_pipeline(pipeline_dir, tokenizer_path=REPO).tokenizer(["a red square"])
    assert ids.shape == (1, 77)
