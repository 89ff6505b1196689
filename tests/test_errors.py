"""One error path: every mistake a user can fix ends as one `error:` line and exit status 2.

Each test runs a command line in this process through `main.run_cli` and reads stderr with
`capsys`; a bad flag or override must fail before the workdir is made.
"""

from __future__ import annotations

import os

import ml_collections
import pytest

from imagerag_jax import config_args, main
from imagerag_jax.data import mixture, sources
from imagerag_jax.errors import UserError
from imagerag_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def config(name: str) -> str:
    return os.path.join(ROOT, "configs", name)


def one_error_line(capsys, *args: str) -> str:
    """Runs `main SUBCOMMAND args` in-process; asserts exit 2 and one `error:` line; returns it."""
    status = main.run_cli(["main", *args])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_remat_fails_before_the_workdir_is_made(capsys, tmp_path):
    workdir = tmp_path / "run"
    line = one_error_line(capsys, "train", "--config", TINY, "--config.remat=bogus",
                          "--workdir", str(workdir))
    assert "unknown remat 'bogus'" in line and "'full'" in line
    assert not workdir.exists()


def test_unknown_config_field_names_it_and_the_nearest_fields(capsys, tmp_path):
    workdir = tmp_path / "run"
    line = one_error_line(capsys, "train", "--config", TINY, "--config.total_step=5",
                          "--workdir", str(workdir))
    assert "'total_step'" in line and "total_steps" in line
    line = one_error_line(capsys, "train", "--config", TINY, "--config.no_such_field=1",
                          "--workdir", str(workdir))
    assert "'no_such_field'" in line and "nearest: " in line
    line = one_error_line(capsys, "train", "--config", TINY, "--config.lora.rnk=2",
                          "--workdir", str(workdir))
    assert "config.lora" in line and "'rnk'" in line and "rank" in line
    assert not workdir.exists()


def test_override_of_the_wrong_type(capsys, tmp_path):
    line = one_error_line(capsys, "train", "--config", TINY, "--config.total_steps=many",
                          "--workdir", str(tmp_path / "run"))
    assert "--config.total_steps=many" in line
    assert not (tmp_path / "run").exists()


def test_a_flag_of_another_subcommand(capsys, tmp_path):
    line = one_error_line(capsys, "export", "--workdir", str(tmp_path), "--out", str(tmp_path / "x"))
    assert line.startswith("error: export does not take --out (did you mean --out_dir?)")
    line = one_error_line(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "run"),
                          "--seed=3")
    assert "train does not take --seed" in line
    assert not (tmp_path / "run").exists()


def test_missing_required_flags(capsys, tmp_path):
    line = one_error_line(capsys, "build-db", "--config", config("precompute_digits.py"))
    assert "build-db needs --config" in line and "--workdir" in line
    line = one_error_line(capsys, "export", "--workdir", str(tmp_path))
    assert "--out_dir" in line


def test_unknown_flag_and_subcommand(capsys):
    assert "'nosuchflag'" in one_error_line(capsys, "train", "--nosuchflag=1")
    assert "usage: python -m imagerag_jax.main" in one_error_line(capsys, "paint")
    assert "no subcommand" in one_error_line(capsys)
    assert "unexpected 'extra'" in one_error_line(capsys, "train", "extra")


def test_config_file_errors(capsys, tmp_path):
    line = one_error_line(capsys, "train", "--config", TINY + ":bogus", "--workdir", str(tmp_path))
    assert "unknown config arg 'bogus'" in line
    line = one_error_line(capsys, "precompute", "--config", config("precompute_webdataset.py"),
                          "--workdir", str(tmp_path))
    assert "needs paths=" in line
    line = one_error_line(capsys, "train", "--config", config("no_such_config.py"),
                          "--workdir", str(tmp_path))
    assert "no_such_config.py: no such file" in line
    assert os.listdir(tmp_path) == []


def test_precompute_without_a_database(capsys, tmp_path):
    line = one_error_line(capsys, "precompute", "--config", config("precompute_digits.py") + ":quick",
                          "--workdir", str(tmp_path / "w"))
    assert "retrieval database" in line and "does not exist" in line


def test_calls_in_one_process_start_from_the_defaults(capsys, tmp_path):
    """Overrides, --config and other flags of one call do not leak into the next."""
    workdir = str(tmp_path / "run")
    one_error_line(capsys, "train", "--config", TINY, "--config.total_step=5", "--workdir", workdir)
    line = one_error_line(capsys, "precompute", "--config", config("precompute_webdataset.py"),
                          "--workdir", workdir)
    assert "needs paths=" in line  # another --config, not tiny's
    line = one_error_line(capsys, "train", "--config", TINY, "--config.total_step=6", "--workdir", workdir)
    assert "'total_step'" in line  # the same override flag again: defined afresh
    line = one_error_line(capsys, "export", "--workdir", workdir)
    assert "--out_dir" in line  # --config of the calls before is not "given" to export
    assert not os.path.exists(workdir)


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken() -> None:
        raise RuntimeError("a bug, not the user's mistake")

    monkeypatch.setitem(main.SUBCOMMANDS, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main.run_cli(["main", "train", "--config", TINY, "--workdir", str(tmp_path)])


def test_library_raise_sites_are_user_errors():
    assert issubclass(UserError, ValueError)  # `except ValueError` callers still catch them
    with pytest.raises(UserError, match="unknown remat"):
        trainer.check_config(ml_collections.ConfigDict(dict(remat="bogus")))
    with pytest.raises(UserError, match="unknown config arg 'steps'"):
        config_args.parse_arg("steps=3", total_steps=1)
    with pytest.raises(UserError, match="unknown source kind"):
        sources.make_source({"kind": "nope"})
    with pytest.raises(UserError, match="not both"):
        mixture.config_sets(ml_collections.ConfigDict(dict(data_dir="/a", data_mixture=(("/b", 1.0),))))
    assert issubclass(mixture.MixtureError, UserError)



def test_a_mesh_that_does_not_fit_the_devices(tmp_path, capsys):
    # A mesh of a fixed size larger than the devices (this process has fewer than 1024).
    workdir = tmp_path / "w"
    line = one_error_line(capsys, "train", "--config", TINY, "--config.mesh=(('data',-1),('fsdp',1024))",
                          f"--workdir={workdir}")
    assert "does not divide" in line
    assert not workdir.exists()
