"""Test configuration: keep JAX on the CPU, quiet TensorFlow's start-up chatter, share one
persistent XLA compilation cache across the session, and schedule the xdist groups longest first."""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests check values and plumbing, not the speed of the generated code: LLVM's optimisation
# level 0 leaves XLA's HLO passes (fusion, layout, the programs' maths) as they are and only skips
# the machine-code optimisation, which is most of a CPU compile (the digits smoke run: 177 s ->
# 131 s; the SD 2.1 UNet and VAE parity files: 25% less CPU time). XLA's older loop emitters for
# fused elementwise code compile faster than its MLIR fusion emitters (the 2x4-mesh sharding
# script: 44 -> 29 CPU-s; digits smoke compile 56 -> 41 s); their float results may differ in the
# last bits between two programs that fuse the same maths differently, so the few tests that need
# such programs bit for bit run under XLA's default emitters (helpers.rerun_with_default_emitters).
# Every process of the session (the xdist workers and the subprocesses they start, see
# helpers.xla_flags) compiles with these flags.
FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if not os.environ.get("IMAGERAG_TEST_DEFAULT_EMITTERS"):
    FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
for _flag in FAST_COMPILE:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# One persistent compilation cache for the whole session: the controller makes it before the
# xdist workers start, they and every subprocess they launch (the CLI end-to-end runs) inherit it
# through the environment, so a function compiled once (same HLO, same flags) is loaded, not
# recompiled, by the next process or the next jax.jit of a fresh closure. A cached executable is
# the one XLA compiled, so results are unchanged. A JAX_COMPILATION_CACHE_DIR already set is kept.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="imagerag-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


# A full (generation 2) collection walks every live object: in an xdist worker that has run a few
# hundred tests that is ~2M objects (the imported libraries, JAX's traced programs) and ~2 s, and
# CPython's default (one every 10 generation-1 collections, once the old generation has grown by a
# quarter) ran 34-38 of them per worker, 50-80 s of a 12-minute session. One per 100 generation-1
# collections keeps a few per worker (test_train + test_rag + test_export + test_lora +
# test_adapter in one process: 19 full collections, 7.1 s -> 5, 3.8 s). Young garbage is
# collected as before. (gc.freeze() of the imports made it worse: 29 full collections, 38.6 s.)
gc.set_threshold(gc.get_threshold()[0], gc.get_threshold()[1], 100)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-size configurations (still run in CI)")
    config.addinivalue_line("markers", "xdist_group(name): the xdist group (also without xdist)")
    # Run the groups in the order pytest_collection_modifyitems leaves them (longest first), not
    # xdist's default of most tests first.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    if _OWN_CACHE is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


import pytest  # noqa: E402

# Under `pytest -n 2 --dist loadgroup` (the README's command) a group runs on one worker: each
# file is a group (module fixtures are built once), the files sharing the session's trained run
# are one, the compositional smoke run's tests are one (it is computed once), and the real-size
# SD 2.1 tests are one, so that two of them never hold memory at once.
SHARED_RUN_FIXTURES = {"rag_run", "rag_pipe"}
COMPOSE_FIXTURES = {"compose_smoke"}
REAL_SIZE_FILES = {"test_unet", "test_vae", "test_clip_text", "test_latent_lpips", "test_load_memory"}

# Seconds per group, from `--durations=0` of a 2026-12-08 run (2-core AMD EPYC, both workers busy);
# groups start longest first so that the two workers finish together. Only the order matters.
# Unlisted groups count 0 and keep their collection order after the listed ones.
GROUP_SECONDS = {
    "compose_run": 337, "shared_run": 236, "test_train": 222, "real_size": 198,
    "test_multihost": 149, "test_miniature": 144, "test_notebooks": 97,
    "test_build_db_multihost": 83, "test_miniature_prediction": 76, "test_sharding": 71,
    "test_benchmark_gpu": 69, "test_grad_accum": 65, "test_flops": 59,
    "test_benchmark_precompute": 55, "test_single_file": 48, "test_cli": 47, "test_aot": 43,
    "test_record_options": 95, "test_pipeline": 40, "test_precompute": 110, "test_judge": 35, "test_benchmark_rag": 35,
    "test_webdataset": 29, "test_text_sides": 21, "test_readme_api": 21, "test_export": 21,
    "test_weight_errors": 20, "test_encoders_devices": 20, "test_hub": 19, "test_export_runtime": 19,
}


def _group(item) -> str:
    fixtures = set(getattr(item, "fixturenames", ()))
    if COMPOSE_FIXTURES & fixtures:
        return "compose_run"
    if SHARED_RUN_FIXTURES & fixtures:
        return "shared_run"
    return "real_size" if item.path.stem in REAL_SIZE_FILES else item.path.stem


# tryfirst: xdist's worker adds the `@group` suffix that --dist loadgroup schedules by in its own
# pytest_collection_modifyitems; the marks must be on the items before that hook runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    by_path = {}
    for item in items:  # a file goes wholly to the group of a run that any of its tests share
        g = _group(item)
        if by_path.get(item.path) not in ("compose_run", "shared_run"):
            by_path[item.path] = g
    groups = {item: by_path[item.path] for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item]))
    # A stable sort: longest groups first, tests keep their order within a group.
    items.sort(key=lambda item: -GROUP_SECONDS.get(groups[item], 0))


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


@pytest.fixture(scope="session")
def compose_smoke(tmp_path_factory):
    """One `main run --config configs/compose.py:smoke,novel=9,arms` for the session (its tests are
    one xdist group): (workdir, results.json, stdout). A test that changes the run copies it."""
    from tests import helpers

    return helpers.compose_smoke_run(tmp_path_factory.mktemp("compose_smoke"))
