"""The miniature's UNet prediction type: the regression target by hand, and it reaches the pipeline folders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagerag_jax.diffusion import schedule as schedule_lib
from imagerag_jax.miniature import stages
from imagerag_jax.weights import from_torch, to_torch

UNET = dict(channels=(8, 16), layers=1, head_dim=8, groups=4)


def test_denoising_target_against_hand_values():
    sched = schedule_lib.scaled_linear_schedule()
    rng = np.random.default_rng(0)
    z0, eps = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)
    acp = np.asarray(sched.alphas_cumprod)[t][:, None, None, None]
    want_v = np.sqrt(acp) * eps - np.sqrt(1.0 - acp) * z0  # Salimans & Ho: v = alpha eps - sigma x0
    got_v = stages.denoising_target("v_prediction", jnp.asarray(z0), jnp.asarray(eps), jnp.asarray(t), sched)
    np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stages.denoising_target("epsilon", z0, eps, t, sched)), eps)
    # At t = 999 an error d in the output moves a one-step x0 by d * sigma / alpha (about 14.6 d)
    # for an eps UNet and by d * sigma (about d) for a v UNet.
    t999, d = jnp.full((1,), 999), jnp.full((1, 4, 4, 2), 0.01)
    x = jnp.asarray(eps[:1])
    moved = {p: float(jnp.max(jnp.abs(schedule_lib.predict_x0(out + d, x, t999, sched, p)
                                       - schedule_lib.predict_x0(out, x, t999, sched, p))))
             for p, out in (("epsilon", jnp.asarray(eps[:1])), ("v_prediction", got_v[2:]))}
    np.testing.assert_allclose(moved["epsilon"], 0.01 * np.sqrt((1 - acp[2]) / acp[2]).item(), rtol=1e-3)
    np.testing.assert_allclose(moved["v_prediction"], 0.01 * np.sqrt(1 - acp[2]).item(), rtol=1e-3)
    assert moved["epsilon"] > 14 * moved["v_prediction"]
    with pytest.raises(ValueError, match="epsilon or v_prediction, not 'sample'"):
        stages.denoising_target("sample", z0, eps, t, sched)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_type_reaches_the_pipeline_folder(tmp_path, prediction_type):
    cfg = dict(UNET, **({} if prediction_type == "epsilon" else {"prediction_type": prediction_type}))
    unet = stages.make_unet(cfg, text_dim=16)
    assert unet.prediction_type == prediction_type
    # Only the folders' configs matter here: zero weights of the right shapes (no init to run).
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
    params = zeros(jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)),
                                  jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3, 16)))["params"])
    vae = stages.make_vae(dict(channels=(8, 16), layers=1, groups=4))
    vae_p = zeros(jax.eval_shape(vae.init, jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))["params"])
    to_torch.save_pipeline(str(tmp_path / "pipe"), unet, params, vae, vae_p)
    # build-db, precompute and the trainer read the prediction type back from here.
    assert from_torch._prediction_type(str(tmp_path / "pipe" / "unet")) == prediction_type  # pylint: disable=protected-access
    assert stages.teacher_spec(4, 3.0, unet.prediction_type).prediction_type == prediction_type
