"""img2dataset webdataset shards as a source: streaming, filters, damage counted, build-db and precompute."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from imagerag_jax.data import build_db, img2dataset, precompute, sources, tfrecords
from tests.helpers import cli_in_process
from tests.test_precompute import SIZE, make_config


def _jpg(seed, side=24):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, bad=True):
    """Three shards in img2dataset's layout (with its .parquet/_stats.json siblings); returns the glob.

    Shard 0 holds the good items and, with `bad`, a corrupt image, a missing caption, an
    undersized image and a high-watermark item; shard 1 is good; shard 2 is truncated.
    """
    os.makedirs(root, exist_ok=True)
    samples = [[], [], []]
    for i in range(6):
        samples[0].append((f"00000{i:04d}", _jpg(i), f"a photo number {i}", {"pwatermark": 0.1}))
    for i in range(4):
        samples[1].append((f"00001{i:04d}", _jpg(100 + i), f"a second-shard photo {i}", {"pwatermark": 0.2}))
    for i in range(3):
        samples[2].append((f"00002{i:04d}", _jpg(200 + i), f"a third-shard photo {i}", {"pwatermark": 0.2}))
    if bad:
        samples[0] += [("000000006", b"\xff\xd8 not a jpeg", "corrupt", {"pwatermark": 0.1}),
                       ("000000007", _jpg(7), None, {"pwatermark": 0.1}),
                       ("000000008", _jpg(8, side=8), "tiny", {"pwatermark": 0.1}),
                       ("000000009", _jpg(9), "watermarked", {"pwatermark": 0.95})]
    for s, items in enumerate(samples):
        path = os.path.join(root, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for key, jpg, caption, extra in items:
                _add(tar, f"{key}.jpg", jpg)
                if caption is not None:
                    _add(tar, f"{key}.txt", caption.encode())
                meta = {"key": key, "status": "success", "width": 28, "height": 24, **extra}
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        with open(os.path.join(root, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": len(items), "successes": len(items)}, f)
        open(os.path.join(root, f"{s:05d}.parquet"), "wb").close()  # not a shard: never read
    if bad:
        last = os.path.join(root, "00002.tar")
        with open(last, "r+b") as f:
            cut = f.read().index(b"000020002.jpg") + 512 + 100  # inside the third sample's image
            f.truncate(cut)
    return os.path.join(root, "*.tar")


def test_source_streams_filters_and_counts_every_skip(tmp_path):
    pattern = write_shards(str(tmp_path / "shards"))
    src = img2dataset.WebDatasetSource(pattern, image_size=SIZE, min_side=16, max_pwatermark=0.8)
    assert [os.path.basename(p) for p in src.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    examples = list(src)
    ids = [e[0] for e in examples]
    assert ids == list(range(6)) + list(range(10000, 10004)) + [20000, 20001]
    assert all(e[1].shape == (SIZE, SIZE, 3) and e[1].dtype == np.uint8 for e in examples)
    assert examples[0][2] == "a photo number 0"
    assert src.skipped.as_dict() == {"unreadable image": 1, "missing caption": 1, "min_side": 1,
                                     "pwatermark": 1, "corrupt shard": 1}
    assert src.skipped.examples["corrupt shard"] == [os.path.join(str(tmp_path / "shards"), "00002.tar")]
    assert src.skipped.examples["pwatermark"][0].endswith("00000.tar:000000009")
    # Raw items = examples + skips, and len() says so without decoding anything: from
    # img2dataset's <shard>_stats.json without opening a shard, else from the members' headers.
    def no_reading(*args, **kwargs):
        raise AssertionError("len() opened a shard")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(img2dataset, "_samples", no_reading)
        assert len(img2dataset.WebDatasetSource(pattern)) == len(examples) + src.skipped.total
    for shard in src.shards[1:]:
        os.remove(img2dataset.stats_path(shard))
    assert len(img2dataset.WebDatasetSource(pattern)) == len(examples) + src.skipped.total
    # Unset filters keep the undersized and the watermarked items; a filter on absent metadata drops all.
    loose = img2dataset.WebDatasetSource(pattern)
    assert len(list(loose)) == 14 and "pwatermark" not in loose.skipped.as_dict()
    strict = img2dataset.WebDatasetSource(pattern, min_aesthetic=5.0)
    # Filters run before decoding: the corrupt image counts as filtered, the captionless as captionless.
    assert list(strict) == [] and strict.skipped.as_dict()["aesthetic"] == 15
    with pytest.raises(FileNotFoundError, match="no webdataset shards match"):
        img2dataset.WebDatasetSource(str(tmp_path / "none" / "*.tar"))
    made = sources.make_source({"kind": "webdataset", "paths": pattern, "min_side": 16})
    assert isinstance(made, img2dataset.WebDatasetSource) and made.min_side == 16


def test_build_db_and_precompute_from_shards(tmp_path):
    work = str(tmp_path / "work")
    pattern = write_shards(str(tmp_path / "shards"))
    source = {"kind": "webdataset", "paths": pattern, "image_size": SIZE, "min_side": 16,
              "max_pwatermark": 0.8}
    cfg = make_config(**{"db.source": source, "db.limit": 0, "source": source, "max_source_items": 0,
                         "num_shards": 2, "db.dir": os.path.join(work, "db")})
    summary = build_db.build_db(cfg, work)
    assert summary["count"] == 12
    assert summary["skipped"] == {"unreadable image": 1, "missing caption": 1, "min_side": 1,
                                  "pwatermark": 1, "corrupt shard": 1}
    precompute.precompute(cfg, work)
    m = tfrecords.validate_manifest(os.path.join(work, "data"), split="train")
    assert sum(f["num_examples"] for f in m["splits"]["train"]["files"]) == 12
    skipped = m["splits"]["train"].get("skipped") or m.get("skipped")
    assert skipped == {"unreadable image": 1, "missing caption": 1, "min_side": 1, "pwatermark": 1,
                       "corrupt shard": 1}


def test_precompute_webdataset_config(tmp_path):
    from imagerag_jax.config_args import load_module

    pattern = write_shards(str(tmp_path / "shards"))
    module = load_module(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                      "precompute_webdataset.py"))
    cfg = module.get_config(f"paths={pattern},image_size=16,min_side=16,max_pwatermark=0.8,teacher")
    assert cfg.latents == "teacher" and cfg.source.paths == cfg.db.source.paths == pattern
    assert cfg.db.source.max_punsafe is None  # an unset filter is None (no filter), not 0
    src = sources.source_from_config(cfg.db.source)
    assert len(list(src)) == 12 and src.skipped.total == 5
    with pytest.raises(ValueError, match="needs paths=GLOB"):
        module.get_config("")


def test_build_db_filter_as_a_config_override(tmp_path, capfd):
    """`--config.db.source.min_side=16` on the command line filters as `min_side=16` in the arg."""
    pattern = write_shards(str(tmp_path / "shards"))
    work = tmp_path / "work"
    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "precompute_webdataset.py")
    res = cli_in_process(capfd, "build-db", "--config", f"{config}:paths={pattern},image_size={SIZE}",
                         "--config.db.source.min_side=16", f"--workdir={work}", cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "'min_side': 1" in res.stdout + res.stderr  # the undersized image is skipped
    manifest = json.loads((work / "db" / "manifest.json").read_text())
    assert manifest["count"] == 13  # 17 items less 4 skips (no watermark filter given)


def _prompt_files(root):
    """The same five prompts (one empty) as .txt, .jsonl, .csv and .parquet lists."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = ["a red cube", "two cats on a sofa", "", "a lighthouse at dusk", "a bowl of ramen"]
    os.makedirs(root, exist_ok=True)
    paths = {ext: os.path.join(root, f"prompts.{ext}") for ext in ("txt", "jsonl", "csv", "parquet")}
    with open(paths["txt"], "w") as f:
        f.write("\n".join(prompts) + "\n")
    with open(paths["jsonl"], "w") as f:
        f.writelines(json.dumps({"caption": p, "id": 50 + i}) + "\n" for i, p in enumerate(prompts))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([50 + i, p] for i, p in enumerate(prompts))
    pq.write_table(pa.table({"caption": prompts, "id": [50 + i for i in range(5)]}), paths["parquet"],
                   row_group_size=2)
    return prompts, paths


def test_prompt_lists_precompute_teacher_pairs(tmp_path):
    prompts, paths = _prompt_files(str(tmp_path / "prompts"))
    kept = [p for p in prompts if p]
    for ext, path in paths.items():
        src = sources.make_source({"kind": "prompts", "path": path,
                                   **({} if ext == "txt" else {"id_key": "id"})})
        got = list(src)
        assert [c for _, _, c in got] == kept and all(im is None for _, im, _ in got), ext
        assert [i for i, _, _ in got] == ([0, 1, 3, 4] if ext == "txt" else [50, 51, 53, 54]), ext
        assert len(src) == 5 and src.skipped.as_dict() == {"empty prompt": 1}
    with pytest.raises(KeyError, match="no column 'prompt'"):
        list(sources.PromptListSource(paths["parquet"], caption_key="prompt"))
    with pytest.raises(ValueError, match=r"\.txt, \.jsonl, \.csv or \.parquet"):
        sources.PromptListSource(str(tmp_path / "prompts.xlsx"))

    work = str(tmp_path / "work")
    source = {"kind": "prompts", "path": paths["parquet"], "id_key": "id"}
    build_db.build_db(make_config(**{"db.dir": os.path.join(work, "db")}), work)  # the digits DB
    cfg = make_config("quick,teacher", source=source, max_source_items=0, num_shards=1,
                      **{"db.dir": os.path.join(work, "db")})
    precompute.precompute(cfg, work)
    data = os.path.join(work, "data")
    m = tfrecords.validate_manifest(data, split="train")
    assert m["schema"]["has_noise"] and m["splits"]["train"]["files"][0]["num_examples"] == 4
    from imagerag_jax.data import input_stream

    batch = next(input_stream.InputStream(data, "train", 4, shuffle_buffer=1, include_prompt=True))
    assert sorted(batch["prompt"].tolist()) == sorted(kept)
    assert sorted(batch["example_id"].tolist()) == [50, 51, 53, 54]
    # Real-image latents and a retrieval database need images.
    with pytest.raises(ValueError, match="prompts only: it needs config.latents='teacher'"):
        precompute.precompute(make_config(source=source, data_dir=str(tmp_path / "vae"),
                                          **{"db.dir": os.path.join(work, "db")}), work)
    with pytest.raises(ValueError, match="a retrieval database needs images"):
        build_db.build_db(make_config(**{"db.source": source, "db.dir": str(tmp_path / "db2")}), work)


def test_img2dataset_parquet_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(key=f"00000{i:04d}", status="success", caption=f"photo {i}", jpg=_jpg(i), pwatermark=0.1)
            for i in range(5)]
    rows[1]["status"] = "failed_to_download"
    rows[1]["jpg"] = None
    rows[2]["caption"] = ""
    rows[3]["pwatermark"] = 0.9
    path = str(tmp_path / "00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    src = sources.make_source({"kind": "parquet", "paths": str(tmp_path / "*.parquet"),
                               "image_size": SIZE, "max_pwatermark": 0.5})
    got = list(src)
    assert [i for i, _, _ in got] == [0, 4] and got[1][2] == "photo 4" and got[0][1].shape == (SIZE, SIZE, 3)
    assert src.skipped.as_dict() == {"status": 1, "missing caption": 1, "pwatermark": 1}
    assert len(src) == 5
    # A damaged file (here: no parquet footer at all) is one counted 'corrupt shard'; the rest flows.
    (tmp_path / "00001.parquet").write_bytes(b"PAR1 not really parquet")
    src = sources.make_source({"kind": "parquet", "paths": str(tmp_path / "*.parquet"),
                               "image_size": SIZE})
    assert len(src) == 6 and [i for i, _, _ in src] == [0, 3, 4]
    assert src.skipped.as_dict() == {"status": 1, "missing caption": 1, "corrupt shard": 1}
    with pytest.raises(KeyError, match="no column 'image'"):
        list(sources.make_source({"kind": "parquet", "paths": path, "image_column": "image"}))


def test_shard_cut_at_a_header_boundary_is_counted(tmp_path):
    # tarfile ends silently at a missing or garbled header; the end-of-archive check catches it.
    pattern = write_shards(str(tmp_path / "shards"), bad=False)
    last = str(tmp_path / "shards" / "00002.tar")
    with open(last, "rb") as f:
        raw = f.read()
    for cut, garble in ((raw.index(b"000020002.jpg"), False), (raw.index(b"000020002.jpg"), True)):
        with open(last, "wb") as f:
            f.write(raw[:cut] + (b"\x01" * 512 + raw[cut + 512:] if garble else b""))
        src = img2dataset.WebDatasetSource(pattern)
        ids = [e[0] for e in src]
        # The sample still open at the cut (000020001: more of its members may be lost) is dropped.
        assert ids[-2:] == [10003, 20000] and len(ids) == 11, garble
        assert src.skipped.as_dict() == {"corrupt shard": 1}
        # img2dataset's stats count the 3 samples it wrote to the shard: an upper bound once it is
        # cut; streamed, the shard's 2 whole samples and its damage.
        assert len(img2dataset.WebDatasetSource(pattern)) == 13
        stats = img2dataset.stats_path(last)
        os.rename(stats, stats + ".away")
        assert len(img2dataset.WebDatasetSource(pattern)) == 12
        os.rename(stats + ".away", stats)
