"""Test configuration: keep JAX on the CPU and quiet TensorFlow's start-up chatter."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-size configurations (still run in CI)")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def rag_run(tmp_path_factory):
    """One tiny trained run + DB + index for every test file that generates with retrieval."""
    from tests import rag_fixtures

    return rag_fixtures.make_run_and_db(tmp_path_factory.mktemp("rag_run"))


@pytest.fixture(scope="session")
def rag_pipe(rag_run):
    """RagPipeline.from_run over `rag_run` with its DB and index (compiled once per session)."""
    from imagerag_jax import rag

    return rag.RagPipeline.from_run(rag_run["workdir"], database=rag_run["db"], index=rag_run["index"])
