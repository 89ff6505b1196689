"""A prompt file -> one image per prompt, its neighbours and metrics: what ``main evaluate`` runs.

    from imagerag_jax.evaluation import evaluate as ep
    from imagerag_jax.inference import rag
    pipe = rag.RagPipeline.from_run("/runs/coco")
    prompts = ep.read_prompts("prompts.txt")                    # .txt, .jsonl or .csv
    ep.evaluate_prompts(pipe, prompts, "/eval/coco", reference="/coco/val2017",
                        inception="/models/inception-2015-12-05.pt", clip="/models/clip-vit-l-14")

The folder `out_dir`:
  run.json              the pinned settings: pipeline.describe(), mode, k, w, seed, batch, count
                        and the prompts' sha256; a rerun with other settings is refused.
  images/{i:06d}.png    the image of prompt i. Its noise is drawn from PRNGKey(seed + i) alone, so
                        an image does not depend on the batch size or the number of hosts.
  batches/{i:06d}.json  the record of the finished batch whose first prompt is i (its prompts,
                        files, retrieved ids, captions, scores, λ, the pipeline's seconds), written
                        atomically after its PNGs: the batch's done marker; a rerun skips those.
  index.jsonl           one line per prompt, in order: prompt, file, ids, captions, scores, λ.
  metrics.json, .md     count, mode, k, w, latency per image (total, denoise, ...), FID against
                        the `reference` images in the `inception` network's features, CLIP score
                        with the `clip` model; a metric whose network is not given is omitted.

Host p of P generates the prompts i with i % P == p, in batches of `batch_size` (the pipeline
shards a batch over the local devices). Process 0 writes index.jsonl and the metrics once every
prompt has a record: under jax.distributed it waits for the other hosts; hosts run as separate
jobs (explicit process_index / process_count) leave that to a rerun of process 0 after the rest.
Reference images are centre-cropped to the generated aspect ratio and resized (bicubic) to the
generated size; both sets are read from PNG/JPEG as uint8, so the FID is that of the files.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm

from imagerag_jax import jsonfiles, storage
from imagerag_jax.evaluation import metrics as metrics_lib
from imagerag_jax import images as image_utils
from imagerag_jax.errors import UserError
from imagerag_jax.weights import hub

RUN_FORMAT, BATCH_FORMAT, METRICS_FORMAT, VERSION = (
    "imagerag-evaluate-run", "imagerag-evaluate-batch", "imagerag-evaluate-metrics", 1)
PROMPT_FIELDS = ("prompt", "caption", "text")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGES_DIR, BATCHES_DIR = "images", "batches"
DEVICE_BATCH = 4  # default batch: this many images per local device
FEATURE_CHUNK = 50  # images decoded at a time for the feature networks


# --------------------------------------------------------------------------- prompt files


def _check_prompt(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: the prompt is a {type(value).__name__}, not a string")
    if not value.strip():
        raise UserError(f"{where}: empty prompt")
    return value


def _read_jsonl(path: str, text: str) -> list[str]:
    prompts = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not a JSON line ({e.msg})") from e
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        field = next((f for f in PROMPT_FIELDS if f in row), None)
        if field is None:
            raise UserError(f"{path}:{n}: no {'/'.join(PROMPT_FIELDS)} field")
        prompts.append(_check_prompt(row[field], f"{path}:{n}"))
    return prompts


def _read_csv(path: str, text: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))  # quoted fields may hold newlines
    header = reader.fieldnames or []
    field = next((f for f in PROMPT_FIELDS if f in header), None)
    if field is None:
        raise UserError(f"{path}: no {'/'.join(PROMPT_FIELDS)} column (columns: {header})")
    prompts = []
    for row in reader:
        prompts.append(_check_prompt(row[field], f"{path}:{reader.line_num}"))
    return prompts


class CocoPrompts(NamedTuple):
    """The prompts drawn from an MS-COCO captions file and the image file of each."""

    prompts: list[str]
    file_names: list[str]
    image_ids: list[int]


def read_coco_captions(path: str, num_prompts: int | None = None, seed: int = 0) -> CocoPrompts:
    """The paper's MS-COCO prompt set from a captions annotation file (``captions_val2017.json``).

    One caption per image (drawn per image with ``seed``), the images in a ``seed``-fixed random
    order, the first ``num_prompts`` of them (all by default: the 5,000 of val2017 are the
    paper's "MS-COCO 5k"); a smaller set is a prefix of a larger one. Each prompt's image (its
    ``file_name``) is the FID reference image for it.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the COCO captions file ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
            or not isinstance(data.get("images"), list):
        raise UserError(f"{path}: not an MS-COCO captions file (expected 'images' and 'annotations' lists)")
    captions: dict[int, list[str]] = {}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise UserError(f"{path}: annotation {n} has no image_id and caption")
        captions.setdefault(int(ann["image_id"]), []).append(
            _check_prompt(ann["caption"], f"{path}: annotation {n}").strip())
    files = {}
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise UserError(f"{path}: image {n} has no id and file_name")
        files[int(im["id"])] = str(im["file_name"])
    ids = sorted(i for i in files if i in captions)
    if not ids:
        raise UserError(f"{path}: no image has a caption")
    if num_prompts is not None and not 1 <= num_prompts <= len(ids):
        raise UserError(f"--num_prompts {num_prompts}: {path} has {len(ids)} captioned images")
    rng = np.random.default_rng([seed, 5000])
    pick = {i: int(rng.integers(len(captions[i]))) for i in ids}  # one caption per image
    order = [ids[j] for j in rng.permutation(len(ids))][:num_prompts]
    return CocoPrompts([captions[i][pick[i]] for i in order], [files[i] for i in order], order)


def read_prompts(path: str) -> list[str]:
    """Prompts from .txt (one a line, blank lines skipped), .jsonl or .csv (prompt/caption/text),
    or an MS-COCO captions .json (``read_coco_captions``: one caption per image, all images)."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return read_coco_captions(path).prompts
    if ext not in (".txt", ".jsonl", ".csv"):
        raise UserError(f"{path}: unknown prompt file type {ext!r} (use .txt, .jsonl, .csv or an "
                        "MS-COCO captions .json)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the prompt file ({e})") from e
    if ext == ".txt":
        prompts = [line.strip() for line in text.split("\n") if line.strip()]
    elif ext == ".jsonl":
        prompts = _read_jsonl(path, text)
    else:
        prompts = _read_csv(path, text)
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


# --------------------------------------------------------------------------- noise and files


@functools.partial(jax.jit, static_argnums=1)
def _normal(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape))(seeds)


def image_noise(seed: int, indices: Sequence[int], latent_shape: Sequence[int]) -> np.ndarray:
    """(B, h, w, c) float32 noise: row j is normal(PRNGKey(seed + indices[j]), latent_shape)."""
    seeds = np.asarray([seed + int(i) for i in indices], np.uint32)
    return np.asarray(_normal(seeds, tuple(int(d) for d in latent_shape)), np.float32)


def image_file(i: int) -> str:
    """The path of prompt i's image, relative to the out dir."""
    return f"{IMAGES_DIR}/{i:06d}.png"


def _read_png(path: str) -> np.ndarray:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with storage.open_file(path, "rb") as f, Image.open(io.BytesIO(f.read())) as im:
        return np.asarray(im.convert("RGB"))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- settings and records


def _settings(pipe: Any, prompts: Sequence[str], mode: str, k: int, w: float, seed: int,
              batch: int) -> dict[str, Any]:
    digest = hashlib.sha256(jsonfiles.canonical(list(prompts)).encode()).hexdigest()
    # The device count only pads the pipeline's batch: a resume on another machine is the same job.
    described = {key: v for key, v in pipe.describe().items() if key != "devices"}
    return jsonfiles.normalized({"pipeline": described, "mode": mode, "k": k, "w": w,
                                 "seed": seed, "batch": batch, "count": len(prompts),
                                 "prompts_sha256": digest})


def _pin_settings(out_dir: str, settings: dict[str, Any], batch_size: int | None) -> dict[str, Any]:
    """The job's settings, written to run.json while out_dir holds no finished batch.

    Once a batch record exists they are those of the images on disk, and a rerun must match them.
    """
    path = os.path.join(out_dir, "run.json")
    fresh = not _record_names(out_dir)
    if not storage.exists(path):
        images = os.path.join(out_dir, IMAGES_DIR)
        if not fresh or (storage.isdir(images) and storage.listdir(images)):
            raise UserError(f"{out_dir} holds {'batch records' if not fresh else 'images/'} but no "
                            f"run.json: it is not an evaluation folder of this tool; use a new --out")
    elif not fresh:
        old = jsonfiles.read_versioned(path, RUN_FORMAT, VERSION, what="evaluation settings file",
                                       error=UserError)["settings"]
        if batch_size is None:  # an unspecified batch resumes with the recorded one
            settings["batch"] = old.get("batch")
        if old != settings:
            diff = sorted(key for key in set(old) | set(settings) if old.get(key) != settings.get(key))
            raise UserError(f"{out_dir} holds an evaluation with other settings (differs in "
                            f"{', '.join(diff)}); use a new --out or delete it")
        return settings
    storage.makedirs(out_dir)
    jsonfiles.write_atomic(path, {"format": RUN_FORMAT, "version": VERSION, "settings": settings})
    return settings


def _record_names(out_dir: str) -> list[str]:
    """The batch record files in out_dir (temporaries of interrupted writes excluded)."""
    folder = os.path.join(out_dir, BATCHES_DIR)
    if not storage.isdir(folder):
        return []
    return sorted(n for n in storage.listdir(folder) if n.endswith(".json") and not n.startswith("."))


def _read_records(out_dir: str) -> dict[int, dict[str, Any]]:
    """First index -> batch record; UserError for a record whose image is gone (not a crash: the
    PNGs are written before the record)."""
    records = {}
    for name in _record_names(out_dir):
        path = os.path.join(out_dir, BATCHES_DIR, name)
        rec = jsonfiles.read_versioned(path, BATCH_FORMAT, VERSION, what="batch record",
                                       error=UserError, hint="delete it to regenerate the batch")
        missing = [f for f in rec["files"] if not storage.isfile(os.path.join(out_dir, f))]
        if missing:
            raise UserError(f"{path}: its image {missing[0]} is missing; delete the record to "
                            f"regenerate the batch")
        records[rec["indices"][0]] = rec
    return records


def _as_list(x: Any, j: int) -> Any:
    return None if x is None else np.asarray(x)[j].tolist()


def _run_batch(pipe: Any, out_dir: str, prompts: Sequence[str], indices: Sequence[int],
               settings: dict[str, Any], warmup: bool) -> None:
    """Generates one batch, writes its PNGs, then its record (the done marker)."""
    batch_prompts = [prompts[i] for i in indices]
    noise = image_noise(settings["seed"], indices, pipe.latent_shape)
    out = pipe(batch_prompts, noise=noise, k=settings["k"], mode=settings["mode"],
               w=settings["w"])
    pixels = image_utils.to_uint8(out.images)
    files = [image_file(i) for i in indices]
    for j, f in enumerate(files):
        image_utils.save_png(pixels[j], os.path.join(out_dir, f))
    record = {
        "format": BATCH_FORMAT, "version": VERSION, "indices": list(indices), "files": files,
        "prompts": batch_prompts, "mode": out.mode,
        "ids": [_as_list(out.ids, j) for j in range(len(indices))],
        "captions": [None if out.captions is None else list(out.captions[j])
                     for j in range(len(indices))],
        "scores": [_as_list(out.scores, j) for j in range(len(indices))],
        "lam": [_as_list(out.lam, j) for j in range(len(indices))],
        "seconds": {key: float(v) for key, v in out.seconds.items()},
        "used_cache": bool(out.used_cache),
        "warmup": warmup,  # the first call of this batch length in this process compiles
    }
    jsonfiles.write_atomic(os.path.join(out_dir, BATCHES_DIR, f"{indices[0]:06d}.json"), record)


# --------------------------------------------------------------------------- metrics


class _Metrics:
    """The feature networks of the finalizing process, loaded (and the reference read) up front."""

    def __init__(self, reference: str | None, inception: str | None, clip: str | Sequence[str] | None,
                 image_size: Sequence[int], reference_names: Sequence[str] | None = None,
                 aesthetic: str | None = None):
        self.notes: list[str] = []
        # Hub ids become local paths here, once; the metrics record them as hub.label gives them.
        inception = None if inception is None else hub.torchscript_file(inception).path
        clips = [] if clip is None else [clip] if isinstance(clip, str) else list(clip)
        self.clip_paths = [hub.local_path(c, ("clip",)) for c in clips]
        self.inception_path, self.reference = inception, reference
        self.features = self.ref_feats = None
        if reference is not None and inception is not None:
            self.features = _load(lambda: metrics_lib.InceptionFeatures(inception), inception,
                                  "an Inception TorchScript file")
            self.ref_feats = reference_features(self.features, reference, image_size, reference_names)
        else:
            if reference is None and inception is None:
                note, log = "FID omitted: no reference images and Inception network given", logging.info
            else:  # half of the pair: likely a mistake, so a warning
                have, lack = (("--reference", "--inception") if inception is None
                              else ("--inception", "--reference"))
                note, log = f"FID omitted: {have} given without {lack}", logging.warning
            log("%s", note)
            self.notes.append(note)
        self.scorers = [_load(lambda c=c: metrics_lib.CLIPScorer(c), c, "a CLIP model folder")
                        for c in self.clip_paths]
        if not self.scorers:
            logging.info("CLIP score omitted: no CLIP model folder given")
            self.notes.append("CLIP score omitted: no CLIP model folder given")
        self.aesthetic = self.aesthetic_path = None
        if aesthetic is not None:
            if not self.scorers:
                raise UserError("--aesthetic needs --clip: the CLIP ViT-L/14 model its predictor reads")
            self.aesthetic_path = os.path.abspath(aesthetic)
            # On the first CLIP model whose embedding width is the predictor's input (ViT-L/14).
            self.aesthetic = _load(lambda: metrics_lib.AestheticScorer(aesthetic, self.scorers),
                                   aesthetic, "an aesthetic predictor")

    def compute(self, out_dir: str, prompts: Sequence[str]) -> dict[str, Any]:
        """FID and CLIP score of the images in out_dir (those whose networks were given)."""
        out: dict[str, Any] = {}
        files = [os.path.join(out_dir, image_file(i)) for i in range(len(prompts))]
        if self.features is not None:
            if len(files) < 2 or len(self.ref_feats) < 2:
                note = "FID omitted: it needs at least 2 generated and 2 reference images"
                logging.warning("%s", note)
                self.notes.append(note)
            else:
                feats = np.concatenate([
                    metrics_lib.batched_features(self.features, np.stack([_read_png(f) for f in c]))
                    for c in _chunks(files, FEATURE_CHUNK)])
                out.update(fid=metrics_lib.frechet_distance(self.ref_feats, feats),
                           fid_reference=os.path.abspath(self.reference),
                           fid_reference_count=len(self.ref_feats),
                           inception=hub.label(self.inception_path))
        for j, (scorer, path) in enumerate(zip(self.scorers, self.clip_paths)):
            scores = np.concatenate([
                scorer.scores(np.stack([_read_png(files[i]) for i in c]), [prompts[i] for i in c])
                for c in _chunks(range(len(files)), FEATURE_CHUNK)])
            score = float(np.maximum(scores, 0.0).mean())
            if j == 0:  # the first model's is `clip_score`; every model's is in `clip_scores`
                out.update(clip_score=score, clip=hub.label(path), clip_scores={})
            out["clip_scores"][hub.label(path)] = score
        if self.aesthetic is not None:
            aes = np.concatenate([self.aesthetic.scores(np.stack([_read_png(f) for f in c]))
                                  for c in _chunks(files, FEATURE_CHUNK)])
            out.update(aesthetic_score=float(aes.mean()), aesthetic=self.aesthetic_path)
        return out


def _load(make: Any, path: str, what: str) -> Any:
    """make(), with a missing or unloadable model file as one UserError naming it."""
    try:
        return make()
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: cannot load {what} ({str(e).splitlines()[0] if str(e) else e!r})"
                        ) from e


def reference_images(folder: str, names: Sequence[str] | None = None) -> list[str]:
    """The PNG/JPEG files in a folder, sorted, or the files `names` in it (in that order, each
    checked); UserError when there are none or one named is missing."""
    if names is not None:
        files = [os.path.join(folder, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UserError(f"{folder}: {len(missing)} of the prompts' {len(files)} reference images "
                            f"are missing, e.g. {os.path.basename(missing[0])}")
        return files
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: the reference image folder does not exist")
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserError(f"{folder}: no PNG or JPEG images in the reference folder")
    return files


def load_reference_image(path: str, size: Sequence[int]) -> np.ndarray:
    """uint8 (H, W, 3): the image centre-cropped to H:W and resized to (H, W) bicubically."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    h, w = int(size[0]), int(size[1])
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable reference image ({e})") from e
    iw, ih = im.size
    if iw * h > ih * w:  # wider than the target: crop the sides
        cw = round(ih * w / h)
        im = im.crop(((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih))
    elif iw * h < ih * w:
        ch = round(iw * h / w)
        im = im.crop((0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch))
    if im.size != (w, h):
        im = im.resize((w, h), Image.BICUBIC)
    return np.asarray(im)


def reference_features(feature_fn: Any, folder: str, size: Sequence[int],
                       names: Sequence[str] | None = None) -> np.ndarray:
    """(N, F) features of the reference images (`reference_images`; read in chunks; a bad file
    is a UserError)."""
    files = reference_images(folder, names)
    return np.concatenate([
        metrics_lib.batched_features(feature_fn, np.stack([load_reference_image(f, size) for f in c]))
        for c in tqdm.tqdm(list(_chunks(files, FEATURE_CHUNK)), desc="reference features",
                           unit="chunk", leave=False)])


def _latency(records: Sequence[dict[str, Any]]) -> tuple[dict[str, float], str]:
    """Mean per-image seconds by part over the batches that did not compile (all if none)."""
    timed = [r for r in records if not r.get("warmup")]
    note = "excludes each process's first batch of every size (compilation)"
    if not timed:
        timed, note = list(records), "includes compilation: every batch was a first call"
    parts = sorted({key for r in timed for key in r["seconds"]})
    return ({p: float(np.mean([r["seconds"].get(p, 0.0) / len(r["indices"]) for r in timed]))
             for p in parts}, f"{note}; {len(timed)} batch(es)")


def _metrics_markdown(m: dict[str, Any]) -> str:
    rows = [("images", m["count"]), ("mode", m["mode"]), ("k", m["k"]), ("w", m["w"]),
            ("seed", m["seed"])]
    rows += [(f"latency per image, {p} (s)", f"{v:.4g}") for p, v in m["latency_s"].items()]
    if "lambda_mean" in m:
        rows.append(("mean λ", f"{m['lambda_mean']:.4g}"))
    if "fid" in m:
        rows.append((f"FID ({m['fid_reference_count']} reference images)", f"{m['fid']:.4f}"))
    for label, score in m.get("clip_scores", {}).items():
        rows.append((f"CLIP score ({os.path.basename(label.rstrip('/'))})", f"{score:.4f}"))
    if "aesthetic_score" in m:
        rows.append(("aesthetic score (LAION predictor)", f"{m['aesthetic_score']:.4f}"))
    lines = [f"# Evaluation of {m['count']} prompts", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", f"Latency: {m['latency_note']}."]
    lines += [f"{note}." for note in m["omitted"]]
    return "\n".join(lines) + "\n"


def _finalize(out_dir: str, prompts: Sequence[str], settings: dict[str, Any],
              records: dict[int, dict[str, Any]], metrics: _Metrics) -> dict[str, Any]:
    """Writes index.jsonl, metrics.json and metrics.md from the complete batch records."""
    rows: dict[int, dict[str, Any]] = {}
    for rec in records.values():
        for j, i in enumerate(rec["indices"]):
            if i in rows:
                raise UserError(f"{out_dir}: two batch records hold prompt {i}; delete "
                                f"{BATCHES_DIR}/ and images/ and rerun")
            rows[i] = {"index": i, "prompt": rec["prompts"][j], "file": rec["files"][j],
                       "ids": rec["ids"][j], "captions": rec["captions"][j],
                       "scores": rec["scores"][j], "lam": rec["lam"][j]}
    extra = metrics.compute(out_dir, prompts)  # before any write: a failure leaves files as they were
    latency, latency_note = _latency(list(records.values()))
    lams = [r["lam"] for r in rows.values() if r["lam"] is not None]
    m = {"format": METRICS_FORMAT, "version": VERSION, "count": len(prompts),
         "mode": settings["mode"], "k": settings["k"], "w": settings["w"],
         "seed": settings["seed"], "batch": settings["batch"], "pipeline": settings["pipeline"],
         "latency_s": latency, "latency_note": latency_note,
         **({"lambda_mean": float(np.mean(lams))} if lams else {}), **extra,
         "omitted": list(metrics.notes)}
    jsonfiles.write_text(os.path.join(out_dir, "index.jsonl"), "".join(
        json.dumps(rows[i], ensure_ascii=False) + "\n" for i in range(len(prompts))))
    jsonfiles.write_atomic(os.path.join(out_dir, "metrics.json"), m)
    jsonfiles.write_text(os.path.join(out_dir, "metrics.md"), _metrics_markdown(m))
    return m


# --------------------------------------------------------------------------- the job


def evaluate_prompts(pipe: Any, prompts: Sequence[str], out_dir: str, *,
                     batch_size: int | None = None, seed: int = 0, mode: str | None = None,
                     k: int | None = None, w: float | None = None, reference: str | None = None,
                     inception: str | None = None, clip: str | Sequence[str] | None = None,
                     aesthetic: str | None = None, reference_names: Sequence[str] | None = None,
                     process_index: int | None = None,
                     process_count: int | None = None) -> dict[str, Any]:
    """Generates this host's prompts into out_dir (resumable); process 0 then writes the metrics.

    ``clip``: one CLIP model or several (e.g. ViT-L/14 and the paper's OpenCLIP ViT-bigG-14 in
    transformers' format, laion/CLIP-ViT-bigG-14-laion2B-39B-b160k), each scored into
    ``clip_scores`` (the first also as ``clip_score``). ``aesthetic``: LAION's aesthetic
    predictor file (``metrics.AestheticScorer``) on the first ``clip`` model of its input width
    (ViT-L/14) for the mean aesthetic score. ``reference_names``: the FID reference is these files of ``reference`` (e.g. the images of
    MS-COCO prompts, ``read_coco_captions``) instead of every image in it.

    Returns {"complete", "generated" (images made by this call), "skipped" (this host's images
    already done), "missing" (prompts without a record), "metrics" (None unless written now)}.
    """
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompts given")
    distributed = process_index is None and process_count is None and jax.process_count() > 1
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise UserError(f"process_index {pi} is not in [0, {pc})")
    # The pipeline checks mode, k and w on its first call; run.json stays rewritable until then.
    mode = pipe.mode if mode is None else mode
    k = int(pipe.k if k is None else k)
    w = float(pipe.w if w is None else w)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch must be >= 1, got {batch_size}")
    default_batch = DEVICE_BATCH * jax.local_device_count()
    settings = _settings(pipe, prompts, mode, k, w, int(seed), batch_size or default_batch)
    settings = _pin_settings(out_dir, settings, batch_size)
    # The finalizer loads its networks and reads the reference first: a bad file fails fast.
    metrics = (_Metrics(reference, inception, clip, pipe.image_size, reference_names, aesthetic)
               if pi == 0 else None)

    storage.makedirs(os.path.join(out_dir, IMAGES_DIR))  # a local folder or a URL (gs://...)
    storage.makedirs(os.path.join(out_dir, BATCHES_DIR))
    done = {i for rec in _read_records(out_dir).values() for i in rec["indices"]}
    mine = list(range(pi, len(prompts), pc))
    todo = [i for i in mine if i not in done]
    logging.info("evaluate: process %d/%d has %d of %d prompts; %d to generate in batches of %d",
                 pi, pc, len(mine), len(prompts), len(todo), settings["batch"])
    bar = tqdm.tqdm(total=len(mine), initial=len(mine) - len(todo), unit="image",
                    desc=f"evaluate p{pi}")
    compiled: set[int] = set()
    for indices in _chunks(todo, settings["batch"]):
        _run_batch(pipe, out_dir, prompts, indices, settings, warmup=len(indices) not in compiled)
        compiled.add(len(indices))
        bar.update(len(indices))
    bar.close()

    if distributed:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"evaluate_prompts {os.path.abspath(out_dir)}")
    summary = {"complete": False, "generated": len(todo), "skipped": len(mine) - len(todo),
               "missing": 0, "metrics": None}
    if pi != 0:
        return summary
    records = _read_records(out_dir)
    summary["missing"] = len(prompts) - len({i for r in records.values() for i in r["indices"]})
    if summary["missing"]:
        logging.warning("evaluate: %d prompts have no batch record yet (other hosts); rerun "
                        "process 0 once they finish to write index.jsonl and the metrics",
                        summary["missing"])
        return summary
    summary.update(complete=True, metrics=_finalize(out_dir, prompts, settings, records, metrics))
    return summary
