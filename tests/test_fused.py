"""The chunked "mean"/"sum" path of the core against its per-position path.

``reduction="none"`` goes through ``_index_loss`` (whole-array ops); "mean" and
"sum" through the chunked loop of ``_fused_pass`` (on XLA:CPU only from
``_CPU_LOOP_MIN_BYTES`` up, so the tests force it). Shrinking the chunk makes
the loop take many steps, with a shifted last chunk along both the position
axes before and after the class axis.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import check_each, labelled_logits, spy_calls

import jaxloss
from jaxloss import _losses

IGN = 255


@pytest.fixture(
    params=[(64, 0), (1 << 18, 0), (1 << 18, None)],
    ids=["loop-tiny-chunks", "loop-default-chunks", "cpu-default-path"],
)
def chunk(request, monkeypatch):
    """Force the loop (any size) with tiny or default chunks, or keep XLA:CPU's
    own choice (the whole-array formulation at these sizes).

    The core's jit cache does not see these module constants: clear it so
    each setting really traces its own path.
    """
    elements, min_bytes = request.param
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", elements)
    if min_bytes is not None:
        monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", min_bytes)
    _losses._index_impl.clear_cache()
    yield elements
    _losses._index_impl.clear_cache()


def _data(shape, axis, dtype=jnp.float32, seed=0, ignore=0.2, bad=False):
    c = shape[axis]
    x, t, _ = labelled_logits(shape, axis, dtype, seed, ignore, IGN)
    if bad:
        t = t.reshape(-1).at[1].set(c + 3).reshape(t.shape)
    w = jnp.linspace(0.5, 2.0, c)
    return x, t, w


def _reference_fn(t, w, *, reduction, axis, eps=0.0, where=None, normalize=True):
    """Mean/sum of logits ``x`` built from the per-position path."""
    fn = jaxloss.cross_entropy if normalize else jaxloss.nll_loss
    kw = {"label_smoothing": eps} if normalize else {}

    def f(x):
        loss = fn(x, t, weight=w, ignore_index=IGN, reduction="none", axis=axis, where=where, **kw)
        if reduction == "sum":
            return jnp.sum(loss)
        valid = t != IGN
        if where is not None:
            valid = valid & where
        wt = jnp.ones(t.shape) if w is None else w[jnp.clip(t, 0, x.shape[axis] - 1)]
        denom = jnp.sum(jnp.where(valid, wt, 0.0))
        return jnp.where(denom != 0, jnp.sum(loss) / jnp.where(denom != 0, denom, 1), 0.0)

    return f


def _reference(x, t, w, **kw):
    """Value and gradient of ``_reference_fn``, differentiated by JAX."""
    # One jit: eagerly, each operation compiles on its own (~50 ms each on a
    # 2-core CPU).
    return jax.jit(jax.value_and_grad(_reference_fn(t, w, **kw)))(x)


CASES = [
    ((37, 19), -1),
    ((3, 5, 7, 19), -1),
    ((3, 19, 5, 7), 1),
    ((2, 150, 9), 1),
    ((5, 1), -1),
    ((4, 1000), -1),
    # leading dimensions that the 4 test devices divide: the loops keep
    # gcd(leading, 4) groups whole in every chunk (with the tiny chunks the
    # first two shift their last chunk back, as do the last two below:
    # test_tiny_chunks_shift_the_last_chunk)
    ((8, 11, 3), -1),
    ((12, 2, 11), 1),
    # ... and the first dimension of the second part (gcd(8, 4) groups)
    ((3, 8, 11, 3), -1),
    ((3, 2, 8, 11), 1),
]


MATCHED = list(itertools.product((False, True), ("mean", "sum")))  # (weighted, reduction)


def _matched_case(shape, axis, weighted):
    """Arrays of test_fused_matches_per_position: ``x, t, w, where``."""
    x, t, w = _data(shape, axis)
    where = jnp.asarray(np.random.default_rng(7).random(t.shape) < 0.9)
    return x, t, (w if weighted else None), where


@functools.cache
def _matched_references(shape, axis):
    """test_fused_matches_per_position's references (value and gradient of
    each of ``MATCHED``), under one jit and computed once for the three chunk
    settings: the per-position path does not read them (only "mean" and
    "sum" take the loop)."""
    def refs(cases):
        return [
            jax.value_and_grad(
                _reference_fn(t, w, reduction=reduction, axis=axis, eps=eps, where=where)
            )(x)
            for (x, t, w, where), (eps, reduction) in zip(cases, _matched_statics(), strict=True)
        ]

    return jax.jit(refs)(_matched_arrays(shape, axis))


def _matched_arrays(shape, axis):
    """Each configuration's own arrays ``(x, t, w, where)``: no value is
    shared between them in the one program that computes them all."""
    return [_matched_case(shape, axis, weighted) for weighted, _ in MATCHED]


def _matched_statics():
    """``(label_smoothing, reduction)`` of each of ``MATCHED``."""
    return [(0.1 if weighted else 0.0, reduction) for weighted, reduction in MATCHED]


@pytest.mark.parametrize("shape,axis", CASES, ids=[f"{s}-ax{a}" for s, a in CASES])
def test_fused_matches_per_position(chunk, shape, axis):
    """Unweighted, and weighted with label smoothing; "mean" and "sum": the
    loss and gradient, and the forward-only value, of the four under one jit
    (as in a training step; one compilation instead of four)."""
    def run(cases):
        out = []
        for (x, t, w, where), (eps, reduction) in zip(cases, _matched_statics(), strict=True):

            def loss(x, t=t, w=w, eps=eps, where=where, reduction=reduction):
                return jaxloss.cross_entropy(
                    x, t, weight=w, ignore_index=IGN, reduction=reduction, axis=axis,
                    label_smoothing=eps, where=where,
                )

            out.append((jax.value_and_grad(loss)(x), loss(x)))
        return out

    def check(got, want):
        (got_v, got_g), fwd = got
        ref_v, ref_g = want
        np.testing.assert_allclose(got_v, ref_v, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(got_g, ref_g, rtol=2e-5, atol=1e-7)
        # Forward-only gives the same value.
        np.testing.assert_allclose(fwd, ref_v, rtol=2e-6, atol=1e-6)

    got = jax.jit(run)(_matched_arrays(shape, axis))
    check_each(
        {f"weighted={w} reduction={r}": pair
         for (w, r), *pair in zip(MATCHED, got, _matched_references(shape, axis), strict=True)},
        check,
    )


def test_loop_recomputes_the_exponentials_where_the_whole_array_passes_do(monkeypatch):
    """Float32 rows that ``_recomputed_exp`` picks (32 classes): the loop's
    chunks recompute ``exp(x - m)`` in the gradient's pass too, no shared
    exponentials; the loss and gradient equal the per-position path's."""
    shape, axis = (2, 40, 13, 32), -1
    monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)

    def plan(x, *args, chunked=False, share_exp=False, **kwargs):
        return x.shape, chunked, share_exp

    calls = spy_calls(monkeypatch, ("_index_loss_and_grad",), plan)
    x, t, w = _data(shape, axis)

    def loss(x):
        return jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN, axis=axis)

    got = jax.jit(jax.value_and_grad(loss))(x)
    chunks = [(s, share) for s, chunked, share in calls if chunked]
    assert chunks and all(
        _losses._recomputed_exp(jax.ShapeDtypeStruct(s, jnp.float32), len(s) - 1) for s, _ in chunks
    ), chunks
    assert not any(share for _, share in chunks), chunks
    want = _reference(x, t, w, reduction="mean", axis=axis)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=1e-7)
    _losses._index_impl.clear_cache()


def test_wide_rows_keep_the_whole_array_passes():
    """XLA:CPU channels-last rows of _CPU_WIDE_ROW_CLASSES classes or more
    take the whole-array passes at any size (no zero-filled buffer, under
    0.5% of the logits held); narrower rows and strided classes the loop."""
    def takes(shape, axis=-1):
        return _losses._takes_loop(jax.ShapeDtypeStruct(shape, jnp.float32), axis)

    assert not takes((4096, 32000))
    assert not takes((32768, 1024))
    assert not takes((16, 64, 64, 2048))
    assert takes((65536, 1023))
    assert takes((8, 512, 512, 150))
    assert takes((8, 2048, 128, 128), 1)
    x = jax.ShapeDtypeStruct((2048, 32000), jnp.float32)
    t = jax.ShapeDtypeStruct((2048,), jnp.int32)
    w = jax.ShapeDtypeStruct((32000,), jnp.float32)

    def loss(x, t, w):
        return jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN)

    for f in (jax.value_and_grad(loss), loss):
        held = jax.jit(f).lower(x, t, w).compile().memory_analysis().temp_size_in_bytes
        assert held < 0.005 * 2048 * 32000 * 4, held


@pytest.mark.parametrize("c, loop", [(40, False), (39, True)])
def test_wide_rows_threshold_takes_the_path_it_names(monkeypatch, c, loop):
    """With the thresholds lowered (every input "large", rows of 40 classes
    "wide"), the loop or the whole-array passes, both equal to the
    per-position path (value and gradient, "mean" and "sum")."""
    monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
    monkeypatch.setattr(_losses, "_CPU_WIDE_ROW_CLASSES", 40)
    calls = spy_calls(monkeypatch, ("_fused_pass",))
    shape, axis = (5, 37, c), -1
    x, t, w = _data(shape, axis)
    for reduction in ("mean", "sum"):

        def loss(x, reduction=reduction):
            return jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN, reduction=reduction)

        calls.clear()
        got = jax.jit(jax.value_and_grad(loss))(x)
        fwd = jax.jit(loss)(x)
        assert bool(calls) == loop, calls
        want = _reference(x, t, w, reduction=reduction, axis=axis)
        np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(fwd, want[0], rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=2e-5, atol=1e-7)
    _losses._index_impl.clear_cache()


@pytest.mark.parametrize("shape,axis", CASES[6:], ids=[f"{s}-ax{a}" for s, a in CASES[6:]])
def test_tiny_chunks_shift_the_last_chunk(monkeypatch, shape, axis):
    """The grouped cases above do exercise a shifted last chunk along part B
    (on the 4 test devices, with the "loop-tiny-chunks" setting)."""
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 64)
    cut = _losses._Chunking.of_logits(shape, axis % len(shape), 4)
    assert jax.device_count() == 4
    assert -(-cut.pb // cut.rb) * cut.rb > cut.pb


@pytest.mark.parametrize("c", [19, 24, 33, 41, 150])
def test_forward_chunks_of_grouped_rows_are_not_halved(c):
    """Channels-last rows that the fwd+bwd groups (9-41 classes, not
    multiples of 16) take half-size chunks there (the grouped exponentials
    are held besides the gradient); the forward, which groups nothing,
    takes full-size ones (with half-size chunks 262x2048x41 ran at 0.76x
    optax). Other rows: the same chunks either way."""
    shape = (22020096 // 2048 // c, 2048, c)
    chunks = [
        _losses._Chunking.of_logits(shape, 2, 4, with_grad=g).chunk for g in (True, False)
    ]
    ratio = np.prod(chunks[1]) / np.prod(chunks[0])
    if _losses._grouped_classes(c, 4):
        assert 1.7 < ratio <= 3, chunks  # twice the elements, balanced
    else:
        assert ratio == 1, chunks


@pytest.mark.parametrize(
    "n,want,stride",
    [(65536, 13797, 76), (65536, 13797, 4), (16384, 1747, 600), (1001, 300, 76), (37, 3, 76),
     (14, 7, 4), (13, 7, 4), (5, 9, 4), (1, 1, 4)],
)
def test_balanced_chunks(n, want, stride):
    """Chunk extents: within [1, n], no more chunks than ``want`` asks for,
    every chunk start on a 64-byte boundary once the chunk is large, and a
    shifted last chunk overlapping the one before by less than one alignment
    step per chunk."""
    size = _losses._balanced(n, want, stride)
    assert 1 <= size <= n
    count = -(-n // size)
    assert count <= -(-n // min(n, want))
    align = 64 // np.gcd(stride, 64)
    if size >= 8 * align:
        assert (size * stride) % 64 == 0
    assert count * size - n < count * align


@pytest.mark.parametrize("shape,axis", [((1, 1001, 19), -1), ((1, 19, 1001), 1)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_aligned_chunks_match_per_position(monkeypatch, shape, axis, reduction):
    """Chunks rounded to 64-byte starts (256 of 1001 positions, the last
    shifted back) give the per-position path's loss and gradient."""
    # Channels-last rows of 19 classes (grouped, see _chunks) take chunks of
    # this size too; other channels-last rows take twice this size.
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 19 * 300)
    monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
    _losses._index_impl.clear_cache()
    cut = _losses._Chunking.of_logits(shape, axis % len(shape), 4)
    assert (cut.rb, cut.steps) == (256, 4)
    x, t, w = _data(shape, axis)
    got_v, got_g = jax.value_and_grad(
        lambda x: jaxloss.cross_entropy(
            x, t, weight=w, ignore_index=IGN, reduction=reduction, axis=axis, label_smoothing=0.1
        )
    )(x)
    _losses._index_impl.clear_cache()
    ref_v, ref_g = _reference(x, t, w, reduction=reduction, axis=axis, eps=0.1)
    np.testing.assert_allclose(got_v, ref_v, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got_g, ref_g, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("shape,axis", CASES[:3], ids=[f"{s}-ax{a}" for s, a in CASES[:3]])
def test_fused_nll(chunk, shape, axis):
    x, t, w = _data(shape, axis)
    got_v, got_g = jax.value_and_grad(
        lambda x: jaxloss.nll_loss(x, t, weight=w, ignore_index=IGN, axis=axis)
    )(x)
    ref_v, ref_g = _reference(x, t, w, reduction="mean", axis=axis, normalize=False)
    np.testing.assert_allclose(got_v, ref_v, rtol=2e-6)
    np.testing.assert_allclose(got_g, ref_g, rtol=2e-6, atol=1e-8)


def test_bad_label_under_jit_is_nan_in_loss_and_gradient(chunk):
    x, t, w = _data((3, 5, 7, 19), -1, bad=True)
    v, g = jax.jit(jax.value_and_grad(
        lambda x, t: jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN)
    ))(x, t)
    assert np.isnan(v)
    g = np.asarray(g).reshape(-1, 19)
    assert np.isnan(g[1]).all()
    assert np.isfinite(np.delete(g, 1, axis=0)).all()


def test_all_ignored_mean_is_zero_with_zero_gradient(chunk):
    x, t, _ = _data((4, 6, 19), -1)
    t = jnp.full(t.shape, IGN)
    v, g = jax.jit(jax.value_and_grad(lambda x: jaxloss.cross_entropy(x, t, ignore_index=IGN)))(x)
    assert v == 0.0 and not np.asarray(g).any()


def test_empty_batch(chunk):
    x = jnp.zeros((0, 19))
    t = jnp.zeros((0,), jnp.int32)
    v, g = jax.value_and_grad(lambda x: jaxloss.cross_entropy(x, t))(x)
    assert v == 0.0 and g.shape == (0, 19)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_gradient_in_input_dtype(chunk, dtype):
    x, t, w = _data((3, 5, 7, 19), -1, dtype=dtype)
    v, g = jax.value_and_grad(lambda x: jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN))(x)
    assert g.dtype == dtype
    ref_v, ref_g = _reference(x.astype(jnp.float32), t, w, reduction="mean", axis=-1)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5)
    # Within one rounding to the 16-bit dtype.
    np.testing.assert_allclose(
        np.asarray(g, np.float32), ref_g, rtol=2.0 ** -7, atol=float(jnp.finfo(dtype).tiny)
    )


def test_bfloat16_rounding_is_converts():
    """XLA:CPU's gradient cast to bfloat16 by integer rounding
    (``_losses._to_dtype``) gives ``astype``'s bits: ties to even, carries
    into the exponent, overflow to inf, subnormals, signed zeros, and NaN
    (whatever its payload) stays NaN."""
    special = np.array(
        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-40, -1e-45],
        np.float32,
    )
    bits = np.array(
        [
            0x3F808000,  # a tie, even below: down
            0x3F818000,  # a tie, odd below: up
            0x3F80FFFF,
            0x3FFFFFFF,  # carries into the exponent
            0x7F7F8000,  # a tie at the top: to inf
            0x7F7F7FFF,
            0x00008000,
            0x7F800001,  # signalling NaN, payload in the low bits only
            0x7FFFFFFF,  # full payloads: the rounding's carry would give -0
            0xFFFFFFFF,
            0xFFC00001,
            0x7FC00000,
        ],
        np.uint32,
    ).view(np.float32)
    rng = np.random.default_rng(0)
    g = np.concatenate([special, bits, rng.standard_normal(4096).astype(np.float32) * 1e3])
    want = np.asarray(jnp.asarray(g).astype(jnp.bfloat16))
    nan = np.isnan(g)
    # Also as pairs along a last axis of 2 (two classes: one uint32 each).
    for shape in (g.shape, (-1, 2)):
        got = np.asarray(jax.jit(lambda v: _losses._to_dtype(v, jnp.bfloat16))(g.reshape(shape)))
        got = got.reshape(-1)
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
        np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_bfloat16_rounding_selects_nan_in_float32():
    """``_to_dtype`` replaces a NaN while the values are float32: a select
    on the rounded integers was moved by LLVM onto bfloat16 vectors, which
    XLA:CPU ran 2.3x slower on an AVX2 machine."""
    g = jnp.zeros((64, 64), jnp.float32)
    hlo = jax.jit(lambda v: _losses._to_dtype(v, jnp.bfloat16)).lower(g).compile().as_text()
    selects = [ln for ln in hlo.splitlines() if " select(" in ln]
    if jax.default_backend() == "cpu":
        assert selects and all(" f32[" in ln.split("=")[1][:8] for ln in selects), selects
    else:
        assert not selects


def test_jvp_hessian_vmap(chunk):
    x, t, w = _data((6, 7), -1)

    def f(x):
        return jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN, label_smoothing=0.1)

    def f_ref(x):
        return _reference(x, t, w, reduction="mean", axis=-1, eps=0.1)[0]

    dx = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape).astype(np.float32))
    # Each side's transforms compiled together: one program, not op by op.
    def transforms(f):
        return jax.jit(lambda x, dx: (jax.jvp(f, (x,), (dx,))[1], jax.hessian(f)(x)))(x, dx)

    (got, got_h), (want, want_h) = transforms(f), transforms(f_ref)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-7)
    # Per-example gradients.
    xs = jnp.stack([x, 2 * x])
    got = jax.jit(jax.vmap(jax.grad(f)))(xs)
    np.testing.assert_allclose(got[1], jax.jit(jax.grad(f))(2 * x), rtol=1e-6)


@pytest.mark.parametrize("devices", ["one", "four"])
def test_cpu_temporaries_are_small(monkeypatch, devices):
    """Compiled fwd+bwd temporaries stay below 1% of the logits (XLA:CPU).

    The issue's three shapes, compiled (not run) from shapes alone, with the
    chunked loops' device groups of this 4-device session and of a 1-device
    process (where a view with unit dimensions once made XLA copy the whole
    logits).
    """
    if devices == "one":
        monkeypatch.setattr(_losses, "_groups", lambda size: 1)
    _losses._index_impl.clear_cache()
    s = jax.ShapeDtypeStruct
    for shape, dtype, axis in [
        ((16, 512, 1024, 19), jnp.float32, -1),
        ((16, 19, 512, 1024), jnp.float32, 1),
        ((8, 512, 512, 150), jnp.float32, -1),
        ((8192, 128256), jnp.bfloat16, -1),
    ]:
        c = shape[axis]
        pos = shape[:axis % len(shape)] + shape[axis % len(shape) + 1 :]
        step = jax.jit(jax.value_and_grad(
            lambda x, t, w, axis=axis: jaxloss.cross_entropy(
                x, t, weight=w, ignore_index=IGN, axis=axis
            )
        ))
        for labels in (jnp.int32, jnp.uint8):  # uint8: segmentation masks as stored
            compiled = step.lower(s(shape, dtype), s(pos, labels), s((c,), jnp.float32)).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            nbytes = np.prod(shape) * jnp.dtype(dtype).itemsize
            assert temp <= 0.01 * nbytes, (shape, dtype, labels, temp, nbytes)
    _losses._index_impl.clear_cache()


@pytest.mark.parametrize(
    "shape,dtype,axis,bound",
    [
        ((4, 128, 128, 19), jnp.float32, -1, 0.24),
        ((4, 19, 128, 128), jnp.float32, 1, 0.31),
        ((4, 64, 64, 150), jnp.float32, -1, 0.032),
        ((512, 32000), jnp.bfloat16, -1, 0.03),
    ],
)
def test_cpu_probability_target_temporaries(shape, dtype, axis, bound):
    """Probability targets take no chunked loop: their fwd+bwd keeps per-row
    statistics, whose class index (XLA:CPU's variadic reductions,
    ``_native_reduce``) is int8/int16 where the rows allow. Measured 22.4%,
    28.9%, 3.0% and 2.5% of the logits; 26.3%, 36.8%, 3.3% and 3.8% with an
    int32 index (the per-row ratio does not depend on the position count)."""
    s = jax.ShapeDtypeStruct
    c = shape[axis]
    step = jax.jit(jax.value_and_grad(
        lambda x, q, w: jaxloss.cross_entropy(x, q, weight=w, axis=axis)
    ))
    compiled = step.lower(s(shape, dtype), s(shape, dtype), s((c,), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    nbytes = np.prod(shape) * jnp.dtype(dtype).itemsize
    assert temp <= bound * nbytes, (temp / nbytes, bound)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(4, 24, 64, 64), (4, 48, 32, 32), (2, 150, 64, 64)])
def test_cpu_probability_target_forward_16bit_strided_temporaries(shape, reduction):
    """The forward alone of bfloat16 logits with probability targets over a
    strided class axis of more than 19 classes (the whole-array forward, no
    ``native`` reductions) takes the max shift, which XLA:CPU puts in one
    fusion: no float32 copy of the logits. With the unshifted statistics the
    conversion shared by their sum of ``exp(x)`` and the loss term was
    written out: 204-233% of the logits."""
    s = jax.ShapeDtypeStruct
    fwd = jax.jit(lambda x, q, w: jaxloss.cross_entropy(x, q, weight=w, axis=1,
                                                        reduction=reduction))
    compiled = fwd.lower(s(shape, jnp.bfloat16), s(shape, jnp.bfloat16),
                         s((shape[1],), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 0.01 * np.prod(shape) * 2, temp / (np.prod(shape) * 2)


@pytest.mark.parametrize("shape,axis", [((3, 8, 7, 19), -1), ((12, 19, 11), 1)])
def test_fused_narrow_labels_equal_int32_labels(chunk, shape, axis):
    """8- and 16-bit labels (sliced chunk by chunk as they are, widened at
    each use) give the int32 labels' loss and gradient, "mean" and "none":
    uint8 and int16 with ignore_index 255, int8 with -100."""
    x, t, w = _data(shape, axis)
    labels = {"uint8": (jnp.uint8, 255), "int8": (jnp.int8, -100), "int16": (jnp.int16, 255)}

    def f(x, labels, reduction, ignore):
        out = jaxloss.cross_entropy(
            x, labels, weight=w, ignore_index=ignore, reduction=reduction, axis=axis
        )
        return jnp.sum(out * out) if reduction == "none" else out

    def run(args):
        # Each call with its own copy of x and labels: programs that share
        # nothing, under one jit (one compilation, not twelve).
        return {
            (name, r): (
                jax.value_and_grad(f)(x32, t32, r, labels[name][1]),
                jax.value_and_grad(f)(x_narrow, t_narrow, r, labels[name][1]),
            )
            for name, (x32, t32, x_narrow, t_narrow) in args.items()
            for r in ("mean", "none")
        }

    args = {}
    for name, (dtype, ignore) in labels.items():
        ti = jnp.where(t == IGN, ignore, t)
        args[name] = (x, ti.astype(jnp.int32), x, ti.astype(dtype))

    def check(want, got):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)

    check_each({f"{name} {r}": res for (name, r), res in jax.jit(run)(args).items()}, check)


def test_fused_int8_label_is_not_taken_for_ignore_index_255(chunk):
    """An int8 label -1 with ignore_index=255 is a bad label (NaN), as with
    int32 labels: compared as int8, the 255 would wrap to -1 and ignore it."""
    x, t, _ = _data((4, 6, 5), -1)
    t = jnp.where(t == IGN, 0, t).at[0, 0].set(-1)
    f = jax.jit(lambda x, t: jaxloss.cross_entropy(x, t, ignore_index=255, reduction="sum"))
    assert np.isnan(float(f(x, t.astype(jnp.int32))))
    assert np.isnan(float(f(x, t.astype(jnp.int8))))
