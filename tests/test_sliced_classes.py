"""XLA:CPU's float32 cross-entropy over few classes by class slices
(``_losses._sliced_applies``).

A forward (no gradient) over 2 to 16 classes, and the fwd+bwd over 2
(bfloat16: two classes along the last axis, either way), take every class
as an array of the positions: the row max, the
exponentials' sum, the target logit (a chain of selects), the loss and the
gradient's classes (stacked) are elementwise passes. These tests check
where it applies, the values (and gradients) against PyTorch in float64
and the NumPy reference (both layouts, a 1-D input, every reduction,
weights, label smoothing, ``where``), non-finite logits and a bad label as
PyTorch has them, that it equals the path it replaces, that the compiled
forward takes it (no gather, no XLA ``exp``), the chunked loop, and second
derivatives and ``vmap`` of the 2-class step.
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
    check_each,
    config_forwards,
    config_losses_and_grads,
    float64_oracles,
    jax_loss_and_grad,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss
from jaxloss import _losses

IGN = 255
RTOL, ATOL = 2e-6, 1e-6
GRAD_RTOL, GRAD_ATOL = GRAD_TOL["float32"]


@pytest.mark.parametrize(
    "shape,axis,dtype,applies",
    [
        ((64, 2), -1, jnp.float32, True),
        ((4, 5, 8, 8), 1, jnp.float32, True),
        ((4, 8, 8, 16), -1, jnp.float32, True),
        ((7,), 0, jnp.float32, True),
        ((64, 1), -1, jnp.float32, False),  # one class: the max shift as it is
        ((4, 8, 8, 17), -1, jnp.float32, False),  # more classes: a reduction
        ((64, 5), -1, jnp.bfloat16, False),  # 16-bit: XLA:CPU ran the slices scalar
        ((64, 2), -1, jnp.bfloat16, True),  # except bfloat16 pairs, channels-last
        ((4, 2, 8, 8), 1, jnp.bfloat16, False),  # strided: with AVX-512 only (below)
        ((64, 2), -1, jnp.float16, False),
        ((64, 5), -1, jnp.float64, False),
    ],
)
def test_where_it_applies(core_constants, shape, axis, dtype, applies):
    core_constants("_CPU_AVX512", False)
    x = jax.ShapeDtypeStruct(shape, dtype)
    assert _losses._sliced_applies(x, axis) == applies
    # In the chunked loop only classes not last (channels-last chunks ran slower).
    assert _losses._sliced_applies(x, axis, chunked=True) == (
        applies and len(shape) == 4 and axis == 1
    )
    # With the gradient: two classes only.
    two = applies and shape[axis] == 2
    assert _losses._sliced_applies(x, axis, with_grad=True) == two


@pytest.mark.parametrize(
    "shape,axis,applies",
    [
        ((4, 2, 8, 8), 1, True),
        ((4, 5, 8, 8), 1, True),
        ((3, 5), 0, True),
        ((4, 6, 8, 8), 1, False),  # from 6 classes: 0.30-0.42x optax
        ((64, 5), -1, False),  # channels-last: pairs only
        ((64, 2), -1, True),
    ],
)
def test_where_it_applies_to_bfloat16_with_avx512(core_constants, shape, axis, applies):
    # With AVX-512 the forward of 2-5 bfloat16 classes over a strided axis;
    # never the fwd+bwd (but channels-last pairs).
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    core_constants("_CPU_AVX512", True)
    assert _losses._sliced_applies(x, axis) == applies
    last = axis % len(shape) == len(shape) - 1
    assert _losses._sliced_applies(x, axis, with_grad=True) == (applies and last)
    core_constants("_CPU_AVX512", False)
    assert _losses._sliced_applies(x, axis) == (applies and last)


def _case(shape, axis, seed):
    rng = rng_for("sliced", shape, axis, seed)
    ax = axis % len(shape)
    c = shape[ax]
    pos = shape[:ax] + shape[ax + 1 :]
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    t = np.asarray(rng.integers(0, c, pos))
    if t.ndim:
        t[rng.random(pos) < 0.2] = IGN
    return x, t, np.linspace(0.5, 2.0, c).astype(np.float32)


def _kw(w, reduction, smoothing):
    return dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=smoothing)


def _forward(x, t, axis, **kw):
    return np.asarray(
        jax.jit(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), axis=axis, **kw))(jnp.asarray(x))
    )


# Two classes are in TWO below (with the gradient).
SHAPES = [((6, 7, 5), -1), ((3, 4, 5, 6), 1), ((2, 16, 3, 5), 1), ((5,), 0)]


def _configs(w, smoothings):
    """``{name: kwargs}``: each ``(weighted, smoothing)`` of ``smoothings``
    with every reduction."""
    return {
        f"weighted={weighted} label_smoothing={smoothing} reduction={reduction}": _kw(
            w if weighted else None, reduction, smoothing
        )
        for weighted, smoothing in smoothings
        for reduction in ("none", "mean", "sum")
    }


@pytest.mark.parametrize("shape,axis", SHAPES)
def test_matches_float64_oracles(shape, axis):
    """Unweighted, weighted, weighted with label smoothing; every reduction:
    the nine forwards under one ``jit``, then each checked (``check_each``)."""
    x, t, w = _case(shape, axis, 0)
    assert _losses._sliced_applies(x, axis)
    configs = _configs(w, [(False, 0.0), (True, 0.2), (True, 0.0)])
    got = config_forwards(x, t, axis, configs)

    def check(kw, got):
        cot = np.ones(np.shape(t)) if kw["reduction"] == "none" else 1.0
        tl, _ = torch_loss_and_grad(to_torch_layout(x, axis), t, cot, nll=False, **kw)
        rl, _ = reference.loss_and_grad(x, t, axis=axis, **kw)
        np.testing.assert_allclose(got, tl, rtol=RTOL, atol=ATOL, err_msg="pytorch")
        np.testing.assert_allclose(got, rl, rtol=RTOL, atol=ATOL, err_msg="numpy")

    check_each({name: (kw, got[name]) for name, kw in configs.items()}, check)


def test_where_matches_the_reference():
    shape, axis = (3, 4, 5, 6), 1
    x, t, w = _case(shape, axis, 1)
    where = rng_for("sliced-where").random(t.shape) < 0.6
    for reduction in ("none", "mean"):
        kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=0.1)
        got = _forward(x, t, axis, where=jnp.asarray(where), **kw)
        want, _ = reference.loss_and_grad(x, t, axis=axis, where=where, **kw)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_non_finite_logits_and_a_bad_label_as_pytorch():
    """NaN where PyTorch's float64 loss is NaN: a valid row of -inf, a +inf
    logit, a NaN logit; a masked class at -inf in a valid row stays finite;
    an ignored row of -inf gives 0. A label outside [0, C) under ``jit``
    gives NaN (PyTorch raises; the reference has NaN)."""
    x, t, _ = _case((2, 9, 5), -1, 2)
    t[:] = 1
    x[0, 2] = -np.inf  # a valid row of -inf: NaN
    x[1, 4] = -np.inf
    t[1, 4] = IGN  # ignored: 0
    x[1, 6, 2] = np.inf  # a +inf logit: NaN
    x[0, 5, 3] = np.nan  # a NaN logit: NaN
    x[1, 1, 0] = -np.inf  # a masked class: finite
    got = _forward(x, t, -1, ignore_index=IGN, reduction="none")
    tl, _ = torch_loss_and_grad(
        to_torch_layout(x, -1), t, np.ones(t.shape), nll=False, ignore_index=IGN, reduction="none"
    )
    np.testing.assert_array_equal(np.isnan(got), np.isnan(tl))
    assert np.isnan(got[0, 2]) and np.isnan(got[1, 6]) and np.isnan(got[0, 5])
    assert got[1, 4] == 0.0 and np.isfinite(got[1, 1])
    fin = np.isfinite(tl)
    np.testing.assert_allclose(got[fin], tl[fin], rtol=RTOL, atol=ATOL)
    bad = t.copy()
    bad[0, 0] = 5
    got = _forward(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), bad, -1, ignore_index=IGN)
    assert np.isnan(got)


@pytest.mark.parametrize("shape,axis", SHAPES[:3])
def test_equals_the_path_it_replaces(monkeypatch, shape, axis):
    x, t, w = _case(shape, axis, 3)
    kw = dict(weight=w, ignore_index=IGN, reduction="none", label_smoothing=0.1)
    got = _forward(x, t, axis, **kw)
    monkeypatch.setattr(_losses, "_sliced_applies", lambda *a: False)
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    try:
        want = _forward(x, t, axis, **kw)
    finally:
        _losses._index_impl.clear_cache()
        jax.clear_caches()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shape,axis", [((64, 4096, 5), -1), ((4, 10, 128, 256), 1)])
def test_the_compiled_forward_takes_it(shape, axis, reduction):
    """Compiled from shapes alone (over a million logits): no gather of the
    target logit and no XLA ``exp`` (the slices' exponentials are
    ``_poly_exp``'s polynomial)."""
    ax = axis % len(shape)
    pos = shape[:ax] + shape[ax + 1 :]
    s = jax.ShapeDtypeStruct

    def loss(x, t):
        return jaxloss.cross_entropy(x, t, axis=axis, ignore_index=IGN, reduction=reduction)

    text = jax.jit(loss).lower(s(shape, jnp.float32), s(pos, jnp.int32)).compile().as_text()
    assert " exponential(" not in text and " gather(" not in text


@pytest.mark.parametrize("c", [5, 15])
@pytest.mark.parametrize("axis", [1, -1])
def test_in_the_chunked_loop(monkeypatch, axis, c):
    """The loop forced at any size, with small chunks: classes on axis 1 take
    the slices chunk by chunk, forward and fwd+bwd, each chunk and its
    gradient in buffers of their own (a conditional in the program,
    _buffered_chunk); channels-last chunks keep the reduction; all match
    the reference (mean with smoothing, value and gradient, a bad label's
    NaN)."""
    shape = (4, c, 6, 8) if axis == 1 else (4, 6, 8, c)
    x, t, w = _case(shape, axis, 4)
    monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 16 * c)
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    try:
        kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1)
        got = _forward(x, t, axis, **kw)
        want, want_g = reference.loss_and_grad(x, t, axis=axis, cotangent=1.7, **kw)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

        def step(v):
            return jax.value_and_grad(
                lambda v: 1.7 * jaxloss.cross_entropy(v, jnp.asarray(t), axis=axis, **kw)
            )(v)

        jaxpr = str(jax.make_jaxpr(step)(jnp.asarray(x)))
        assert ("cond[" in jaxpr) == (axis == 1)
        loss, g = jax.jit(step)(jnp.asarray(x))
        np.testing.assert_allclose(loss, 1.7 * want, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g, want_g, rtol=GRAD_RTOL, atol=GRAD_ATOL)
        bad = t.copy()
        bad.reshape(-1)[5] = c
        assert np.isnan(_forward(x, bad, axis, **kw))
    finally:
        _losses._index_impl.clear_cache()
        jax.clear_caches()


TWO = [((6, 7, 2), -1), ((3, 2, 5, 6), 1), ((2,), 0)]


def _value_and_grad(x, t, axis, cot, **kw):
    loss, g, _, _ = jax_loss_and_grad(
        jaxloss.cross_entropy, jnp.asarray(x), jnp.asarray(t), cot, axis=axis, **kw
    )
    return loss, g


@pytest.mark.parametrize("shape,axis", TWO)
def test_two_classes_fwd_bwd_match_float64_oracles(shape, axis):
    """Unweighted, weighted with label smoothing, smoothed; every reduction:
    the nine losses and gradients under one ``jit`` (``config_losses_and_grads``),
    then each checked (``check_each``)."""
    x, t, w = _case(shape, axis, 5)
    assert _losses._sliced_applies(x, axis, with_grad=True)
    configs = {}
    for name, kw in _configs(w, [(False, 0.0), (True, 0.2), (False, 0.1)]).items():
        rng = rng_for("sliced-cot", shape, kw["reduction"])
        cot = rng.uniform(0.5, 1.5, np.shape(t)) if kw["reduction"] == "none" else 1.7
        configs[name] = (kw, cot)

    def check(kw, cot, loss, g, *_):
        for want_l, want_g, name in float64_oracles(x, t, axis, cot, **kw):
            np.testing.assert_allclose(loss, want_l, rtol=RTOL, atol=ATOL, err_msg=name)
            np.testing.assert_allclose(g, want_g, rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=name)

    check_each(config_losses_and_grads(jaxloss.cross_entropy, x, t, configs, axis=axis), check)


def test_two_classes_where_non_finite_and_bad_label():
    """``where`` against the reference; gradients of non-finite rows as
    PyTorch's (NaN for a valid row of -inf or a +inf logit), an ignored row
    of -inf keeps a zero gradient; a bad label gives a NaN loss and NaN in
    its row's gradient only."""
    x, t, w = _case((3, 2, 5, 6), 1, 6)
    where = rng_for("sliced-two-where").random(t.shape) < 0.6
    kw = dict(weight=w, ignore_index=IGN, reduction="mean", label_smoothing=0.1)
    loss, g = _value_and_grad(x, t, 1, 1.0, where=jnp.asarray(where), **kw)
    rl, rg = reference.loss_and_grad(x, t, axis=1, where=where, **kw)
    np.testing.assert_allclose(loss, rl, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g, rg, rtol=GRAD_RTOL, atol=GRAD_ATOL)

    x, t, _ = _case((2, 9, 2), -1, 7)
    t[:] = 1
    x[0, 2] = -np.inf  # valid row of -inf: NaN
    x[1, 4] = -np.inf
    t[1, 4] = IGN  # ignored: zero gradient
    x[1, 6, 0] = np.inf  # +inf logit: NaN
    x[1, 1, 0] = -np.inf  # a masked class: finite
    kw = dict(ignore_index=IGN, reduction="none")
    loss, g = _value_and_grad(x, t, -1, np.ones(t.shape), **kw)
    tl, tg = torch_loss_and_grad(to_torch_layout(x, -1), t, np.ones(t.shape), nll=False, **kw)
    tg = np.moveaxis(tg, 1, -1)
    tg[1, 4] = 0.0
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(tg))
    fin = np.isfinite(tg)
    np.testing.assert_allclose(g[fin], tg[fin], rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert np.isfinite(g[1, 1]).all() and (g[1, 4] == 0.0).all()

    bad = t.copy()
    bad[0, 0] = 2
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    step = jax.jit(jax.value_and_grad(lambda v, tt: jaxloss.cross_entropy(v, tt, ignore_index=IGN)))
    loss, g = (np.asarray(v) for v in step(jnp.asarray(x), jnp.asarray(bad)))
    assert np.isnan(loss) and np.isnan(g[0, 0]).all()
    assert np.isfinite(np.delete(g.reshape(-1, 2), 0, axis=0)).all()


def test_two_classes_second_order_and_vmap():
    """jvp of the gradient and reverse over reverse against the plain
    log_softmax formulation differentiated by JAX, and ``vmap``."""
    shape, axis = (3, 2, 4, 5), 1
    x, t, w = _case(shape, axis, 8)

    def f(v):
        return jaxloss.cross_entropy(
            v, jnp.asarray(t), weight=w, ignore_index=IGN, axis=axis, label_smoothing=0.1
        )

    def f_ref(v):
        lp = jax.nn.log_softmax(v, axis=axis)
        valid = t != IGN
        safe = np.where(valid, t, 0)
        picked = jnp.squeeze(jnp.take_along_axis(lp, np.expand_dims(safe, axis), axis), axis)
        wt = w[safe] * valid
        smooth = jnp.sum(lp * np.reshape(w, (1, 2, 1, 1)), axis=axis) * valid
        return -(0.9 * jnp.sum(picked * wt) + 0.05 * jnp.sum(smooth)) / np.sum(wt)

    xj = jnp.asarray(x)
    np.testing.assert_allclose(f(xj), f_ref(xj), rtol=1e-6)
    dx = jnp.asarray(rng_for("sliced-dx").standard_normal(shape), jnp.float32)
    # Each transform compiled: one program, not op by op.
    want = jax.jit(lambda v: jax.jvp(jax.grad(f_ref), (v,), (dx,))[1])(xj)
    got = jax.jit(lambda v: jax.jvp(jax.grad(f), (v,), (dx,))[1])(xj)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    hv = jax.jit(jax.grad(lambda v: jnp.vdot(jax.grad(f)(v), dx)))(xj)
    np.testing.assert_allclose(hv, want, rtol=1e-4, atol=1e-7)
    xs = jnp.stack([xj, 2 * xj])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(f)))(xs)[1], jax.jit(jax.grad(f))(2 * xj), rtol=1e-6, atol=1e-9
    )


BF16_TWO = [((5, 6, 2), -1), ((9, 2), 1), ((2,), 0)]


def _bf16_case(shape, seed, axis=-1):
    x, t, w = _case(shape, axis, seed)
    return (*as_bfloat16(x), t, w)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.2)])
@pytest.mark.parametrize("shape,axis", BF16_TWO)
def test_bfloat16_pairs_match_float64_oracles(shape, axis, reduction, smoothing, weighted):
    """Two bfloat16 classes along the last axis, read (and their gradient
    written) as uint32 pairs: the loss against PyTorch and NumPy in float64
    on the same (exactly representable) values, the gradient within bfloat16
    rounding; ``axis=1`` of a 2-D input is the last axis too."""
    xb, x64, t, w = _bf16_case(shape, 9)
    assert _losses._sliced_applies(xb, axis, with_grad=True)
    kw = _kw(w if weighted else None, reduction, smoothing)
    cot = rng_for("pairs-cot", shape).uniform(0.5, 1.5, np.shape(t)) if reduction == "none" else 1.3
    loss, g, _, graw = jax_loss_and_grad(
        jaxloss.cross_entropy, xb, jnp.asarray(t), cot, axis=axis, **kw
    )
    assert graw.dtype == jnp.bfloat16 and graw.shape == xb.shape
    fwd = _forward(xb, t, axis, **kw)
    lt, gt = LOSS_TOL["bfloat16"], GRAD_TOL["bfloat16"]
    for want_l, want_g, name in float64_oracles(x64, t, axis, cot, **kw):
        np.testing.assert_allclose(loss, want_l, rtol=lt[0], atol=lt[1], err_msg=name)
        np.testing.assert_allclose(fwd, want_l, rtol=lt[0], atol=lt[1], err_msg=name)
        np.testing.assert_allclose(g, want_g, rtol=gt[0], atol=gt[1], err_msg=name)


def test_bfloat16_pairs_non_finite_bad_label_and_compiled_form():
    """NaN where PyTorch's float64 loss and gradient are NaN (a valid row of
    -inf, a +inf or NaN logit), a masked class at -inf finite, an ignored
    row of -inf 0; a bad label a NaN loss and its row's NaN gradient. The
    compiled steps gather nothing (the target logit is a select)."""
    xb, x64, t, _ = _bf16_case((2, 9, 2), 10)
    t[:] = 1
    x64[0, 2] = -np.inf
    x64[1, 4] = -np.inf
    t[1, 4] = IGN
    x64[1, 6, 0] = np.inf
    x64[0, 5, 1] = np.nan
    x64[1, 1, 0] = -np.inf
    xb = jnp.asarray(x64, jnp.bfloat16)
    kw = dict(ignore_index=IGN, reduction="none")
    loss, g, _, _ = jax_loss_and_grad(
        jaxloss.cross_entropy, xb, jnp.asarray(t), np.ones(t.shape), **kw
    )
    tl, tg = torch_loss_and_grad(to_torch_layout(x64, -1), t, np.ones(t.shape), nll=False, **kw)
    tg = np.moveaxis(tg, 1, -1)
    tg[1, 4] = 0.0
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(tg))
    assert loss[1, 4] == 0.0 and (g[1, 4] == 0.0).all() and np.isfinite(loss[1, 1])
    bad = t.copy()
    bad[0, 0] = 2
    xf = jnp.asarray(np.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0), jnp.bfloat16)
    step = jax.jit(jax.value_and_grad(lambda v, tt: jaxloss.cross_entropy(v, tt, ignore_index=IGN)))
    lb, gb = (np.asarray(v, np.float32) for v in step(xf, jnp.asarray(bad)))
    assert np.isnan(lb) and np.isnan(gb[0, 0]).all()
    assert np.isfinite(np.delete(gb.reshape(-1, 2), 0, axis=0)).all()
    for text in (
        step.lower(xf, jnp.asarray(t)).compile().as_text(),
        jax.jit(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), ignore_index=IGN))
        .lower(xf)
        .compile()
        .as_text(),
    ):
        assert " gather(" not in text


BF16_STRIDED = [((3, 2, 4, 5), 1), ((2, 3, 6, 7), 1), ((4, 5, 3), 1), ((5, 3), 0)]


@pytest.fixture
def avx512_plan(constants_at_setup):
    """The plan of a host where XLA:CPU emits AVX-512 code, on any host."""
    constants_at_setup("_CPU_AVX512", True)


@pytest.mark.parametrize("shape,axis", BF16_STRIDED)
def test_bfloat16_strided_forward_matches_float64_oracles(avx512_plan, shape, axis):
    """The forward of 2-5 bfloat16 classes over a strided axis by class
    slices (AVX-512's plan): every reduction, weighted or not, label
    smoothing, against PyTorch and NumPy in float64 on the same (exactly
    representable) values; the gradient (not by slices) as well."""
    xb, x64, t, w = _bf16_case(shape, 11, axis)
    assert _losses._sliced_applies(xb, axis)
    configs = _configs(w, [(False, 0.0), (True, 0.2)])
    got = config_forwards(xb, t, axis, configs)
    lt, gt = LOSS_TOL["bfloat16"], GRAD_TOL["bfloat16"]
    for name, kw in configs.items():
        cot = np.ones(np.shape(t)) if kw["reduction"] == "none" else 1.0
        _, g, _, _ = jax_loss_and_grad(
            jaxloss.cross_entropy, xb, jnp.asarray(t), cot, axis=axis, **kw
        )
        for want_l, want_g, oracle in float64_oracles(x64, t, axis, cot, **kw):
            msg = f"{name} {oracle}"
            np.testing.assert_allclose(got[name], want_l, rtol=lt[0], atol=lt[1], err_msg=msg)
            np.testing.assert_allclose(g, want_g, rtol=gt[0], atol=gt[1], err_msg=msg)


def test_bfloat16_strided_non_finite_and_bad_label(avx512_plan):
    """AVX-512's bfloat16 slices: NaN where PyTorch's float64 loss is NaN (a
    valid position of -inf logits, a +inf or NaN logit), an ignored
    position of -inf 0, a masked class at -inf finite; a bad label NaN
    under ``jit``; the compiled forward gathers nothing."""
    _, x64, t, _ = _bf16_case((2, 4, 3, 5), 12, 1)
    t = np.where(t == IGN, 1, t)
    x64[0, :, 0, 0] = -np.inf
    x64[0, :, 1, 1] = -np.inf
    t[0, 1, 1] = IGN
    x64[1, 2, 2, 2] = np.inf
    x64[1, 3, 0, 3] = np.nan
    x64[1, 0, 1, 4] = -np.inf
    xb = jnp.asarray(x64, jnp.bfloat16)
    assert _losses._sliced_applies(xb, 1)
    kw = dict(ignore_index=IGN, reduction="none")
    loss = _forward(xb, t, 1, **kw)
    tl, _ = torch_loss_and_grad(x64, t, np.ones(t.shape), nll=False, **kw)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    finite = ~np.isnan(tl)
    np.testing.assert_allclose(loss[finite], tl[finite], rtol=LOSS_TOL["bfloat16"][0], atol=1e-5)
    assert loss[0, 1, 1] == 0.0
    bad = t.copy()
    bad[1, 1, 1] = 7
    xf = jnp.asarray(np.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0), jnp.bfloat16)
    f = jax.jit(
        lambda v, tt: jaxloss.cross_entropy(v, tt, axis=1, ignore_index=IGN, reduction="none")
    )
    lb = np.asarray(f(xf, jnp.asarray(bad)), np.float32)
    assert (
        np.isnan(lb[1, 1, 1]) and np.isfinite(np.delete(lb.reshape(-1), 1 * 15 + 1 * 5 + 1)).all()
    )
    assert " gather(" not in f.lower(xf, jnp.asarray(t)).compile().as_text()
