"""One database-compatibility rule (`database.check_encoders`) for build-db's resume, precompute and rag.

A database copied with its workdir to another folder (every path changes, the weights do not) is
accepted by all three; a database built with other weights of the same architecture is refused
by all three with the same message.
"""

import os
import shutil

import pytest

from imagerag_jax.data import build_db, precompute
from imagerag_jax.inference import rag
from imagerag_jax.retrieval import database
from imagerag_jax.weights import random_pipeline, towers
from tests.test_precompute import make_config


WEIGHTS = "encoder_weights"  # the offline jobs' field naming the VAE + text-encoder weights


def _config(root, limit, weights_root=None):
    """build-db's config of the DB and index under `root`, with the weights of `weights_root`."""
    return make_config(**{WEIGHTS: os.path.join(weights_root or root, "pipe"),
                          "db.dir": os.path.join(root, "db"), "index_dir": os.path.join(root, "index"),
                          "db.limit": limit})


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """'a': a DB of 10 rows built with weights a/pipe; 'b': a copy of a; 'c': other weights."""
    tmp = tmp_path_factory.mktemp("compat")
    a, b, c = (str(tmp / n) for n in "abc")
    random_pipeline.write_random_pipeline(os.path.join(a, "pipe"), preset="tiny", seed=0)
    assert build_db.build_db(_config(a, 10), a)["count"] == 10
    shutil.copytree(a, b)
    random_pipeline.write_random_pipeline(os.path.join(c, "pipe"), preset="tiny", seed=1)
    return a, b, c


def _precompute_opens(db_root, weights_root):
    models = towers.load_job_towers(_config(weights_root, 10), weights_root)
    return precompute._open_retriever(os.path.join(db_root, "db"), os.path.join(db_root, "index"),
                                      models, exclude_duplicates=True)


def _rag_opens(db_root, weights_root):
    return rag.RagPipeline.from_weights(os.path.join(weights_root, "pipe"),
                                        database=os.path.join(db_root, "db"),
                                        index=os.path.join(db_root, "index"), cache=False)


def test_encoder_rule():
    have = {"text_encoder": "/old/pipe#aaa", "vae": "/old/pipe#bbb",
            "extra": {"text_encoder_fingerprint": "f1", "vae_fingerprint": "f2"}}
    database.check_encoders("db", have, database.Encoders("/new/pipe#aaa", "/new/pipe#bbb", "f1", "f2"))
    database.check_encoders("db", have, database.Encoders("x#aaa", "y#bbb"))  # fingerprints unknown
    with pytest.raises(database.DatabaseError, match="vae /old/pipe#bbb .*weights f2.*weights f3"):
        database.check_encoders("db", have, database.Encoders("x#aaa", "y#bbb", "f1", "f3"))
    with pytest.raises(database.DatabaseError, match="text_encoder /old/pipe#aaa"):
        database.check_encoders("db", have, database.Encoders("/old/pipe#ccc", "/old/pipe#bbb"))


def test_a_copied_workdir_is_accepted_everywhere(roots):
    _, b, _ = roots
    assert _precompute_opens(b, b).database.count == 10
    assert _rag_opens(b, b).database.count == 10
    resumed = build_db.build_db(_config(b, 20), b)  # resumes the copied rows
    assert (resumed["count"], resumed["added"]) == (20, 10)


def test_other_weights_are_refused_everywhere_alike(roots):
    a, _, c = roots
    messages = []
    for attempt in (lambda: build_db.build_db(_config(a, 20, weights_root=c), a),
                    lambda: _precompute_opens(a, c), lambda: _rag_opens(a, c)):
        with pytest.raises(database.DatabaseError) as err:
            attempt()
        messages.append(str(err.value))
    assert messages[0] == messages[1] == messages[2], messages
    assert "was built with text_encoder" in messages[0] and "rebuild the database" in messages[0]
    assert database.Database(os.path.join(a, "db")).count == 10  # the old rows are kept

