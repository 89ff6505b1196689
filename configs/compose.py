r"""The compositional miniature: prompts that bind colours and digits to sides, and a long tail.

Canvases of two of scikit-learn's handwritten digits side by side, each tinted red, green, blue
or yellow (16x16 RGB, 1,600 compositions), captioned in varied wording and order ("a red 3 to the
left of a blue 7", ...). The training split is long-tailed over compositions (frequent / rare /
never seen), the retrieval database holds every composition, and the held-out prompts are
stratified by that frequency (`miniature/compose.py`). Every tower is trained here (tiny VAE, a
CLIP-style text encoder trained against the coloured canvases, a teacher with CFG, a one-step
turbo student), then ImageRAGTurbo with the production build-db -> precompute -> train path on
the paper's mixture of teacher-synthesised and real pairs; a TIFA-like judge reads each side's
digit and colour. Results: workdir/results.{json,md} and grids/.

  python -m imagerag_jax.main run --config configs/compose.py:quick --workdir /tmp/compose_quick
  python -m imagerag_jax.main run --config configs/compose.py --workdir /tmp/compose
  python -m imagerag_jax.main run --config configs/compose.py:seeds=3 --workdir /tmp/compose3

Arg string: ``quick`` (fewer steps: 10 min on a 2-core Zen 5 VM, 16 on a Zen 4 one),
``smoke`` (a few steps per stage: checks the plumbing in tests, the numbers mean nothing),
``seeds=N`` (training seeds seed..seed+N-1, each in workdir/seed_S, then the table over
seeds), ``k=N`` neighbours, ``positional=none|sincos`` (the adapter's position code,
models/adapter.py; the paper's adapter has none), ``self_neighbour`` (diagnostic: ImageRAGTurbo
trains with neighbour 0 replaced by the example itself, an upper bound on what the adapter can
take from a neighbour; training/step.py), ``prediction=epsilon|v_prediction`` (what the teacher and
so the student UNet predict; eps, the default, is SD 2.1-base's and SD-Turbo's, v is SD 2.1-768's:
with v the one-step student matches its teacher and the task saturates, docs/compose_findings.md),
``arms`` (two more students trained beside ImageRAGTurbo, each a row: ``imageragturbo_no_adapter``,
the same LoRA, losses and data without the adapter, and ``imageragturbo_shuffled``, the adapter
and LoRA trained on neighbours shuffled across the batch with lambda kept; training/step.ARMS),
``block=attention|transformer`` (the adapter: our cross-attention block, the default here, or
the paper's SD transformer block; models/adapter.py),
``novel=D`` (digits, e.g. ``novel=9``, that the teacher and student UNets never see: the
database holds every composition with them and the held-out prompts gain a 'novel' class, a
concept only retrieval can supply; the VAE and text encoder see every canvas), ``blind=D``
(digits the teacher and student UNets never see although the training split holds them:
ImageRAGTurbo's real pairs then show content the student cannot draw and its retrieved
neighbours can, the case where copying them lowers the loss; the report adds "blind digit
drawn").
The splits and the judge depend on `data_seed` only, never on the training seed; every stage
resumes from its checkpoint when the command is run again with the same workdir.
"""

import ml_collections

from imagerag_jax.config_args import load_sibling, parse_arg
from imagerag_jax.miniature.stages import PREDICTION_TYPES
from imagerag_jax.models.adapter import BLOCKS, POSITIONAL


def _source(split, size, splits):
    return ml_collections.ConfigDict(dict(kind="imagerag_jax.miniature.compose:ComposeSource",
                                          split=split, size=size, **splits))


def get_config(arg=None):
    """The compositional miniature; see the module docstring for `arg`."""
    arg = parse_arg(arg, quick=False, smoke=False, seeds=1, k=2, positional="none",
                    self_neighbour=False, prediction="epsilon", novel="", blind="", arms=False,
                    block="attention")
    if arg.prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction={arg.prediction!r}: choose one of {', '.join(PREDICTION_TYPES)}")
    if arg.positional not in POSITIONAL:
        raise ValueError(f"positional={arg.positional!r}: choose one of {', '.join(POSITIONAL)}")
    if arg.block not in BLOCKS:
        raise ValueError(f"block={arg.block!r}: choose one of {', '.join(BLOCKS)}")
    if not set(arg.novel) <= set("0123456789"):
        raise ValueError(f"novel={arg.novel!r}: give digits, e.g. novel=9 or novel=89")
    if not set(arg.blind) <= set("0123456789") or set(arg.blind) & set(arg.novel):
        raise ValueError(f"blind={arg.blind!r}: give digits not named by novel={arg.novel!r}, e.g. blind=8")
    blind = tuple(sorted({int(d) for d in arg.blind}))
    q = arg.quick
    config = ml_collections.ConfigDict()
    config.miniature = "compose"
    config.seed = 0  # training seed: tower inits and batches
    config.num_seeds = arg.seeds
    config.data_seed = 0  # splits, captions and the judge
    config.image_size = 16
    config.progress = True
    # miniature.compose.make_splits: 4,000 long-tailed training canvases (60% on 40 frequent
    # compositions, the rest over 1,160 rare ones, 400 never seen), 2 database canvases per
    # composition, 60 held-out prompts per class (40 for 'frequent': one per composition).
    config.splits = dict(train=4000, frequent_share=0.6, database_per_composition=2,
                         eval_per_class=60, frequent=40, unseen=400,
                         novel_digits=tuple(sorted({int(d) for d in arg.novel})))

    # 1,500 steps reconstruct held-out canvases to 0.975 all-four-correct by the judge (its
    # ceiling on the real canvases: 0.988); 300 steps at 1e-3 gave 0.49.
    config.vae = dict(channels=(16, 32), layers=1, groups=8, kl_weight=1e-4, lr=2e-3, warmup=50,
                      batch=32, steps=600 if q else 1500)
    # sides: the per-side loss on the token states (stages.train_text). Without it the teacher
    # drew both digits right in ~12% of held-out prompts (0.74 with it; 0.98 given the four
    # attributes as tokens instead of text).
    config.text = dict(hidden=64, layers=2, heads=2, lr=1e-3, warmup=20, batch=256, colour=True,
                       sides=1.0, steps=300 if q else 800)
    config.teacher = dict(channels=(32, 64), layers=1, head_dim=16, groups=8, lr=1e-3, warmup=100,
                          batch=32, steps=2000 if q else 6000, uncond_prob=0.1,
                          ema=0.995 if q else 0.999, prediction_type=arg.prediction)
    config.sampling = dict(steps=10 if q else 20, guidance=5.0)  # the teacher's DDIM + CFG
    config.student = dict(pairs=1024 if q else 4096, teacher_steps=10 if q else 20, guidance=5.0,
                          lr=5e-4, warmup=50, batch=32, steps=500 if q else 2000)
    if blind:  # only then: the stages of a run without blind digits keep their recorded config
        config.teacher = {**config.teacher, "blind_digits": blind}
        config.student = {**config.student, "blind_digits": blind}

    # ImageRAGTurbo on the paper's mixture (Sec. 4.1: ~3M teacher-synthesised + 0.5M real
    # pairs): the training prompts synthesised by the teacher, and the real training canvases.
    config.k = arg.k
    config.mixture = dict(teacher=0.8, real=0.2)
    config.teacher_only_ablation = not q  # a second ImageRAGTurbo trained on teacher pairs only
    rag_jobs = load_sibling(__file__, "digits").rag_jobs
    pre, config.train = rag_jobs(arg.k, config.sampling, 500 if q else 1500)
    config.train.adapter.positional = arg.positional
    config.train.adapter.block = arg.block
    config.train.adapter.groups = config.teacher["groups"]  # the transformer block's GroupNorm
    # The training arms (training/step.ARMS) beside ImageRAGTurbo: the same LoRA, losses and data
    # with no adapter, and the adapter trained on neighbours shuffled across the batch.
    config.train_arms = arg.arms
    config.train.self_neighbour = arg.self_neighbour
    pre.db.source = _source("database", 16, config.splits)
    pre.source = _source("train", 16, config.splits)
    config.precompute = pre

    config.eval = dict(num_prompts=0,  # 0: every held-out prompt (160)
                       injection_w=0.8, grid_per_class=6, latency_repeats=5 if q else 20,
                       bootstrap=2000)
    config.classifier = dict(epochs=0)  # 0: miniature.judge.DigitClassifier's default

    if arg.smoke:
        load_sibling(__file__, "digits").smoke_stages(config)
        config.sampling = dict(steps=2, guidance=5.0)
        config.splits = dict(config.splits, train=200, eval_per_class=4, database_per_composition=1)
        config.precompute.db.source = _source("database", 16, config.splits)
        config.precompute.source = _source("train", 16, config.splits)
        config.precompute.teacher.steps = 2
        config.precompute.max_source_items, config.precompute.db.limit = 24, 0
        config.train.total_steps, config.train.global_batch_size = 2, 4
        config.train.checkpoint_every = 2
        config.teacher_only_ablation = True
        config.eval = dict(num_prompts=0, injection_w=0.8, grid_per_class=2, latency_repeats=1,
                           bootstrap=50)
        config.classifier = dict(epochs=1)
        config.progress = False
    config.lock()
    return config
