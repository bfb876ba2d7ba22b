"""Probability targets over a strided class axis: the chunked loop.

On XLA:CPU a reduced loss with probability targets and float32 or bfloat16
logits over a class axis other than the last, of ``_SOFT_FLAT_MIN_CLASSES`` classes or more, takes
``_soft_loop_total_and_grad`` from ``_SOFT_LOOP_MIN_ELEMENTS`` logits up (the
forward alone from planes of ``_SOFT_LOOP_FORWARD_MIN_PLANE`` positions). The
tests force it at small sizes, with chunks small enough that the loop takes
many steps and shifts its last chunk back along both position parts, and
check loss and gradient against PyTorch and NumPy in float64.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch  # noqa: F401  -- the suite must fail, not skip, without PyTorch
from oracles import check_soft_reduced_each, rng_for

import jaxloss
from jaxloss import _losses


def _force_loop(monkeypatch, chunk: int) -> None:
    """The loop at any size (the forward too), chunks of ``chunk`` logits;
    the core's jit cache cleared, as it does not see module constants."""
    monkeypatch.setattr(_losses, "_SOFT_LOOP_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_losses, "_SOFT_LOOP_FORWARD_MIN_PLANE", 0)
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", chunk)
    _losses._soft_impl.clear_cache()


@pytest.fixture(params=[64, 1 << 18], ids=["tiny-chunks", "default-chunks"])
def forced_loop(request, monkeypatch):
    _force_loop(monkeypatch, request.param)
    yield request.param
    _losses._soft_impl.clear_cache()


# name: (shape, class axis, logits' dtype, targets' dtype); every class axis
# strided, 48 classes or more.
F32, BF16 = np.float32, ml_dtypes.bfloat16
CASES = {
    "2x50x3x5-axis1": ((2, 50, 3, 5), 1, F32, F32),
    "3x48x7-axis1": ((3, 48, 7), 1, F32, F32),
    "2x60x4x3x2-axis1": ((2, 60, 4, 3, 2), 1, F32, F32),
    "2x3x49x5-axis2": ((2, 3, 49, 5), 2, F32, F32),
    "1x64x9x9-axis1": ((1, 64, 9, 9), 1, F32, F32),
    # bfloat16 through the loop as its bits, targets bfloat16 or float32
    "2x50x3x5-axis1-bf16": ((2, 50, 3, 5), 1, BF16, BF16),
    "2x3x49x5-axis2-bf16-f32": ((2, 3, 49, 5), 2, BF16, F32),
}


def _case(rng, shape, axis, large, dtype=F32, q_dtype=F32):
    x = 3.0 * rng.standard_normal(shape)
    if large:  # one row near 100: exp(x) overflows without the max shift
        x[(0,) * len(shape)] += 100.0
    # Unnormalised (rows summing to about 2), as PyTorch allows; rows summing
    # to ~C would put the gradient's cancellation A p - w q beyond float32's
    # tolerance in any implementation.
    q = rng.uniform(0.0, 4.0 / shape[axis], shape)
    w = rng.uniform(0.5, 2.0, shape[axis])
    where = rng.random(np.delete(shape, axis)) < 0.8
    where.flat[0] = True
    return x.astype(dtype), q.astype(q_dtype), w.astype(np.float32), where


def test_loop_matches_pytorch_and_numpy(forced_loop):
    """Mean and sum, weighted or not, smoothed or not, with and without a
    ``where`` mask, logits moderate or with a row near 100, a cotangent of
    1.7: loss and gradient against PyTorch (``reduction="none"``, each
    position's cotangent its share) and NumPy in float64; the loss also
    against the forward alone."""
    cases = {}
    # Four configurations a shape, each option in half of them; with the
    # default chunks (one step at these sizes; the tiny chunks take many and
    # shift the last one back) the first of them only.
    configs = [("mean", True, 0.1, True, False), ("sum", False, 0.0, True, True),
               ("mean", False, 0.0, False, True), ("sum", True, 0.1, False, False)]
    if forced_loop > 64:
        configs = configs[:1]
    for (name, (shape, axis, dtype, q_dtype)), (reduction, weighted, eps, masked, large) in (
        itertools.product(CASES.items(), configs)
    ):
        rng = rng_for("soft-loop", name, reduction, weighted, eps, masked, large)
        x, q, w, where = _case(rng, shape, axis, large, dtype, q_dtype)
        assert _losses._soft_loop_applies(jnp.asarray(x), axis)
        key = f"{name} {reduction} w={weighted} eps={eps} where={masked} large={large}"
        cases[key] = (x, q, axis, reduction, w if weighted else None, eps,
                      where if masked else None)

    check_soft_reduced_each(cases)


def _programs(x):
    loss = functools.partial(jaxloss.cross_entropy, axis=1)
    return [jax.jit(f).lower(x, x).as_text() for f in (loss, jax.value_and_grad(loss))]


def test_loop_is_what_runs(forced_loop):
    """The forced configuration compiles a loop, forward and fwd+bwd, that
    the default one (whole arrays at this size) does not: the tests above
    exercise the loop."""
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.zeros((2, 50, 3, 5), dtype)
        assert all("while" in text for text in _programs(x)), dtype


def test_default_path_at_this_size_has_no_loop():
    x = jnp.zeros((2, 50, 3, 5), jnp.float32)
    assert not _losses._soft_loop_applies(x, 1)
    assert not any("while" in text for text in _programs(x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nothing_to_average_and_bad_rows(forced_loop, reduction):
    """Every position masked out: 0 and a zero gradient (jaxloss's mean of
    nothing); a row of -inf logits or a +inf logit where counted: NaN, as in
    PyTorch; the same row masked out: no NaN in the loss or gradient."""
    rng = rng_for("soft-loop-edges", reduction)
    x, q, w, _ = _case(rng, (2, 48, 3, 4), 1, False)
    f = jax.jit(jax.value_and_grad(
        lambda x, where: jaxloss.cross_entropy(x, q, weight=w, axis=1, where=where,
                                               reduction=reduction)
    ))
    nothing = np.zeros((2, 3, 4), bool)
    loss, grad = f(x, nothing)
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))
    for bad in (-np.inf, np.inf):
        xb = x.copy()
        xb[1, :, 2, 3] = -np.inf if bad < 0 else xb[1, :, 2, 3]
        if bad > 0:
            xb[1, 5, 2, 3] = np.inf
        counted = np.ones((2, 3, 4), bool)
        loss, _ = f(xb, counted)
        assert np.isnan(float(loss))
        counted[1, 2, 3] = False
        loss, grad = f(xb, counted)
        assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
        assert not np.any(np.asarray(grad)[1, :, 2, 3])


def test_full_size_temporaries():
    """At seg150's size with the classes along axis 1 (8x150x512x512) the
    float32 fwd+bwd holds under 1% of the logits in temporaries (compiled,
    not run); the whole-array derivative it replaces held 200%."""
    s = jax.ShapeDtypeStruct
    shape = (8, 150, 512, 512)
    step = jax.jit(jax.value_and_grad(
        lambda x, q, w: jaxloss.cross_entropy(x, q, weight=w, axis=1)
    ))
    compiled = step.lower(s(shape, jnp.float32), s(shape, jnp.float32),
                          s((150,), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 0.01 * np.prod(shape) * 4, temp / (np.prod(shape) * 4)
    # bfloat16: the bits of logits and targets copied once for the loop
    # (200.8%); the whole-array derivative held 400%.
    compiled = step.lower(s(shape, jnp.bfloat16), s(shape, jnp.bfloat16),
                          s((150,), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 2.05 * np.prod(shape) * 2, temp / (np.prod(shape) * 2)


def test_loop_under_vmap_jvp_and_second_order(monkeypatch):
    """With the loop forced: ``vmap`` over a leading batch of losses, forward
    mode (``jvp`` in logits and targets) and a Hessian-vector product (the
    gradient differentiated: the plain expression) equal the whole-array
    path's."""
    rng = rng_for("soft-loop-transforms")
    x, q, w, where = _case(rng, (3, 2, 50, 3, 4), 2, False)
    xv, qv = jnp.asarray(x), jnp.asarray(q)
    dx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    dq = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(x, q):
        return jaxloss.cross_entropy(x, q, weight=w, axis=1, where=where[0], label_smoothing=0.1)

    def run():
        batched = jax.vmap(jax.value_and_grad(loss))(xv, qv)
        tangent = jax.jvp(loss, (xv[0], qv[0]), (dx[0], dq[0]))
        hvp = jax.jvp(jax.grad(loss), (xv[0], qv[0]), (dx[0], dq[0]))[1]
        return batched, tangent, hvp

    want = jax.jit(run)()
    _force_loop(monkeypatch, 64)
    try:
        forced = jax.jit(lambda: run())  # a new function: not the trace above
        assert "while" in forced.lower().as_text()
        got = forced()
    finally:
        _losses._soft_impl.clear_cache()
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-5, atol=2e-6)
