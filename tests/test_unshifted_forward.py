"""XLA:CPU's forward without the max pass (``_losses._unshifted_row_stats``).

Forward-only calls on 16-bit or float32 logits (whatever the class axis) take
each row's ``sum exp(x)`` without a shift and a log-sum-exp split as
``round(log s0) + log(s0 * exp(-round(log s0)))``. These tests check where it
applies, that the fast branch really runs (its ``m`` is an integer, the
fallback's is the row max), that it is as accurate as the shifted formulation
against PyTorch in float64 and the NumPy reference (at the range's edge too),
and that the batches it cannot take fall back, NaNs included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import check_each, config_forwards, data_mesh, rng_for, torch_loss_and_grad

import jaxloss
from jaxloss import _losses

IGN = 255
# The shifted formulation measured within these of float64 on the same data.
LOSS_ATOL, RTOL = 1e-6, 1e-6


def _case(shape, seed, scale=3.0, offset=0.0):
    """NCHW-like logits (classes on axis 1), 20% ignored labels, class weights."""
    rng = rng_for("unshifted", shape, seed)
    c = shape[1]
    x = scale * rng.standard_normal(shape) + offset
    pos = shape[:1] + shape[2:]
    t = rng.integers(0, c, pos)
    t[rng.random(pos) < 0.2] = IGN
    return x.astype(np.float32), t, np.linspace(0.5, 2.0, c).astype(np.float32)


@pytest.mark.parametrize(
    "shape,axis,dtype,applies",
    [
        ((2, 19, 8, 8), 1, jnp.float32, True),
        ((2, 150, 8), 1, jnp.float32, True),
        ((16, 32000), -1, jnp.bfloat16, True),
        ((16, 19), -1, jnp.float16, True),
        ((2, 8, 8, 19), -1, jnp.float32, True),
        ((2, 8, 8, 19), 3, jnp.float32, True),
        ((2, 8, 63), -1, jnp.float32, True),
        ((2, 8, 1), -1, jnp.float32, False),  # one class: the max is the row
        ((2, 1, 8), 1, jnp.bfloat16, False),
        # 16-bit over a strided class axis of 2-5 classes: the max shift
        ((2, 2, 8, 8), 1, jnp.bfloat16, False),
        ((2, 5, 8), 1, jnp.float16, False),
        ((5, 2, 8), 0, jnp.bfloat16, False),
        ((2, 6, 8, 8), 1, jnp.bfloat16, True),
        ((2, 8, 8, 2), -1, jnp.bfloat16, True),
        ((2, 2, 8, 8), 1, jnp.float32, True),
        ((2, 8, 8, 150), 3, jnp.float32, True),
        ((2, 150), -1, jnp.float64, False),
        ((2, 19, 8, 8), 1, jnp.float64, False),
    ],
)
def test_where_it_applies(shape, axis, dtype, applies):
    x = jax.ShapeDtypeStruct(shape, dtype)
    assert _losses._unshifted_applies(x, axis) == applies


def _stats(x, axis):
    return jax.jit(lambda v: _losses._unshifted_row_stats(v, axis))(jnp.asarray(x))


def test_the_fast_branch_runs_and_falls_back():
    """In range, ``m`` is an integer near the log-sum-exp and ``m + log s``
    equals it; one logit above the range (or a row far below it) sends the
    batch to the row max."""
    x, _, _ = _case((2, 19, 6), 0)
    m, log_s = _stats(x, 1)
    lse = np.log(np.sum(np.exp(x.astype(np.float64)), axis=1, keepdims=True))
    np.testing.assert_array_equal(m, np.round(m))
    assert np.all(np.abs(m - lse) <= 0.5 + 1e-6)
    np.testing.assert_allclose(m + log_s, lse, rtol=0, atol=1e-6)
    for bad in (60.0, -70.0):
        y = x.copy()
        if bad > 0:
            y[1, 4, 2] = bad  # one logit: s0 > 2**80
        else:
            y[0, :, 3] = bad + y[0, :, 3] * 0.01  # a whole row: s0 < 2**-80
        m, log_s = _stats(y, 1)
        np.testing.assert_array_equal(m, np.max(y, axis=1, keepdims=True))
        lse = np.log(np.sum(np.exp(y.astype(np.float64)), axis=1, keepdims=True))
        np.testing.assert_allclose(m + log_s, lse, rtol=1e-7, atol=1e-5)


def _check_forwards(x, t, w, atol, logits=None):
    """The weighted forward (``logits``, default ``x``; classes on axis 1)
    with and without label smoothing, every reduction: the six losses under
    one ``jit``, then each against PyTorch and NumPy in float64 (``x``)
    within ``RTOL`` and ``atol`` (``check_each``)."""
    configs = {
        f"{x.shape} label_smoothing={ls} reduction={r}": dict(
            weight=w, ignore_index=IGN, reduction=r, label_smoothing=ls
        )
        for ls in (0.0, 0.1)
        for r in ("none", "mean", "sum")
    }
    losses = config_forwards(x if logits is None else logits, t, 1, configs)

    def check(kw, loss):
        tl, _ = torch_loss_and_grad(x, t, np.ones(np.shape(loss)), nll=False, **kw)
        rl, _ = reference.loss_and_grad(np.moveaxis(x, 1, -1), t, **kw)
        np.testing.assert_allclose(loss, tl, rtol=RTOL, atol=atol)
        np.testing.assert_allclose(loss, rl, rtol=RTOL, atol=atol)

    check_each({name: (kw, losses[name]) for name, kw in configs.items()}, check)


@pytest.mark.parametrize("offset", [0.0, 45.0, -45.0])
def test_forward_matches_float64_oracles(offset):
    """Logits around 0 and near the range's edges (rows of log-sum-exp ~ +-48,
    where ``log s0`` alone rounds to 4e-6), NCHW float32; with and without
    label smoothing, every reduction: the six losses under one ``jit``, then
    each checked (``check_each``)."""
    x, t, w = _case((2, 19, 5, 7), 1, offset=offset)
    m, _ = _stats(x, 1)
    np.testing.assert_array_equal(m, np.round(m))  # the unshifted branch
    # Relative: the losses are 5-20 here. The shifted sums measured within
    # 1.7e-7 of float64; log(s0) taken whole, 5.9e-6 at offsets of 45.
    _check_forwards(x, t, w, atol=1e-7)


def test_16bit_strided_few_classes_forward_matches_float64_oracles():
    """bfloat16 over a strided class axis of 2-5 classes (the max shift, not
    the unshifted statistics): weighted, with and without label smoothing,
    every reduction, against PyTorch and NumPy in float64; all under one
    ``jit`` per shape."""
    for shape in ((3, 2, 4, 5), (2, 3, 7), (2, 5, 3, 3)):
        x, t, w = _case(shape, 4, scale=4.0)
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # exact
        assert not _losses._unshifted_applies(jnp.asarray(x, jnp.bfloat16), 1)
        _check_forwards(x, t, w, atol=LOSS_ATOL, logits=jnp.asarray(x, jnp.bfloat16))


def test_bfloat16_forward_matches_pytorch():
    x, t, w = _case((64, 1000), 2, scale=4.0)
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # exactly representable
    kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1)
    for reduction in ("none", "mean"):
        loss = jax.jit(
            lambda v, r=reduction: jaxloss.cross_entropy(v, jnp.asarray(t), reduction=r, **kw)
        )(jnp.asarray(x, jnp.bfloat16))
        tl, _ = torch_loss_and_grad(
            x, t, np.ones(np.shape(loss)), nll=False, reduction=reduction, **kw
        )
        np.testing.assert_allclose(loss, tl, rtol=RTOL, atol=LOSS_ATOL)


def test_non_finite_and_extreme_rows_fall_back_to_pytorchs_values():
    """A +inf logit (NaN), a valid row of -inf (NaN), an ignored one (0), a
    logit of 1e30: the fallback gives PyTorch's forward, NaNs included."""
    x, t, w = _case((2, 19, 8), 3)
    x[0, 2, 1] = np.inf
    t[0, 1] = 2
    x[0, :, 3] = -np.inf
    t[0, 3] = 4
    x[1, :, 5] = -np.inf
    t[1, 5] = IGN
    x[1, 7, 6] = 1e30
    t[1, 6] = 0
    kw = dict(weight=w, ignore_index=IGN, reduction="none")
    loss = jax.jit(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), axis=1, **kw))(x)
    tl, _ = torch_loss_and_grad(x, t, np.ones(t.shape), nll=False, **kw)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    np.testing.assert_allclose(loss, tl, rtol=RTOL, atol=LOSS_ATOL)


def test_forward_and_gradient_agree_under_vmap():
    """Under ``vmap`` the cond's predicate is batched: one example in range,
    one beyond it; each keeps its own values, and the forward equals the
    fwd+bwd step's loss (which takes the shifted sums)."""
    x, t, w = _case((6, 19, 4), 4)
    x, t = x.reshape(2, 3, 19, 4), t.reshape(2, 3, 4)
    x[1, 0, 5, 1] = 80.0
    kw = dict(weight=w, ignore_index=IGN, axis=1)

    def f(v, tv):
        return jaxloss.cross_entropy(v, tv, **kw)

    got = jax.jit(jax.vmap(f))(jnp.asarray(x), jnp.asarray(t))
    with_grad = jax.jit(jax.vmap(jax.value_and_grad(f)))(jnp.asarray(x), jnp.asarray(t))[0]
    for i in range(2):
        np.testing.assert_allclose(got[i], f(jnp.asarray(x[i]), jnp.asarray(t[i])), rtol=RTOL)
    np.testing.assert_allclose(got, with_grad, rtol=2e-6)


def test_under_shard_map_each_shard_takes_its_own_branch():
    """Under ``shard_map`` the cond's predicate is per device: one shard holds
    a logit beyond the range and falls back, the others do not; together they
    give the one-device values (which fall back as a whole)."""
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map
    x, t, w = _case((8, 19, 6, 5), 6)
    x[5, 3, 2, 1] = 100.0
    mesh = data_mesh()

    def f(v, tv):
        return jaxloss.cross_entropy(v, tv, weight=w, axis=1, ignore_index=IGN, reduction="none")

    spec = P("data")
    got = jax.jit(shard_map(f, mesh=mesh, in_specs=(spec, spec), out_specs=spec))(x, t)
    want = jax.jit(f)(x, t)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-7)
    tl, _ = torch_loss_and_grad(
        x, t, np.ones(t.shape), nll=False, weight=w, ignore_index=IGN, reduction="none"
    )
    np.testing.assert_allclose(got, tl, rtol=RTOL, atol=1e-7)


CHANNELS_LAST_CASES = {  # name: (offset, one logit set to this value or None)
    "offset=0": (0.0, None),
    "offset=40": (40.0, None),
    "offset=-45": (-45.0, None),
    "one-logit-70": (0.0, 70.0),
}


@pytest.mark.parametrize("loop", [False, True], ids=["whole-array", "chunked-loop"])
@pytest.mark.parametrize("c", [19, 150])
def test_channels_last_rows(monkeypatch, loop, c):
    """Float32 channels-last rows of 19 and 150 classes (Cityscapes' and
    ADE20K's sizes): the fast branch (its ``m`` an integer) or, with one logit beyond the
    range, the fallback, in the whole-array forward and in the chunked loop
    (forced, tiny chunks: some fall back, some not), against PyTorch in
    float64 and the NumPy reference, every reduction. Every case's row
    statistics and losses are computed under one ``jit`` (each call with its
    own inputs), then each is checked (``check_each``)."""
    xs = {}
    for name, (offset, bad) in CHANNELS_LAST_CASES.items():
        x, t, w = _case((3, c, 7), 7, offset=offset)
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # (3, 7, c)
        if bad is not None:
            x[2, 5, 11] = bad
        xs[name] = x
    reductions = ("none", "mean", "sum")
    kws = {
        r: dict(weight=w, ignore_index=IGN, reduction=r, label_smoothing=0.1) for r in reductions
    }
    if loop:
        monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", c * 4)
        monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
    _losses._index_impl.clear_cache()

    def run(xs, t):
        out = {}
        for name, v in xs.items():
            stats = _losses._unshifted_row_stats(v, -1)[0]
            out[name] = (stats, {r: jaxloss.cross_entropy(v, t, **kws[r]) for r in reductions})
        return out

    try:
        results = jax.jit(run)(xs, jnp.asarray(t))
    finally:
        _losses._index_impl.clear_cache()

    def check(x, bad, m, losses):
        if bad is None:
            np.testing.assert_array_equal(m, np.round(m))
        else:
            np.testing.assert_array_equal(m, np.max(x, axis=-1, keepdims=True))
        for reduction, loss in losses.items():
            kw = kws[reduction]
            ones = np.ones(np.shape(loss))
            tl, _ = torch_loss_and_grad(np.moveaxis(x, -1, 1), t, ones, nll=False, **kw)
            rl, _ = reference.loss_and_grad(x, t, **kw)  # channels-last
            np.testing.assert_allclose(loss, tl, rtol=RTOL, atol=1e-7, err_msg=reduction)
            np.testing.assert_allclose(loss, rl, rtol=RTOL, atol=1e-7, err_msg=reduction)

    check_each(
        {name: (xs[name], bad, *results[name]) for name, (_, bad) in CHANNELS_LAST_CASES.items()},
        check,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_class_keeps_the_max_and_pytorchs_values(dtype):
    """A single class: the shifted formulation (its max is the logit itself;
    the unshifted one spent 10x the time on per-position maths there). Loss 0
    at finite logits, NaN at +-inf and NaN logits, 0 where ignored; PyTorch's
    forward in float64."""
    x = rng_for("one-class").standard_normal((4, 1, 6)).astype(np.float32) * 30.0
    t = np.zeros((4, 6), np.int64)
    x[0, 0, 1], x[1, 0, 2], x[2, 0, 3] = np.inf, -np.inf, np.nan
    x[3, 0, 4], t[3, 4] = np.inf, IGN
    t[2, 5] = IGN
    assert not _losses._unshifted_applies(jnp.asarray(x, dtype), 1)
    xr = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    for reduction in ("none", "sum"):
        loss = jax.jit(
            lambda v, r=reduction: jaxloss.cross_entropy(
                v, jnp.asarray(t), axis=1, ignore_index=IGN, reduction=r
            )
        )(jnp.asarray(x, dtype))
        tl, _ = torch_loss_and_grad(
            xr, t, np.ones(np.shape(loss)), nll=False, ignore_index=IGN, reduction=reduction
        )
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
        ok = ~np.isnan(tl)
        np.testing.assert_array_equal(np.asarray(loss, np.float64)[ok], tl[ok])
    assert np.isnan(tl)  # the sum: NaN rows count
