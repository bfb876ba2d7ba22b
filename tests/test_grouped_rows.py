"""XLA:CPU's grouped exponentials (``_losses._group_shifted_exp``).

Channels-last float32 logits with 9-41 classes (bfloat16: 9-12, 1M-3M
logits, the "mean"/"sum" step): the fwd+bwd step takes one shift per group
of consecutive positions (their largest logit) so that the exponentials run
over rows of a multiple of 16 floats, with the rounding of ``x - shift`` put
back (``_exp_diff``). These tests check that the path is taken where it
should be, that it is as accurate as the per-row shift (PyTorch in float64
and the NumPy reference as oracles, at tolerances the uncorrected
formulation fails), that a batch it cannot take (a valid target too far
below its group's max, non-finite rows) falls back, and that
transformations keep working through its fallback loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    as_bfloat16,
    assert_rows_match_pytorch,
    check_each,
    config_losses_and_grads,
    plant_non_finite_rows,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss
from jaxloss import _losses

IGN = 255
# Tighter than the suite's float32 tolerance: the grouped path measured loss
# 5.2e-7 and gradient 9.5e-8 off float64 here (the per-row shift 5.2e-7 and
# 1.4e-7), and without the rounding correction 1.5e-6 and 4.9e-7.
LOSS_ATOL, GRAD_ATOL, RTOL = 1e-6, 2.5e-7, 1e-6


def _case(shape, seed, spread=60.0):
    """Logits whose position maxima lie up to ``spread`` apart, so that a
    group's shift sits far above most of its rows; 20% ignored labels."""
    rng = rng_for("grouped", shape, seed)
    c = shape[-1]
    x = 3.0 * rng.standard_normal(shape) - rng.uniform(0.0, spread, shape[:-1] + (1,))
    t = rng.integers(0, c, shape[:-1])
    t[rng.random(shape[:-1]) < 0.2] = IGN
    w = np.linspace(0.5, 2.0, c)
    return x.astype(np.float32), t, w.astype(np.float32)


def _row_maxima_of_e(x, t=None):
    """Each row's max of ``_group_shifted_exp``'s exponentials: 1 under the
    per-row shift, ``exp(m - group max)`` under a group's. ``t``: the labels
    whose target logits the check reads (default: every row valid, its
    target its max)."""
    xc = jnp.asarray(x).reshape(-1, x.shape[-1])
    if t is None:
        x_t, valid = jnp.max(xc, axis=-1), jnp.ones(xc.shape[:-1], bool)
    else:
        tc = jnp.asarray(t).reshape(-1)
        valid = tc != IGN
        x_t = jnp.take_along_axis(xc, jnp.where(valid, tc, 0)[:, None], axis=-1)[:, 0]
    e, _, _ = jax.jit(lambda v, x_t, ok: _losses._group_shifted_exp(v, x_t, ok, 1))(xc, x_t, valid)
    return np.asarray(jnp.max(e, axis=-1))


@pytest.mark.parametrize(
    "shape,axis,dtype,k",
    [
        ((2, 2, 16, 19), -1, jnp.float32, 16),
        ((64, 10), -1, jnp.float32, 8),
        ((4, 2, 40), -1, jnp.float32, 2),
        ((3, 5, 19), -1, jnp.float32, 1),  # 5 positions a row: no whole group
        ((2, 16, 8, 19), -1, jnp.float32, 1),  # groups stay within the last dimension
        ((2, 8, 16), -1, jnp.float32, 1),  # rows of 16 already vectorize
        ((2, 8, 50), -1, jnp.float32, 1),  # 50 classes ran fast per row
        ((2, 8, 8), -1, jnp.float32, 1),  # so did 8
        ((2, 19, 16), 1, jnp.float32, 1),  # classes not last
        ((2, 16, 19), -1, jnp.bfloat16, 1),  # 16-bit: its own plan
    ],
)
def test_which_shapes_group(shape, axis, dtype, k):
    assert _losses._row_group(shape, axis % len(shape), dtype) == k


@pytest.mark.parametrize("c", [10, 19, 40])
def test_the_grouped_path_runs(c):
    """Rows below their group's max get exponentials below 1: the grouped
    branch ran. A row beyond ``_GROUP_SPAN`` sends the batch to the per-row
    shift, where every row's max exponential is 1."""
    x, t, _ = _case((2, 16, c), 0, spread=30.0)
    tops = _row_maxima_of_e(x)
    assert np.any(tops < 0.5) and np.all(tops <= 1.0)
    x[1, 3] -= 100.0
    np.testing.assert_array_equal(_row_maxima_of_e(x), 1.0)


def test_the_check_reads_valid_targets():
    """The check reads each valid row's target logit: one more than
    ``_GROUP_SPAN`` below its group's max sends the batch to the per-row
    shift even where the row's max is close; an ignored row's does not."""
    x, t, _ = _case((2, 16, 19), 6, spread=5.0)
    t[t == IGN] = 0
    t[0, 3] = 4
    x[0, 3, 4] = x[0].max() - 70.0  # the target only: the row's max stays close
    assert np.any(_row_maxima_of_e(x) < 0.5)  # checked on each row's max: grouped
    np.testing.assert_array_equal(_row_maxima_of_e(x, t), 1.0)  # on its target: per row
    x[0, 3] = x[0].max() - 70.0  # now the whole row
    t[0, 3] = IGN
    assert np.any(_row_maxima_of_e(x, t) < 0.5)  # that row ignored: grouped


@pytest.mark.parametrize("shape", [(2, 2, 16, 19), (64, 10), (4, 2, 40)])
def test_grouped_rows_match_float64_oracles(shape):
    """With and without label smoothing, every reduction: the six losses and
    gradients under one ``jit`` (``config_losses_and_grads``), then each against
    PyTorch and NumPy in float64 (``check_each``)."""
    x, t, w = _case(shape, 1)
    configs = {}
    for smoothing in (0.0, 0.1):
        for reduction in ("none", "mean", "sum"):
            kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=smoothing)
            ct = rng_for("grouped-ct", shape).standard_normal(
                shape[:-1] if reduction == "none" else ()
            )
            configs[f"label_smoothing={smoothing} reduction={reduction}"] = (kw, ct)

    def check(kw, ct, loss, g, *_):
        tl, tg = torch_loss_and_grad(to_torch_layout(x, -1), t, ct, nll=False, **kw)
        tg = np.moveaxis(tg, 1, -1) if x.ndim > 2 else tg
        tg[t == IGN] = 0.0
        np.testing.assert_allclose(loss, tl, rtol=RTOL, atol=LOSS_ATOL)
        np.testing.assert_allclose(g, tg, rtol=RTOL, atol=GRAD_ATOL)
        rl, rg = reference.loss_and_grad(x, t, cotangent=ct, **kw)
        np.testing.assert_allclose(loss, rl, rtol=RTOL, atol=LOSS_ATOL)
        np.testing.assert_allclose(g, rg, rtol=RTOL, atol=GRAD_ATOL)

    check_each(config_losses_and_grads(jaxloss.cross_entropy, x, t, configs), check)


def test_fallback_and_non_finite_rows_match_pytorch():
    """Rows the group shift cannot serve -- one 100 below its group's max, a
    row of -inf (valid: NaN; ignored: zero), a +inf logit, a target on a
    masked class (inf) -- give PyTorch's values, NaNs included, through the
    per-row branch."""
    x, t, w = _case((2, 8, 19), 2, spread=5.0)
    x[0, 1] -= 100.0
    plant_non_finite_rows(x, t, IGN)
    x[0, 5, 1::2] = -np.inf
    t[0, 5] = 3
    assert_rows_match_pytorch(
        x, t, (RTOL, LOSS_ATOL), (RTOL, GRAD_ATOL), weight=w, ignore_index=IGN
    )


def test_masked_and_extreme_logits_in_grouped_rows_match_pytorch():
    """Rows the grouped branch serves may hold masked classes (-inf) and
    logits whose difference to the shift overflows (-3e38 beside 1e38): their
    exponentials are 0, as in PyTorch, not the NaN of a two-sum of infinite
    differences. (A target on a masked class fails the check: see the
    fallback test.)"""
    x, t, w = _case((2, 2, 16, 19), 5, spread=5.0)
    x[0, 0, 3, 5:9] = -np.inf
    t[0, 0, 3] = 2
    x[0, 1, 7, ::2] = -np.inf
    t[0, 1, 7] = 1
    x[1, 0] = 1e38  # a whole group of 16 positions, so that the batch still groups
    x[1, 0, :, 3] = -3e38
    x[1, 0, :, 7] = 0.0
    t[1, 0] = 0
    assert np.any(_row_maxima_of_e(x, t) < 0.5)  # the grouped branch runs
    for reduction, eps in (("none", 0.0), ("none", 0.1), ("sum", 0.0)):
        kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=eps)
        t = t.copy()
        if eps:  # smoothing sums 1e38 - -3e38 (inf in float32, not in the float64 oracle)
            t[1, 0] = IGN
        loss, vjp = jax.vjp(
            lambda v, kw=kw, t=t: jaxloss.cross_entropy(v, jnp.asarray(t), **kw), jnp.asarray(x)
        )
        (g,) = vjp(jnp.ones(loss.shape, jnp.float32))
        tl, tg = torch_loss_and_grad(
            to_torch_layout(x, -1), t, np.ones(loss.shape), nll=False, **kw
        )
        tg = np.moveaxis(tg, 1, -1)
        tg[t == IGN] = 0.0
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl), err_msg=reduction)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(tg), err_msg=reduction)
        np.testing.assert_allclose(loss, tl, rtol=RTOL, atol=LOSS_ATOL, err_msg=reduction)
        np.testing.assert_allclose(g, tg, rtol=RTOL, atol=GRAD_ATOL, err_msg=reduction)


def test_vmap_and_second_order_through_the_fallback():
    """Under ``vmap`` the fallback loop's predicate is batched (it runs where
    any example needs it and each example keeps its own); the gradient's own
    derivative (reduction "none", whose rule the grouped path is part of)
    equals the per-row formulation's."""
    x, t, w = _case((3, 16, 19), 3, spread=20.0)
    x[1, 5] -= 100.0  # example 1 falls back, 0 and 2 group
    tj = jnp.asarray(t)

    def per_example(v, tv):
        return jnp.sum(jaxloss.cross_entropy(v, tv, weight=w, ignore_index=IGN, reduction="none"))

    got = jax.vmap(jax.value_and_grad(per_example))(jnp.asarray(x), tj)
    for i in range(3):
        want = jax.value_and_grad(per_example)(jnp.asarray(x[i]), tj[i])
        np.testing.assert_allclose(got[0][i], want[0], rtol=RTOL)
        np.testing.assert_allclose(got[1][i], want[1], rtol=RTOL, atol=GRAD_ATOL)

    def hvp(v, d):
        return jax.jvp(jax.grad(lambda u: per_example(u, tj[0])), (v,), (d,))[1]

    v = jnp.asarray(x[0])
    d = jnp.asarray(rng_for("grouped-dir").standard_normal(v.shape), jnp.float32)
    got_hvp = jax.jit(hvp)(v, d)
    ungrouped = range(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_losses, "_GROUPED_CLASSES", ungrouped)
        jax.clear_caches()
        want_hvp = jax.jit(hvp)(v, d)
    jax.clear_caches()
    np.testing.assert_allclose(got_hvp, want_hvp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["batch", "height"])
def test_grouped_loop_under_gspmd(monkeypatch, spec):
    """The chunked loop (XLA:CPU from 64 MiB; forced here) groups each chunk's
    rows along its last position dimension only, so under GSPMD ``jit`` with
    the logits sharded along the batch or the height no device gathers
    another's logits, and value and gradient equal the one-device
    whole-array path's."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, t, w = _case((8, 4, 32, 19), 4, spread=30.0)
    x, t = jnp.asarray(x), jnp.asarray(t)

    def step(x, t):
        return jax.value_and_grad(
            lambda v: jaxloss.cross_entropy(v, t, weight=w, ignore_index=IGN, label_smoothing=0.1)
        )(x)

    with jaxloss.disable_pallas():
        want = jax.jit(step)(x, t)
        monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 16 * 16 * 19)
        monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
        monkeypatch.setattr(_losses, "_loop_writes_grad", lambda x: True)
        _losses._index_impl.clear_cache()  # the core's jit cache misses these
        cut = _losses._Chunking.of_logits(x.shape, 3, 4)
        assert cut.steps > 1 and _losses._row_group(cut.chunk, cut.cax, jnp.float32) == 16
        mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
        xs = P("data") if spec == "batch" else P(None, "data")
        sharded = jax.jit(step, in_shardings=(NamedSharding(mesh, xs), NamedSharding(mesh, P(*xs))))
        text = sharded.lower(x, t).compile().as_text()
        got = sharded(x, t)
    _losses._index_impl.clear_cache()
    # The grouped rows' fallback loop is compiled in (each device's chunk
    # loop, one step here, is inlined).
    assert " while(" in text
    assert "all-gather" not in text
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=GRAD_ATOL)


# ---------------------------------------------------------------------------
# bfloat16 rows of 9-12 classes ("mean"/"sum": _losses._grouped_16bit)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,dtype,k",
    [
        ((1953, 128, 10), jnp.bfloat16, 8),
        ((8, 128, 128, 12), jnp.bfloat16, 4),
        ((1953, 128, 9), jnp.bfloat16, 16),
        ((16, 64, 9), jnp.bfloat16, 1),  # small: the per-row pass
        ((3200, 128, 10), jnp.bfloat16, 1),  # large: the exponentials outgrow the cache
        ((1953, 128, 19), jnp.bfloat16, 1),  # 19-40 classes measured slower
        ((1953, 128, 10), jnp.float16, 1),  # measured for bfloat16 only
    ],
)
def test_which_bfloat16_shapes_group(core_constants, shape, dtype, k):
    # Without AVX-512 (measured on an AVX2 host); with it, no bfloat16 rows
    # are grouped (the per-row pass runs vectorised there).
    core_constants("_CPU_AVX512", True)
    assert _losses._row_group(shape, len(shape) - 1, dtype) == 1
    core_constants("_CPU_AVX512", False)
    assert _losses._row_group(shape, len(shape) - 1, dtype) == k
    plans = {}

    def trace(v):
        for reduced in (False, True):
            plans[reduced] = _losses._cpu_exp_plan(v, len(shape) - 1, reduced=reduced)
        return v

    jax.eval_shape(trace, jax.ShapeDtypeStruct(shape, dtype))
    # Only the "mean"/"sum" step shares the float32 exponentials.
    assert ("share_exp" in plans[True]) == (k > 1)
    assert "share_exp" not in plans[False]


@pytest.fixture
def small_bf16_groups(constants_at_setup):
    """bfloat16 grouping for test-sized inputs, on any host."""
    constants_at_setup("_GROUPED_16BIT_MIN_ELEMENTS", 0)
    constants_at_setup("_CPU_AVX512", False)


def _bf16_case(shape, seed, spread=20.0):
    """bfloat16 logits and the same values in float64 (exact)."""
    x, t, w = _case(shape, seed, spread)
    return (*as_bfloat16(x), t, w)


def _bf16_step(xb, t, **kw):
    """``(loss, gradient as float64, the compiled step's text)``."""
    step = jax.jit(jax.value_and_grad(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), **kw)))
    loss, g = step(xb)
    assert g.dtype == jnp.bfloat16
    text = step.lower(xb).compile().as_text()
    return np.asarray(loss, np.float64), np.asarray(g.astype(jnp.float32), np.float64), text


@pytest.mark.parametrize("shape", [(4, 32, 10), (2, 2, 16, 9), (8, 4, 12)])
def test_bfloat16_grouped_rows_match_float64_oracles(small_bf16_groups, shape):
    """The loss against PyTorch and NumPy in float64 on the same values, the
    gradient within bfloat16 rounding, through the grouped path (the compiled
    step holds one fallback loop per configuration): weighted or not, with or
    without label smoothing, "mean" and "sum", the six steps under one
    ``jit``, then each checked (``check_each``)."""
    xb, x64, t, w = _bf16_case(shape, 7)
    configs = {
        f"weighted={weighted} label_smoothing={smoothing} reduction={reduction}": dict(
            weight=w if weighted else None,
            ignore_index=IGN,
            reduction=reduction,
            label_smoothing=smoothing,
        )
        for reduction in ("mean", "sum")
        for weighted, smoothing in ((True, 0.0), (True, 0.1), (False, 0.0))
    }

    def steps(xs, t):
        return [
            jax.value_and_grad(lambda v, kw=kw: jaxloss.cross_entropy(v, t, **kw))(v)
            for v, kw in zip(xs, configs.values(), strict=True)
        ]

    args = ([xb] * len(configs), jnp.asarray(t))
    compiled = jax.jit(steps).lower(*args).compile()
    assert compiled.as_text().count(" while(") == len(configs)
    results = compiled(*args)
    lt, gt = LOSS_TOL["bfloat16"], GRAD_TOL["bfloat16"]

    def check(kw, loss, g):
        assert g.dtype == jnp.bfloat16
        loss, g = np.asarray(loss, np.float64), np.asarray(g.astype(jnp.float32), np.float64)
        tl, tg = torch_loss_and_grad(to_torch_layout(x64, -1), t, 1.0, nll=False, **kw)
        tg = np.moveaxis(tg, 1, -1)
        rl, rg = reference.loss_and_grad(x64, t, **kw)
        for want_l, want_g, name in ((tl, tg, "pytorch"), (rl, rg, "numpy")):
            np.testing.assert_allclose(loss, want_l, rtol=lt[0], atol=lt[1], err_msg=name)
            np.testing.assert_allclose(g, want_g, rtol=gt[0], atol=gt[1], err_msg=name)

    check_each(
        {name: (kw, *res) for (name, kw), res in zip(configs.items(), results, strict=True)},
        check,
    )


@pytest.mark.parametrize("case", ["served", "far", "non-finite"])
def test_bfloat16_fallback_and_non_finite_rows_match_pytorch(small_bf16_groups, case):
    """Rows the group shift serves, one with a masked class; a row 100 below
    its group's max (the per-row branch); non-finite rows and a masked
    target: PyTorch's values, NaNs and infinities included."""
    _, x, t, w = _bf16_case((2, 8, 10), 8, spread=5.0)
    x[1, 2, 3:5] = -np.inf
    t[1, 2] = 0
    if case == "far":
        x[0, 1] -= 100.0
    if case == "non-finite":
        plant_non_finite_rows(x, t, IGN)
        x[0, 5, 1::2] = -np.inf
        t[0, 5] = 3
    xb, x = as_bfloat16(x)  # the same values for PyTorch
    kw = dict(weight=w, ignore_index=IGN, reduction="sum")
    loss, g, _ = _bf16_step(xb, t, **kw)
    tl, tg = torch_loss_and_grad(to_torch_layout(x, -1), t, 1.0, nll=False, **kw)
    tg = np.moveaxis(tg, 1, -1)
    tg[t == IGN] = 0.0
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(tg))
    lt, gt = LOSS_TOL["bfloat16"], GRAD_TOL["bfloat16"]
    if case != "non-finite":
        np.testing.assert_allclose(loss, tl, rtol=lt[0], atol=lt[1])
    ok = ~np.isnan(tg)
    np.testing.assert_allclose(g[ok], tg[ok], rtol=gt[0], atol=gt[1])


@pytest.mark.parametrize("shape", [(3, 50008, 24), (150008, 40)], ids=["maps-24", "rows-40"])
def test_pair_grouped_loop_slices_grouped_rows(monkeypatch, shape):
    """Rows grouped in pairs (24 and 40 classes) in the chunked loop: each
    chunk is sliced from the logits viewed as rows of 2 * c (one position
    dimension per chunk ran 1.2-1.5x slower sliced as rows of c); value and
    gradient equal the whole-array path's, many chunks, the last shifted."""
    x, t, w = _case(shape, 5, spread=30.0)
    x, t = jnp.asarray(x), jnp.asarray(t)
    c = shape[-1]

    def step(x, t):
        return jax.value_and_grad(
            lambda v: jaxloss.cross_entropy(v, t, weight=w, ignore_index=IGN, label_smoothing=0.1)
        )(x)

    want = jax.jit(step)(x, t)
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 48000)
    monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    cut = _losses._Chunking.of_logits(shape, len(shape) - 1, 4)
    assert cut.steps > 4 and _losses._row_group(cut.chunk, cut.cax, jnp.float32) == 2
    pairs = cut.chunk[:-2] + (cut.chunk[-2] // 2, 2 * c)
    jaxpr = str(jax.make_jaxpr(step)(x, t))
    got = jax.jit(step)(x, t)
    _losses._index_impl.clear_cache()
    assert f"slice_sizes={pairs}" in jaxpr, pairs
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=GRAD_ATOL)
