"""Test configuration: keep JAX on the CPU and quiet TensorFlow's start-up chatter."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-size configurations (still run in CI)")


import pytest  # noqa: E402

# Under `pytest -n 2 --dist loadgroup` (the README's command) a group runs on one worker: each
# file is a group (module fixtures are built once), the files sharing the session's trained run
# are one, and the real-size SD 2.1 tests are one, so that two of them never hold memory at once.
SHARED_RUN_FIXTURES = {"rag_run", "rag_pipe"}
REAL_SIZE_FILES = {"test_unet", "test_vae", "test_clip_text", "test_latent_lpips", "test_load_memory"}


def pytest_collection_modifyitems(config, items):
    shared = {item.path for item in items if SHARED_RUN_FIXTURES & set(getattr(item, "fixturenames", ()))}
    for item in items:
        stem = item.path.stem
        group = ("shared_run" if item.path in shared else "real_size" if stem in REAL_SIZE_FILES
                 else stem)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def rag_run(tmp_path_factory):
    """One tiny trained run + DB + index for every test file that generates with retrieval."""
    from tests import rag_fixtures

    return rag_fixtures.make_run_and_db(tmp_path_factory.mktemp("rag_run"))


@pytest.fixture(scope="session")
def rag_pipe(rag_run):
    """RagPipeline.from_run over `rag_run` with its DB and index (compiled once per session)."""
    from imagerag_jax.inference import rag

    return rag.RagPipeline.from_run(rag_run["workdir"], database=rag_run["db"], index=rag_run["index"])
