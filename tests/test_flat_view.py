"""XLA:CPU's fwd+bwd over a flat view of the positions after the classes
(``_losses._flat_view_applies``, ``_losses._whole``).

Float32 logits with the classes not last and a short last dimension (NCHW
with small maps) run the whole-array fwd+bwd on a view with the positions
after the class axis as one dimension; the gradient comes back through a
while loop that keeps it in the exponentials' buffer. These tests check
where it applies, that it gives the plain path's values, the
values against PyTorch in float64 and the NumPy reference (weights, ignored
and masked positions, label smoothing, NLL, a bad label under ``jit``), that
the compiled step has no full-size temporary (the loop is what keeps it
out), and second derivatives and ``vmap`` through the loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import GRAD_TOL, rng_for, to_torch_layout, torch_loss_and_grad

import jaxloss
from jaxloss import _losses

IGN = 255
LOSS_RTOL = 1e-6
GRAD_RTOL, GRAD_ATOL = GRAD_TOL["float32"]


@pytest.mark.parametrize(
    "shape,axis,dtype,applies",
    [
        ((2, 19, 16, 16), 1, jnp.float32, True),
        ((2, 19, 32, 47), 1, jnp.float32, True),
        ((2, 3, 19, 4, 5), 2, jnp.float32, True),
        ((2, 19, 4, 5, 6), 1, jnp.float32, True),
        ((2, 19, 16, 48), 1, jnp.float32, False),  # a long enough minor dimension
        ((2, 19, 256), 1, jnp.float32, False),  # one dimension after the classes
        ((2, 16, 16, 19), 3, jnp.float32, False),  # classes last
        ((2, 19, 16, 16), 1, jnp.bfloat16, False),  # 16-bit: its own plan
        ((2, 19, 16, 16), 1, jnp.float64, False),
    ],
)
def test_where_it_applies(shape, axis, dtype, applies):
    assert _losses._flat_view_applies(shape, axis, dtype) == applies


def _case(shape, axis, seed):
    rng = rng_for("flat-view", shape, axis, seed)
    c = shape[axis]
    pos = shape[:axis] + shape[axis + 1 :]
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    t = rng.integers(0, c, pos)
    t[rng.random(pos) < 0.2] = IGN
    return x, t, np.linspace(0.5, 2.0, c).astype(np.float32)


def _step(t, axis, nll=False, **kw):
    fn = jaxloss.nll_loss if nll else jaxloss.cross_entropy
    return jax.jit(jax.value_and_grad(lambda v: fn(v, jnp.asarray(t), axis=axis, **kw)))


SHAPES = [((3, 7, 5, 4), 1), ((2, 3, 6, 4, 5), 2), ((2, 150, 3, 2, 5), 1)]


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_equals_the_plain_path(monkeypatch, shape, axis):
    """Loss and gradient equal the plain path's to float32 rounding (the row
    sums may add in another order), NaNs at the same places: with a bad
    label (a NaN loss; the loop's one trip) and without."""
    x, t, w = _case(shape, axis, 0)
    bad = t.copy()
    bad.reshape(-1)[3] = shape[axis] + 2
    assert _losses._flat_view_applies(shape, axis, jnp.float32)
    kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1)

    def run():
        return [_step(labels, axis, **kw)(jnp.asarray(x)) for labels in (t, bad)]

    got = run()
    monkeypatch.setattr(_losses, "_flat_view_applies", lambda *a: False)
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    try:
        want = run()
    finally:
        _losses._index_impl.clear_cache()
        jax.clear_caches()
    assert np.isfinite(got[0][0]) and np.isnan(got[1][0])
    for (gl, gg), (wl, wg) in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(gl), np.asarray(wl), rtol=1e-6)
        np.testing.assert_array_equal(np.isnan(gg), np.isnan(wg))
        np.testing.assert_allclose(np.asarray(gg), np.asarray(wg), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_matches_float64_oracles(shape, axis, reduction, smoothing):
    x, t, w = _case(shape, axis, 1)
    kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=smoothing)
    loss, g = _step(t, axis, **kw)(jnp.asarray(x))
    tl, tg = torch_loss_and_grad(to_torch_layout(x, axis), t, 1.0, nll=False, **kw)
    tg = np.moveaxis(tg, 1, axis)
    rl, rg = reference.loss_and_grad(x, t, axis=axis, **kw)
    for want_l, want_g, name in ((tl, tg, "pytorch"), (rl, rg, "numpy")):
        np.testing.assert_allclose(loss, want_l, rtol=LOSS_RTOL, err_msg=name)
        np.testing.assert_allclose(g, want_g, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)


def test_nll_and_where_match_the_reference():
    shape, axis = (2, 3, 6, 4, 5), 2
    x, t, w = _case(shape, axis, 2)
    where = rng_for("flat-view-where").random(t.shape) < 0.7
    for nll in (False, True):
        kw = dict(weight=w, ignore_index=IGN)
        loss, g = _step(t, axis, nll=nll, where=jnp.asarray(where), **kw)(jnp.asarray(x))
        rl, rg = reference.loss_and_grad(x, t, axis=axis, where=where, normalize=not nll, **kw)
        np.testing.assert_allclose(loss, rl, rtol=LOSS_RTOL)
        np.testing.assert_allclose(g, rg, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        off = np.expand_dims(~where | (t == IGN), axis)
        np.testing.assert_array_equal(np.asarray(g)[np.broadcast_to(off, g.shape)], 0.0)


def test_no_full_size_temporary():
    """Compiled from shapes alone: the step's temporaries stay under 5% of
    the logits (3.5% here, as on the plain path). Without the loop of
    ``_whole`` XLA fuses the reshape into the gradient's pass and the
    exponentials take a buffer of their own: 103%."""
    shape = (65, 150, 16, 16)
    assert _losses._flat_view_applies(shape, 1, jnp.float32)
    s = jax.ShapeDtypeStruct
    step = jax.jit(
        jax.value_and_grad(
            lambda x, t, w: jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN, axis=1)
        )
    )
    compiled = step.lower(
        s(shape, jnp.float32), s((65, 16, 16), jnp.int32), s((150,), jnp.float32)
    ).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.05 * np.prod(shape) * 4, temp


@pytest.mark.parametrize("pallas", [True, False])
def test_second_order_and_vmap(pallas):
    """Through ``_fused_total_and_grad``, the kernel's switch on and off (XLA
    on CPU either way)."""
    if pallas:
        _second_order_and_vmap()
        return
    with jaxloss.disable_pallas():
        _losses._index_impl.clear_cache()
        jax.clear_caches()
        try:
            _second_order_and_vmap()
        finally:
            _losses._index_impl.clear_cache()
            jax.clear_caches()


def _second_order_and_vmap():
    shape, axis = (2, 5, 3, 4), 1
    x, t, w = _case(shape, axis, 3)

    def f(v):
        return jaxloss.cross_entropy(v, jnp.asarray(t), weight=w, ignore_index=IGN, axis=axis)

    def f_ref(v):  # the plain formulation, differentiated by JAX
        lp = jax.nn.log_softmax(v, axis=axis)
        valid = t != IGN
        safe = np.where(valid, t, 0)
        picked = jnp.squeeze(jnp.take_along_axis(lp, np.expand_dims(safe, axis), axis), axis)
        wt = w[safe] * valid
        return -jnp.sum(picked * wt) / np.sum(wt)

    xj = jnp.asarray(x)
    dx = jnp.asarray(rng_for("flat-view-dx").standard_normal(shape), jnp.float32)
    # Each transform compiled: one program, not op by op.
    got = jax.jit(lambda v: jax.jvp(jax.grad(f), (v,), (dx,))[1])(xj)
    want = jax.jit(lambda v: jax.jvp(jax.grad(f_ref), (v,), (dx,))[1])(xj)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    hv = jax.jit(jax.grad(lambda v: jnp.vdot(jax.grad(f)(v), dx)))(xj)  # reverse over reverse
    np.testing.assert_allclose(hv, want, rtol=1e-4, atol=1e-7)
    # Under vmap the batch is folded into the positions (test_vmap_fold.py),
    # a formulation of its own: as close to float64 as one example's (6.5e-9
    # of gradients up to 0.1 either way), not bit for bit the same.
    xs = jnp.stack([xj, 2 * xj])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(f)))(xs)[1], jax.jit(jax.grad(f))(2 * xj), rtol=1e-6, atol=1e-8
    )
