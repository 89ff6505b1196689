"""The compositional miniature's `run` on its smoke config with a novel digit: every stage through
the production build-db/precompute/train on the teacher + real mixture, every row of
results.json, the grids, the table over seeds, and the path probe."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from imagerag_jax.miniature import compose_report
from tests import helpers

REPO = helpers.REPO
ROWS = ("teacher", "turbo", "injection", "injection_best_w", "imageragturbo",
        "imageragturbo_random_neighbours", "imageragturbo_lambda0", "imageragturbo_teacher_only",
        "imageragturbo_no_adapter", "imageragturbo_shuffled", "imageragturbo_shuffled_random_neighbours")
TRAINED = ("imageragturbo", "imageragturbo_teacher_only", "imageragturbo_no_adapter", "imageragturbo_shuffled")


ARG = helpers.COMPOSE_ARG


def _without_timings(results):
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in results["rows"]]


@pytest.fixture
def smoke(compose_smoke):
    # The session's one run (tests/conftest.py; these tests are one xdist group).
    return compose_smoke


def test_compose_smoke_writes_every_row(smoke):
    workdir, results, stdout = smoke
    rows = {r["method"]: r for r in results["rows"]}
    assert set(ROWS) | {"real", "vae"} == set(rows)
    for r in rows.values():
        assert 0.0 <= r["all_correct"] <= 1.0
        assert set(r["attribute_accuracy"]) == {"left_digit", "left_colour", "right_digit", "right_colour"}
        assert set(r["by_class"]) == {"frequent", "rare", "unseen", "novel"}
        assert 0.0 <= r["novel_digit_accuracy"] <= 1.0
        assert "retrieval_precision" in r
    assert rows["real"]["attribute_accuracy"]["left_colour"] == 1.0  # colours are read exactly
    assert rows["turbo"]["retrieval_precision"] is None
    assert set(rows["imageragturbo"]["retrieval_precision"]) == {"overall", "frequent", "rare", "unseen", "novel"}
    assert rows["teacher"]["nfe"] == 4 and rows["imageragturbo"]["nfe"] == 1
    # The trained students' neighbour sensitivity, and only theirs (16 prompts: rolled neighbours
    # differ; a smoke run's adapter has trained 2 steps, so the value is small but finite).
    assert {m for m in rows if "neighbour_sensitivity" in rows[m]} == set(TRAINED)
    assert all(np.isfinite(rows[m]["neighbour_sensitivity"]) and rows[m]["neighbour_sensitivity"] >= 0
               for m in TRAINED)
    # The no-adapter arm trained no adapter: the neighbours cannot move its prediction.
    assert rows["imageragturbo_no_adapter"]["neighbour_sensitivity"] == 0.0
    assert rows["imageragturbo_no_adapter"]["retrieval_precision"] is None
    assert rows["imageragturbo_shuffled_random_neighbours"]["retrieval_precision"] == \
        rows["imageragturbo_random_neighbours"]["retrieval_precision"]
    assert {"imageragturbo_minus_no_adapter_arm", "imageragturbo_minus_shuffled_arm",
            "shuffled_arm_retrieved_minus_random"} <= set(results["differences"])
    for folder in ("train", "train_no_adapter", "train_shuffled"):
        assert (workdir / "rag" / folder / "checkpoints").is_dir(), folder
    assert all(rows[m]["latency_ms"] > 0 for m in ROWS)
    assert results["num_prompts"] == 16 and results["prompts_per_class"] == {"frequent": 4, "rare": 4, "unseen": 4,
                                                                                   "novel": 4}
    d = results["differences"]["imageragturbo_minus_turbo"]
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert sum(results["best_w_histogram"].values()) == 16
    assert -1.0 <= results["retrieval"]["lambda"]["min"] <= results["retrieval"]["lambda"]["max"] <= 1.0
    for name in ("frequent", "rare", "unseen", "novel"):
        assert (workdir / "grids" / f"{name}.png").stat().st_size > 0
    # The real canvases show the novel digit (the judge can read it); the towers never saw one.
    assert rows["real"]["novel_digit_accuracy"] > 0.5
    assert "| Novel | Novel digit drawn |" in stdout
    # Both ImageRAGTurbo trainings ran the production trainer: the mixture and the teacher set.
    assert (workdir / "rag" / "train" / "checkpoints").is_dir()
    assert (workdir / "rag" / "train_teacher_only" / "checkpoints").is_dir()
    for name in ("data_teacher", "data_real"):
        assert (workdir / "rag" / name / "manifest.json").exists()
    assert "All four correct" in stdout and "ImageRAGTurbo minus turbo" in stdout


def test_compose_rerun_resumes_and_reproduces_the_table(smoke, capfd):
    # In the shared workdir (its precompute manifests record the database's absolute path, so a
    # copy would not resume): only results.json is rewritten, which no other test reads from disk.
    # In this process (the first run was a subprocess): the same code from the command line on.
    workdir, results, _ = smoke
    os.remove(workdir / "results.json")
    res = helpers.cli_in_process(capfd, "run", "--config", os.path.join(REPO, "configs", "compose.py") +
                                 f":{ARG}", "--workdir", str(workdir), cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    # Every stage loads its finished checkpoint; the evaluation reruns.
    rerun = json.loads((workdir / "results.json").read_text())
    assert _without_timings(rerun) == _without_timings(results)
    assert rerun["differences"] == results["differences"]


def test_aggregate_over_seeds(smoke, tmp_path):
    workdir, results, _ = smoke
    other = json.loads(json.dumps(results))
    other["seeds"] = [1]
    for r in other["rows"]:
        r["all_correct"] = min(1.0, r["all_correct"] + 0.5)
    config = json.loads(json.dumps(results["config"]))
    import ml_collections
    cfg = ml_collections.ConfigDict(config)
    out = compose_report.aggregate(cfg, [results, other], [str(workdir), str(workdir)])
    rows = {r["method"]: r for r in out["rows"]}
    base = {r["method"]: r for r in results["rows"]}
    turbo = base["turbo"]["all_correct"]
    assert rows["turbo"]["all_correct_per_seed"] == [turbo, min(1.0, turbo + 0.5)]
    assert rows["turbo"]["all_correct_std"] == pytest.approx(np.std([turbo, min(1.0, turbo + 0.5)], ddof=1))
    assert out["seeds"] == [0, 1]
    md = compose_report.markdown({**out, "total_seconds": 1.0})
    assert "±" in md and "training seeds 0, 1" in md
    assert "Blind digit drawn" not in md
    # Every difference carries its interval over seeds and prompts (the same per-prompt files
    # twice here, so the seeds agree and it is the prompts-only interval), and every trained
    # row its neighbour sensitivity per seed.
    for name, d in out["differences"].items():
        assert d["seeds"] == 2 and d["ci95_seeds_and_prompts"] == d["ci95"], name
    assert "over seeds and prompts" in md and "Neighbour sensitivity" in md
    assert rows["imageragturbo"]["neighbour_sensitivity_per_seed"] == [base["imageragturbo"]["neighbour_sensitivity"]] * 2
    assert "imageragturbo_minus_no_adapter_arm" in out["differences"]
    # A run with blind digits: their rate is averaged over seeds and gets its column.
    mine = json.loads(json.dumps(results))
    for res, rate in ((mine, 0.25), (other, 0.75)):
        for r in res["rows"]:
            r["blind_digit_accuracy"] = rate
    out = compose_report.aggregate(cfg, [mine, other], [str(workdir), str(workdir)])
    assert {r["blind_digit_accuracy"] for r in out["rows"]} == {0.5}
    assert "| Novel digit drawn | Blind digit drawn |" in compose_report.markdown({**out, "total_seconds": 1.0})


def test_path_probe_on_the_smoke_towers(smoke, tmp_path, capsys):
    from imagerag_jax.miniature import path_probe  # pylint: disable=g-import-not-at-top

    workdir, _, _ = smoke
    config = os.path.join(REPO, "configs", "compose.py") + f":{ARG}"
    for targets in ("teacher", "real"):
        rows = path_probe.main(["--config", config, "--workdir", str(workdir), "--targets", targets,
                                "--steps", "2", "--limit", "16", "--variants", "lora,adapter,sincos:1e-2,oracle",
                                "--novel-examples", "16"])
        assert [r["variant"] for r in rows] == ["lora", "adapter", "sincos", "oracle"]
        assert all(np.isfinite([r["plain"], r["own"], r["other"]]).all() for r in rows)
        assert len({r["plain"] for r in rows}) == 1  # every edit and the LoRA start at zero
        assert rows[0]["own"] == rows[0]["other"]  # the LoRA alone never sees the neighbour
        assert rows[3]["own"] != rows[3]["other"]  # after a step the oracle's edit reads it
        assert rows[0]["own"] != rows[0]["plain"]
        # The database canvases with the novel digit: own and another's neighbour, and no edit.
        for r in rows:
            for name in ("novel_own", "novel_other", "novel_no_edit"):
                assert np.isfinite(r[name]["smooth_l1"]) and 0.0 <= r[name]["novel_digit"] <= 1.0
        assert rows[0]["novel_own"] == rows[0]["novel_other"] == rows[0]["novel_no_edit"]
        assert rows[3]["novel_own"]["smooth_l1"] != rows[3]["novel_no_edit"]["smooth_l1"]
    with pytest.raises(FileNotFoundError, match="no finished student"):
        path_probe.main(["--config", config, "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        path_probe.main(["--config", config, "--workdir", str(workdir), "--novel-examples", "-5"])
    assert exit_info.value.code == 2
    assert "error: --novel-examples must be at least 1, got -5" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown variant 'mlp'"):
        path_probe.fit_variant({"noise": np.zeros((4, 1))}, "mlp", 1e-3, 1)
