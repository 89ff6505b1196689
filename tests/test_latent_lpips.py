"""Latent LPIPS: metric properties, shared augmentations, E-LatentLPIPS checkpoint conversion."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.models import latent_lpips as ll
from tests.helpers import assert_parity, nhwc

SMALL = (8, 8, 16, 16, 16)  # VGG16-BN layout (2,2,3,3,3 convs) with narrow widths, for speed


MODULE = ll.LatentLPIPS(widths=SMALL)
# One compiled function per shape, shared by the tests (compilation dominates their run time).
DIST = jax.jit(MODULE.apply)
FEATS = jax.jit(lambda v, a: MODULE.apply(v, a, method=MODULE.features))
SHAPE = (2, 16, 16, 4)


def normal(seed: int, *shape: int) -> jnp.ndarray:
    """Standard normal test data from numpy (compiling jax.random on CPU costs seconds per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def numpy_variables(seed: int = 2):
    """Random variables for MODULE: conv kernels ~ N(0, 1/fan_in), positive heads and BN variances."""
    shapes = jax.eval_shape(MODULE.init, jax.random.PRNGKey(0), jnp.zeros(SHAPE), jnp.zeros(SHAPE))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name.startswith("lin") or name == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32))
        fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 1
        return jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def small():
    """A small random LatentLPIPS and two latent batches."""
    return MODULE, numpy_variables(), normal(0, *SHAPE), normal(1, *SHAPE)


def test_distance_properties(small):
    _, variables, x, y = small
    d_xy, d_yx, d_xx = DIST(variables, x, y), DIST(variables, y, x), DIST(variables, x, x)
    assert d_xy.shape == (2,)
    np.testing.assert_allclose(np.asarray(d_xx), 0.0, atol=1e-12)
    assert np.all(np.asarray(d_xy) > 0)
    np.testing.assert_allclose(np.asarray(d_xy), np.asarray(d_yx), rtol=1e-6)


def test_distance_differentiable(small):
    module, variables, x, y = small
    grad = jax.jit(jax.grad(lambda a: jnp.sum(module.apply(variables, a, y))))(x)
    assert grad.shape == x.shape
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0


def test_default_network_is_vgg16_bn_layout():
    """Param shapes of the full-size network: 13 convs, 4 input channels, five LPIPS heads."""
    module = ll.LatentLPIPS()
    x = jnp.zeros((1, 16, 16, 4))
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, x)
    params = shapes["params"]
    convs = sorted(
        int(k.split("_")[1]) for k, v in params.items() if k.startswith("features") and "kernel" in v
    )
    assert convs == [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
    assert params["features_0"]["kernel"].shape == (3, 3, 4, 64)
    assert params["features_40"]["kernel"].shape == (3, 3, 512, 512)
    assert [params[f"lin{k}"].shape for k in range(5)] == [(64,), (128,), (256,), (512,), (512,)]
    assert shapes["batch_stats"]["features_41"]["mean"].shape == (512,)
    # Pools only after stages 4 and 5: a 16x16 latent ends at 4x4.
    feats = jax.eval_shape(lambda v: module.apply(v, x, method=module.features), shapes)
    assert [f.shape[1] for f in feats] == [16, 16, 16, 8, 4]


def test_key_table_matches_torchvision_indices():
    """torchvision vgg16_bn features: conv i, bn i+1, relu i+2; max-pools at 6, 13, 23, 33, 43."""
    table = {e.torch_prefix: (e.flax_name, e.kind) for e in ll.elatentlpips_key_table()}
    assert table["net.slice1.0"] == ("features_0", "conv")
    assert table["net.slice1.4"] == ("features_4", "bn")
    assert table["net.slice2.7"] == ("features_7", "conv")
    assert table["net.slice3.20"] == ("features_20", "conv")
    assert table["net.slice4.24"] == ("features_24", "conv")
    assert table["net.slice5.41"] == ("features_41", "bn")
    assert table["lin4.model.1"] == ("lin4", "lin")
    assert sum(kind == "conv" for _, kind in table.values()) == 13


# ---------------------------------------------------------------------------------------------
# Augmentations.
# ---------------------------------------------------------------------------------------------


def test_augment_same_transform_on_both():
    x = normal(4, 6, 12, 12, 4)
    ax, ay = ll.random_augment(jax.random.PRNGKey(5), x, 2.0 * x)
    # Every operation is linear and shared: aug(2x) == 2 aug(x) only if the draws coincide.
    np.testing.assert_allclose(np.asarray(ay), 2.0 * np.asarray(ax), rtol=1e-6)
    ax2, ax3 = ll.random_augment(jax.random.PRNGKey(5), x, x)
    np.testing.assert_array_equal(np.asarray(ax2), np.asarray(ax3))
    np.testing.assert_array_equal(np.asarray(ax2), np.asarray(ax))  # same key, same draw


def test_augment_identical_inputs_give_zero_distance(small):
    _, variables, x, _ = small
    ax, ay = ll.random_augment(jax.random.PRNGKey(6), x, x)
    np.testing.assert_allclose(np.asarray(DIST(variables, ax, ay)), 0.0, atol=1e-12)


def test_translation_and_cutout_change_the_input():
    x = normal(7, 8, 16, 16, 4) + 3.0  # no zeros in x
    key = jax.random.PRNGKey(8)
    moved, _ = ll.random_augment(key, x, x, flip=False, translate=0.25, cutout=0.0)
    assert not np.allclose(np.asarray(moved), np.asarray(x))
    # Integer shifts with zero fill: every non-zero output value is some input value.
    assert np.isin(np.asarray(moved)[np.asarray(moved) != 0], np.asarray(x)).all()
    cut, _ = ll.random_augment(key, x, x, flip=False, translate=0.0, cutout=0.5)
    zeros = np.asarray(cut) == 0
    assert zeros.any(axis=(1, 2, 3)).all()  # a box is cut from every example
    assert zeros.mean() <= 0.25 + 1e-6  # at most an (H/2 x W/2) box
    np.testing.assert_array_equal(np.asarray(cut)[~zeros], np.asarray(x)[~zeros])


def test_augment_draws_cover_their_ranges():
    params = ll._draw(jax.random.PRNGKey(14), 4000, 10, 12, (2, 3))
    shift, center, flip = (np.asarray(a) for a in (params.shift, params.cut_center, params.flip))
    assert set(shift[:, 0]) == set(range(-2, 3)) and set(shift[:, 1]) == set(range(-3, 4))
    assert set(center[:, 0]) == set(range(10)) and set(center[:, 1]) == set(range(12))
    assert 0.45 < flip.mean() < 0.55


def test_flip_is_flip_or_identity():
    x = normal(9, 16, 6, 6, 2)
    out, _ = ll.random_augment(jax.random.PRNGKey(10), x, x, translate=0.0, cutout=0.0)
    same = [np.array_equal(out[i], x[i]) for i in range(16)]
    flipped = [np.array_equal(out[i], x[i, :, ::-1]) for i in range(16)]
    assert all(s or f for s, f in zip(same, flipped)) and any(same) and any(flipped)


def test_augment_jit_and_gradient():
    x = normal(11, 3, 8, 8, 4)
    weights = normal(12, *x.shape)
    f = jax.jit(lambda k, a: jnp.sum(ll.random_augment(k, a, a)[0] * weights))
    grad = jax.grad(f, argnums=1)(jax.random.PRNGKey(13), x)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.abs(grad).max()) > 0 and float(jnp.mean(grad == 0)) > 0.05  # cutout zeros some


# ---------------------------------------------------------------------------------------------
# No-weights path.
# ---------------------------------------------------------------------------------------------


def test_no_weights_warns_and_returns_none(caplog):
    with caplog.at_level(logging.WARNING), pytest.warns(RuntimeWarning, match="BETA TO 0"):
        assert ll.latent_lpips_or_none(None, beta=1.0) is None
    assert any("BETA TO 0" in r.getMessage() for r in caplog.records)


def test_beta_zero_needs_no_weights(recwarn):
    assert ll.latent_lpips_or_none(None, beta=0.0) is None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


# ---------------------------------------------------------------------------------------------
# E-LatentLPIPS checkpoint conversion: a plain-torch module with the same key layout.
# ---------------------------------------------------------------------------------------------


def _torch_reference(widths, seed: int = 0):
    """E-LatentLPIPS-layout torch module (net.slice{k}.{i}, lin{k}.model.1) with its forward."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Lin(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            cin, index = 4, 0
            for k, (width, n) in enumerate(zip(widths, ll.VGG16_CONVS)):
                block = nn.Sequential()
                for _ in range(n):
                    block.add_module(str(index), nn.Conv2d(cin, width, 3, padding=1))
                    block.add_module(str(index + 1), nn.BatchNorm2d(width))
                    block.add_module(str(index + 2), nn.ReLU(inplace=True))
                    cin, index = width, index + 3
                # The first three max-pools are Identity in the latent network.
                block.add_module(str(index), nn.MaxPool2d(2, 2) if k >= 3 else nn.Identity())
                index += 1
                setattr(self, f"slice{k + 1}", block)

        def forward(self, x):
            outs = []
            for k in range(len(widths)):
                x = getattr(self, f"slice{k + 1}")(x)
                outs.append(x)
            return outs

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()
            for k, width in enumerate(widths):
                setattr(self, f"lin{k}", Lin(width))

        def forward(self, a, b):
            total = 0
            for k, (fa, fb) in enumerate(zip(self.net(a), self.net(b))):
                norm = lambda f: f / torch.sqrt(torch.sum(f**2, dim=1, keepdim=True) + 1e-8)
                diff = (norm(fa) - norm(fb)) ** 2
                total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
            return total.reshape(-1)

    torch.manual_seed(seed)
    model = Reference()
    with torch.no_grad():  # random BatchNorm statistics and affines, non-negative heads
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)
        for k in range(len(widths)):
            getattr(model, f"lin{k}").model[1].weight.uniform_(0.0, 1.0)
    return torch, model.eval()


def test_converter_parity_with_torch_reference():
    torch, model = _torch_reference(SMALL)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    module, variables = ll.latent_lpips_from_state_dict(sd)
    assert module == MODULE  # widths and conv counts read from the checkpoint's shapes
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 4, 16, 16)).astype(np.float32) for _ in range(2))
    with torch.no_grad():
        ref = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        ref_feats = [f.numpy() for f in model.net(torch.from_numpy(a))]
    out = DIST(variables, nhwc(a), nhwc(b))
    assert_parity(out, ref)
    feats = FEATS(variables, nhwc(a))
    for f, r in zip(feats, ref_feats):
        assert_parity(np.transpose(np.asarray(f), (0, 3, 1, 2)), r)


def test_converter_rejects_wrong_layouts():
    _, model = _torch_reference(SMALL)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError):
        ll.convert_elatentlpips_state_dict({k: v for k, v in sd.items() if k != "lin2.model.1.weight"})
    with pytest.raises(ValueError):
        ll.convert_elatentlpips_state_dict({**sd, "net.slice9.0.weight": np.zeros((1, 1, 1, 1))})
    # Augmentation-pipe buffers of a constructed ELatentLPIPS module are not weights.
    ll.convert_elatentlpips_state_dict({**sd, "augment.p": np.ones(()), "augment.Hz_geom": np.ones(12)})
    # A DataParallel 'module.' prefix is accepted.
    prefixed = ll.convert_elatentlpips_state_dict({"module." + k: v for k, v in sd.items()})
    plain = ll.convert_elatentlpips_state_dict(sd)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda p, q: bool(jnp.all(p == q)), prefixed, plain))


def test_load_from_pth_and_safetensors(tmp_path):
    torch, model = _torch_reference(SMALL, seed=1)
    torch.save(model.state_dict(), tmp_path / "sd21_latest_vgg16_tuned.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((2, 4, 16, 16)).astype(np.float32) for _ in range(2))
    with torch.no_grad():
        ref = model(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for name in ("sd21_latest_vgg16_tuned.pth", "w.safetensors"):
        loaded = ll.latent_lpips_or_none(str(tmp_path / name), beta=1.0)
        assert loaded is not None
        module, variables = loaded
        assert module == MODULE
        assert_parity(DIST(variables, nhwc(a), nhwc(b)), ref)
    with pytest.raises(FileNotFoundError):
        ll.load_latent_lpips(str(tmp_path / "missing.pth"))
