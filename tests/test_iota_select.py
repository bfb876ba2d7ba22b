"""XLA:CPU's gradient pass over short class rows (``_losses._select_by_iota``).

Rows of 2 to 12 classes that are not grouped zero the gradient of positions
that are not valid by comparing the class iota against a per-position bound
(``C`` where valid, else 0) instead of selecting by the broadcast mask: the
same values, 2-3x faster there. These tests check where it applies, that
both selections give bit-equal losses and gradients, and the values against
PyTorch in float64 and the NumPy reference: ignored rows (with non-finite
logits too) zero, a bad label under ``jit`` a NaN row, label smoothing, NLL,
``where``, float32 and bfloat16, classes last and on axis 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import (
    GRAD_TOL,
    assert_rows_match_pytorch,
    check_each,
    config_losses_and_grads,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss
from jaxloss import _losses

IGN = 255


@pytest.mark.parametrize(
    "shape,axis,dtype,applies",
    [
        ((64, 5), 1, jnp.bfloat16, True),
        ((2, 8, 10), 2, jnp.bfloat16, True),
        ((2, 12, 8, 8), 1, jnp.bfloat16, True),  # classes on axis 1
        ((2, 8, 2), 2, jnp.float32, True),
        ((2, 8, 8), 2, jnp.float32, True),
        ((2, 8, 10), 2, jnp.float32, False),  # grouped rows instead
        ((3, 5, 10), 2, jnp.float32, True),  # 5 positions a row: no whole group
        ((2, 8, 13), 2, jnp.bfloat16, False),
        ((64, 1), 1, jnp.bfloat16, False),
        ((2, 8, 5), 2, jnp.float64, True),
    ],
)
def test_where_it_applies(shape, axis, dtype, applies):
    assert _losses._select_by_iota(shape, axis, dtype) == applies


def _case(shape, axis, seed, dtype):
    rng = rng_for("iota-select", shape, axis, seed)
    axis = axis % len(shape)
    c = shape[axis]
    pos = shape[:axis] + shape[axis + 1 :]
    x = np.array(jnp.asarray(3.0 * rng.standard_normal(shape), dtype).astype(jnp.float32))
    t = rng.integers(0, c, pos)
    t[rng.random(pos) < 0.25] = IGN
    return x, t, np.linspace(0.5, 2.0, c).astype(np.float32)


def _step(t, axis, dtype, nll=False, **kw):
    fn = jaxloss.nll_loss if nll else jaxloss.cross_entropy

    def f(v, ct):
        loss, vjp = jax.vjp(lambda u: fn(u, jnp.asarray(t), axis=axis, **kw), v)
        (g,) = vjp(ct.astype(loss.dtype))
        return loss, g

    return jax.jit(f)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,axis", [((3, 7, 5), -1), ((4, 12, 3, 5), 1), ((40, 2), -1)])
def test_both_selections_agree_bit_for_bit(monkeypatch, shape, axis, dtype):
    """The iota bound and the broadcast mask: equal bits, NaN rows included."""
    x, t, w = _case(shape, axis, 0, dtype)
    t.reshape(-1)[1] = shape[axis] + 3  # a bad label: a NaN row
    assert _losses._select_by_iota(shape, axis % len(shape), dtype)
    kw = dict(weight=w, ignore_index=IGN, reduction="none", label_smoothing=0.1)
    ct = jnp.asarray(rng_for("iota-ct", shape).standard_normal(t.shape), jnp.float32)
    xj = jnp.asarray(x, dtype)
    got = _step(t, axis, dtype, **kw)(xj, ct)
    monkeypatch.setattr(_losses, "_select_by_iota", lambda *a: False)
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    try:
        want = _step(t, axis, dtype, **kw)(xj, ct)
    finally:
        _losses._index_impl.clear_cache()
        jax.clear_caches()
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.isnan(np.asarray(got[1], np.float32)).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,axis", [((3, 7, 5), -1), ((4, 12, 3, 5), 1), ((40, 2), -1)])
def test_matches_float64_oracles(shape, axis, dtype):
    """Weighted, label smoothing 0.1, every reduction: the three losses and
    gradients (for a random cotangent) under one ``jit``, then each against
    PyTorch and NumPy in float64, zero on ignored rows (``check_each``)."""
    x, t, w = _case(shape, axis, 1, dtype)
    assert _losses._select_by_iota(shape, axis % len(shape), dtype)
    configs = {}
    for reduction in ("none", "mean", "sum"):
        kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=0.1)
        loss_shape = t.shape if reduction == "none" else ()
        ct = rng_for("iota-ct", shape, reduction).standard_normal(loss_shape)
        configs[reduction] = (kw, ct)

    def check(kw, ct, loss, g, _, raw_g):
        assert raw_g.dtype == dtype
        tl, tg = torch_loss_and_grad(to_torch_layout(x, axis), t, ct, nll=False, **kw)
        tg = np.moveaxis(tg, 1, axis % x.ndim)
        rl, rg = reference.loss_and_grad(x, t, cotangent=ct, axis=axis, **kw)
        tol = GRAD_TOL["float32" if dtype == jnp.float32 else "bfloat16"]
        ignored = np.broadcast_to(np.expand_dims(t == IGN, axis), g.shape)
        np.testing.assert_array_equal(g[ignored], 0.0)
        for want_l, want_g, name in ((tl, tg, "pytorch"), (rl, rg, "numpy")):
            np.testing.assert_allclose(loss, want_l, rtol=1e-6, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(g, want_g, rtol=tol[0], atol=tol[1], err_msg=name)

    check_each(
        config_losses_and_grads(
            jaxloss.cross_entropy, jnp.asarray(x, dtype), t, configs, axis=axis
        ),
        check,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nll_and_where_match_the_reference(dtype):
    shape, axis = (6, 9, 7), -1
    x, t, w = _case(shape, axis, 2, dtype)
    where = rng_for("iota-where").random(t.shape) < 0.7
    kw = dict(weight=w, ignore_index=IGN, reduction="mean", where=jnp.asarray(where))
    ct = np.float64(1.5)
    for nll in (False, True):
        loss, g = _step(t, axis, dtype, nll=nll, **kw)(
            jnp.asarray(x, dtype), jnp.asarray(ct, jnp.float32)
        )
        rl, rg = reference.loss_and_grad(
            x, t, cotangent=ct, axis=axis, normalize=not nll, **dict(kw, where=where)
        )
        tol = GRAD_TOL["float32" if dtype == jnp.float32 else "bfloat16"]
        np.testing.assert_allclose(loss, rl, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g, np.float64), rg, rtol=tol[0], atol=tol[1])
        off = np.broadcast_to((~where | (t == IGN))[..., None], x.shape)
        np.testing.assert_array_equal(np.asarray(g, np.float64)[off], 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_non_finite_rows_match_pytorch(dtype):
    """A valid row of -inf and a +inf logit (NaN, as in PyTorch); ignored rows
    of -inf, +inf and NaN logits keep a zero gradient."""
    x, t, w = _case((2, 9, 6), -1, 3, dtype)
    x[0, 2], t[0, 2] = -np.inf, 3
    x[1, 6, 2], t[1, 6] = np.inf, 2
    x[1, 4], t[1, 4] = -np.inf, IGN
    x[0, 5, 1], t[0, 5] = np.inf, IGN
    x[1, 7, 0], t[1, 7] = np.nan, IGN
    assert _losses._select_by_iota(x.shape, 2, dtype)
    tol = GRAD_TOL["float32" if dtype == jnp.float32 else "bfloat16"]
    assert_rows_match_pytorch(x.astype(dtype), t, (1e-6, 1e-6), tol, weight=w, ignore_index=IGN)
