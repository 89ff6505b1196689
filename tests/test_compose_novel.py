"""Novel digits (configs/compose.py `novel=D`): the UNet towers never see them, the VAE and the
text encoder do, and a workdir refuses to resume on other splits."""

from __future__ import annotations

import os

import numpy as np
import pytest

from imagerag_jax import config_args
from imagerag_jax.miniature import compose
from imagerag_jax.miniature import compose_report
from imagerag_jax.miniature import compose_run
from imagerag_jax.miniature import run as run_lib
from imagerag_jax.miniature import stages

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "compose.py")


class _Reached(Exception):
    """Raised by the stubbed teacher: the test has what it needs."""


def test_the_teacher_never_sees_a_novel_canvas(monkeypatch, tmp_path):
    config = config_args.load_config(CONFIG + ":smoke,novel=9")
    seen = {}

    def fake_vae(workdir, cfg, images, **kw):
        seen["vae"] = len(images)
        return "vae", {}, {}

    def fake_text(workdir, cfg, table, images, labels, **kw):
        seen["text"] = labels
        return type("Text", (), {"hidden_size": 8})(), {}, {}

    def fake_teacher(workdir, cfg, unet, latents, labels, *args, **kw):
        seen["teacher_latents"], seen["teacher"] = latents, labels
        if seen.get("go_on"):
            return {}, {}
        raise _Reached

    def fake_pairs(workdir, cfg, unet, teacher_p, text, text_p, table, shape, *, labels, **kw):
        seen["prompts"] = labels
        raise _Reached

    monkeypatch.setattr(stages, "train_vae", fake_vae)
    monkeypatch.setattr(stages, "train_text", fake_text)
    monkeypatch.setattr(stages, "encode_latents", lambda vae, p, images: images)
    monkeypatch.setattr(stages, "make_unet", lambda cfg, dim: "unet")
    monkeypatch.setattr(stages, "train_teacher", fake_teacher)
    monkeypatch.setattr(stages, "teacher_pairs", fake_pairs)
    with pytest.raises(_Reached):
        compose_run.train_towers(config, str(tmp_path))
    s = compose_run.splits(config)
    n = len(s["train"]) + len(s["database"])
    assert seen["vae"] == n and len(seen["text"]) == n
    assert compose.has_digit(seen["text"], (9,)).sum() == compose.has_digit(s["database"].compositions, (9,)).sum() > 0
    assert not compose.has_digit(seen["teacher"], (9,)).any()
    assert len(seen["teacher"]) == len(seen["teacher_latents"]) == n - compose.has_digit(seen["text"], (9,)).sum()
    # The default keeps every image for the teacher (the digits miniature's path).
    monkeypatch.setattr(stages, "train_teacher", fake_teacher)
    images, labels = np.zeros((5, 16, 16, 3), np.float32), np.arange(5)
    with pytest.raises(_Reached):
        run_lib.train_towers(config, str(tmp_path / "all"), images, labels, captions=[["x"]] * 5)
    assert len(seen["teacher"]) == 5

    # Blind digits (blind=8): in the training split, but neither the teacher nor the student's
    # distillation prompts hold one; the VAE and the text encoder still see every canvas.
    blind = config_args.load_config(CONFIG + ":smoke,novel=9,blind=8")
    seen["go_on"] = True
    (tmp_path / "blind").mkdir()
    with pytest.raises(_Reached):
        compose_run.train_towers(blind, str(tmp_path / "blind"))
    s = compose_run.splits(blind)
    assert compose.has_digit(s["train"].compositions, (8,)).any() and len(seen["text"]) == n
    assert not compose.has_digit(seen["teacher"], (8, 9)).any()
    assert len(seen["teacher"]) == n - compose.has_digit(seen["text"], (8, 9)).sum()
    assert not compose.has_digit(seen["prompts"], (8, 9)).any()
    assert len(seen["prompts"]) == len(s["train"]) - compose.has_digit(s["train"].compositions, (8,)).sum()


def test_a_workdir_refuses_other_splits(tmp_path):
    compose_run.check_splits(config_args.load_config(CONFIG + ":smoke"), str(tmp_path))
    compose_run.check_splits(config_args.load_config(CONFIG + ":smoke"), str(tmp_path))  # same: fine
    with pytest.raises(ValueError, match="other splits.*fresh --workdir"):
        compose_run.check_splits(config_args.load_config(CONFIG + ":smoke,novel=9"), str(tmp_path))


def test_mixture_sets_skip_a_zero_weight_set_and_refuse_bad_weights():
    config = config_args.load_config(CONFIG + ":quick")
    assert compose.mixture_sets(config) == ({"teacher": 0.8, "real": 0.2}, ["teacher", "real"])
    assert compose_report._training_data(config) == "teacher 0.8 + real 0.2"  # the row's label
    config.mixture = dict(teacher=0.0, real=1.0)
    assert compose.mixture_sets(config)[1] == ["real"]
    assert compose_report._training_data(config) == "real pairs only"
    config.teacher_only_ablation = True  # the teacher-only row trains on the teacher set
    assert compose.mixture_sets(config)[1] == ["teacher", "real"]
    for bad in (dict(teacher=0.0, real=0.0), dict(teacher=-1.0, real=1.0), dict(real=1.0, web=1.0)):
        config.mixture = bad
        with pytest.raises(ValueError, match="config.mixture"):
            compose.mixture_sets(config)
