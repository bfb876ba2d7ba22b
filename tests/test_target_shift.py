"""XLA:CPU's fwd+bwd shifted by the target logit (``_losses._target_shifted_exp``).

Float32 rows that are not grouped (``_row_group``) share one
``exp(x - x_t)`` between the row sum and the gradient, ``x_t`` the row's
target logit, instead of ``exp(x - max)``: no max pass. A batch with a valid
row whose sum is not finite (a logit ~88 above its target, a non-finite
logit) falls back to the max through a while loop of 0 or 1 trips. These
tests check where it applies, that each branch really runs, the values and
gradients against PyTorch in float64 and the NumPy reference (at a tolerance
derived from the rounding of ``x - x_t``), the fallback, non-finite rows,
the chunked loop, ``vmap``, second derivatives (whose rule the while loop
is part of) and ``shard_map``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
import torch
from oracles import (
    assert_rows_match_pytorch,
    check_each,
    config_losses_and_grads,
    data_mesh,
    plant_non_finite_rows,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss
from jaxloss import _losses

IGN = 255
# read before the fixture below sets it to 0
DEFAULT_MIN_ELEMENTS = _losses._TARGET_SHIFT_MIN_ELEMENTS


@pytest.fixture(autouse=True)
def _every_size(target_shift_everywhere):
    """These tests' logits are small: take the target shift at any size."""
    yield


LOSS_RTOL, LOSS_ATOL = 1e-6, 1e-6
# A float32 x - x_t rounds to |x - x_t| * 2**-24 relatively, and exp turns
# that into the same relative error of the exponential: a gradient entry
# p_c is off by up to p_c * |x_c - x_t| * 2**-24, on top of the few ulps
# that every implementation shows (GRAD_ULPS).
GRAD_ULPS = 3e-7


def _grad_atol(x, t, axis, ct=1.0):
    """The bound above for these logits: the largest margin by which a
    valid row's largest logit lies above its target's."""
    xl = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    ok = t != IGN
    xt = np.take_along_axis(xl, np.where(ok, t, 0)[..., None], -1)[..., 0]
    margin = np.max(np.where(ok, xl.max(-1) - xt, 0.0))
    return (margin * 2.0**-24 + GRAD_ULPS) * float(np.max(np.abs(ct)))


def _case(shape, axis, seed, scale=3.0):
    rng = rng_for("target-shift", shape, axis, seed)
    axis = axis % len(shape)
    c = shape[axis]
    pos = shape[:axis] + shape[axis + 1 :]
    x = scale * rng.standard_normal(shape)
    t = rng.integers(0, c, pos)
    t[rng.random(pos) < 0.2] = IGN
    return x.astype(np.float32), t, np.linspace(0.5, 2.0, c).astype(np.float32)


@pytest.mark.parametrize(
    "shape,axis,dtype,applies",
    [
        ((2, 8, 150), 2, jnp.float32, True),
        ((2, 150, 8), 1, jnp.float32, True),  # classes not last: never grouped
        ((64, 1000), 1, jnp.float32, True),
        ((2, 8, 64), 2, jnp.float32, True),
        ((2, 16, 19), 2, jnp.float32, False),  # grouped rows instead
        ((3, 5, 19), 2, jnp.float32, True),  # 5 positions a row: no whole group
        ((2, 8, 150), 2, jnp.float64, False),
        ((2, 8, 150), 2, jnp.bfloat16, False),  # 16-bit: its own plan
    ],
)
def test_where_it_applies(shape, axis, dtype, applies):
    assert _losses._target_shift_applies(shape, axis, dtype) == applies


def test_inputs_under_a_million_logits_keep_the_max(core_constants):
    """The library's own threshold (this file's fixture sets it to 0)."""
    assert DEFAULT_MIN_ELEMENTS == 1 << 20
    core_constants("_TARGET_SHIFT_MIN_ELEMENTS", DEFAULT_MIN_ELEMENTS)
    assert not _losses._target_shift_applies((2048, 8, 63), 2, jnp.float32)  # 1032192
    assert _losses._target_shift_applies((2048, 8, 64), 2, jnp.float32)  # 1048576
    assert not _losses._target_shift_applies((6990, 150), 1, jnp.float32)  # 1048500
    assert _losses._target_shift_applies((6991, 150), 1, jnp.float32)  # 1048650


def _shift(x, t, axis):
    """The ``m`` that ``_target_shifted_exp`` chose (and checks on ``e``, ``s``)."""
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    valid = tj != IGN
    x_t = jnp.take_along_axis(xj, jnp.expand_dims(jnp.where(valid, tj, 0), axis), axis)
    e, s, m = jax.jit(lambda v, xt, ok: _losses._target_shifted_exp(v, xt, ok, axis))(
        xj, jnp.squeeze(x_t, axis), valid
    )
    with np.errstate(over="ignore"):  # ignored rows may overflow, as there
        want = np.exp(x - np.asarray(m))  # float32, as there
    # float32 rounding; XLA:CPU flushes subnormal results to zero
    np.testing.assert_allclose(e, want, rtol=1e-6, atol=1e-37)
    np.testing.assert_allclose(s, np.sum(e, axis=axis, keepdims=True), rtol=1e-6)
    return np.asarray(m), np.asarray(x_t)


def test_each_branch_runs():
    """In range the shift is each row's target logit (the ignored rows'
    class 0); a valid row with a logit 100 above its target sends the batch
    to the row max; the same row ignored does not."""
    x, t, _ = _case((4, 6, 150), -1, 0)
    m, x_t = _shift(x, t, 2)
    np.testing.assert_array_equal(m, x_t)
    t[1, 2] = 3
    x[1, 2, 7] = x[1, 2, 3] + 100.0
    m, _ = _shift(x, t, 2)
    np.testing.assert_array_equal(m, np.max(x, axis=2, keepdims=True))
    t[1, 2] = IGN
    m, x_t = _shift(x, t, 2)
    np.testing.assert_array_equal(m, x_t)


@pytest.mark.parametrize("shape,axis", [((3, 6, 150), -1), ((3, 40, 5, 4), 1), ((32, 1000), -1)])
def test_matches_float64_oracles(shape, axis):
    """With and without label smoothing, every reduction: the six losses and
    gradients under one ``jit`` (``config_losses_and_grads``), then each against
    PyTorch and NumPy in float64, the gradient within the derived bound
    (``check_each``)."""
    x, t, w = _case(shape, axis, 1)
    assert _losses._target_shift_applies(shape, axis % len(shape), jnp.float32)
    pos = np.shape(t)
    configs = {}
    for smoothing in (0.0, 0.1):
        for reduction in ("none", "mean", "sum"):
            kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=smoothing)
            ct = rng_for("target-shift-ct", shape).standard_normal(
                pos if reduction == "none" else ()
            )
            configs[f"label_smoothing={smoothing} reduction={reduction}"] = (kw, ct)

    def check(kw, ct, loss, g, *_):
        scale = 1.0 if kw["reduction"] != "mean" else 1.0 / np.sum(w[t[t != IGN]])
        atol = _grad_atol(x, t, axis, ct) * scale
        tl, tg = torch_loss_and_grad(to_torch_layout(x, axis), t, ct, nll=False, **kw)
        tg = np.moveaxis(tg, 1, axis % x.ndim)
        tg[np.broadcast_to(np.expand_dims(t == IGN, axis), tg.shape)] = 0.0
        rl, rg = reference.loss_and_grad(x, t, cotangent=ct, axis=axis, **kw)
        for want_l, want_g, name in ((tl, tg, "pytorch"), (rl, rg, "numpy")):
            np.testing.assert_allclose(
                loss, want_l, rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=name
            )
            np.testing.assert_allclose(g, want_g, rtol=0, atol=atol, err_msg=name)

    check_each(config_losses_and_grads(jaxloss.cross_entropy, x, t, configs, axis=axis), check)


def test_large_margins_stay_within_the_bound():
    """Targets 20-80 below their row's largest logit (just inside the
    overflow limit): the target shift runs, the loss is as accurate as
    ever, and the gradient within the derived bound (up to 4.8e-6 a unit
    of weight here)."""
    x, t, w = _case((64, 150), -1, 2, scale=1.0)
    t[t == IGN] = 0
    rng = rng_for("target-shift-margins")
    top = (t + 1 + rng.integers(0, 149, t.shape)) % 150
    x[np.arange(64), top] = x[np.arange(64), t] + rng.uniform(20.0, 80.0, 64)
    m, x_t = _shift(x, t, 1)
    np.testing.assert_array_equal(m, x_t)
    kw = dict(weight=w, reduction="sum")
    loss, g = jax.jit(jax.value_and_grad(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), **kw)))(
        jnp.asarray(x)
    )
    rl, rg = reference.loss_and_grad(x, t, **kw)
    np.testing.assert_allclose(loss, rl, rtol=LOSS_RTOL)
    atol = _grad_atol(x, t, -1, 2.0)  # weights up to 2
    assert atol < 1.1e-5
    np.testing.assert_allclose(g, rg, rtol=0, atol=atol)


def test_fallback_and_non_finite_rows_match_pytorch():
    """A valid row with a logit 100 above its target (the batch falls back),
    a +inf logit and a valid row of -inf (NaN, as in PyTorch), an ignored
    row of -inf (zero): PyTorch's values, NaNs included."""
    x, t, w = _case((2, 8, 150), -1, 3)
    t[0, 1] = 4
    x[0, 1, 9] = x[0, 1, 4] + 100.0
    plant_non_finite_rows(x, t, IGN)
    assert_rows_match_pytorch(
        x, t, (LOSS_RTOL, LOSS_ATOL), (0, GRAD_ULPS), weight=w, ignore_index=IGN
    )


def test_overflow_in_ignored_rows_keeps_the_fast_branch():
    """An ignored row whose class 0 lies 200 below another logit overflows
    its own sum: it does not count, the gradient there is zero, and every
    other row keeps the target shift."""
    x, t, w = _case((4, 150), -1, 4)
    t[2] = IGN
    x[2, 0] = -200.0
    t[[0, 1, 3]] = [5, 6, 7]
    m, x_t = _shift(x, t, 1)
    np.testing.assert_array_equal(m[[0, 1, 3]], x_t[[0, 1, 3]])
    kw = dict(weight=w, ignore_index=IGN)
    loss, g = jax.value_and_grad(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), **kw))(
        jnp.asarray(x)
    )
    rl, rg = reference.loss_and_grad(x, t, **kw)
    np.testing.assert_allclose(loss, rl, rtol=LOSS_RTOL)
    np.testing.assert_array_equal(g[2], 0.0)
    np.testing.assert_allclose(g, rg, rtol=0, atol=_grad_atol(x, t, -1))


def test_chunked_loop_falls_back_per_chunk(monkeypatch):
    """The chunked loop (XLA:CPU from 64 MiB; forced, tiny chunks): each
    chunk decides for itself; one chunk falls back, the result equals the
    oracles' and the whole-array path's."""
    x, t, w = _case((3, 9, 150), -1, 5)
    t[2, 3] = 1
    x[2, 3, 0] = x[2, 3, 1] + 95.0

    def step(v):
        kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1)
        return jax.value_and_grad(lambda u: jaxloss.cross_entropy(u, jnp.asarray(t), **kw))(v)

    want = jax.jit(step)(jnp.asarray(x))
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 150 * 3)
    monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
    _losses._index_impl.clear_cache()
    try:
        cut = _losses._Chunking.of_logits(x.shape, 2, 4)
        assert cut.steps > 2
        got = jax.jit(step)(jnp.asarray(x))
    finally:
        _losses._index_impl.clear_cache()
    rl, rg = reference.loss_and_grad(
        x, t, weight=w, ignore_index=IGN, label_smoothing=0.1, reduction="mean"
    )
    np.testing.assert_allclose(got[0], rl, rtol=LOSS_RTOL)
    scale = 1.0 / np.sum(w[t[t != IGN]])
    np.testing.assert_allclose(got[1], rg, rtol=0, atol=_grad_atol(x, t, -1) * scale)
    np.testing.assert_allclose(got[0], want[0], rtol=LOSS_RTOL)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=_grad_atol(x, t, -1) * scale)


def test_vmap_each_example_takes_its_own_branch():
    """Under ``vmap`` the while loop runs for the batch if any example needs
    it, and each example keeps its own values."""
    x, t, w = _case((3, 16, 150), -1, 6)
    t[1, 5] = 2
    x[1, 5, 9] = x[1, 5, 2] + 100.0  # example 1 falls back

    def per_example(v, tv):
        return jaxloss.cross_entropy(v, tv, weight=w, ignore_index=IGN)

    got = jax.jit(jax.vmap(jax.value_and_grad(per_example)))(jnp.asarray(x), jnp.asarray(t))
    for i in range(3):
        rl, rg = reference.loss_and_grad(x[i], t[i], weight=w, ignore_index=IGN)
        scale = 1.0 / np.sum(w[t[i][t[i] != IGN]])
        np.testing.assert_allclose(got[0][i], rl, rtol=LOSS_RTOL)
        np.testing.assert_allclose(got[1][i], rg, rtol=0, atol=_grad_atol(x[i], t[i], -1) * scale)


@pytest.mark.parametrize("bad", [False, True], ids=["target-shift", "fallback"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_second_order_through_the_while_loop(reduction, bad):
    """The while loop has no reverse-mode rule of its own: a hessian-vector
    product (jvp of grad, and grad of grad) through the path that calls it
    directly (``disable_pallas``; "none": the per-position rule) equals
    PyTorch's double backward in float64, at a batch that falls back and
    one that does not."""
    x, t, w = _case((6, 150), -1, 7)
    if bad:
        t[3] = 2
        x[3, 9] = x[3, 2] + 100.0
    d = jnp.asarray(rng_for("target-shift-dir", bad).standard_normal(x.shape), jnp.float32)
    kw = dict(weight=w, ignore_index=IGN, reduction=reduction)

    def total(v):
        out = jaxloss.cross_entropy(v, jnp.asarray(t), **kw)
        return jnp.sum(out * out) if reduction == "none" else out

    with jaxloss.disable_pallas():
        fwd_rev = jax.jit(lambda v: jax.jvp(jax.grad(total), (v,), (d,))[1])
        rev_rev = jax.jit(lambda v: jax.grad(lambda u: jnp.vdot(jax.grad(total)(u), d))(v))
        got = (fwd_rev(jnp.asarray(x)), rev_rev(jnp.asarray(x)))

    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    tkw = dict(weight=torch.tensor(w, dtype=torch.float64), ignore_index=IGN)
    out = torch.nn.functional.cross_entropy(xt, torch.tensor(t), reduction=reduction, **tkw)
    out = (out * out).sum() if reduction == "none" else out
    (gx,) = torch.autograd.grad(out, xt, create_graph=True)
    (want,) = torch.autograd.grad((gx * torch.tensor(np.asarray(d), dtype=torch.float64)).sum(), xt)
    want = want.numpy()
    for value in got:
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))


def test_under_shard_map_each_shard_takes_its_own_branch():
    """Under ``shard_map`` the loop's predicate is per device (its carry
    typed as varying): one shard falls back, the others do not; together
    they give the one-device values."""
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map
    x, t, w = _case((8, 5, 150), -1, 8)
    t[5, 2] = 1
    x[5, 2, 0] = x[5, 2, 1] + 100.0
    mesh = data_mesh()

    def step(v, tv):
        return jax.value_and_grad(
            lambda u: jaxloss.cross_entropy(u, tv, weight=w, ignore_index=IGN, reduction="sum")
        )(v)

    def summed(v, tv):
        total, g = step(v, tv)
        return jax.lax.psum(total, "data"), g

    spec = P("data")
    sharded = shard_map(summed, mesh=mesh, in_specs=(spec, spec), out_specs=(P(), spec))
    got = jax.jit(sharded)(jnp.asarray(x), jnp.asarray(t))
    np.testing.assert_allclose(got[0], jax.jit(step)(x, t)[0], rtol=LOSS_RTOL)
    rl, rg = reference.loss_and_grad(x, t, weight=w, ignore_index=IGN, reduction="sum")
    np.testing.assert_allclose(got[0], rl, rtol=LOSS_RTOL)
    np.testing.assert_allclose(got[1], rg, rtol=0, atol=_grad_atol(x, t, -1, 2.0))
