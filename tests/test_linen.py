"""The Flax linen modules: standalone, as submodules, and the seed's 2-D
example (Flax channels-last and torch_compat channels-first) against PyTorch
doing the same computation with the same convolution weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import SEED_2D, module_case, rng_for, seed_2d_data, torch_seed_2d

import jaxloss
import jaxloss.linen
from jaxloss import torch_compat


def test_modules_are_reexported():
    assert jaxloss.NLLLoss is jaxloss.linen.NLLLoss
    assert jaxloss.CrossEntropyLoss is jaxloss.linen.CrossEntropyLoss
    assert jaxloss.LogSoftmax is jaxloss.linen.LogSoftmax
    for cls in (jaxloss.NLLLoss, jaxloss.CrossEntropyLoss, jaxloss.LogSoftmax):
        assert issubclass(cls, nn.Module)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_modules_equal_the_functions(axis, reduction):
    x, t, where = module_case("linen", axis, reduction)
    w = (0.5, 1.0, 2.0, 1.5, 0.7)  # a hashable tuple, as a module field should be
    common = dict(weight=w, ignore_index=255, reduction=reduction, axis=axis)

    ce_mod = jaxloss.CrossEntropyLoss(label_smoothing=0.1, **common)
    got = ce_mod.apply({}, x, t, where=where)
    want = jaxloss.cross_entropy(x, t, label_smoothing=0.1, where=where, **common)
    np.testing.assert_array_equal(got, want)

    nll_mod = jaxloss.NLLLoss(**common)
    log_probs = jaxloss.LogSoftmax(axis=axis).apply({}, x)
    np.testing.assert_array_equal(log_probs, jaxloss.log_softmax(x, axis=axis))
    np.testing.assert_allclose(log_probs, jax.nn.log_softmax(x, axis=axis), rtol=1e-6,
                               atol=1e-6)
    got = nll_mod.apply({}, log_probs, t)
    np.testing.assert_array_equal(got, jaxloss.nll_loss(log_probs, t, **common))
    # NLL of log-softmax is cross-entropy.
    np.testing.assert_allclose(got, jaxloss.cross_entropy(x, t, **common), rtol=1e-5,
                               atol=1e-6)


def test_module_defaults_are_pytorchs():
    ce = jaxloss.CrossEntropyLoss()
    assert (ce.weight, ce.ignore_index, ce.reduction, ce.label_smoothing, ce.axis) == (
        None, -100, "mean", 0.0, -1)
    nll = jaxloss.NLLLoss()
    assert (nll.weight, nll.ignore_index, nll.reduction, nll.axis) == (None, -100, "mean", -1)
    assert jaxloss.LogSoftmax().axis == -1


class Classifier(nn.Module):
    num_classes: int = 5

    @nn.compact
    def __call__(self, x, labels, *, where=None):
        logits = nn.Dense(self.num_classes)(nn.relu(nn.Dense(8)(x)))
        return jaxloss.CrossEntropyLoss(ignore_index=255, label_smoothing=0.1)(
            logits, labels, where=where
        ), logits


def test_as_a_submodule_inside_a_model():
    rng = rng_for("submodule")
    x = rng.standard_normal((6, 3)).astype(np.float32)
    t = np.array([0, 4, 255, 2, 1, 3], np.int32)
    where = np.array([True, True, True, False, True, True])
    model = Classifier()
    params = model.init(jax.random.key(0), x, t)
    # The loss module has no parameters of its own.
    assert set(params["params"]) == {"Dense_0", "Dense_1"}

    def via_module(p):
        return model.apply(p, x, t, where=where)[0]

    def via_function(p):
        logits = model.apply(p, x, t)[1]
        return jaxloss.cross_entropy(logits, t, ignore_index=255, label_smoothing=0.1,
                                     where=where)

    l1, g1 = jax.value_and_grad(via_module)(params)
    l2, g2 = jax.jit(jax.value_and_grad(via_function))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
    assert float(l1) > 0


# ---------------------------------------------------------------------------
# the seed's 2-D example
# ---------------------------------------------------------------------------

N, C_IN, HW, C = (SEED_2D[k] for k in ("N", "C_IN", "HW", "C"))


class SeedHead(nn.Module):
    @nn.compact
    def __call__(self, x, target):
        # Full float32 convolution (XLA:GPU would use TF32 by default).
        x = nn.Conv(C, (3, 3), padding="VALID", precision=jax.lax.Precision.HIGHEST)(x)
        return jaxloss.NLLLoss()(jaxloss.LogSoftmax()(x), target)


def test_seed_2d_example_flax_channels_last():
    x_nchw, target, w_oihw, b = seed_2d_data()
    x_nhwc = np.moveaxis(x_nchw, 1, -1)
    head = SeedHead()
    params = head.init(jax.random.key(0), x_nhwc, target)
    kernel_shape = params["params"]["Conv_0"]["kernel"].shape
    assert kernel_shape == (3, 3, C_IN, C)  # HWIO
    params = {"params": {"Conv_0": {"kernel": jnp.asarray(w_oihw.transpose(2, 3, 1, 0)),
                                    "bias": jnp.asarray(b)}}}
    loss, grads = jax.value_and_grad(lambda p: head.apply(p, x_nhwc, target))(params)
    t_loss, t_gw, t_gb = torch_seed_2d(x_nchw, target, w_oihw, b)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-5)
    g = grads["params"]["Conv_0"]
    np.testing.assert_allclose(g["kernel"], t_gw.transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["bias"], t_gb, rtol=1e-4, atol=1e-6)


def test_seed_2d_example_torch_compat_channels_first():
    x_nchw, target, w_oihw, b = seed_2d_data()

    def loss_fn(w, bias):
        y = jax.lax.conv_general_dilated(x_nchw, w, (1, 1), "VALID",
                                         precision=jax.lax.Precision.HIGHEST)
        y = y + bias[None, :, None, None]
        assert y.shape == (N, C, HW - 2, HW - 2)
        return torch_compat.NLLLoss()(torch_compat.LogSoftmax(dim=1)(y), target)

    loss, (gw, gb) = jax.value_and_grad(loss_fn, argnums=(0, 1))(jnp.asarray(w_oihw),
                                                                  jnp.asarray(b))
    t_loss, t_gw, t_gb = torch_seed_2d(x_nchw, target, w_oihw, b)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-5)
    np.testing.assert_allclose(gw, t_gw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb, t_gb, rtol=1e-4, atol=1e-6)
