"""The launchers start the job asked for (JOB) with its flags: fake `gcloud` and `srun` record it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fake_bin(folder: Path, name: str) -> Path:
    """An executable `name` that appends its arguments, one per line, to `folder/name.log`."""
    log = folder / f"{name}.log"
    path = folder / name
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {log}\necho --- >> {log}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return log


def run(script: str, args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                          text=True, env=full, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("job", ["build-db", "precompute", "evaluate"])
def test_tpu_pod_runs_the_job_on_every_host(job, tmp_path):
    log = fake_bin(tmp_path, "gcloud")
    env = {"TPU_NAME": "pod", "ZONE": "z", "JOB": job, "WORKDIR": "gs://b/w", "REPO_URL": "https://x/r.git",
           "CONFIG": "configs/precompute_webdataset.py:paths=/d/*.tar"}
    res = run("tpu_pod.sh", ["--out=gs://b/eval" if job == "evaluate" else "--config.db.dir=gs://b/db"],
              env, tmp_path)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().split("---\n")
    command = calls[1].splitlines()[-1]  # setup first, then the job, both with --worker=all
    assert "--worker=all" in calls[1]
    assert f"python3 -m imagerag_jax.main {job}" in command
    if job == "evaluate":
        assert "--config" not in command and command.endswith("--out=gs://b/eval")
    else:
        assert "--workdir gs://b/w" in command and command.endswith("--config.db.dir=gs://b/db")


def test_slurm_runs_the_job_in_every_task(tmp_path):
    log = fake_bin(tmp_path, "srun")
    env = {"JOB": "precompute", "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(ROOT)}
    res = run("gpu_slurm.sbatch", ["configs/precompute_digits.py", "/w", "--config.k=2"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    args = log.read_text().split("---\n")[0].splitlines()
    assert args[args.index("imagerag_jax.main") + 1:] == [
        "precompute", "--config", "configs/precompute_digits.py", "--workdir", "/w", "--config.k=2"]
    log.unlink()
    res = run("gpu_slurm.sbatch", ["--run=/r", "--out=/o"], {**env, "JOB": "evaluate"}, tmp_path)
    assert res.returncode == 0, res.stderr
    args = log.read_text().splitlines()
    assert args[args.index("imagerag_jax.main") + 1:-1] == ["evaluate", "--run=/r", "--out=/o"]
    res = run("gpu_slurm.sbatch", [], {**env, "JOB": "serve"}, tmp_path)
    assert res.returncode == 2 and "error: JOB must be" in res.stderr
