"""The Flax NNX modules (``jaxloss.nnx``): equal to the functions, PyTorch's
defaults, configuration checked when built, class weights kept out of the
trained parameters, inside an NNX model under ``nnx.jit``/``nnx.value_and_grad``
with an optimizer, and the seed's 2-D example against PyTorch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from oracles import SEED_2D, module_case, rng_for, seed_2d_data, torch_seed_2d

import jaxloss
from jaxloss import nnx as jnnx

WEIGHT = (0.5, 1.0, 2.0, 1.5, 0.7)


def test_modules_are_nnx_modules_apart_from_the_linen_ones():
    for cls in (jnnx.NLLLoss, jnnx.CrossEntropyLoss, jnnx.LogSoftmax):
        assert issubclass(cls, nnx.Module)
    # The top-level names stay the linen modules.
    assert jaxloss.CrossEntropyLoss is jaxloss.linen.CrossEntropyLoss
    assert jnnx.CrossEntropyLoss is not jaxloss.CrossEntropyLoss


@pytest.mark.parametrize("weight_kind", ["tuple", "array"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_modules_equal_the_functions(axis, reduction, weight_kind):
    x, t, where = module_case("nnx", axis, reduction)
    w = WEIGHT if weight_kind == "tuple" else np.array(WEIGHT, np.float32)
    common = dict(ignore_index=255, reduction=reduction, axis=axis)
    want_w = jnp.asarray(WEIGHT, jnp.float32)

    got = jnnx.CrossEntropyLoss(weight=w, label_smoothing=0.1, **common)(x, t, where=where)
    want = jaxloss.cross_entropy(x, t, weight=want_w, label_smoothing=0.1, where=where, **common)
    np.testing.assert_array_equal(got, want)

    log_probs = jnnx.LogSoftmax(axis=axis)(x)
    np.testing.assert_array_equal(log_probs, jaxloss.log_softmax(x, axis=axis))
    got = jnnx.NLLLoss(w, **common)(log_probs, t)  # weight positionally, as in linen
    np.testing.assert_array_equal(got, jaxloss.nll_loss(log_probs, t, weight=want_w, **common))
    # NLL of log-softmax is cross-entropy.
    np.testing.assert_allclose(
        got, jaxloss.cross_entropy(x, t, weight=want_w, **common), rtol=1e-5, atol=1e-6
    )


def test_module_defaults_are_pytorchs():
    ce = jnnx.CrossEntropyLoss()
    assert (ce.weight, ce.ignore_index, ce.reduction, ce.label_smoothing, ce.axis) == (
        None, -100, "mean", 0.0, -1)
    nll = jnnx.NLLLoss()
    assert (nll.weight, nll.ignore_index, nll.reduction, nll.axis) == (None, -100, "mean", -1)
    assert jnnx.LogSoftmax().axis == -1
    # ... and the same as the linen modules'.
    lce = jaxloss.CrossEntropyLoss()
    assert (lce.weight, lce.ignore_index, lce.reduction, lce.label_smoothing, lce.axis) == (
        ce.weight, ce.ignore_index, ce.reduction, ce.label_smoothing, ce.axis)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: jnnx.CrossEntropyLoss(reduction="avg"), ValueError,
         r"reduction must be one of 'none', 'mean' or 'sum'; got 'avg'"),
        (lambda: jnnx.NLLLoss(reduction=None), ValueError, r"reduction must be one of .*None"),
        (lambda: jnnx.CrossEntropyLoss(label_smoothing=1.5), ValueError,
         r"label_smoothing must be in \[0.0, 1.0\]; got 1.5"),
        (lambda: jnnx.CrossEntropyLoss(label_smoothing="a"), TypeError,
         r"label_smoothing must be a float in \[0.0, 1.0\]; got str 'a'"),
        (lambda: jnnx.NLLLoss(ignore_index=2.0), TypeError,
         r"ignore_index must be a Python int or None; got float 2.0"),
        (lambda: jnnx.CrossEntropyLoss(axis=1.0), TypeError, r"axis must be an int; got float"),
        (lambda: jnnx.LogSoftmax(axis=True), TypeError, r"axis must be an int; got bool"),
    ],
)
def test_bad_configuration_raises_when_built(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_weight_raises_at_call_naming_it():
    loss = jnnx.CrossEntropyLoss(weight=[1.0, 2.0])  # 2 weights, 3 classes
    with pytest.raises(ValueError, match="weight"):
        loss(jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0]))


class Classifier(nnx.Module):
    def __init__(self, weight, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(3, 8, rngs=rngs)
        self.out = nnx.Linear(8, 5, rngs=rngs)
        self.loss = jnnx.CrossEntropyLoss(weight=weight, ignore_index=255, label_smoothing=0.1)

    def logits(self, x):
        return self.out(nnx.relu(self.hidden(x)))

    def __call__(self, x, labels, *, where=None):
        return self.loss(self.logits(x), labels, where=where)


def _classifier_data():
    rng = rng_for("nnx-submodule")
    x = rng.standard_normal((6, 3)).astype(np.float32)
    t = np.array([0, 4, 255, 2, 1, 3], np.int32)
    where = np.array([True, True, True, False, True, True])
    return x, t, where


def test_as_a_submodule_inside_a_model():
    x, t, where = _classifier_data()
    weight = jnp.asarray(WEIGHT, jnp.float32)
    model = Classifier(weight, nnx.Rngs(0))
    # The class weights are state, not parameters.
    params = nnx.state(model, nnx.Param)
    assert set(params) == {"hidden", "out"}
    assert "weight" in nnx.state(model)["loss"]

    @nnx.jit
    def via_module(model):
        return nnx.value_and_grad(lambda m: m(x, t, where=where))(model)

    def via_function(m):
        return jaxloss.cross_entropy(m.logits(x), t, weight=weight, ignore_index=255,
                                     label_smoothing=0.1, where=where)

    l1, g1 = via_module(model)
    l2, g2 = nnx.value_and_grad(via_function)(model)
    assert float(l1) > 0
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert set(g1) == {"hidden", "out"}  # no gradient for the class weights
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)


def test_an_optimizer_trains_the_parameters_and_not_the_class_weights():
    x, t, where = _classifier_data()
    model = Classifier(np.array(WEIGHT, np.float32), nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(x, t, where=where))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(model.loss.weight, np.array(WEIGHT, np.float32))
    after = nnx.state(model, nnx.Param)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(changed))
    # A split model merges back to the same loss.
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(x, t), model(x, t))


# ---------------------------------------------------------------------------
# the seed's 2-D example, with NNX modules
# ---------------------------------------------------------------------------


class SeedHead(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        # Full float32 convolution (XLA:GPU would use TF32 by default).
        self.conv = nnx.Conv(SEED_2D["C_IN"], SEED_2D["C"], (3, 3), padding="VALID",
                             precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        self.log_softmax = jnnx.LogSoftmax()
        self.loss = jnnx.NLLLoss()

    def __call__(self, x, target):
        return self.loss(self.log_softmax(self.conv(x)), target)


def test_seed_2d_example_nnx_channels_last():
    x_nchw, target, w_oihw, b = seed_2d_data()
    x_nhwc = np.moveaxis(x_nchw, 1, -1)
    head = SeedHead(nnx.Rngs(0))
    assert head.conv.kernel[...].shape == (3, 3, SEED_2D["C_IN"], SEED_2D["C"])  # HWIO
    head.conv.kernel[...] = jnp.asarray(w_oihw.transpose(2, 3, 1, 0))
    head.conv.bias[...] = jnp.asarray(b)
    loss, grads = nnx.value_and_grad(lambda m: m(x_nhwc, target))(head)
    t_loss, t_gw, t_gb = torch_seed_2d(x_nchw, target, w_oihw, b)
    np.testing.assert_allclose(loss, t_loss, rtol=1e-5)
    g = grads["conv"]
    np.testing.assert_allclose(g["kernel"][...], t_gw.transpose(2, 3, 1, 0), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(g["bias"][...], t_gb, rtol=1e-4, atol=1e-6)


def test_submodules_are_attributes_of_the_package():
    import importlib
    import subprocess
    import sys

    assert jaxloss.nnx is jnnx
    assert jaxloss.torch_compat is importlib.import_module("jaxloss.torch_compat")
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        jaxloss.nothing  # noqa: B018
    # In a fresh process, after a bare ``import jaxloss``.
    code = "import jaxloss; print(jaxloss.nnx.CrossEntropyLoss.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "jaxloss.nnx"
