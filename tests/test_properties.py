"""Hypothesis property tests over random shapes, class axes, ignore fractions,
weights, label smoothing and reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import reference
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxloss

REDUCTIONS = ("mean", "sum", "none")
IGNORE = 255
SETTINGS = settings(max_examples=20, deadline=None, database=None)


@st.composite
def problems(draw, soft=False):
    """A random problem: input with the class axis anywhere, targets, options."""
    n_pos = draw(st.integers(0, 3))
    pos_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=n_pos, max_size=n_pos)))
    num_classes = draw(st.integers(1, 6))
    axis = draw(st.integers(0, n_pos))
    shape = pos_shape[:axis] + (num_classes,) + pos_shape[axis:]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (draw(st.sampled_from([0.5, 3.0, 30.0])) * rng.standard_normal(shape)).astype(
        np.float32)
    if soft:
        t = np.exp(reference.log_softmax(rng.standard_normal(shape), axis=axis)).astype(
            np.float32)
    else:
        ignore_frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
        t = rng.integers(0, num_classes, pos_shape)
        t = np.where(rng.random(pos_shape) < ignore_frac, IGNORE, t).astype(
            draw(st.sampled_from([np.uint8, np.int32])))
    weight = (rng.uniform(0.1, 3.0, num_classes).astype(np.float32)
              if draw(st.booleans()) else None)
    return {
        "x": x,
        "t": t,
        "axis": axis - len(shape) if draw(st.booleans()) else axis,
        "weight": weight,
        "eps": draw(st.sampled_from([0.0, 0.1, 0.7])),
        "reduction": draw(st.sampled_from(REDUCTIONS)),
        "pos_shape": pos_shape,
    }


def call(fn_name, p, **overrides):
    kw = {"weight": p["weight"], "ignore_index": IGNORE, "reduction": p["reduction"],
          "axis": p["axis"]}
    if fn_name == "ce":
        kw["label_smoothing"] = p["eps"]
    kw.update(overrides)
    fn = jaxloss.cross_entropy if fn_name == "ce" else jaxloss.nll_loss
    return lambda x: fn(x, p["t"], **kw)


@SETTINGS
@given(p=problems(), fn_name=st.sampled_from(["nll", "ce"]))
def test_index_targets_equal_the_reference(p, fn_name):
    f = call(fn_name, p)
    loss, vjp = jax.vjp(f, jnp.asarray(p["x"]))
    ct = np.random.default_rng(0).uniform(0.5, 2.0, loss.shape).astype(np.float32)
    (grad,) = vjp(jnp.asarray(ct))
    ref_loss, ref_grad = reference.loss_and_grad(
        p["x"], p["t"], weight=p["weight"], ignore_index=IGNORE, reduction=p["reduction"],
        label_smoothing=p["eps"] if fn_name == "ce" else 0.0, axis=p["axis"],
        normalize=fn_name == "ce", cotangent=ct)
    scale = 1.0 + np.max(np.abs(ref_loss), initial=0.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, atol=2e-6 * scale)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-6)


@SETTINGS
@given(p=problems(soft=True))
def test_probability_targets_equal_the_reference(p):
    f = call("ce", p)
    loss, grad = jax.value_and_grad(lambda x: jnp.sum(f(x)))(jnp.asarray(p["x"]))
    ref_loss, ref_grad = reference.loss_and_grad(
        p["x"], p["t"], weight=p["weight"], reduction=p["reduction"],
        label_smoothing=p["eps"], axis=p["axis"])
    np.testing.assert_allclose(loss, np.sum(ref_loss), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-6)


@SETTINGS
@given(p=problems(), soft=st.booleans(), shift_scale=st.sampled_from([1.0, 100.0]))
def test_cross_entropy_is_invariant_to_a_per_position_shift(p, soft, shift_scale):
    if soft:
        q = np.exp(reference.log_softmax(p["x"].astype(np.float64) / 3, axis=p["axis"]))
        p = {**p, "t": q.astype(np.float32)}
    axis = p["axis"] % p["x"].ndim
    shift = shift_scale * np.random.default_rng(1).standard_normal(p["pos_shape"])
    shifted = (p["x"] + np.expand_dims(shift, axis)).astype(np.float32)
    f = call("ce", p)
    g = lambda x: jnp.sum(f(x) ** 2)
    a, ga = jax.value_and_grad(g)(jnp.asarray(p["x"]))
    b, gb = jax.value_and_grad(g)(jnp.asarray(shifted))
    # float32 rounding of the shifted logits is all that may differ.
    tol = 1e-5 * (1.0 + shift_scale + np.max(np.abs(p["x"]), initial=0.0))
    np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
    np.testing.assert_allclose(gb, ga, rtol=tol, atol=tol)


@SETTINGS
@given(p=problems(), fn_name=st.sampled_from(["nll", "ce"]))
def test_mean_is_sum_over_the_sum_of_weights(p, fn_name):
    total = call(fn_name, p, reduction="sum")(p["x"])
    mean = call(fn_name, p, reduction="mean")(p["x"])
    t = np.asarray(p["t"]).astype(np.int64)
    valid = t != IGNORE
    w = np.ones(p["x"].shape[p["axis"]]) if p["weight"] is None else p["weight"]
    denom = np.sum(np.where(valid, w[np.where(valid, t, 0)], 0.0))
    if denom == 0:
        assert float(mean) == 0.0 and float(total) == 0.0
    else:
        np.testing.assert_allclose(mean, float(total) / denom, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(p=problems(), fn_name=st.sampled_from(["nll", "ce"]), soft=st.booleans())
def test_none_sums_to_sum(p, fn_name, soft):
    if soft:
        fn_name = "ce"
        q = np.exp(reference.log_softmax(p["x"].astype(np.float64) * 0.3, axis=p["axis"]))
        p = {**p, "t": q.astype(np.float32)}
    per_position = call(fn_name, p, reduction="none")(p["x"])
    assert per_position.shape == p["pos_shape"]
    total = call(fn_name, p, reduction="sum")(p["x"])
    np.testing.assert_allclose(np.sum(np.asarray(per_position, np.float64)), total,
                               rtol=1e-5, atol=1e-5)
    if not soft:  # ignored positions hold exactly 0
        assert np.all(np.asarray(per_position)[np.asarray(p["t"]) == IGNORE] == 0.0)


@SETTINGS
@given(p=problems(), k=st.sampled_from([0.25, 3.0]))
def test_mean_is_invariant_to_scaling_the_weights(p, k):
    w = np.ones(p["x"].shape[p["axis"]], np.float32) if p["weight"] is None else p["weight"]
    a = call("ce", p, reduction="mean", weight=w)(p["x"])
    b = call("ce", p, reduction="mean", weight=w * np.float32(k))(p["x"])
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(p=problems())
def test_one_hot_probability_targets_sum_like_index_targets(p):
    t = np.asarray(p["t"]).astype(np.int64)
    valid = t != IGNORE
    c = p["x"].shape[p["axis"]]
    q = np.moveaxis(np.eye(c, dtype=np.float32)[np.where(valid, t, 0)], -1, p["axis"])
    where = valid
    soft = jaxloss.cross_entropy(p["x"], q, weight=p["weight"], label_smoothing=p["eps"],
                                 axis=p["axis"], reduction="sum", where=where)
    index = call("ce", p, reduction="sum")(p["x"])
    np.testing.assert_allclose(soft, index, rtol=1e-5, atol=1e-5)
