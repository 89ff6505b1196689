"""Training record options: neighbours by id and the H-space branch give today's step.

The bar (issue 29): at SD 2.1 shapes with k = 4 one option is at most 0.25 MB per example, one
removes the frozen encoder on neighbours from the step, and each option's train step gives the
same losses and gradients as the inline records on the same examples. The step comparison trains
three steps (so the adapter's output is no longer zero and the neighbours matter) and compares the
metrics (losses, gradient norms) and the trained params.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from imagerag_jax.data import neighbour_feed, synthetic, tfrecords
from imagerag_jax.errors import UserError
from imagerag_jax.retrieval import hspace_cache
from imagerag_jax.retrieval import database as db_lib
from imagerag_jax.training import trainer as trainer_lib
from tests.test_train import compile_cache, quiet_config, train_steps  # noqa: F401  (a fixture)

DB_ENTRIES = 24


def write_database(path: str, schema: tfrecords.Schema, seed: int = 0) -> db_lib.Database:
    """A database of random entries at the schema's shapes (ids 1000, 1007, ...)."""
    rng = np.random.default_rng(seed)
    spec = db_lib.DatabaseSpec(schema.latent_shape, schema.embed_shape, schema.pooled_dim)
    with db_lib.DatabaseWriter(path, spec, source="test", text_encoder="te", vae="vae", fsync=False) as w:
        w.append([f"entry {i}" for i in range(DB_ENTRIES)],
                 rng.standard_normal((DB_ENTRIES, *schema.latent_shape), np.float32),
                 rng.standard_normal((DB_ENTRIES, *schema.embed_shape), np.float32),
                 rng.standard_normal((DB_ENTRIES, schema.pooled_dim), np.float32),
                 1000 + 7 * np.arange(DB_ENTRIES))
    return db_lib.Database.open(path)


def stored_batch(schema: tfrecords.Schema, db: db_lib.Database, batch: int, seed: int) -> dict:
    """What records stored by id hold: targets, neighbour ids and scores (no neighbour arrays)."""
    rng = np.random.default_rng(100 + seed)
    host = trainer_lib.random_batch(schema, batch, seed=seed)
    rows = np.stack([rng.choice(db.count, schema.k, replace=False) for _ in range(batch)])
    out = {f: v for f, v in host.items() if not f.startswith("retrieved_")}
    out["retrieved_ids"] = np.asarray(db.ids)[rows]
    out["retrieval_scores"] = rng.uniform(0.2, 0.9, (batch, schema.k)).astype(np.float32)
    return out


def step_batch(host: dict, schema) -> dict:
    """The float32 fields the step reads (`step.batch_fields`)."""
    from imagerag_jax.training import step

    return {f: np.asarray(host[f], np.float32) for f in step.batch_fields(schema)}


def test_record_bytes_at_sd21_shapes():
    from imagerag_jax.benchmark import records

    rows = {r["option"]: r for r in records.table()}
    inline, ids = rows["inline"], rows["ids_hspace"]
    # Inline: 5 latents + noise in f16 (2 B x 16,384 each), 5 x 77x1024 f16 embeddings, 5 pooled f32.
    arrays = 6 * 16_384 * 2 + 5 * 77 * 1024 * 2 + 5 * 1024 * 4
    assert arrays < inline["bytes_synthetic"] < arrays + 2_000
    assert ids["bytes_synthetic"] <= 0.25e6 and rows["ids"]["bytes_synthetic"] <= 0.25e6
    noise = inline["bytes_synthetic"] - inline["bytes_real"]  # the noise field and its framing
    assert 16_384 * 2 < noise < 16_384 * 2 + 32
    # The H-space options take the retrieved branch (the encoder on k = 4 neighbours) out of the step.
    assert rows["ids_hspace"]["train_flops_per_example"] < 0.8 * inline["train_flops_per_example"]
    assert rows["ids"]["train_flops_per_example"] == inline["train_flops_per_example"]
    assert rows["inline_hspace"]["bytes_synthetic"] > rows["ids_hspace"]["bytes_synthetic"]


def test_neighbours_by_id_and_cached_hspace_train_as_inline_records(compile_cache, tmp_path):
    cfg = quiet_config(**{"optimizer.lr": 3e-3})
    schema = synthetic.synthetic_schema(cfg)
    db = write_database(str(tmp_path / "db"), schema)
    trainer = trainer_lib.Trainer(cfg)
    hspace_cache.build_cache(db.path, trainer.setup.student, trainer.frozen["student"], batch_size=8,
                             dtype="float32", fsync=False, progress=False)
    manifest = {"index": {"database": {"path": db.path, "count": db.count,
                                       "created": db.manifest["created"]}}}
    by_id = dataclasses.replace(schema, neighbours="ids")
    arrays = neighbour_feed.open_feed(manifest, by_id, hspace=False)
    cached = neighbour_feed.open_feed(manifest, by_id, hspace=True, hspace_dtype="float32",
                                      student_params=trainer.frozen["student"])
    assert cached.schema(by_id).hspace_shape == (8, 8, 32) == cached.cache.shape
    assert neighbour_feed.open_feed(manifest, schema, hspace=False) is None  # inline: nothing to feed

    b = cfg.global_batch_size
    stored = [stored_batch(schema, db, b, seed) for seed in range(3)]
    inline, hspace = [], []
    for host in stored:
        filled = arrays.fill(host)
        got = db.gather(db.rows_for_ids(host["retrieved_ids"]))
        for field, name in (("retrieved_latents", "latents"), ("retrieved_prompt_embeds", "prompt_embeds"),
                            ("retrieved_pooled", "pooled")):
            assert np.array_equal(filled[field], got[name]), field
        inline.append(step_batch(filled, schema))
        hspace.append(step_batch(cached.fill(host), cached.schema(by_id)))
    assert "retrieved_latents" not in hspace[0] and hspace[0]["retrieved_hspace"].shape == (b, 2, 8, 8, 32)

    want, p_want = train_steps(cfg, schema, inline)
    got, p_got = train_steps(cfg, cached.schema(by_id), hspace)
    for a, g in zip(want, got):
        for name in ("g_loss", "g_adv", "g_distill", "d_loss", "lambda_mean", "hspace_edit_ratio",
                     "g_grad_norm", "d_grad_norm"):
            np.testing.assert_allclose(g[name], a[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert want[-1]["hspace_edit_ratio"] > 0  # the adapter edits: the neighbours matter
    import jax
    for x, y in zip(jax.tree.leaves(p_got), jax.tree.leaves(p_want)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    # The step without the retrieved branch is cheaper by the encoder on B x k neighbours.
    f_inline = trainer.analytic_flops(schema, b).phases["retrieved_branch"]
    assert f_inline > 0 and trainer.analytic_flops(cached.schema(by_id), b).phases["retrieved_branch"] == 0


def test_feed_refuses_another_database_and_a_missing_cache(tmp_path):
    cfg = quiet_config()
    schema = dataclasses.replace(synthetic.synthetic_schema(cfg), neighbours="ids")
    db = write_database(str(tmp_path / "db"), schema)
    recorded = {"path": db.path, "count": db.count, "created": db.manifest["created"]}
    with pytest.raises(UserError, match="has count 24, the training records were retrieved from one "
                                        "with count 30"):
        neighbour_feed.open_feed({"index": {"database": {**recorded, "count": 30}}}, schema, hspace=False)
    with pytest.raises(UserError, match="does not exist on this host.*set config.database"):
        neighbour_feed.open_feed({"index": {"database": {**recorded, "path": str(tmp_path / "gone")}}},
                                 schema, hspace=False)
    feed = neighbour_feed.open_feed({"index": {}}, schema, hspace=False, database=db.path)
    with pytest.raises(UserError, match=r"ids not in the database: \[5\]"):
        feed.fill({"retrieved_ids": np.array([[1000, 5]])})
    trainer = trainer_lib.Trainer(cfg)
    with pytest.raises(UserError, match="needs the H-space cache .*imagerag_jax.main build-cache"):
        neighbour_feed.open_feed({"index": {"database": recorded}}, schema, hspace=True,
                                 student_params=trainer.frozen["student"])


def test_input_stream_gathers_neighbours_of_records_stored_by_id(tmp_path):
    from imagerag_jax.data.input_stream import InputStream

    cfg = quiet_config()
    inline = synthetic.synthetic_schema(cfg)
    schema = dataclasses.replace(inline, neighbours="ids")
    db = write_database(str(tmp_path / "db"), schema)
    stored = stored_batch(schema, db, 12, seed=0)
    examples = [{"prompt": f"p{i}", "example_id": i, **{f: v[i] for f, v in stored.items()}}
                for i in range(12)]
    data = str(tmp_path / "data")
    index = {"database": {"path": db.path, "count": db.count, "created": db.manifest["created"]}}
    manifest = tfrecords.write_examples(data, "train", examples, schema, 2, index_params=index)
    assert manifest["schema"]["neighbours"] == "ids"
    on_disk = sum(f["num_bytes"] for f in manifest["splits"]["train"]["files"])
    feed = neighbour_feed.open_feed(manifest, schema, hspace=False)
    it = InputStream(data, "train", 4, seed=0, shuffle_buffer=1, num_epochs=1, neighbour_feed=feed,
                     fields=("latent", "retrieved_latents", "retrieved_pooled"), process_count=1,
                     process_index=0)
    n = 0
    for batch in it:
        assert sorted(batch) == ["latent", "retrieved_latents", "retrieved_pooled"]
        # Which records: match each target latent to its example; its neighbours are its ids' rows.
        for latent, retrieved in zip(batch["latent"], batch["retrieved_latents"]):
            i = int(np.argmin([np.abs(latent - np.float32(e["latent"].astype(np.float16))).max()
                               for e in examples]))
            want = db.gather(db.rows_for_ids(examples[i]["retrieved_ids"]))["latents"]
            np.testing.assert_array_equal(retrieved, want.astype(np.float32))
            n += 1
    assert n == 12
    # The same examples with their neighbours inline take more than twice the bytes on disk.
    full = [{**e, **{f: v for f, v in zip(("retrieved_latents", "retrieved_prompt_embeds", "retrieved_pooled"),
                                          (lambda g: (g["latents"], g["prompt_embeds"], g["pooled"]))(
                                              db.gather(db.rows_for_ids(e["retrieved_ids"]))))}}
            for e in examples]
    m_inline = tfrecords.write_examples(str(tmp_path / "inline"), "train", full, inline, 2)
    assert sum(f["num_bytes"] for f in m_inline["splits"]["train"]["files"]) > 2 * on_disk
    assert os.path.exists(os.path.join(data, tfrecords.MANIFEST))


def test_training_on_records_by_id_with_cached_hspace_resumes_exactly(compile_cache, tmp_path):
    from tests.test_train import assert_trees_equal, host_tree

    base = quiet_config()
    schema = dataclasses.replace(synthetic.synthetic_schema(base), neighbours="ids")
    db = write_database(str(tmp_path / "db"), schema)
    stored = stored_batch(schema, db, 16, seed=0)
    data = str(tmp_path / "data")
    index = {"database": {"path": db.path, "count": db.count, "created": db.manifest["created"]}}
    tfrecords.write_examples(data, "train", [{"prompt": f"p{i}", "example_id": i,
                                              **{f: v[i] for f, v in stored.items()}} for i in range(16)],
                             schema, 2, index_params=index)
    run = lambda steps: quiet_config(total_steps=steps, checkpoint_every=1, log_every=1, data_dir=data,
                                     retrieved_branch="hspace", sample_every=2, num_samples=2)
    with pytest.raises(UserError, match="needs the H-space cache"):
        trainer_lib.train_and_evaluate(run(2), str(tmp_path / "no_cache"))
    trainer = trainer_lib.Trainer(base)
    hspace_cache.build_cache(db.path, trainer.setup.student, trainer.frozen["student"], batch_size=8,
                             fsync=False, progress=False)
    straight = host_tree(trainer_lib.train_and_evaluate(run(2), str(tmp_path / "straight")))
    trainer_lib.train_and_evaluate(run(1), str(tmp_path / "resumed"))
    resumed = host_tree(trainer_lib.train_and_evaluate(run(2), str(tmp_path / "resumed")))
    assert_trees_equal(resumed, straight, "resumed state")
    assert int(straight["step"]) == 2
    with pytest.raises(UserError, match="self_neighbour"):
        trainer_lib.train_and_evaluate(quiet_config(retrieved_branch="hspace", self_neighbour=True),
                                       str(tmp_path / "self"))
