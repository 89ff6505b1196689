"""Config files by path (`file.py:arg`, as --config reads them) and reading a run's logged scalars."""

from __future__ import annotations

import os

import pytest

from imagerag_jax import config_args
from imagerag_jax.training import checkpoints

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_load_config_with_and_without_arg():
    assert config_args.load_config(os.path.join(CONFIGS, "tiny.py") + ":total_steps=7,batch=2").total_steps == 7
    default = config_args.load_config(os.path.join(CONFIGS, "tiny.py"))
    assert default.total_steps == 30 and default.global_batch_size == 4
    digits = config_args.load_config(os.path.join(CONFIGS, "digits.py") + ":quick,k=3")
    assert digits.k == 3 and digits.precompute.k == 3 and digits.train.random_preset == "none"


def test_load_config_bad_inputs():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_args.load_config(os.path.join(CONFIGS, "nope.py"))
    with pytest.raises(ValueError, match="unknown config arg 'steps'"):
        config_args.load_config(os.path.join(CONFIGS, "tiny.py") + ":steps=3")


def test_read_scalars_round_trip(tmp_path):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(tmp_path))
    writer.write_scalars(1, {"g_loss": 0.5, "d_loss": 2.0})
    writer.write_scalars(3, {"g_loss": 0.25})
    writer.flush()
    writer.close()
    got = checkpoints.read_scalars(str(tmp_path))
    assert got == {"g_loss": {1: 0.5, 3: 0.25}, "d_loss": {1: 2.0}}
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        checkpoints.read_scalars(str(tmp_path / "empty"))


def test_compose_positional_arg_reaches_the_adapter_config():
    path = os.path.join(CONFIGS, "compose.py")
    assert config_args.load_config(path + ":smoke").train.adapter.positional == "none"
    assert config_args.load_config(path + ":smoke,positional=sincos").train.adapter.positional == "sincos"
    assert not config_args.load_config(path + ":smoke").train.self_neighbour
    assert config_args.load_config(path + ":smoke,self_neighbour").train.self_neighbour
    with pytest.raises(ValueError, match="positional='rope': choose one of none, sincos"):
        config_args.load_config(path + ":smoke,positional=rope")


def test_compose_prediction_arg_reaches_the_towers():
    path = os.path.join(CONFIGS, "compose.py")
    assert config_args.load_config(path + ":smoke").teacher.prediction_type == "epsilon"
    got = config_args.load_config(path + ":smoke,prediction=v_prediction").teacher.prediction_type
    assert got == "v_prediction"
    with pytest.raises(ValueError, match="prediction='v': choose one of epsilon, v_prediction"):
        config_args.load_config(path + ":smoke,prediction=v")


def test_compose_novel_arg_reaches_the_splits():
    path = os.path.join(CONFIGS, "compose.py")
    assert config_args.load_config(path + ":smoke").splits.novel_digits == ()
    config = config_args.load_config(path + ":smoke,novel=98")
    assert config.splits.novel_digits == (8, 9) and config.precompute.db.source.novel_digits == (8, 9)
    with pytest.raises(ValueError, match="novel='nine': give digits"):
        config_args.load_config(path + ":smoke,novel=nine")
    config = config_args.load_config(path + ":smoke,novel=9,blind=8")
    assert config.teacher.blind_digits == config.student.blind_digits == (8,)
    # Without blind digits the stage configs carry no such key (older workdirs still resume).
    assert "blind_digits" not in config_args.load_config(path + ":smoke").teacher
    with pytest.raises(ValueError, match="blind='9': give digits not named by novel"):
        config_args.load_config(path + ":smoke,novel=9,blind=9")
