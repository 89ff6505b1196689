"""evaluate_prompts: a prompt file -> images, index.jsonl and metrics, resumable and host-independent.

(a) prompt files in three formats, and bad ones; (b) a run's images, index and metrics agree with
the pipeline, the DB and direct FID / CLIP-score computations; (c) a run killed after its first
batch resumes without redoing it and writes the same files; (d) two hosts = one host; (e) other
settings, a foreign folder, no prompts and an unreadable reference image fail with one error and
leave the outputs as they were.

The pipeline is the real `rag.RagPipeline` on the tiny random towers (no training: the job only
needs a pipeline whose outputs depend on prompt, noise and neighbours) with a random adapter, the
6-entry DB and exact index of `rag_fixtures`. Every call has batch 2: one compile.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from imagerag_jax.evaluation import metrics  # noqa: E402
from imagerag_jax.inference import rag
from imagerag_jax.weights import towers
from imagerag_jax.evaluation import evaluate as ep  # noqa: E402
from imagerag_jax import images as image_utils  # noqa: E402
from imagerag_jax.errors import UserError  # noqa: E402
from imagerag_jax.models import adapter as adapter_lib  # noqa: E402
from imagerag_jax.models.clip_text import Tokenizer  # noqa: E402
from imagerag_jax.weights import random_pipeline  # noqa: E402
from tests import rag_fixtures  # noqa: E402
from tests.helpers import COCO, write_coco_captions  # noqa: E402
from tests.test_evaluate import _scripted_features, _tiny_clip  # noqa: E402

PROMPTS = ["a red square on white", "a photo of a cat", "a blue circle", "digit seven, handwritten"]
BATCH, SEED = 2, 3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread (tiny models; two threads on a busy 2-core machine are far slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """RagPipeline on the tiny random towers (seed 0, as the DB's) with a random adapter."""
    root = tmp_path_factory.mktemp("rag")
    db = rag_fixtures.write_db(str(root / "db"), rag_fixtures.CAPTIONS)
    index = rag_fixtures.write_index(db, str(root / "index"))
    unet, unet_p = towers.random_tower("unet", "tiny", 0)
    vae, vae_p = towers.random_tower("vae", "tiny", 0)
    text, text_p = towers.random_tower("text_encoder", "tiny", 0)
    tok = Tokenizer.from_pretrained(random_pipeline.write_byte_tokenizer(str(root / "tok")))
    adapter = adapter_lib.HSpaceAdapter(num_heads=4)
    h = np.zeros((1, 2, 2, unet.h_space_channels), np.float32)
    adapter_p = adapter.init(jax.random.PRNGKey(0), h, h[:, None])["params"]
    leaves, tree = jax.tree_util.tree_flatten(adapter_p)  # off zero: the neighbours matter
    rng = np.random.default_rng(0)
    adapter_p = tree.unflatten([x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
                                for x in leaves])
    return rag.RagPipeline(unet=unet, unet_params=unet_p, vae=vae, vae_params=vae_p, text=text,
                           text_params=text_p, tokenizer=tok, source="random:tiny:0",
                           text_label="random:tiny:0", vae_label="random:tiny:0", adapter=adapter,
                           adapter_params=adapter_p, database=db, index=index, k=2)


@pytest.fixture(scope="module")
def nets(tmp_path_factory, pipe):
    """A TorchScript feature net, a tiny CLIP folder and a reference folder (PNGs + one JPEG)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("nets")
    inception, clip, ref = str(root / "feat.pt"), str(root / "clip"), root / "ref"
    _scripted_features(inception)
    _tiny_clip(clip)
    ref.mkdir()
    rng = np.random.default_rng(1)
    h, w = pipe.image_size
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(ref / f"r{i}.png")
    Image.fromarray(rng.integers(0, 256, (h + 8, w + 4, 3), dtype=np.uint8)).save(
        ref / "tall.JPG", quality=95)  # taller than the generated aspect: centre-cropped, resized
    return {"inception": inception, "clip": clip, "reference": str(ref)}


@pytest.fixture(scope="module")
def full(tmp_path_factory, pipe, nets):
    """One complete run with FID and CLIP score: (out dir, summary)."""
    out = str(tmp_path_factory.mktemp("full") / "eval")
    summary = ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED, **nets,
                                  process_index=0, process_count=1)
    return out, summary


class Counting:
    """The pipeline, counting its calls and raising on call number `fail_at` (a killed job)."""

    def __init__(self, pipe, fail_at: int | None = None):
        self.pipe, self.fail_at, self.calls = pipe, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return self.pipe(*args, **kwargs)


def snapshot(folder: str) -> dict[str, bytes]:
    """Every file under a folder -> its bytes."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def read_index(out: str) -> list[dict]:
    with open(os.path.join(out, "index.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_image(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def images_of(out: str) -> np.ndarray:
    return np.stack([read_image(os.path.join(out, ep.image_file(i))) for i in range(len(PROMPTS))])


# --------------------------------------------------------------------------- (a) prompt files


def test_read_prompts_three_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red square\n\n  a cat, sitting  \n\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red square", "id": 1}\n\n'
                                      '{"caption": "a cat, sitting"}\n')
    (tmp_path / "p.csv").write_text('id,caption\n1,a red square\n2,"a cat, sitting"\n')
    (tmp_path / "t.CSV").write_text('text\n"two\nlines"\n')
    want = ["a red square", "a cat, sitting"]
    for name in ("p.txt", "p.jsonl", "p.csv"):
        assert ep.read_prompts(str(tmp_path / name)) == want, name
    assert ep.read_prompts(str(tmp_path / "t.CSV")) == ["two\nlines"]


@pytest.mark.parametrize("name,text,match", [
    ("empty.txt", "\n  \n", r"empty\.txt: no prompts"),
    ("empty.csv", "prompt\n", r"empty\.csv: no prompts"),
    ("p.json", '["a"]', r"p\.json: not an MS-COCO captions file"),
    ("p.yaml", "- a\n", r"p\.yaml: unknown prompt file type"),
    ("nocol.csv", "id,title\n1,a\n", r"nocol\.csv: no prompt/caption/text column"),
    ("short.csv", "id,prompt\n1,a\n2\n", r"short\.csv:3: the prompt is a NoneType"),
    ("num.jsonl", '{"prompt": "a"}\n{"prompt": 7}\n', r"num\.jsonl:2: the prompt is a int"),
    ("nofield.jsonl", '{"title": "a"}\n', r"nofield\.jsonl:1: no prompt/caption/text field"),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl:2: not a JSON line"),
    ("blank.jsonl", '{"prompt": "  "}\n', r"blank\.jsonl:1: empty prompt"),
])
def test_read_prompts_bad_files(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=match):
        ep.read_prompts(str(tmp_path / name))


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.txt: cannot read"):
        ep.read_prompts(str(tmp_path / "nope.txt"))


# --------------------------------------------------------------------------- (b) one run


def test_outputs_present_and_consistent(full, pipe):
    out, summary = full
    assert summary["complete"] and summary["generated"] == 4 and summary["skipped"] == 0
    imgs = images_of(out)
    assert imgs.shape == (4, *pipe.image_size, 3) and imgs.std() > 1
    # Image i's noise is PRNGKey(seed + i) alone: the pipeline's per-prompt convention, shifted.
    np.testing.assert_array_equal(ep.image_noise(SEED, [2, 3], pipe.latent_shape),
                                  pipe.noise(4, SEED)[2:])
    rows = read_index(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["prompt"] for r in rows] == PROMPTS
    assert [r["file"] for r in rows] == [f"images/00000{i}.png" for i in range(4)]
    for r in rows:  # the DB ids are 100.. in CAPTIONS order
        assert len(r["ids"]) == 2 and r["captions"] == [rag_fixtures.CAPTIONS[i - 100] for i in r["ids"]]
        assert r["scores"][0] >= r["scores"][1] and 0 < r["lam"] <= 1
    assert rows[2]["captions"][0] == "a blue circle"  # a DB caption finds itself
    # The same batch through the pipeline directly gives the same neighbours and the same pixels.
    direct = pipe(PROMPTS[2:], noise=ep.image_noise(SEED, [2, 3], pipe.latent_shape))
    assert [r["ids"] for r in rows[2:]] == direct.ids.tolist()
    np.testing.assert_allclose([r["lam"] for r in rows[2:]], direct.lam, rtol=1e-6)
    np.testing.assert_array_equal(imgs[2:], image_utils.to_uint8(direct.images))

    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert (m["count"], m["mode"], m["k"], m["w"], m["seed"], m["batch"]) == (4, "adapter", 2, 0.8,
                                                                               SEED, BATCH)
    np.testing.assert_allclose(m["lambda_mean"], np.mean([r["lam"] for r in rows]), rtol=1e-6)
    # Latency: the first batch compiled, so only the second one counts.
    with open(os.path.join(out, "batches", "000002.json")) as f:
        second = json.load(f)
    assert sorted(os.listdir(os.path.join(out, "batches"))) == ["000000.json", "000002.json"]
    assert m["latency_s"]["total"] == pytest.approx(second["seconds"]["total"] / 2)
    assert m["latency_s"]["denoise"] == pytest.approx(second["seconds"]["denoise"] / 2)
    assert 0 < m["latency_s"]["denoise"] < m["latency_s"]["total"] and m["omitted"] == []
    md = open(os.path.join(out, "metrics.md")).read()
    assert f"{m['fid']:.4f}" in md and f"{m['clip_score']:.4f}" in md and "6 reference" in md


def test_fid_and_clip_score_match_direct(full, nets, pipe):
    from PIL import Image

    out, summary = full
    m = summary["metrics"]
    net = torch.jit.load(nets["inception"])
    h, w = pipe.image_size
    ref = [read_image(os.path.join(nets["reference"], f"r{i}.png")) for i in range(5)]
    assert h == w
    with Image.open(os.path.join(nets["reference"], "tall.JPG")) as im:  # (w+4) x (h+8): a square
        square = im.convert("RGB").crop((0, 2, w + 4, w + 6))           # of w+4 from the middle
        ref.append(np.asarray(square.resize((w, h), Image.BICUBIC)))

    def feats(x):  # NVIDIA's export convention: NCHW in [0, 255], return_features=True
        with torch.no_grad():
            t = torch.tensor(np.stack(x).transpose(0, 3, 1, 2), dtype=torch.float32)
            return net(t, return_features=True).reshape(len(x), -1).double().numpy()

    fid = metrics.frechet_distance(feats(ref), feats(list(images_of(out))))
    assert m["fid"] == pytest.approx(fid, rel=1e-6) and m["fid"] > 0
    assert m["fid_reference_count"] == 6
    clip = metrics.CLIPScorer(nets["clip"]).score(images_of(out), PROMPTS)
    assert m["clip_score"] == pytest.approx(clip, rel=1e-5)


def test_load_reference_image_crops_the_centre(tmp_path):
    from PIL import Image

    x = np.zeros((4, 12, 3), np.uint8)
    x[:, 4:8] = 200  # the middle third of a 3:1 image
    Image.fromarray(x).save(tmp_path / "wide.png")
    got = ep.load_reference_image(str(tmp_path / "wide.png"), (4, 4))
    np.testing.assert_array_equal(got, x[:, 4:8])
    assert ep.load_reference_image(str(tmp_path / "wide.png"), (2, 6)).shape == (2, 6, 3)


# --------------------------------------------------------------------------- (c) resume, (d) hosts


def test_killed_run_resumes_without_redoing_batches(full, pipe, tmp_path):
    out = str(tmp_path / "eval")
    killed = Counting(pipe, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        ep.evaluate_prompts(killed, PROMPTS, out, batch_size=BATCH, seed=SEED)
    assert os.listdir(os.path.join(out, "batches")) == ["000000.json"]
    assert not os.path.exists(os.path.join(out, "index.jsonl"))
    resumed = Counting(pipe)
    summary = ep.evaluate_prompts(resumed, PROMPTS, out, seed=SEED)  # the batch from run.json
    assert resumed.calls == 1 and (summary["generated"], summary["skipped"]) == (2, 2)
    before, after = snapshot(full[0]), snapshot(out)
    for name in ["index.jsonl", "run.json"] + [ep.image_file(i) for i in range(4)]:
        assert after[name] == before[name], name
    m_full, m = (json.loads(s["metrics.json"]) for s in (before, after))
    for key in ("count", "mode", "k", "w", "seed", "batch", "pipeline", "lambda_mean"):
        assert m[key] == m_full[key], key
    assert "fid" not in m and "clip_score" not in m and len(m["omitted"]) == 2

    again = Counting(pipe)  # everything done: nothing is generated, the metrics are rewritten
    summary = ep.evaluate_prompts(again, PROMPTS, out, batch_size=BATCH, seed=SEED)
    assert again.calls == 0 and summary["complete"] and summary["skipped"] == 4


def test_outputs_at_a_url_are_a_local_runs_and_resume_there(full, pipe):
    # ram:// is TensorFlow's in-memory filesystem, reached through storage as gs:// is.
    import tensorflow as tf

    url = "ram://evaluate-test/eval"
    summary = ep.evaluate_prompts(pipe, PROMPTS, url, batch_size=BATCH, seed=SEED,
                                  process_index=0, process_count=1)
    assert summary["complete"] and summary["generated"] == 4
    local = snapshot(full[0])
    for name in ["index.jsonl", "run.json"] + [ep.image_file(i) for i in range(4)]:
        with tf.io.gfile.GFile(f"{url}/{name}", "rb") as f:
            assert f.read() == local[name], name
    assert tf.io.gfile.exists(f"{url}/metrics.json") and tf.io.gfile.exists(f"{url}/metrics.md")
    again = Counting(pipe)
    summary = ep.evaluate_prompts(again, PROMPTS, url, batch_size=BATCH, seed=SEED)
    assert again.calls == 0 and summary["complete"] and summary["skipped"] == 4


def test_two_hosts_give_the_images_of_one(full, pipe, tmp_path):
    out = str(tmp_path / "eval")
    first = ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED,
                                process_index=0, process_count=2)
    assert not first["complete"] and first["missing"] == 2 and first["generated"] == 2
    assert not os.path.exists(os.path.join(out, "index.jsonl"))
    other = ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED,
                                process_index=1, process_count=2)
    assert not other["complete"] and other["metrics"] is None  # only process 0 writes them
    assert not os.path.exists(os.path.join(out, "index.jsonl"))
    last = Counting(pipe)
    done = ep.evaluate_prompts(last, PROMPTS, out, batch_size=BATCH, seed=SEED,
                               process_index=0, process_count=2)
    assert done["complete"] and last.calls == 0
    # Batches [0, 2] and [1, 3] here, [0, 1] and [2, 3] in the one-host run: the same images.
    assert np.abs(images_of(out).astype(int) - images_of(full[0])).max() <= 1
    one, two = read_index(full[0]), read_index(out)
    assert [r["ids"] for r in two] == [r["ids"] for r in one]
    np.testing.assert_allclose([r["scores"] for r in two], [r["scores"] for r in one], rtol=1e-5)


# --------------------------------------------------------------------------- (e) bad inputs


def test_other_settings_are_refused(full, pipe, tmp_path):
    out, _ = full
    before = snapshot(out)
    with pytest.raises(UserError, match="differs in seed"):
        ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED + 1)
    with pytest.raises(UserError, match="differs in count, prompts_sha256"):
        ep.evaluate_prompts(pipe, PROMPTS[:3], out, batch_size=BATCH, seed=SEED)
    with pytest.raises(UserError, match="differs in k"):
        ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED, k=1)
    assert snapshot(out) == before
    gone = tmp_path / "gone"
    shutil.copytree(out, gone)
    os.remove(gone / "images" / "000003.png")
    with pytest.raises(UserError, match=r"000002\.json: its image images/000003\.png is missing"):
        ep.evaluate_prompts(pipe, PROMPTS, str(gone), batch_size=BATCH, seed=SEED)
    foreign = tmp_path / "photos"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "holiday.png").write_bytes(b"x")
    with pytest.raises(UserError, match="no run.json"):
        ep.evaluate_prompts(pipe, PROMPTS, str(foreign), batch_size=BATCH)
    with pytest.raises(UserError, match="no prompts"):
        ep.evaluate_prompts(pipe, [], str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty")


def test_unreadable_reference_keeps_outputs(full, nets, pipe, tmp_path):
    out = str(tmp_path / "eval")
    shutil.copytree(full[0], out)
    before = snapshot(out)
    ref = tmp_path / "ref"
    shutil.copytree(nets["reference"], ref)
    (ref / "zz_broken.png").write_bytes(b"not a png at all")
    calls = Counting(pipe)
    with pytest.raises(UserError, match=r"zz_broken\.png: not a readable reference image"):
        ep.evaluate_prompts(calls, PROMPTS, out, batch_size=BATCH, seed=SEED,
                            reference=str(ref), inception=nets["inception"])
    assert snapshot(out) == before and calls.calls == 0
    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match="no PNG or JPEG"):
        ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED,
                            reference=str(tmp_path / "none"), inception=nets["inception"])
    with pytest.raises(UserError, match=r"missing\.pt: cannot load an Inception"):
        ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED,
                            reference=str(ref), inception=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="cannot load a CLIP model folder"):
        ep.evaluate_prompts(pipe, PROMPTS, out, batch_size=BATCH, seed=SEED,
                            clip=str(tmp_path / "none"))
    assert snapshot(out) == before


def test_mode_none_records_no_neighbours(full, pipe, tmp_path):
    out = str(tmp_path / "eval")
    summary = ep.evaluate_prompts(pipe, PROMPTS[:2], out, batch_size=BATCH, seed=SEED, mode="none")
    rows = read_index(out)
    assert summary["complete"] and [r["prompt"] for r in rows] == PROMPTS[:2]
    assert all(r[key] is None for r in rows for key in ("ids", "captions", "scores", "lam"))
    m = summary["metrics"]
    assert m["mode"] == "none" and "lambda_mean" not in m and m["count"] == 2
    # Same noise as the adapter run's first two images, no retrieved branch: other pixels.
    plain = np.stack([read_image(os.path.join(out, ep.image_file(i))) for i in range(2)])
    assert np.abs(plain.astype(int) - images_of(full[0])[:2]).max() > 1


# --------------------------------------------------------------------------- MS-COCO captions


def test_coco_captions_one_caption_per_image_seeded_and_nested(tmp_path):
    path = tmp_path / "captions_val2017.json"
    write_coco_captions(path, COCO)
    got = ep.read_coco_captions(str(path))
    assert sorted(got.image_ids) == sorted(COCO) and len(got.prompts) == 5
    for prompt, image_id, name in zip(got.prompts, got.image_ids, got.file_names):
        assert name == COCO[image_id][0] and prompt in [c.strip() for c in COCO[image_id][1]]
    assert ep.read_coco_captions(str(path)) == got  # the seed fixes the draw
    few = ep.read_coco_captions(str(path), num_prompts=2)
    assert few.prompts == got.prompts[:2] and few.file_names == got.file_names[:2]
    draws = {tuple(ep.read_coco_captions(str(path), seed=s).image_ids) for s in range(6)}
    assert len(draws) > 1  # the order depends on the seed
    assert ep.read_prompts(str(path)) == got.prompts
    with pytest.raises(UserError, match="--num_prompts 6: .* has 5 captioned images"):
        ep.read_coco_captions(str(path), num_prompts=6)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not an MS-COCO captions file"):
        ep.read_coco_captions(str(tmp_path / "bad.json"))
    (tmp_path / "nocap.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                     "annotations": [{"image_id": 1}]}))
    with pytest.raises(UserError, match="annotation 0 has no image_id and caption"):
        ep.read_coco_captions(str(tmp_path / "nocap.json"))


def test_coco_prompts_use_their_own_images_as_the_fid_reference(pipe, nets, tmp_path):
    from PIL import Image

    h, w = pipe.image_size
    ref = tmp_path / "val2017"
    ref.mkdir()
    rng = np.random.default_rng(4)
    for _, (name, _) in COCO.items():  # JPEGs as in val2017/, a different size from the output
        Image.fromarray(rng.integers(0, 256, (h + 4, w + 4, 3), dtype=np.uint8)).save(ref / name, quality=95)
    path = tmp_path / "captions_val2017.json"
    write_coco_captions(path, COCO)
    coco = ep.read_coco_captions(str(path), num_prompts=4, seed=SEED)
    out = str(tmp_path / "eval")
    summary = ep.evaluate_prompts(pipe, coco.prompts, out, batch_size=BATCH, seed=SEED,
                                  reference=str(ref), inception=nets["inception"],
                                  reference_names=coco.file_names, process_index=0, process_count=1)
    m = summary["metrics"]
    assert m["fid_reference_count"] == 4  # the 4 prompts' images, not the folder's 5
    feat = metrics.InceptionFeatures(nets["inception"])
    ref_feats = metrics.batched_features(feat, np.stack([
        ep.load_reference_image(os.path.join(str(ref), n), (h, w)) for n in coco.file_names]))
    gen = metrics.batched_features(feat, np.stack([read_image(os.path.join(out, ep.image_file(i)))
                                                   for i in range(4)]))
    assert m["fid"] == pytest.approx(metrics.frechet_distance(ref_feats, gen), rel=1e-6)
    os.remove(ref / coco.file_names[1])
    with pytest.raises(UserError, match="1 of the prompts' 4 reference images are missing"):
        ep.evaluate_prompts(pipe, coco.prompts, str(tmp_path / "eval2"), batch_size=BATCH, seed=SEED,
                            reference=str(ref), inception=nets["inception"],
                            reference_names=coco.file_names, process_index=0, process_count=1)


# --------------------------------------------------------------------------- aesthetic score


def laion_predictor(path: str, width: int, seed: int = 0):
    """LAION's improved-aesthetic-predictor MLP (its layer layout, input `width`), saved as it is
    distributed: torch.save of the state dict."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    holder = torch.nn.Module()
    holder.layers = mlp  # the keys are layers.N.weight / layers.N.bias, as in the released file
    torch.save(holder.state_dict(), path)
    return mlp.eval()


def test_aesthetic_score_is_laions_mlp_on_normalised_clip_embeddings(pipe, nets, full, tmp_path):
    clip = metrics.CLIPScorer(nets["clip"])
    width = clip.model.config.projection_dim
    mlp = laion_predictor(str(tmp_path / "aes.pth"), width)
    scorer = metrics.AestheticScorer(str(tmp_path / "aes.pth"), clip)
    out, _ = full
    imgs = images_of(out)
    emb = torch.tensor(clip.image_embeds(imgs))
    with torch.no_grad():
        ref = mlp(emb / emb.norm(dim=-1, keepdim=True)).numpy()[:, 0]
    got = scorer.scores(imgs)
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()) and np.ptp(got) > 0
    # Through evaluate: the mean over the generated images, in metrics.json; two CLIP models (as
    # ViT-L/14 and ViT-bigG-14 would be) each give their score.
    second = str(tmp_path / "clip_copy")
    shutil.copytree(nets["clip"], second)
    res = ep.evaluate_prompts(pipe, PROMPTS, str(tmp_path / "eval"), batch_size=BATCH, seed=SEED,
                              clip=[nets["clip"], second], aesthetic=str(tmp_path / "aes.pth"),
                              process_index=0, process_count=1)
    m = res["metrics"]
    np.testing.assert_allclose(m["aesthetic_score"], got.mean(), rtol=1e-6)
    assert len(m["clip_scores"]) == 2 and m["clip_score"] == list(m["clip_scores"].values())[0]
    np.testing.assert_allclose(m["clip_score"], clip.score(imgs, PROMPTS), rtol=1e-5)
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "CLIP score (clip_copy)" in md and "aesthetic score" in md
    # Mistakes: one error each, before anything is generated.
    with pytest.raises(UserError, match="--aesthetic needs --clip"):
        ep.evaluate_prompts(pipe, PROMPTS, str(tmp_path / "e2"), aesthetic=str(tmp_path / "aes.pth"),
                            process_index=0, process_count=1)
    laion_predictor(str(tmp_path / "wide.pth"), width + 1)
    with pytest.raises(UserError, match=r"wide.pth: cannot load an aesthetic predictor .*embeddings"):
        ep.evaluate_prompts(pipe, PROMPTS, str(tmp_path / "e3"), clip=nets["clip"],
                            aesthetic=str(tmp_path / "wide.pth"), process_index=0, process_count=1)
    torch.save({"w": torch.zeros(2)}, str(tmp_path / "other.pth"))
    with pytest.raises(UserError, match="not LAION's aesthetic predictor"):
        ep.evaluate_prompts(pipe, PROMPTS, str(tmp_path / "e4"), clip=nets["clip"],
                            aesthetic=str(tmp_path / "other.pth"), process_index=0, process_count=1)
    for e in ("e2", "e3", "e4"):  # at most the pinned settings, no image and no index
        assert set(os.listdir(tmp_path / e)) <= {"run.json"} if (tmp_path / e).exists() else True, e
