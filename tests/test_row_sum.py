"""XLA:CPU's row sums of 16-bit logits' exponentials (``_losses._row_sum``),
and of float32 ones in long rows and in the forward of medium inputs.

They run as XLA's own fused reduction (a variadic reduction that YNNPACK
does not take: its fused reduction allocated a float32 copy of the logits on
every call), in blocks along rows longer than ``_NATIVE_SUM_ROW``. These
tests check the sums against float64 (short rows, blocked rows, a long row
with no block, another axis), that the compiled step really has no YNNPACK
reduction over the logits, the derivative rule, ``vmap`` and ``shard_map``,
and bfloat16 losses and gradients of long rows against PyTorch.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    assert_rows_match_pytorch,
    data_mesh,
    float64_oracles,
    labelled_logits,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss
from jaxloss import _losses

IGN = 255


def _exps(shape, seed=0):
    """Exponentials of logits of scale 3: terms spread over e**+-10."""
    rng = rng_for("row_sum", shape, seed)
    return np.exp(3.0 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize(
    "shape,axis,block",
    [
        ((64, 150), -1, None),  # one reduction
        ((3, 19, 40), 1, None),  # the classes not last
        ((8, 32000), -1, 160),  # blocks of 160: 32000 = 200 x 160
        ((4, 128256), -1, 334),  # 384 blocks of 334
        ((4, 4099), -1, None),  # prime: jnp.sum
    ],
)
def test_sums_match_float64(shape, axis, block):
    v = _exps(shape)
    assert _losses._sum_block(shape[axis]) == block or shape[axis] <= _losses._NATIVE_SUM_ROW
    got = jax.jit(lambda a: _losses._row_sum(a, axis))(v)
    want = np.sum(v.astype(np.float64), axis=axis)
    # One reduction: ~sqrt(C / 16) * 2**-24; measured 4e-7 at 150 classes.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's reduction")
def test_long_rows_need_the_blocks():
    """Without the blocks, one reduction over 128256 classes is off by more
    than the tolerance above (this is what the blocks are for); with them,
    it is within."""
    v = _exps((4, 128256))
    want = np.sum(v.astype(np.float64), axis=-1)
    whole = np.asarray(jax.jit(lambda a: _losses._native_sums((a,), 1)[0])(v))
    blocked = np.asarray(jax.jit(lambda a: _losses._row_sum(a, -1))(v))
    assert np.max(np.abs(whole - want) / want) > 1e-6
    assert np.max(np.abs(blocked - want) / want) < 1e-6


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions")
@pytest.mark.parametrize("shape", [(64, 1000), (16, 32000)])
def test_no_ynnpack_reduction_over_16bit_logits(shape):
    """The compiled bfloat16 forward and fwd+bwd sum the logits'
    exponentials in XLA's own fusions: a YNNPACK fusion reading the logits
    may only take their max (in bfloat16)."""
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)

    def loss(v, tv):
        return jaxloss.cross_entropy(v, tv, ignore_index=IGN)

    for fn in (loss, jax.value_and_grad(loss)):
        hlo = jax.jit(fn).lower(x, t).compile().as_text()
        entry = hlo[hlo.index("\nENTRY") :].splitlines()
        (logits,) = [ln.split("=")[0].strip() for ln in entry if "parameter(0)" in ln]
        names = [(ln.split("=")[0].split() or [""])[-1] for ln in entry]
        ynn = [ln for ln, name in zip(entry, names, strict=True) if name.startswith("%ynn_fusion")]
        for line in ynn:
            operands = line.split(" fusion(")[1].split(")")[0].split(", ")
            # Only the row max (in bfloat16, no conversion) reads the logits.
            assert logits not in operands or "= bf16[" in line, line
        assert "iota_reduce" in hlo


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions")
def test_small_16bit_inputs_keep_jnp_sum():
    """Under ``_NATIVE_SUM_MIN_16BIT`` logits the forward sums by ``jnp.sum``
    (XLA:CPU would split the variadic reduction over both cores)."""
    x = jax.ShapeDtypeStruct((20, 1000), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((20,), jnp.int32)
    hlo = (
        jax.jit(lambda v, tv: jaxloss.cross_entropy(v, tv, ignore_index=IGN))
        .lower(x, t)
        .compile()
        .as_text()
    )
    assert "iota_reduce" not in hlo


def test_derivatives_are_the_sums():
    """``jvp``, ``grad`` and second order go through ``jnp.sum``'s rule."""
    v = jnp.asarray(_exps((5, 3000)))
    dv = jnp.asarray(_exps((5, 3000), seed=1))

    def f(a):
        return _losses._row_sum(a, -1)

    out, tangent = jax.jvp(f, (v,), (dv,))
    np.testing.assert_allclose(tangent, np.sum(np.asarray(dv, np.float64), -1), rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(lambda a: jnp.sum(f(a) * 2.0))(v), 2.0)
    hess = jax.jacfwd(jax.grad(lambda a: jnp.sum(f(a) ** 2)))(v[:1, :8])
    np.testing.assert_allclose(hess.reshape(8, 8), 2.0 * np.ones((8, 8)), rtol=1e-6)
    np.testing.assert_allclose(out, np.sum(np.asarray(v, np.float64), -1), rtol=1e-6)


def test_vmap_and_shard_map():
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map
    v = _exps((4, 6, 2304))
    want = np.sum(v.astype(np.float64), axis=-1)
    got = jax.jit(jax.vmap(lambda a: _losses._row_sum(a, -1)))(v)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    spec = P("data")
    sharded = jax.jit(
        shard_map(
            lambda a: _losses._row_sum(a, -1), mesh=data_mesh(), in_specs=spec, out_specs=spec
        )
    )(v)
    np.testing.assert_allclose(sharded, want, rtol=1e-6)


@pytest.mark.parametrize("c", [1000, 4099, 32000])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bfloat16_long_rows_match_pytorch(core_constants, c, smoothing):
    """bfloat16 logits (exact in float64), rows short, prime and blocked:
    per-row losses and gradients against PyTorch in float64, the row sums
    by ``_row_sum`` at any size."""
    core_constants("_NATIVE_SUM_MIN_16BIT", 0)
    rng = rng_for("row_sum_bf16", c, smoothing)
    x = np.asarray(jnp.asarray(4.0 * rng.standard_normal((6, c)), jnp.bfloat16))
    t = rng.integers(0, c, 6)
    t[1] = IGN
    w = np.linspace(0.5, 2.0, c).astype(np.float32)
    kw = dict(weight=w, ignore_index=IGN, label_smoothing=smoothing)
    # Losses: float32 maths, a few ulps of ~10. Gradients: rounded to bfloat16.
    assert_rows_match_pytorch(x, t, (1e-6, 1e-6), (2.0**-8, 1e-7), **kw)


@pytest.mark.parametrize(
    "dtype,shape,axis,native",
    [
        (jnp.bfloat16, (2048, 19), -1, True),
        (jnp.float16, (64, 1000), 1, True),
        (jnp.bfloat16, (2, 19), -1, False),  # under _NATIVE_SUM_MIN_16BIT logits
        (jnp.float16, (32, 1000), 1, False),
        (jnp.float32, (64, 32767), -1, False),
        (jnp.float32, (2, 32768), -1, True),
        (jnp.float64, (2, 65536), -1, False),
        (jnp.bfloat16, (2, 150, 8), 1, False),  # classes not last: YNNPACK's
        (jnp.float32, (2, 32768, 3), 1, False),
        # Shorter float32 rows from _CPU_SMALL_ELEMENTS logits: up to 48
        # classes under 2**20 logits, any row under 2**17.
        (jnp.float32, (1000, 32), -1, False),  # small (32000 logits)
        (jnp.float32, (1024, 32), -1, True),
        (jnp.float32, (2, 64, 128, 19), -1, True),
        (jnp.float32, (21845, 48), -1, True),  # 1048560 logits
        (jnp.float32, (21846, 48), -1, False),  # 1048608
        (jnp.float32, (2, 64, 128, 19), 1, False),  # classes not last
        (jnp.float32, (1008, 130), -1, True),  # 131040
        (jnp.float32, (1009, 130), -1, False),  # 131170
        (jnp.float32, (2730, 49), -1, False),
        (jnp.float64, (2048, 19), -1, False),
    ],
)
def test_which_rows_take_it(small_inputs, dtype, shape, axis, native):
    x = jax.ShapeDtypeStruct(shape, dtype)
    on_cpu = jax.default_backend() == "cpu"  # other backends keep jnp.sum
    assert _losses._native_row_sums(x, axis) == (native and on_cpu)


@pytest.mark.parametrize(
    "shape,forward",
    [
        ((26210, 19), True),
        ((26209, 19), False),  # an odd count, split over the cores
        ((2, 64, 128, 19), False),  # positions over several dimensions
        ((1001, 100), True),  # under 2**17 logits: on one thread
        ((8192, 32), False),  # rows of 32 classes
        ((2048, 32), True),
        ((2, 25, 25, 33), True),
    ],
)
def test_which_forward_rows_take_it(small_inputs, shape, forward):
    """Above 2**17 logits the forward's short rows sum natively only where
    the positions are one dimension of an even count, not rows of 32; the
    fwd+bwd's (the recomputed exponentials) wherever they are short."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    on_cpu = jax.default_backend() == "cpu"
    assert _losses._native_row_sums(x, -1, forward=True) == (forward and on_cpu)
    assert _losses._native_row_sums(x, -1) == on_cpu


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions")
@pytest.mark.parametrize("shape", [(2354, 17), (2, 16, 32, 40), (10000, 40), (120, 1000)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_medium_float32_forward(small_inputs, core_constants, shape, reduction):
    """The float32 forward of medium inputs (up to 48 classes under 2**20
    logits, any row under 2**17) sums its exponentials by ``_row_sum``
    (``iota_reduce`` in the compiled step; once the two thresholds are 0
    only label smoothing's weighted sum over positions of several dimensions
    is), weighted and smoothed, against PyTorch and NumPy in float64, with
    ignored positions and a bad label (NaN)."""
    x, t, rng = labelled_logits(shape, -1, jnp.float32, 7, 0.1, IGN)
    t = np.asarray(t)
    bad = t.copy()
    bad.reshape(-1)[5] = shape[-1]  # out of range: NaN, not a clamped class
    w = rng.uniform(0.5, 2.0, shape[-1]).astype(np.float32)
    kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=0.1)

    def forward(labels=t):
        f = jax.jit(lambda v, tv: jaxloss.cross_entropy(v, tv, **kw))
        return f.lower(x, labels).compile().as_text(), np.asarray(f(x, labels), np.float64)

    text, loss = forward()
    assert "iota_reduce" in text
    cot = np.ones(loss.shape)
    for want, _, name in float64_oracles(np.asarray(x, np.float64), t, -1, cot, **kw):
        assert_close(loss, want, LOSS_TOL["float32"], f"loss vs {name}")
    _, with_bad = forward(bad)
    nan = np.isnan(with_bad)
    assert nan.reshape(-1)[5 if reduction == "none" else 0] and np.sum(nan) == 1
    if reduction == "none":
        np.testing.assert_array_equal(with_bad[~nan], loss[~nan])
    core_constants("_NATIVE_SUM_F32_SHORT_MAX", 0)
    core_constants("_NATIVE_SUM_F32_ONE_THREAD", 0)
    text0, loss0 = forward()
    # The exponentials' sums are no longer native; label smoothing's weighted
    # sum stays native where the positions span several dimensions
    # (_weighted_gap_sum).
    native = re.compile(r"%iota_reduce_fusion(\.\d+)? = ")
    left = len(native.findall(text0))
    assert left == (0 if len(shape) == 2 else 1) < len(native.findall(text))
    assert_close(loss0, loss, LOSS_TOL["float32"], "jnp.sum vs _row_sum")


@pytest.mark.parametrize("c", [50304, 65536])
def test_float32_long_rows_forward_matches_pytorch(c):
    """Float32 rows of 50304 (blocks of 192) and 65536 classes: the forward
    (which sums the exponentials by ``_row_sum``) against PyTorch in float64."""
    rng = rng_for("row_sum_f32", c)
    x = (4.0 * rng.standard_normal((5, c))).astype(np.float32)
    t = rng.integers(0, c, 5)
    t[2] = IGN
    for reduction in ("none", "mean"):
        kw = dict(ignore_index=IGN, reduction=reduction, label_smoothing=0.1)
        loss = jax.jit(lambda v, kw=kw: jaxloss.cross_entropy(v, jnp.asarray(t), **kw))(x)
        tl, _ = torch_loss_and_grad(x, t, np.ones(np.shape(loss)), nll=False, **kw)
        np.testing.assert_allclose(loss, tl, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("c", [127, 128, 32767, 32768])
@pytest.mark.parametrize("axis", [-1, 1])
def test_index_width_boundaries(c, axis):
    """The class index of XLA:CPU's variadic row reductions is int8 up to 127
    classes, int16 up to 32767, int32 beyond (``_native_reduce``): losses and
    gradients on both sides of each width, index and probability targets,
    against PyTorch and NumPy in float64."""
    shape = (2, 3, c) if axis == -1 else (2, c, 3)
    rng = rng_for("index_width", c, axis)
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    w = (rng.random(c) + 0.5).astype(np.float32)
    q = rng.random(shape).astype(np.float32)
    q /= q.sum(axis=axis, keepdims=True)
    t = rng.integers(0, c, (2, 3))
    cot = np.float64(1.7)
    for target in (t, q):
        got_l, got_g = jax.jit(jax.value_and_grad(
            lambda x, target: jaxloss.cross_entropy(x, target, weight=w, axis=axis)
        ))(x, target)
        got_g = np.asarray(got_g, np.float64) * cot
        torch_t = target if target is t else to_torch_layout(target, axis)
        tl, tg = torch_loss_and_grad(to_torch_layout(x, axis), torch_t, cot, nll=False, weight=w)
        rl, rg = reference.loss_and_grad(x, target, weight=w, axis=axis, cotangent=cot)
        for want_l, want_g, name in ((tl, np.moveaxis(tg, 1, axis), "pytorch"), (rl, rg, "numpy")):
            what = f"{name}, {'index' if target is t else 'probability'} targets"
            assert_close(got_l, want_l, LOSS_TOL["float32"], what)
            assert_close(got_g, want_g, GRAD_TOL["float32"], what)
