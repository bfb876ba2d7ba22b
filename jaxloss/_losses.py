"""The one implementation of the loss maths.

Every public surface -- the functions in :mod:`jaxloss`, the Flax modules in
:mod:`jaxloss.linen` and the PyTorch-signature layer in
:mod:`jaxloss.torch_compat` -- is a thin layer over :func:`_loss` below.

Notation: ``x`` is the input (logits for cross-entropy, log-probabilities for
NLL) with the class axis ``axis`` of size ``C``; a *position* is one index of
``x`` with the class axis removed; ``t`` is the class index at a position,
``w`` the class weights, ``eps`` the label smoothing.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxloss import _checks, _kernels
from jaxloss._kernels import partition

Array = jax.Array


# ---------------------------------------------------------------------------
# numerics helpers
# ---------------------------------------------------------------------------


def _compute_dtype(dtype: Any) -> Any:
    """float32 for 16/32-bit inputs, float64 for float64 (under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


# Inputs of fewer logits than this are small on XLA:CPU (see _cpu_small).
_CPU_SMALL_ELEMENTS = 1 << 15


def _cpu_small(shape: tuple[int, ...]) -> bool:
    """Whether logits of ``shape`` are small on XLA:CPU: fewer than
    ``_CPU_SMALL_ELEMENTS``. Small inputs keep the formulations that XLA:CPU
    runs on one thread: not :func:`_row_group`'s grouped rows, not the float32
    channels-last forward's class slices (:func:`_sliced_applies`).

    XLA:CPU splits an elementwise pass over both cores once its cost model
    calls the pass compute-bound (more operations than bytes) and it touches
    some 20 KB; those two paths' passes are, from a few thousand logits.
    Handing half a pass to the second core's sleeping thread cost ~90 us a
    call on the 2-core dev VM, where optax's whole step took 30-140 us
    (its passes, fewer operations per byte, stay on one thread below
    ~40K logits).
    """
    return jax.default_backend() == "cpu" and math.prod(shape) < _CPU_SMALL_ELEMENTS


# Whether XLA:CPU emits AVX-512 code on this host; None: detect it
# (_cpu_avx512). The tests set it to check both plans on any host.
_CPU_AVX512: bool | None = None


@functools.cache
def _detect_cpu_avx512() -> bool:
    """Whether this host's CPU has AVX-512 (``avx512f`` among Linux's
    ``/proc/cpuinfo`` flags; False where that cannot be read) and
    ``XLA_FLAGS`` does not cap XLA:CPU's instruction set below it
    (``--xla_cpu_max_isa``)."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith("--xla_cpu_max_isa="):
            isa = flag.split("=", 1)[1].upper()
            if not isa.startswith(("AVX512", "AMX")):
                return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def _cpu_avx512() -> bool:
    """``_CPU_AVX512``, or where it is None :func:`_detect_cpu_avx512`."""
    return _detect_cpu_avx512() if _CPU_AVX512 is None else _CPU_AVX512


# e**f on [-ln2/2, ln2/2]: a degree-6 polynomial fitted for relative error
# (1.9e-9 in exact arithmetic), Horner order from the constant term up.
_EXP_POLY = (
    1.0,
    1.0,
    0.49999991059303284,
    0.16666419804096222,
    0.04166822507977486,
    0.008374815806746483,
    0.0013836845755577087,
)
# ln 2 in two parts (Cody-Waite): n * _LN2_HI is exact for |n| <= 2**11.
_LN2_HI = 0.693145751953125
_LN2_LO = math.log(2.0) - _LN2_HI
# 1.5 * 2**23 + 127: an integer n + 127 in [0, 255] added to 1.5 * 2**23 sits
# in the low bits of the sum's float32 encoding.
_EXP_BIAS = 12582912.0 + 127.0


# Passes of fewer float32 exponentials keep jnp.exp (see _exp).
_FAST_EXP_MIN_ELEMENTS = 1 << 20


def _exp(v: Array, elements: int | None = None) -> Array:
    """``jnp.exp(v)``, by :func:`_poly_exp` where that pays: float32 on
    XLA:CPU, in a pass of ``_FAST_EXP_MIN_ELEMENTS`` exponentials or more
    (``elements``, default ``v.size``).

    Smaller passes keep XLA's ``exp``: XLA:CPU's cost model splits a pass of
    the longer polynomial over both cores from under 20K elements
    (``jnp.exp``'s from about 100K), and at 20K logits the threads'
    hand-off cost more than the arithmetic saved (200x100 fwd+bwd 97-112
    us against 64-68); from 200K to 600K logits it measured 0.92-1.0x, at
    1.6M 1.02x, at 2.5M 1.05-1.2x.
    """
    n = v.size if elements is None else elements
    if jax.default_backend() == "cpu" and v.dtype == jnp.float32 and n >= _FAST_EXP_MIN_ELEMENTS:
        return _poly_exp(v)
    return jnp.exp(v)


@jax.custom_jvp
def _poly_exp(v: Array) -> Array:
    """``jnp.exp(v)``; for float32 on XLA:CPU, a shorter polynomial evaluation.

    XLA:CPU's own float32 ``exp`` takes ~35 vector instructions per 8
    values: range clamps at both ends, a degree-7 polynomial and a
    saturating float-to-int conversion. Where an elementwise pass is all
    exponentials (the shared exponentials of the fwd+bwd) that is the pass's
    cost, not memory. This takes ~24: ``n = round(v / ln 2)`` (clamped to
    127 above), ``f = v - n ln 2`` in two parts, ``e**f`` by
    :data:`_EXP_POLY`, and ``2**n`` by moving ``n + 127`` into the exponent
    bits through the float encoding of ``n + _EXP_BIAS`` (no conversion).

    Accuracy against float64, measured over 3.1M values at XLA:CPU's
    default LLVM level (which contracts the polynomial's multiply-adds into
    fused ones): at most 1.48 ulp for ``v`` up to 88.3 (XLA's: 1.38), mean
    0.40 ulp (0.38); at LLVM level 0, without the contraction, at most
    1.79 ulp. Ends: ``v``
    below -87.34 (where ``exp`` is below the smallest normal float32) gives
    0, as does -inf; ``v`` above 88.72 and +inf give inf, NaN gives NaN; in
    (88.38, 88.72], the last 0.34 below overflow, the polynomial runs past
    its range (up to 92 ulps, 5.5e-6 relative). Not fused into a
    reduction's loop by XLA:CPU (a sum of it ran 4x slower than of
    ``jnp.exp``): for passes that write their exponentials, and vectorised
    ones (XLA's ``convert`` to bfloat16 leaves a pass scalar, where this is
    slower than XLA's: see :func:`_index_loss_jvp`).

    The callers go through :func:`_exp`, which keeps ``jnp.exp`` for small
    passes.
    """
    if not (jax.default_backend() == "cpu" and v.dtype == jnp.float32):
        return jnp.exp(v)
    lo = jnp.float32(-88.0)
    v = jnp.where(v < lo, lo, v)  # a NaN stays a NaN (a select, not max)
    n = jnp.round(v * jnp.float32(1.0 / math.log(2.0)))
    n = jnp.where(n > 127, jnp.float32(127.0), n)
    f = (v - n * jnp.float32(_LN2_HI)) - n * jnp.float32(_LN2_LO)
    p = jnp.float32(_EXP_POLY[-1])
    for c in _EXP_POLY[-2::-1]:
        p = p * f + jnp.float32(c)
    bits = jax.lax.bitcast_convert_type(n + jnp.float32(_EXP_BIAS), jnp.int32)
    return p * jax.lax.bitcast_convert_type(jax.lax.shift_left(bits, jnp.int32(23)), jnp.float32)


@_poly_exp.defjvp
def _poly_exp_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    e = _poly_exp(primals[0])
    return e, e * tangents[0]


# XLA:CPU row sums of up to this many classes are one reduction of XLA's own;
# longer rows are summed in blocks (see _row_sum).
_NATIVE_SUM_ROW = 2048


def _native_reduce(vs: tuple[Array, ...], inits: tuple[float, ...], op: Any, axis: int) -> tuple:
    """``op``-reductions of ``vs`` (one shape) along ``axis`` in one reduction
    that XLA:CPU emits itself, fused with the operands' producers, rather
    than handing it to YNNPACK: a variadic reduction, the classes' index
    max beside the values (always >= 0, kept alive by the select below),
    which YNNPACK does not take.

    The index is as narrow as the row allows: XLA writes it out beside each
    value (a multi-output fusion), so its bytes are temporaries. int8 up to
    127 classes, int16 up to 32767 (the blocks of the blocked row sums):
    probability targets' fwd+bwd temporaries at 16x19x512x1024 float32 36.8%
    -> 28.9% of the logits, 16x512x1024x19 26.3% -> 22.4%, the index
    targets' at 8192x128256 bfloat16 0.61% -> 0.31%; their speed unchanged
    but for the NCHW probability targets (1.11-1.27x faster)."""
    c = vs[0].shape[axis]
    itype = jnp.int8 if c <= 127 else jnp.int16 if c <= 32767 else jnp.int32
    index = _varying_like(jax.lax.broadcasted_iota(itype, vs[0].shape, axis), *vs)
    init = tuple(
        _varying_like(jnp.full((), i, v.dtype), *vs) for v, i in zip(vs, inits, strict=True)
    )
    # The index's start behind an optimization barrier: with it the reduction
    # is never a constant expression. Operands that XLA knows at compile
    # time (probability targets closed over by the caller's jit, summed for
    # their weights) were otherwise constant-folded by XLA's interpreter,
    # which took this variadic reduction element by element: a fwd+bwd at
    # 4x64x64x150 float32 compiled in 22 s against 0.65 s.
    init += (jax.lax.optimization_barrier(_varying_like(jnp.zeros((), itype), *vs)),)
    k = len(vs)

    def combine(a: tuple, b: tuple) -> tuple:
        return tuple(op(a[i], b[i]) for i in range(k)) + (jnp.maximum(a[k], b[k]),)

    out = jax.lax.reduce(tuple(vs) + (index,), init, combine, (axis,))
    ok = out[k] >= 0
    return tuple(jnp.where(ok, s, jnp.full((), jnp.nan, s.dtype)) for s in out[:k])


def _native_sums(vs: tuple[Array, ...], axis: int) -> tuple[Array, ...]:
    """``jnp.sum(v, axis)`` of each of ``vs`` by :func:`_native_reduce`."""
    return _native_reduce(vs, (0.0,) * len(vs), jnp.add, axis)


def _row_sums(vs: tuple[Array, ...], axis: int) -> tuple[Array, ...]:
    """``jnp.sum(v, axis)`` of each of ``vs`` (float, one shape) by one
    variadic reduction that XLA:CPU emits itself (:func:`_native_sums`);
    rows longer than ``_NATIVE_SUM_ROW`` in blocks (see :func:`_row_sum`),
    or by ``jnp.sum`` where ``C`` has no divisor for them. Not
    differentiable (:func:`_row_sum` is)."""
    axis = axis % vs[0].ndim
    c = vs[0].shape[axis]
    if c <= _NATIVE_SUM_ROW:
        return _native_sums(vs, axis)
    block = _sum_block(c)
    if block is None:
        return tuple(jnp.sum(v, axis=axis) for v in vs)
    shape = vs[0].shape[:axis] + (c // block, block) + vs[0].shape[axis + 1 :]
    return _native_sums(_native_sums(tuple(v.reshape(shape) for v in vs), axis + 1), axis)


def _native_max(v: Array, axis: int) -> Array:
    """``jnp.max(v, axis)``, stopped gradient, by :func:`_native_reduce`."""
    return _native_reduce((jax.lax.stop_gradient(v),), (-jnp.inf,), jnp.maximum, axis)[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _row_sum(v: Array, axis: int) -> Array:
    """``jnp.sum(v, axis)`` (no keepdims) of a float ``v`` by
    :func:`_native_sums`, for XLA:CPU. The row sums of exponentials of 16-bit logits and
    of long float32 rows take it (:func:`_native_row_sums`).

    YNNPACK's fused reduction, XLA:CPU's default, sums the exponentials of
    16-bit logits through a float32 copy of them of its own, allocated and
    page-faulted on every call (unseen by XLA's ``memory_analysis``): at
    1024x128256 bfloat16, 525 MB, and a forward of 287 ms against 22 ms
    here, fwd+bwd 400 against 128 ms; at 512x32000 fwd+bwd 9.3-9.5 against
    7.3-7.5 ms, the forward alike (each pair: both executables in one
    process, interleaved, 2 processes). For float32 it was no clear gain
    (8x128x128x19 forward 0.76-0.89x, 4096x1000 1.0-1.19x), except on long
    rows (:func:`_native_row_sums`). XLA's reduction adds a row in a few
    vector lanes: relative error ~ sqrt(C / 16) * 2**-24 (4e-6 measured at
    128256 classes, 2e-7 at 150), so rows longer than ``_NATIVE_SUM_ROW``
    are cut into blocks of a divisor of ``C`` near its square root (64 to
    1024), summed block by block, then the blocks' sums (2.4e-7 at 128256
    with blocks of 256);
    a long row with no such divisor keeps ``jnp.sum``. A custom JVP: the
    tangent is ``jnp.sum`` (reverse mode transposes it)."""
    return _row_sums((v,), axis)[0]


@_row_sum.defjvp
def _row_sum_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    return _row_sum(primals[0], axis), jnp.sum(tangents[0], axis=axis)


# Float32 rows of at least this many classes sum their exponentials by
# _row_sum too (see _native_row_sums).
_NATIVE_SUM_F32_ROW = 1 << 15
# 16-bit logits take them from this many elements (see _native_row_sums).
_NATIVE_SUM_MIN_16BIT = 1 << 15
# Shorter float32 rows take them from _CPU_SMALL_ELEMENTS logits: rows of up
# to _NATIVE_SUM_F32_SHORT_ROW classes under _NATIVE_SUM_F32_SHORT_MAX
# logits, any row under _NATIVE_SUM_F32_ONE_THREAD (see _native_row_sums).
_NATIVE_SUM_F32_SHORT_ROW = 48
_NATIVE_SUM_F32_SHORT_MAX = 1 << 20
_NATIVE_SUM_F32_ONE_THREAD = 1 << 17


def _native_row_sums(x: Array, axis: int, forward: bool = False) -> bool:
    """Whether the row sums of ``x``'s exponentials take :func:`_row_sum`:
    on XLA:CPU, classes along the last axis, 16-bit logits, float32 rows of
    ``_NATIVE_SUM_F32_ROW`` classes or more, and, from ``_CPU_SMALL_ELEMENTS``
    logits, float32 inputs of fewer than ``_NATIVE_SUM_F32_ONE_THREAD``
    logits and float32 rows of at most ``_NATIVE_SUM_F32_SHORT_ROW`` classes
    in inputs of fewer than ``_NATIVE_SUM_F32_SHORT_MAX`` logits; for the
    ``forward`` (:func:`_unshifted_row_stats`) the latter only where the
    positions are one dimension of an even count and not in rows of 32.

    Not classes along another axis: XLA's own reduction over a strided
    class axis was 3-4x slower than YNNPACK's at 4x150x64x64 bfloat16
    (forward and fwd+bwd; at 8x19x128x128 it was 1.2-1.4x faster).
    Channels-last bfloat16, fwd+bwd: 4x64x64x150 1.07x, 8x128x128x19
    1.13x. Forward, both executables interleaved in one process, 2
    processes each, float32 against YNNPACK's sum: 128x50304 2.3-2.5x
    faster, 128x65536 2.6-2.8x, 64x128256 2.2x, 256x128256 1.6x (YNNPACK
    page-faulted 1.6 MB of scratch a call at the first two); at 512x32000
    0.93-1.06x, 1024x4096 0.88-0.97x and 2048x2500 0.78-1.22x, so shorter
    float32 rows keep ``jnp.sum``, except in inputs of medium size.

    There (the float32 forward's sums, :func:`_unshifted_row_stats`; the
    float32 fwd+bwd sums its shared exponentials by ``jnp.sum``, unchanged)
    YNNPACK's fusion cost more than the sum: 2354x17 took 0.17-0.25 ms
    against 0.08 ms. Forward, both interleaved in one process, 2 processes,
    2-core EPYC (weighted mean, 10% ignored), 2^15 to 2^20 logits, native
    over YNNPACK, 17 to 48 classes: 1.2-3.0x faster at 26 of 33 shapes,
    0.90-1.19x at the other 7, most near 2^20 logits (against optax:
    0.79-1.20x before, 0.90-2.85x after); from 2^20 logits mixed
    (0.76-1.35x), so not there. Longer rows gain under 2^17
    logits (64 to 4000 classes: 1.2-2.4x but 26x4000 0.83x in one process),
    where XLA:CPU runs the native reduction on one thread; above, split over
    both cores, they lost (3126x64 0.73-0.89x, 2668x150 0.68-0.78x, 63
    classes at 300K-600K logits 0.77-0.80x, 400x1000 0.66-0.69x). Under
    ``_CPU_SMALL_ELEMENTS`` logits it made no difference (0.91-1.07x). On
    other shapes, ``ab.py --base c51cd24 --reps 11 --block 10``: forward
    3000x20 1.96x faster (0.89x to 1.75x optax), 120x1000 1.87x (0.68x to
    1.27x), 700x180 1.82x, 1000x120 1.42x, 50x2000 1.34x, 8x16x16x48 1.21x,
    20000x45 1.21x, 40000x20 1.06x. Above ``_NATIVE_SUM_F32_ONE_THREAD``
    logits, where XLA:CPU splits the reduction over the cores, the forward
    keeps ``jnp.sum`` for an odd number of positions (26209x19, 13107x33,
    20001x45: 2.0-3.3x slower natively, ``ab.py --base 8f8d03e``) and for
    positions over several dimensions (10x37x37x27 0.85-0.92x, 6x50x50x33
    0.77-0.97x, 4x64x64x32 0.83-1.04x in 2-3 processes; 2x64x128x19
    1.11x, 12x50x50x30 1.0x), and rows of 32 classes (8192x32 0.77-1.16x,
    median 0.92x, over 6 processes; 16384x32 0.74-1.07x, 4096x32
    0.91-0.93x; 24, 33, 35, 40 and 48 classes there 1.0-1.6x). The
    fwd+bwd's recomputed exponentials (:func:`_recomputed_exp`) sum
    natively there.

    16-bit inputs of fewer than ``_NATIVE_SUM_MIN_16BIT`` logits keep
    ``jnp.sum`` too: XLA:CPU's cost model splits the variadic reduction over
    both cores from a few thousand elements, and waking the second core's
    thread cost more than the sum. bfloat16 forward, in-process A/B (caches
    cleared), 10K-32K logits from 16 to 4000 classes: 0.56-0.85x optax with
    the native sums, 1.01-1.11x without (1000x10: 1.21x and 1.10x); from 40K
    logits the native sums were faster (400x100, 48x1000, 128x512, 4096x8:
    1.24-1.66x optax against 1.08-1.30x; 64x1000 fwd+bwd 1.70x against
    1.50x)."""
    if jax.default_backend() != "cpu" or axis % x.ndim != x.ndim - 1:
        return False
    size = jnp.dtype(x.dtype).itemsize
    if size == 2:
        return math.prod(x.shape) >= _NATIVE_SUM_MIN_16BIT
    if size != 4:
        return False
    c, n = x.shape[axis], math.prod(x.shape)
    if c >= _NATIVE_SUM_F32_ROW:
        return True
    if _cpu_small(x.shape):
        return False
    if n < _NATIVE_SUM_F32_ONE_THREAD:
        return True
    if c > _NATIVE_SUM_F32_SHORT_ROW or n >= _NATIVE_SUM_F32_SHORT_MAX:
        return False
    # Split over the cores: the forward's sums only over one even dimension
    # of positions, and not in rows of 32 classes.
    return not forward or (x.ndim == 2 and x.shape[0] % 2 == 0 and c != 32)


def _exp_row_sums(e: Array, x: Array, axis: int, forward: bool = False) -> Array:
    """The row sums (no keepdims) of ``e``, exponentials of logits ``x``: by
    :func:`_row_sum` where :func:`_native_row_sums` says, else ``jnp.sum``."""
    native = _native_row_sums(x, axis, forward)
    return _row_sum(e, axis) if native else jnp.sum(e, axis=axis)


def _sum_block(c: int) -> int | None:
    """The divisor of ``c`` in [64, 1024] nearest its square root, if any."""
    divisors = [b for b in range(64, 1025) if c % b == 0]
    return min(divisors, key=lambda b: abs(b * b - c)) if divisors else None


def _row_stats(x: Array, axis: int) -> tuple[Array, Array]:
    """``(m, log s)`` with ``logsumexp(x) = m + log s``, both keepdims.

    Keeping the two parts apart lets callers form ``lse - x_c`` as
    ``(m - x_c) + log s``, which keeps full precision for logits of magnitude
    1e4 where ``m + log s`` would already have rounded away ``log s``.

    Both come back in the compute dtype, whatever ``x``'s dtype. The max is
    taken in ``x``'s own dtype (it is exact there): a 16-bit ``x`` then has no
    float32 conversion shared between the two reductions, which XLA would
    materialise as a full-size temporary.

    The max is used as it is: a row of -inf or a +inf logit gives NaN, as in
    PyTorch (callers select ignored positions away). Replacing a non-finite
    max by 0 kept XLA:CPU from fusing the max with the exponentials (forward
    passes 1.0-1.4x slower at the ``bench.py --small`` shapes), and gave inf
    instead of PyTorch's NaN for a +inf logit.
    """
    cdt = _compute_dtype(x.dtype)
    m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True)).astype(cdt)
    e = jnp.exp(x.astype(cdt) - m)
    return m, jnp.expand_dims(jnp.log(_exp_row_sums(e, x, axis)), axis)


# The forward's row sums may skip the max shift where every row's sum of
# exp(x) lies in this range: no exponential overflows, and what flushes to
# zero (below 2**-126) is under 2**-46 of its row's sum.
_UNSHIFTED_RANGE = (2.0**-80, 2.0**80)


# In the chunked loop, float32 channels-last rows of fewer classes keep the max.
_UNSHIFTED_MIN_ROW = 64
# 16-bit logits over a strided class axis of fewer classes keep the max.
_UNSHIFTED_MIN_STRIDED_16BIT = 6


def _unshifted_applies(x: Array, axis: int, chunked: bool = False) -> bool:
    """Whether the forward takes :func:`_unshifted_row_stats` (XLA:CPU only):
    16-bit and float32 logits, whatever the class axis, more than one class.
    Not float64, whose shifted sums keep their range. Not a single class,
    whose max is the logit itself and whose per-position maths is all there
    is: at 2.5M positions of one class the unshifted forward took 24-25 ms,
    0.32x optax in float32 and 0.84x in bfloat16; shifted, 2.6-3.6 ms
    (``ab.py --base 4e1fe95 --shape 1x19531x128x1``; 64x1x128x128 axis=1:
    4.3x faster, 1.5x optax).

    Measured faster everywhere (``ab.py``, forward, against the max shift):
    16-bit logits (512x32000 bf16: 1.24-1.41x, the max of the 16-bit logits
    is a pass of its own there), float32 classes not along the last axis
    (8x19x128x128: 0.99-1.15x), float32 channels-last rows of 64 classes or
    more (``--base e65978f``: 16384x64 1.02-1.06x, 4x64x64x150 1.12-1.15x,
    4096x1000 1.33x, 256x32003 1.26x, 4x256x256x150 in the chunked loop
    1.12-1.31x; 16384x100 1.00-1.04x), and, once the per-position maths ran
    on the positions' shape (0143d1b), shorter channels-last rows too
    (``--base 0143d1b``, 8x128x128x19 1.08-1.11x over 5 processes; at
    ~2.5M logits, 2 processes each: 2 classes 1.24-1.27x, 5 1.05-1.17x, 10
    1.11-1.18x, 33 1.09-1.36x, 48 1.49-1.57x; from 2 to 19 classes the max
    shift had been 0.92-0.99x optax). Before that fix, over
    ``(positions, 1)``, 19 classes measured 0.79-0.90x.

    Except in the chunked loop (``chunked``), where float32 channels-last
    rows of fewer than ``_UNSHIFTED_MIN_ROW`` classes keep the max, fused
    into the exponentials' reduction: at 4x512x512x19 the forward measured
    0.89-0.90x without it.

    And except 16-bit logits over a strided class axis of fewer than
    ``_UNSHIFTED_MIN_STRIDED_16BIT`` classes, whose max XLA:CPU fuses with
    the rest into YNNPACK passes, as optax's; the unshifted sums' range
    check and conditional cost more there. ``ab.py --axis 1 --dtype
    bfloat16 --base ed8309c`` (forward, weighted mean, 10% ignored, 2-core
    EPYC, two runs): 3255x3x16x16 1.31-1.45x faster, 1953x5x16x16
    1.02-1.14x, 76x2x128x128 1.14-1.19x, 8x5x128x128 1.08-1.16x,
    4882x2x16x16 0.99-1.03x (0.76-0.90x optax in the sweeps, 1.02-1.15x
    now); with ``label_smoothing=0.1`` 4882x2x16x16 2.0-2.1x (0.52-0.60x
    -> 1.10-1.21x optax), 3255x3x16x16 1.78-1.82x (0.66-0.72x -> 1.18-1.31x),
    1953x5x16x16 1.41-1.44x, 76x2x128x128 1.36-1.41x (0.57-0.60x ->
    0.77-0.85x), 8x5x128x128 1.21-1.45x; ``reduction="none"`` 1.18-1.26x
    (8x5x128x128 0.98x). From 8-10 classes it was 0.78-1.14x unsmoothed, and
    above 64 classes 0.77-1.05x smoothed.
    """
    size = jnp.dtype(x.dtype).itemsize
    if jax.default_backend() != "cpu" or size not in (2, 4) or x.shape[axis] == 1:
        return False
    last = axis % x.ndim == x.ndim - 1
    if size == 2 and not last and x.shape[axis] < _UNSHIFTED_MIN_STRIDED_16BIT:
        return False
    return not (chunked and size == 4 and last and x.shape[axis] < _UNSHIFTED_MIN_ROW)


def _unshifted_row_stats(x: Array, axis: int, native: bool = False) -> tuple[Array, Array]:
    """:func:`_row_stats`'s ``(m, log s)`` from one read of ``x``, for the forward.

    ``s0 = sum exp(x)`` without the max shift, ``m = round(log s0)`` (not the
    row max: an integer within 1/2 of the log-sum-exp, so that ``m - x_c``
    stays exact where ``x_c`` is close to it, as with the max) and
    ``log s = log(s0 * exp(-m))``, below 1/2 in magnitude. The max pass is
    what this saves (see :func:`_unshifted_applies` for where it pays).

    A batch with any row sum outside ``_UNSHIFTED_RANGE`` (a logit above
    ~55 or every logit of a row below ~-55, a non-finite logit, a masked row
    of -inf) takes :func:`_row_stats` instead, through a ``lax.cond``
    (under ``vmap`` both branches run).

    The per-position maths runs on the positions' shape, the class axis put
    back at the end: over ``(positions, 1)`` XLA:CPU ran the logs 4x slower
    (``ab.py --base 45054a5``, forward: 4x64x64x150 1.06-1.08x faster,
    8x19x128x128 1.04-1.09x, 512x32000 bfloat16 1.11-1.18x).

    ``native``: every reduction XLA:CPU's own (:func:`_row_sum`,
    :func:`_native_row_stats`), for :func:`_soft_terms`.
    """
    cdt = _compute_dtype(x.dtype)
    e = jnp.exp(x.astype(cdt))
    s0 = _row_sum(e, axis) if native else _exp_row_sums(e, x, axis, forward=True)
    lo, hi = _UNSHIFTED_RANGE
    ok = jnp.all((s0 >= lo) & (s0 <= hi))

    def unshifted(x: Array) -> tuple[Array, Array]:
        m = jnp.round(jnp.log(s0))
        return m, jnp.log(s0 * jnp.exp(-m))

    def shifted(x: Array) -> tuple[Array, Array]:
        m, log_s = (_native_row_stats if native else _row_stats)(x, axis)
        return jnp.squeeze(m, axis), jnp.squeeze(log_s, axis)

    m, log_s = jax.lax.cond(ok, unshifted, shifted, x)
    return jnp.expand_dims(m, axis), jnp.expand_dims(log_s, axis)


def _native_row_stats(x: Array, axis: int) -> tuple[Array, Array]:
    """:func:`_row_stats` by XLA:CPU's own reductions (:func:`_native_max`,
    :func:`_row_sum`), the max of a 16-bit ``x`` taken on its float32 view
    (XLA:CPU's native max of bfloat16 took 35 ms at 512x32000, of the view
    2.0 ms, YNNPACK's 1.4 ms). Not differentiable."""
    xc = x.astype(_compute_dtype(x.dtype))
    m = jnp.expand_dims(_native_max(xc, axis), axis)
    return m, jnp.expand_dims(jnp.log(_row_sum(jnp.exp(xc - m), axis)), axis)


def _wide_labels(t: Array) -> Array:
    """Labels as int32 for arithmetic and comparisons. The core carries 8- and
    16-bit labels as they came (a converted copy made up front would be a
    full-size int32 temporary, 5% of float32 logits at 19 classes); each use
    converts them where XLA fuses the conversion (and the kernel after its
    load). Comparing a uint8 array with 300 would wrap the 300."""
    return t.astype(jnp.int32) if t.dtype.itemsize < 4 else t


def _take_in_range(a: Array, idx: Array, axis: int | None, shape: tuple[int, ...]) -> Array:
    """``jnp.take_along_axis(a, idx, axis)`` (``a[idx]`` where ``axis`` is
    None) for indices known to lie in range. 16-bit ``a`` is gathered as raw
    bits (XLA:CPU would convert the whole input to float32 to gather from it).

    For a small input on XLA:CPU (logits of ``shape``, :func:`_cpu_small`)
    the gather takes unsigned indices, which JAX does not wrap from the end,
    and no bounds handling: some ten integer operations per position fewer.
    XLA:CPU's cost model had counted the forward's per-position pass
    compute-bound and split it over both cores: the bfloat16 forward at
    41x128x3 and 3200x5 measured 1.40-1.60x faster (0.74-0.97x optax
    before, 1.17-1.36x after; ``ab.py --base 9154b45 --reps 21 --block 10``,
    3 processes), other small shapes 0.99-1.15x. The same change at every
    size measured 0.73-1.10x on the four ``bench.py --small`` cases, within
    their scatter between processes; larger inputs keep the plain gather.
    """
    if a.dtype.itemsize == 2:
        return _take_bits(a, idx, axis, shape)
    return _gather_in_range(a, idx, axis, shape)


# XLA:CPU looks up the class weights of rows of at most this many classes
# by selects (_class_weight_at).
_WEIGHT_SELECT_MAX_CLASSES = 5


def _class_weight_at(w: Array, t: Array, shape: tuple[int, ...], clip: bool = False) -> Array:
    """``w[t]`` per position, for labels ``t`` in ``[0, C)`` (``clip``: any
    labels, clipped into it), ``shape`` the logits' shape.

    On XLA:CPU, for at most ``_WEIGHT_SELECT_MAX_CLASSES`` classes and
    inputs that are not small (:func:`_cpu_small`), a chain of selects
    ``t >= k`` (exact, and clipped by construction), which XLA:CPU
    vectorises, where it ran the gather element by element: the weighted
    mean's denominator alone over 2.5M labels of 2 classes 2.2x faster (0.95
    ms against 2.08), of 5 and 10 classes at 1.25M 1.4x and 1.3x, of 19
    0.83x. ``ab.py --base cf32baf`` (weighted mean, 10% ignored, 2-core
    EPYC, 2-5 runs): float32 forward 9765x128x2 0.69-1.43x (median 1.11),
    3906x128x5 1.16-1.92x, 8x128x128x5 1.21-1.28x, ``axis=1`` 4882x2x16x16
    1.71-2.25x, 3255x3x16x16 1.32-1.94x, 1953x5x16x16 1.53-1.68x,
    8x5x128x128 1.31-1.49x; float32 fwd+bwd 0.90-1.53x (median 1.06);
    bfloat16 forward 0.89-1.38x, fwd+bwd 0.93-1.63x; ``reduction="none"``
    forward 1.28-1.48x. From 8 classes 0.88-1.08x, so not there; small
    inputs keep the gather (fwd+bwd 0.59-0.86x with the selects).
    """
    c = w.shape[0]
    if jax.default_backend() == "cpu" and c <= _WEIGHT_SELECT_MAX_CLASSES and not _cpu_small(shape):
        out = jnp.broadcast_to(w[0], t.shape)
        for k in range(1, c):
            out = jnp.where(t >= k, w[k], out)
        return out
    if clip:
        return w[jnp.clip(t, 0, c - 1)]
    return _take_in_range(w, t, None, shape)


def _gather_in_range(a: Array, idx: Array, axis: int | None, shape: tuple[int, ...]) -> Array:
    """:func:`_take_in_range`'s gather, of ``a`` as it is."""
    if _cpu_small(shape):
        idx = idx.astype(jnp.uint32 if idx.dtype.itemsize <= 4 else jnp.uint64)
        if axis is None:
            return a.at[idx].get(mode="promise_in_bounds")
        return jnp.take_along_axis(a, idx, axis, mode="promise_in_bounds")
    return a[idx] if axis is None else jnp.take_along_axis(a, idx, axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _take_bits(a: Array, idx: Array, axis: int | None, shape: tuple[int, ...]) -> Array:
    """:func:`_take_in_range` of 16-bit ``a``, gathered as its bits. The
    bits carry no derivative, so the derivative is the tangent's gather:
    without it the plain formulation, which JAX differentiates for second
    order (``jax.jvp`` of ``jax.value_and_grad``, hessians), lost the
    target logit's term for 16-bit logits (the loss's tangent came out
    -0.070 where it is 0.055)."""
    bits = _gather_in_range(jax.lax.bitcast_convert_type(a, jnp.uint16), idx, axis, shape)
    return jax.lax.bitcast_convert_type(bits, a.dtype)


@_take_bits.defjvp
def _take_bits_jvp(
    axis: int | None, shape: tuple[int, ...], primals: tuple, tangents: tuple
) -> tuple[Array, Array]:
    a, idx = primals
    return _take_bits(a, idx, axis, shape), _gather_in_range(tangents[0], idx, axis, shape)


def _class_iota(shape: tuple[int, ...], axis: int) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


# ---------------------------------------------------------------------------
# index targets: per-position loss with a fused gradient
# ---------------------------------------------------------------------------


def _index_loss_and_grad(
    x: Array,
    t: Array,
    valid: Array,
    w: Array | None,
    eps: float,
    normalize: bool,
    axis: int,
    with_grad: bool,
    grad_x: Array | None = None,
    share_exp: bool = False,
    stats: tuple[Array, Array] | None = None,
    target_shift: bool = False,
    chunked: bool = False,
    xla_exp: bool = False,
    grad_scale: Array | None = None,
    scatter_target: bool = False,
) -> tuple[Array, Array | None]:
    """Per-position loss ``l`` (compute dtype) and, optionally, ``dl/dx``.

    With ``normalize`` (cross-entropy) ``-log p_c = (m - x_c) + log s``;
    without it (NLL) ``x`` already holds log-probabilities and ``-log p_c = -x_c``.

    ``l = (1 - eps) * w_t * (-log p_t) + eps / C * sum_c w_c * (-log p_c)``
    (PyTorch's label-smoothing rule), 0 where the position is not valid and
    NaN where it is valid but ``t`` lies outside ``[0, C)``.

    The gradient is formed in the same pass (no one-hot is built: the target
    class is found by comparing against an iota)::

        dl/dx_c = (1 - eps) * w_t * (p_c - [c == t]) + eps / C * (W p_c - w_c)

    with ``W = sum_c w_c`` (``C`` when unweighted); for NLL it is
    ``-w_t [c == t]``.

    ``grad_x``, if given, is ``x`` in the compute dtype computed another way,
    for the gradient's elementwise part to read (see :func:`_exact_upcast`).
    ``share_exp`` forms ``exp(x - m)`` once for both the row sum and the
    gradient (XLA then materialises it: fastest on XLA:CPU for small float32
    inputs, where one exponential per element dominates). ``stats``, if
    given, is ``(m, log s)`` of :func:`_row_stats` computed elsewhere (by the
    kernel), without the class axis. With ``share_exp`` and the gradient,
    XLA:CPU's exponentials may take :func:`_group_shifted_exp`'s group shift, or,
    with ``target_shift``, each row's target logit as the shift (see
    :func:`_target_shift_applies`). ``chunked``: called on a chunk of the
    chunked loop (see :func:`_unshifted_applies`). ``xla_exp``: the
    gradient's exponentials by ``jnp.exp``, not :func:`_exp` (where the
    caller's pass ends in XLA's conversion to bfloat16: see
    :func:`_index_loss_jvp`). ``grad_scale``, if given, multiplies the
    gradient (in the class slices' form before their stacking, which a
    consumer of one class then reads without the stacked array: see
    :func:`_to_dtype`); a scalar or one factor per position.
    ``scatter_target``: the gradient's ``-b [c == t]`` term is added at each
    row's target by a scatter after the elementwise pass, not selected in it
    (see :func:`_target_by_scatter`).
    """
    by_target = normalize and share_exp and target_shift and stats is None
    by_group = (
        normalize
        and share_exp
        and with_grad
        and stats is None
        and _row_group(x.shape, axis, x.dtype) > 1
    )
    cdt = _compute_dtype(x.dtype)
    xc = x.astype(cdt)
    num_classes = x.shape[axis]
    t = _wide_labels(t)
    in_range = (t >= 0) & (t < num_classes)
    t_safe = jnp.where(in_range, t, 0)
    t_keep = jnp.expand_dims(t_safe, axis)
    # A forward over few classes: every class as an array of the positions.
    sliced = normalize and stats is None and _sliced_applies(x, axis, chunked, with_grad)
    xs = _class_slices(x, axis) if sliced else []
    # Take the target logit rather than building a full log_softmax.
    if sliced:
        x_t = _pick_class(xs, t_safe)
    else:
        x_t = jnp.squeeze(_take_in_range(x, t_keep, axis, x.shape), axis).astype(cdt)
    w_t = jnp.ones((), cdt) if w is None else _class_weight_at(w, t_safe, x.shape)

    if normalize:
        if stats is not None:
            m, log_s = (jnp.expand_dims(v.astype(cdt), axis) for v in stats)
        elif sliced:
            m_pos, es, s_pos = _sliced_exps(xs)
            m, log_s = jnp.expand_dims(m_pos, axis), jnp.expand_dims(jnp.log(s_pos), axis)
        elif by_target:
            e, s, m = _target_shifted_exp(xc, x_t, valid, axis)
            log_s = jnp.log(s)
        elif by_group:
            e, s, m = _group_shifted_exp(xc, x_t, valid, axis)
            log_s = jnp.log(s)
        elif share_exp:
            m = jax.lax.stop_gradient(jnp.max(xc, axis=axis, keepdims=True))
            e, s, log_s = _shared_exp(xc, m, axis)
        elif not with_grad and _unshifted_applies(x, axis, chunked):
            m, log_s = _unshifted_row_stats(x, axis)
        else:
            m, log_s = _row_stats(x, axis)
        neg_logp_t = (jnp.squeeze(m, axis) - x_t) + jnp.squeeze(log_s, axis)
        if by_group:
            # m is the group's shift: (m - x_t) + log s would lose log s's
            # digits to cancellation where the row's max lies far below it.
            e_t = _exp_diff(x_t, jnp.squeeze(m, axis))
            near = e_t >= _GROUP_TARGET_MIN_EXP
            s_pos = jnp.squeeze(s, axis)
            neg_logp_t = jnp.where(near, jnp.log(s_pos / jnp.where(near, e_t, 1.0)), neg_logp_t)
    else:
        neg_logp_t = -x_t
    loss = w_t * neg_logp_t
    if eps > 0.0 and sliced:
        m_pos, log_s_pos = jnp.squeeze(m, axis), jnp.squeeze(log_s, axis)
        gaps = [m_pos - v if w is None else w[c] * (m_pos - v) for c, v in enumerate(xs)]
        total_w = num_classes if w is None else jnp.sum(w)
        smooth = functools.reduce(jnp.add, gaps) + total_w * log_s_pos
        loss = (1.0 - eps) * loss + (eps / num_classes) * smooth
    elif eps > 0.0:
        if w is None:
            smooth = _weighted_gap_sum(x, xc, m, None, axis, forward=not with_grad)
            smooth = smooth + num_classes * jnp.squeeze(log_s, axis)
        else:
            wb = _broadcast_weight(w, x.ndim, axis)
            smooth = _weighted_gap_sum(x, xc, m, w, axis) + jnp.sum(w) * jnp.squeeze(log_s, axis)
        loss = (1.0 - eps) * loss + (eps / num_classes) * smooth

    nan = jnp.full((), jnp.nan, cdt)
    zero = jnp.zeros((), cdt)
    loss = jnp.where(valid, jnp.where(in_range, loss, nan), zero)
    if not with_grad:
        return loss, None

    def along(v: Array) -> Array:  # a per-position value, to broadcast over classes
        return jnp.expand_dims(v, axis) if jnp.ndim(v) else v

    iota = _class_iota(x.shape, axis)
    is_t = iota == t_keep
    b_t = (1.0 - eps) * (jnp.ones((), cdt) if w is None else w_t)
    # With the target's term scattered, the scale goes into the per-position
    # and per-class factors: no elementwise pass after the scatter. So does
    # a scale per position (one per example, _batch_folded): the elementwise
    # pass then reads no more per-position operands than with a scalar.
    fold = grad_scale is not None and (scatter_target or jnp.ndim(grad_scale) > 0)
    # The target's term in the elementwise pass, scaled there where folded.
    b_in_pass = b_t if scatter_target or not fold else grad_scale * b_t
    if normalize:
        # dl/dx_c = a p_c - b [c == t] - eps / C * w_c with per-position a
        # and b: few per-position operands for the elementwise pass (on
        # XLA:CPU each one broadcast along a short class row costs time).
        eps_c = eps / num_classes
        if eps > 0.0:
            a_t = b_t + eps_c * (num_classes if w is None else jnp.sum(w))
        else:  # no sum of the weights times 0: XLA keeps it (NaN semantics)
            a_t = b_t
        # NaN for a bad label; not where ignored (0 * NaN in derivatives).
        a_t = jnp.where(in_range | ~valid, a_t, nan)
        if sliced:
            # The same formula, class by class, stacked at the end. Stacking
            # the exponentials into q and taking the general expression
            # below measured 0.73-0.88x (8x256x256x2, 8x2x256x256 fwd+bwd).
            inv = a_t / s_pos
            gs = []
            for c, e_c in enumerate(es):
                g = e_c * inv - jnp.where(t_safe == c, b_t, zero)
                if eps > 0.0:
                    g = g - eps_c * (1.0 if w is None else w[c])
                g = jnp.where(valid, g, zero)
                gs.append(g if grad_scale is None else grad_scale * g)
            return loss, jnp.stack(gs, axis)
        if fold:
            # Folded in before the division by the row sums: XLA:CPU computes
            # a division's result once, where it fused the scale's selects
            # (taken after it) into the elementwise pass and recomputed them
            # for every logit (one row of 32000 bfloat16 classes: 0.15 ms,
            # 0.11 ms now).
            a_t, eps_c = grad_scale * a_t, grad_scale * eps_c
        if share_exp:
            q, a_t = e, a_t / jnp.squeeze(s, axis)  # p = e / s
        else:
            exp = jnp.exp if xla_exp else _exp
            if grad_x is None:
                q = exp(xc - m - log_s)
            else:  # shares no subexpression with the row reductions
                q = exp(grad_x - (m + log_s))
        grad = q * along(a_t)
        if not scatter_target:
            grad = grad - jnp.where(is_t, along(b_in_pass), zero)
        if eps > 0.0:
            grad = grad - along(eps_c) * (1.0 if w is None else wb)
    else:
        if scatter_target:
            at_t = jnp.zeros(x.shape, cdt)
        else:
            at_t = jnp.where(is_t, -along(b_in_pass), zero)
        grad = jnp.where(along(in_range), at_t, nan)
    if not by_group and _select_by_iota(x.shape, axis, x.dtype):
        keep = iota < along(jnp.where(valid, num_classes, 0))
    else:
        keep = along(valid)
    grad = jnp.where(keep, grad, zero)
    if scatter_target:
        minus_b = -jnp.where(valid, b_t, zero)
        grad = _add_at_target(grad, t_safe, grad_scale * minus_b if fold else minus_b, axis)
    return loss, grad if grad_scale is None or fold else along(grad_scale) * grad


def _add_at_target(grad: Array, t: Array, v: Array, axis: int) -> Array:
    """``grad`` plus ``v`` (per position, or a scalar) at each position's
    class ``t`` (in range) along ``axis``: one scatter-add."""
    idx = [jax.lax.broadcasted_iota(jnp.int32, t.shape, d) for d in range(t.ndim)]
    idx.insert(axis % grad.ndim, t.astype(jnp.int32))
    v = jnp.broadcast_to(v, t.shape).astype(grad.dtype)
    return grad.at[tuple(idx)].add(v, mode="promise_in_bounds", unique_indices=True)


def _target_by_scatter(x: Array, axis: int, normalize: bool = True) -> bool:
    """Whether XLA:CPU's fwd+bwd adds the target's term of the gradient,
    ``-b [c == t]``, by one scatter-add after the elementwise pass
    (``scatter_target`` of :func:`_index_loss_and_grad`): small inputs
    (:func:`_cpu_small`) of more than 2 classes, with 16-bit logits for
    cross-entropy (whose float32 exponentials are then shared, see
    :func:`_cpu_exp_plan`), of any dtype for NLL. The mean's scale is then
    folded into the per-position and per-class factors, and a small
    gradient is converted to bfloat16 by XLA's ``convert`` (:func:`_to_dtype`).

    XLA:CPU splits an elementwise pass over both cores when its cost model
    counts more operations than bytes accessed in it (see
    :func:`_cpu_small`). A 16-bit gradient pass moves 4-6 bytes per logit;
    the recomputed exponential's operands, the target's compare and
    select, the mask's select, the scale and the integer rounding made it
    "compute-bound", and the hand-off to the second core cost more than the
    whole step. NLL's gradient pass reads no logits at all. With these
    changes every full-size pass keeps to one thread, as optax's do.

    fwd+bwd, weighted mean, 10% ignored, 2-core EPYC, jax 0.10.2,
    ``ab.py --base a83c250 --dtype bfloat16 --reps 21 --block 10``, 2
    processes: bfloat16 cross-entropy 1.27-2.57x faster at 10 shapes of
    3-4096 classes and 10K-16K logits (0.39-0.79x optax before, 0.97-1.11x
    after), ``reduction="none"`` 1.54-2.14x (0.93-1.07x optax after). NLL
    against its unscattered step (switched off by patching, both compiled
    in one process, 2 processes), 8 shapes of 3-30000 classes: bfloat16
    1.1-2.4x faster (0.41-0.86x a plain ``take_along_axis`` NLL before,
    0.96-1.08x after), float32 1.4-5.7x. Not taken: 2 classes, which
    measured the same either way, and float32 cross-entropy, whose
    shared-exponential gradient pass XLA:CPU already keeps on one thread
    (0.90-0.94x scattered). One row of 20000-32000 classes stays at
    0.68-0.74x optax either way (the unscattered step measured 0.62-1.16x,
    bimodal, between processes).
    """
    return (x.dtype.itemsize == 2 or not normalize) and x.shape[axis] > 2 and _cpu_small(x.shape)


# Forward rows of at most this many classes take the sliced statistics (see
# _sliced_applies); in XLA:CPU's chunked loop, strided classes of at most
# _BUFFERED_MAX_CLASSES, forward and fwd+bwd, from buffered chunks
# (_buffered_chunk).
_SLICED_MAX_CLASSES = 16
_BUFFERED_MAX_CLASSES = 15
# bfloat16 over a strided class axis (AVX-512 only): the forward's slices up
# to this many classes (see _sliced_applies).
_SLICED_MAX_BF16_STRIDED = 5
# A small channels-last float32 forward keeps the class slices where
# positions * (C + 4) is below this: XLA:CPU then keeps their pass on one
# thread (it split it from ~5000, about 20 KB touched: 1500x2, 768x5,
# 384x10, 256x16; not 1000x2, 512x5, 256x10, 192x16).
_SLICED_ONE_THREAD = 4096


def _sliced_applies(x: Array, axis: int, chunked: bool = False, with_grad: bool = False) -> bool:
    """Whether XLA:CPU takes each class as an array of the positions
    (:func:`_class_slices`): float32 logits, either layout, of 2 to
    ``_SLICED_MAX_CLASSES`` classes for the forward (no gradient) and of 2
    for the fwd+bwd (``with_grad``), and bfloat16 logits of two classes
    along the last axis (either way), except channels-last chunks of the
    chunked loop (``chunked``) and the float32 channels-last forward of a
    small input (:func:`_cpu_small`) unless tiny (``_SLICED_ONE_THREAD``).

    The row max, the exponentials' sum, its log, the target logit (a chain
    of selects instead of a gather) and the loss are then elementwise
    operations on the positions' shape, which XLA:CPU fuses into one pass,
    its exponentials by :func:`_exp`. Before, a reduction over so few
    classes and the unshifted forward's per-position maths ran as separate
    passes, 0.66-1.02x optax with ``reduction="none"`` and classes on axis
    1. Forward, ``ab.py --base ccee207 --reps 20`` (weighted, 10% ignored,
    2-core EPYC), ~2.5M logits, ``"none"`` and the mean: channels-last 2-5
    classes 1.95-2.54x faster (2.4-2.8x optax), 10-16 1.22-1.87x; axis=1
    with 16x16 maps 1.2-2.1x (1.25-2.2x optax), 8x5x128x128 1.5-1.7x;
    16x5x512x512 in the chunked loop 1.86x (0.57x optax before).

    Not for 16-bit logits, except bfloat16 pairs: XLA:CPU ran the pass
    scalar (2.5-4x slower; slicing their raw bits did not change it). Two
    bfloat16 classes along the last axis are read as one uint32 per
    position instead (:func:`_class_slices`), and their gradient written
    the same way (:func:`_to_dtype`). ``ab.py --base 08da32d --reps 20``
    (2-core EPYC with AVX2): forward 1953x128x2 1.08-1.48x faster,
    8x256x256x2 1.16-1.56x, 19531x128x2 3.3x; fwd+bwd 1953x128x2 2.18x,
    8x256x256x2 2.2-2.6x (``"none"`` too), 19531x128x2 1.26x (4-6x
    optax). Not from 17 classes (19: 0.9-1.0x in a prototype). Not for
    channels-last chunks (16x512x512x5: 0.56x).

    With the gradient, its classes are formed the same way and stacked:
    two classes, fwd+bwd against the shared exponentials (``ab.py --base
    8e67c03 --reps 20``): 9765x128x2 1.33x (mean) and 1.90x (``"none"``),
    8x256x256x2 1.61x, 4882x2x16x16 1.28x, 8x2x256x256 1.46-1.60x (2.4-5.5x
    optax). From 3 classes a prototype measured 0.98-1.08x (3) and
    0.66-0.9x (4-10).

    The forward of probability targets takes the same slices
    (:func:`_soft_sliced_loss`).

    Where XLA:CPU emits AVX-512 code (:func:`_cpu_avx512`), the forward of
    bfloat16 logits over a strided class axis of 2 to
    ``_SLICED_MAX_BF16_STRIDED`` classes too (their slices are contiguous
    runs of the positions). Compiled forwards, with and without, interleaved
    in one process (2-core AMD EPYC with AVX-512), weighted mean / ``"none"``
    against optax: 4882x2x16x16 ``axis=1`` 1.13x -> 1.73x / 0.96x -> 1.35x,
    3255x3x16x16 0.87x -> 1.88x / 0.89x -> 1.62x, 2441x4x16x16 0.84x ->
    1.76x / 0.78x -> 1.56x, 1953x5x16x16 0.97x -> 2.02x / 0.85x -> 1.16x,
    8x5x128x128 1.14x -> 1.25x / 1.15x -> 1.47x, 8x3x128x128 1.08x -> 1.42x
    / 1.18x -> 1.53x; from 6 classes 0.30-0.42x optax (1627x6x16x16,
    1220x8x16x16, 976x10x16x16, 8x8x128x128). Without AVX-512 the plan is
    as measured on the AVX2 EPYC (not taken).
    """
    c = x.shape[axis]
    last = axis % x.ndim == x.ndim - 1
    if jax.default_backend() != "cpu" or (chunked and last):
        return False
    if jnp.dtype(x.dtype) == jnp.bfloat16:
        if last:
            return c == 2
        return not with_grad and _cpu_avx512() and 2 <= c <= _SLICED_MAX_BF16_STRIDED
    if (
        last
        and not with_grad
        and _cpu_small(x.shape)
        and (c + 4) * (math.prod(x.shape) // max(c, 1)) >= _SLICED_ONE_THREAD
    ):
        return False
    if with_grad:
        # In XLA:CPU's chunked loop (strided classes here) each chunk and its
        # gradient in buffers of their own (_buffered_chunk).
        top = _BUFFERED_MAX_CLASSES if chunked else 2
    else:
        top = _SLICED_MAX_CLASSES
    return jnp.dtype(x.dtype) == jnp.float32 and 2 <= c <= top


def _class_slices(x: Array, axis: int) -> list[Array]:
    """``x``'s classes as ``C`` arrays of the positions' shape, compute dtype.

    Two bfloat16 classes along the last axis: each position's pair read as
    one uint32 (the first class in its low half), each half put in the high
    bits of a float32 -- exact, and a contiguous read that XLA:CPU
    vectorises, where a stride-2 slice of 16-bit values ran scalar.
    """
    cdt = _compute_dtype(x.dtype)
    if x.dtype == jnp.bfloat16 and x.shape[axis] == 2 and axis % x.ndim == x.ndim - 1:
        return list(_bf16_pair(x))
    return [jax.lax.index_in_dim(x, c, axis, False).astype(cdt) for c in range(x.shape[axis])]


@jax.custom_jvp
def _bf16_pair(x: Array) -> tuple[Array, Array]:
    """The two classes of bfloat16 ``(..., 2)`` logits as float32, read as
    one uint32 per position (see :func:`_class_slices`); differentiated as
    the slices they are (the bits carry no derivative)."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    halves = (u << 16, u & jnp.uint32(0xFFFF0000))
    lo, hi = (jax.lax.bitcast_convert_type(h, jnp.float32) for h in halves)
    return lo, hi


@_bf16_pair.defjvp
def _bf16_pair_jvp(primals: tuple, tangents: tuple) -> tuple[tuple, tuple]:
    (x,), (x_dot,) = primals, tangents
    dots = tuple(x_dot[..., c].astype(jnp.float32) for c in (0, 1))
    return _bf16_pair(x), dots


def _pick_class(xs: list[Array], t: Array) -> Array:
    """``xs[t]`` per position (``t`` in range) by a chain of selects."""
    out = xs[0]
    for c in range(1, len(xs)):
        out = jnp.where(t == c, xs[c], out)
    return out


def _sliced_exps(xs: list[Array]) -> tuple[Array, list[Array], Array]:
    """``(m, [exp(x_c - m)], s)`` on the positions' shape from the class
    slices: the row max ``m`` as the shift (:func:`_row_stats`'s non-finite
    semantics: NaN for a NaN or +inf logit and for a row of -inf) and ``s``
    the exponentials' sum.

    One class (probability targets, :func:`_soft_sliced_applies`): ``x - m``
    is 0, or NaN where ``x`` is not finite, and ``exp`` of it is ``1 + (x -
    m)``, exactly (the polynomial's pass took 1.6-1.9x the time: 19531x128x1
    float32, forward).
    """
    m = jax.lax.stop_gradient(functools.reduce(jnp.maximum, xs))
    if len(xs) == 1:
        e = 1.0 + (xs[0] - m)
        return m, [e], e
    es = [_exp(v - m, elements=len(xs) * v.size) for v in xs]
    return m, es, functools.reduce(jnp.add, es)


# Rows of at most this many classes select the gradient's valid positions
# by the class iota (see _select_by_iota).
_IOTA_SELECT_MAX_CLASSES = 12


def _select_by_iota(shape: tuple[int, ...], axis: int, dtype: Any) -> bool:
    """Whether XLA:CPU's gradient pass zeroes the positions that are not
    valid by comparing the class iota against a per-position bound (``C``
    where valid, else 0) rather than selecting by the mask broadcast along
    the classes: rows of ``_IOTA_SELECT_MAX_CLASSES`` classes or fewer that
    :func:`_row_group` does not group. The same values either way.

    XLA:CPU ran the broadcast mask's select over such rows 2.5x slower (an
    elementwise pass over 2.5M bfloat16 logits of 10 classes: 4.6 against
    1.8 ms). Measured fwd+bwd with ``ab.py --base 44e05cf --reps 20``
    (weighted mean, 10% ignored, 2-core EPYC), ~2.5M logits channels-last:
    bfloat16 C = 2, 3, 5, 8, 10, 12 2.0-3.0x faster (from 0.72-0.97x optax
    at 5-12 classes to 1.7-2.6x), 65536x10 1.9x, (8, C, 128, 128) 1.03-1.11x;
    float32 C = 2, 5, 8 1.14-1.21x, (16, 5, 128, 128) and (8, 10, 128, 128)
    1.06-1.07x. Not taken where it did not pay: C = 1
    and 13 to 33 (0.96-1.04x), and float32's grouped rows (0.93-0.98x).
    """
    return (
        jax.default_backend() == "cpu"
        and shape[axis] <= _IOTA_SELECT_MAX_CLASSES
        and shape[axis] > 1
        and (_row_group(shape, axis, dtype) == 1 or jnp.dtype(dtype).itemsize == 2)
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _target_shifted_exp(
    xc: Array, x_t: Array, valid: Array, axis: int
) -> tuple[Array, Array, Array]:
    """``(e, s, m)`` for ``target_shift`` (:func:`_target_shift_applies`):
    ``m = x_t`` (keepdims), ``e = exp(xc - m)``, ``s`` its row sum; or, where
    any valid row's ``s`` is not finite, the row max as ``m`` for the whole
    batch.

    The fallback is a while loop of 0 or 1 trips, not a ``lax.cond``: its
    carry is updated in place, where a cond's result is a copy of the
    exponentials (XLA:CPU, 4x64x64x150: temporaries of twice the logits and
    a fwd+bwd 1.5x slower). A while loop has no reverse-mode derivative, so
    the derivative is given (:func:`_held_shift_jvp`).
    """
    m = jax.lax.stop_gradient(jnp.expand_dims(x_t, axis))
    e = _exp(xc - m)
    s = jnp.sum(e, axis=axis, keepdims=True)
    bad = ~jnp.all(jnp.isfinite(jnp.squeeze(s, axis)) | ~valid)

    def by_max(carry: tuple[Array, Array, Array, Array]) -> tuple[Array, Array, Array, Array]:
        bad = carry[0]
        m = jax.lax.stop_gradient(jnp.max(xc, axis=axis, keepdims=True))
        e, s, _ = _shared_exp(xc, m, axis)  # the per-row shift
        return bad & False, e, s, m

    _, e, s, m = jax.lax.while_loop(lambda carry: carry[0], by_max, (bad, e, s, m))
    return e, s, m


def _held_shift_jvp(
    fn: Any, axis: int, primals: tuple, tangents: tuple
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    """The JVP of a shifted exponentials' ``fn`` (:func:`_target_shifted_exp`,
    :func:`_group_shifted_exp`): either branch's ``e = exp(xc - m)`` with
    ``m`` held constant (stop_gradient): ``de = e dxc``, ``ds = sum de``,
    ``dm = 0``. Linear in ``dxc``, so reverse mode (the second derivative of
    a loss whose rule differentiates this) works."""
    e, s, m = fn(*primals, axis)
    de = e * tangents[0]
    return (e, s, m), (de, jnp.sum(de, axis=axis, keepdims=True), jnp.zeros_like(m))


_target_shifted_exp.defjvp(functools.partial(_held_shift_jvp, _target_shifted_exp))


# Fewer logit elements than this keep the max shift: the fallback's check and
# loop cost more than the max pass there (see _target_shift_applies).
_TARGET_SHIFT_MIN_ELEMENTS = 1 << 20


def _target_shift_applies(shape: tuple[int, ...], axis: int, dtype: Any) -> bool:
    """Whether XLA:CPU's fwd+bwd with shared exponentials (``share_exp``) takes
    ``target_shift``: float32 rows that :func:`_row_group` does not group,
    ``_TARGET_SHIFT_MIN_ELEMENTS`` logits or more.

    The shift is then each row's target logit ``x_t`` instead of its max:
    ``s = sum_c exp(x_c - x_t)`` and ``-log p_t = log s``. No max pass (the
    row's one read before the exponentials is the target's gather), and
    ``s >= 1`` (its target's term is 1): no sum underflows to zero. An
    exponential overflows only where a logit lies more than ~88 above its
    row's target logit; a batch with any valid row whose ``s`` is not finite
    (that overflow, a non-finite logit) takes the max shift instead, through
    :func:`_target_shifted_exp`'s while loop. Ignored rows, zeros in the
    result either way, do not count.

    The price is rounding: ``x_c - x_t`` is rounded to ``|x_c - x_t| *
    2**-24`` relatively, and so is ``exp`` of it, so a gradient entry
    ``p_c`` may be off by ``p_c * (max_c x_c - x_t) * 2**-24`` where the
    target lies below the row's largest logit (at most 5.3e-6 of ``p_c``,
    at the overflow limit; logits of scale 10 measured 7.2e-7 against the
    max shift's 2.4e-7 in float64, the losses alike). The rounding error
    put back as in :func:`_exp_diff` made the step 1.3x slower.

    Measured with ``ab.py --base 3c7c79e --reps 40`` (weighted mean, 10%
    ignored, 2-core EPYC), fwd+bwd against the max shift: 4x64x64x150
    1.09-1.20x faster (1.12-1.21x optax, before 0.94-1.10x), 8x19x128x128
    1.08-1.14x (1.46-1.52x optax), 4096x1000 1.26-2.0x, 16384x64 0.98-1.02x;
    ``--reduction none``: 1.09-1.11x.

    Not below ``_TARGET_SHIFT_MIN_ELEMENTS`` = 2**20 logits, where the
    fallback's finiteness check and loop cost more than the max pass (7
    more operations in the compiled step at 8192x64, one more pass split
    over the cores). The max shift against it, ``ab.py --base 50ac86a``
    (same case, 2-core EPYC): at 2**17-2**19 logits (``--reps 21 --block
    10``) 2048x256 1.36x faster (0.76x optax before, 1.03x now), 8192x64
    1.56x (0.66x to 1.03x), 262x1000 1.40x, 524x1000 1.29x, 6990x150 1.08x,
    32768x16 1.05x; at 2**14-2**16 (``--reps 9 --block 50``) 1600x19,
    1700x10, 3000x10, 1200x24, 2000x12 1.06-1.11x (0.91-0.95x optax before,
    0.97-1.02x now); ``--axis 1`` 8x19x12x12, 2x150x8x8, 16x5x16x16
    1.06-1.07x. Around 2**20-2**21 the target shift was 1.10-1.14x faster
    at 13982x150 in two processes; 4097x256, 1049x1000, 2098x1000, 16385x64
    and 65537x16 scattered by 0.8-1.4x either way.

    Not for one class, whose max is its target logit already: the check and
    the loop were all the shift changed. ``ab.py --base 7350f23 --reps 15``
    (fwd+bwd, weighted mean, 2-core EPYC): 19531x128x1 2.9x faster (2.9x ->
    8.4x optax), 9765x1x16x16 ``axis=1`` 2.4x, 4x512x512x1 1.14x; smoothed
    (``--label-smoothing 0.1``) 3.1x, 3.3x (0.43x -> 1.41x optax), 1.21x.
    """
    return (
        jax.default_backend() == "cpu"
        and jnp.dtype(dtype) == jnp.float32
        and math.prod(shape) >= _TARGET_SHIFT_MIN_ELEMENTS
        and _row_group(shape, axis, dtype) == 1
        and shape[axis] > 1
    )


# Class counts whose rows XLA:CPU's elementwise code runs slowly: it vectorizes
# the contiguous class dimension 16 floats at a time and the rest of a row
# scalar, so exp(x - m) over (positions, 19) float32 took 1.6-1.9 ms at 2.5M
# elements against 0.6 ms over rows of 304 (2-core AMD EPYC, jax 0.10.2,
# interleaved; from C = 50 up, and below 9, the rows ran near the fast speed).
# The fwd+bwd step at 8x128x128xC, grouped against per-row (median of 4-15
# processes): C = 9, 10, 19, 24, 33, 40, 41 1.10-1.26x faster, 36 1.01x,
# 45 and 47 0.81-0.83x (slower), hence up to 41.
_GROUPED_CLASSES = range(9, 42)
# A batch with a valid row whose target logit (so possibly its max) lies this
# far below its group's max takes the per-row shift instead: exp(x - shift)
# must not underflow where x is a row's maximum (e**-64 is 1.6e-28, a normal
# float32).
_GROUP_SPAN = 64.0


def _grouped_classes(c: int, itemsize: int) -> bool:
    """Whether rows of ``c`` classes of ``itemsize``-byte floats (channels-last,
    XLA:CPU) take :func:`_group_shifted_exp`'s grouped exponentials."""
    return itemsize == 4 and c in _GROUPED_CLASSES and c % 16 != 0


def _row_group(shape: tuple[int, ...], axis: int, dtype: Any) -> int:
    """How many consecutive positions :func:`_group_shifted_exp` shifts together
    (along the last position dimension, which they must divide): the fewest
    whose classes fill a multiple of 16 float32, or 1 (no grouping) where
    grouping does not pay (off XLA:CPU, classes not last, float64, small
    inputs (:func:`_cpu_small`), ...). bfloat16: see :func:`_grouped_16bit`."""
    c = shape[axis]
    k = 16 // math.gcd(c, 16)
    dtype = jnp.dtype(dtype)
    if (
        jax.default_backend() != "cpu"
        or _cpu_small(shape)
        or len(shape) < 2
        or axis != len(shape) - 1
        or not (dtype == jnp.float32 or _grouped_16bit(shape, axis, dtype))
        or not _grouped_classes(c, 4)
        or shape[-2] % k
    ):
        return 1
    return k


# bfloat16 rows of these many classes, in inputs of this many logits (at
# least MIN, under MAX), share grouped float32 exponentials in the
# "mean"/"sum" fwd+bwd.
_GROUPED_16BIT_CLASSES = range(9, 13)
_GROUPED_16BIT_MIN_ELEMENTS = 1 << 20
_GROUPED_16BIT_MAX_ELEMENTS = 3 << 20


def _grouped_16bit(shape: tuple[int, ...], axis: int, dtype: Any) -> bool:
    """Whether bfloat16 logits of ``shape`` (classes last) take grouped rows
    (:func:`_row_group`), with float32 exponentials shared by the row sums
    and the gradient (:func:`_cpu_exp_plan`) as for float32: 9-12 classes,
    from ``_GROUPED_16BIT_MIN_ELEMENTS`` up to ``_GROUPED_16BIT_MAX_ELEMENTS``
    logits, where XLA:CPU emits no AVX-512 code (:func:`_cpu_avx512`).

    Their gradient pass otherwise reads the logits over rows of 10 and
    computes the exponentials there, nearly scalar (11 of the 16.5 ms step at
    1953x128x10). Measured fwd+bwd with ``ab.py --base 7717fde --reps 15``
    (weighted mean, 10% ignored, 2-core EPYC, AVX2), against the per-row
    pass: 1953x128x9 1.32x faster, 1953x128x10 1.59x (0.76x optax before,
    1.21x now), 1953x128x11 1.26x, 8x128x128x12 1.15-1.46x, 820x128x10
    1.57x, 512x256x10 1.26x, 2100x128x10 1.36x, 2400x128x10 1.20x. Not
    taken where it measured slower: 3200x128x10 0.72x and 16x256x256x10
    0.77x (the float32 exponentials no longer fit this CPU's cache), 19-40
    classes (0.34-0.82x), ``reduction="none"`` (0.66x at 1953x128x10: its
    pass ends in XLA's conversion to bfloat16), small inputs (16x64x9:
    0.82x). The price is memory: the float32 exponentials are a temporary
    (1953x128x10: 443% of the logits' bytes, 80% before; optax 520%).

    With AVX-512 the per-row pass runs vectorised: on a 2-core AMD EPYC with
    AVX-512, grouped against per-row in one process, 1953x128x10 9.2 / 4.5
    ms (0.95x / 1.91x optax), 8x128x128x12 6.5 / 2.7 ms, 820x128x10 3.5 /
    1.6 ms; the same host with ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` 5.9 /
    9.3 ms (grouping wins, as on the AVX2 EPYC), with ``AVX512`` 6.1 / 2.9.
    """
    return (
        not _cpu_avx512()
        and jnp.dtype(dtype) == jnp.bfloat16
        and shape[axis] in _GROUPED_16BIT_CLASSES
        and _GROUPED_16BIT_MIN_ELEMENTS <= math.prod(shape) < _GROUPED_16BIT_MAX_ELEMENTS
    )


def _exp_diff(a: Array, b: Array) -> Array:
    """``exp(a - b)`` to float32 accuracy however far apart ``a`` and ``b``:
    the rounding error of ``a - b`` (Knuth's two-sum) is put back as the
    factor ``1 + err``. Plain ``exp(a - b)`` is off by up to ``|a - b| *
    2**-24`` relatively, 8 ulps at a distance of 64."""
    d = a - b
    back = d - a
    err = (a - (d - back)) + (-b - back)
    ed = _exp(d)
    # Where exp gives 0 (a masked class at -inf, a difference that overflows
    # to -inf) the two-sum is NaN: keep the 0.
    return jnp.where(ed == 0, ed, ed + ed * err)


def _shared_exp(xc: Array, m: Array, axis: int) -> tuple[Array, Array, Array]:
    """``(e, s, log s)``: ``e = exp(xc - m)`` (``m`` the row max, keepdims;
    materialised, shared by the row sum and the gradient), ``s`` its row sum,
    so that ``p = e / s``."""
    e = _exp(xc - m)
    s = jnp.sum(e, axis=axis, keepdims=True)
    return e, s, jnp.log(s)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _group_shifted_exp(
    xc: Array, x_t: Array, valid: Array, axis: int
) -> tuple[Array, Array, Array]:
    """``(e, s, m)`` for rows that :func:`_row_group` groups: ``m`` (keepdims)
    the largest logit of each group of consecutive positions, ``e = exp(xc -
    m)``, ``s`` its row sum; or, where any valid row's target logit ``x_t``
    lies more than ``_GROUP_SPAN`` below its ``m`` (or ``m`` is not finite),
    each row's max as ``m`` for the whole batch.

    One shift per group lets the exponentials run over the group's
    contiguous rows as one row of a multiple of 16 floats, 2-2.4x faster on
    XLA:CPU at 10-40 classes; the group max is a reduction over those rows
    too, and no per-row max is taken. :func:`_exp_diff` keeps them accurate
    to float32 rounding. A row that passes the check has its max (at least
    ``x_t``) within ``_GROUP_SPAN`` of the shift, so its largest
    exponentials are normal floats with ~23 e-folds to spare. The check
    fails for a row of NaN or +inf and a group of -inf only (through the max
    shift they give PyTorch's values); ignored rows, zeros in the result
    either way, do not count. The check reads ``x_t``, not the exponentials:
    with both the row sums and the loop reading them, XLA:CPU computed the
    exponentials twice. The fallback is a while loop of 0 or 1 trips (as in
    :func:`_target_shifted_exp`), so the derivative is given: ``m`` is held
    constant.
    """
    k = _row_group(xc.shape, axis, xc.dtype)
    *lead, b, c = xc.shape
    # Grouped along the last position dimension only: the others (a sharded
    # batch, a chunk's groups) are left as they are. Per-position maths on
    # the positions' shape, not (positions, 1): XLA:CPU ran a log over the
    # latter 4x slower.
    rows = xc.reshape(*lead, b // k, k * c)
    g = jax.lax.stop_gradient(jnp.max(rows, axis=-1, keepdims=True))
    m = jnp.repeat(g[..., 0], k, axis=-1)
    near = (x_t >= m - _GROUP_SPAN) & (jnp.abs(m) < jnp.inf)
    bad = ~jnp.all(near | ~valid)

    def by_max(carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        m = jax.lax.stop_gradient(jnp.max(xc, axis=axis))
        return carry[0] & False, _exp(xc - m[..., None]).reshape(rows.shape), m

    # The exponentials stay rows of k * c through the loop: a fusion whose
    # result is reshaped to (..., positions, c) loops over that shape.
    carry = (bad, _exp_diff(rows, g), m)
    _, e, m = jax.lax.while_loop(lambda carry: carry[0], by_max, carry)
    e = e.reshape(xc.shape)
    # Row sums of so few classes: a matrix-vector product ran 1.6-1.8x
    # faster on XLA:CPU than the reduction (19 and 40 classes).
    s = jnp.dot(e, jnp.ones((c,), e.dtype), precision=jax.lax.Precision.HIGHEST)
    return e, s[..., None], m[..., None]


_group_shifted_exp.defjvp(functools.partial(_held_shift_jvp, _group_shifted_exp))


# Where exp(x_t - shift) is at least this (e**-83), the grouped rows' loss is
# log(s / exp(x_t - shift)), both to float32's relative accuracy. Below it
# (only after the fallback, whose shift is the row's max: the check keeps a
# valid x_t within _GROUP_SPAN of a group's shift) it is (m - x_t) + log s,
# as for the other shifts.
_GROUP_TARGET_MIN_EXP = 2.0**-120


def _kernel_applies(pallas: bool, x: Array) -> bool:
    """Whether the kernel may take ``x``: enabled, float32 maths (no float64),
    and not empty (an empty input keeps torch_compat's NaN mean via XLA)."""
    return pallas and jnp.dtype(x.dtype).itemsize <= 4 and x.size > 0


# Float32 channels-last rows of these many classes may recompute their
# exponentials in the gradient's pass (see _recomputed_exp).
_RECOMPUTED_EXP_CLASSES = range(23, 42)


def _recomputed_exp(x: Array, axis: int) -> bool:
    """Whether XLA:CPU's fwd+bwd recomputes ``exp(x - m)`` in the gradient's
    pass instead of sharing materialised exponentials (:func:`_cpu_exp_plan`):
    float32 rows of 23 to 41 classes (``_RECOMPUTED_EXP_CLASSES``) that
    :func:`_row_group` does not group and whose row sums :func:`_native_row_sums`
    takes (from ``_CPU_SMALL_ELEMENTS`` up to 2^20 logits). The step is then
    the row max, one fused pass of the exponentials and their sum, and the
    gradient's pass, as in optax: the gradient is the one full-size array it
    writes, where the shared path writes the exponentials, then the
    gradient. Compiled temporaries (per-position arrays): 0.12-0.15x the
    logits' bytes against 0.09-0.11x shared (optax 0.21-0.41x).

    fwd+bwd, both interleaved in one process, 2 processes, 2-core EPYC
    (weighted mean, 10% ignored), 40K-1M logits, recomputed against shared,
    rows of 23 to 41 classes that are not grouped: 1.04-2.34x faster at 38
    of 42 shapes, 0.92-1.06x at the other 4 (38 classes, 1334x30, 1212x33);
    32 classes 1.19-2.34x (0.80-1.21x optax before, 1.17-1.91x after).
    Not elsewhere, where it measured slower: 17 to 22 classes 0.48-0.85x,
    44 to 63 classes 0.51-1.11x, grouped rows at 130K logits 0.58-0.90x
    (at 500K mixed, 0.91-1.32x), rows that :func:`_native_row_sums` does
    not sum (1.38x optax against 1.72x at 32768x40, grouped, with
    YNNPACK's sums). On other shapes,
    ``ab.py --base 6988c25 --reps 21 --block 10``, fwd+bwd: 8192x32 2.16x
    faster (0.76x optax before, 1.64x after), 6x50x50x33 1.76x, 10x37x37x27
    1.35x, 3x1000x41 1.32x, 5000x35 1.23x, 3000x33 1.20x (0.95x to 1.14x
    optax), 12x50x50x30 1.06x; ``reduction="none"`` (``--reps 11``):
    8192x32 2.08x, 10x37x37x27 1.67x, 4x64x64x32 1.48x, 6x50x50x33 1.37x,
    12x50x50x30 1.29x, 3000x33 1.10x, 3x1000x41 1.09x, 5000x35 1.00x.
    """
    axis = axis % x.ndim
    return (
        x.dtype == jnp.float32
        and x.shape[axis] in _RECOMPUTED_EXP_CLASSES
        and _row_group(x.shape, axis, x.dtype) == 1
        and _native_row_sums(x, axis)
    )


def _cpu_exp_plan(x: Array, axis: int, reduced: bool = False) -> dict[str, Any]:
    """Keyword arguments of :func:`_index_loss_and_grad` for XLA:CPU's
    whole-array fwd+bwd (``share_exp`` or ``grad_x``).

    32-bit and wider: one ``exp(x - m)`` shared by the row sum and the
    gradient (grouped where :func:`_row_group` says, else shifted by the
    target logit where :func:`_target_shift_applies`), except the float32
    rows that :func:`_recomputed_exp` recomputes (no keyword). Elsewhere,
    unshared, the gradient pass recomputes it with every per-position factor
    broadcast along the classes (reduction="none": 4.4 of the step's 6.5 ms
    at 8x128x128x19).
    16-bit: the gradient reads its own float32 view of ``x``; a conversion
    shared with the row reductions is materialised as a full-size float32
    temporary. Except where the float32 exponentials are shared: small
    inputs (:func:`_target_by_scatter`), and (``reduced``: the "mean"/"sum"
    step) bfloat16 rows that :func:`_grouped_16bit` groups.
    """
    if _recomputed_exp(x, axis):
        return {}
    if _target_by_scatter(x, axis):
        return dict(share_exp=True)
    if x.dtype.itemsize >= 4 or (reduced and _row_group(x.shape, axis, x.dtype) > 1):
        return dict(share_exp=True, target_shift=_target_shift_applies(x.shape, axis, x.dtype))
    return dict(grad_x=_upcast_apart(x))


# XLA:CPU's per-position passes over an odd number of positions take them in
# two parts, the first a multiple of this (see _aligned_rest).
_POSITION_ALIGN = 16


def _aligned_rest(shape: tuple[int, ...], axis: int, dtype: Any, with_grad: bool) -> int:
    """How many trailing positions XLA:CPU takes apart from the rest (0: none):
    channels-last logits of an odd number ``P`` of positions, ``P %
    _POSITION_ALIGN`` of them, for the forward where the rest takes the class
    slices (:func:`_sliced_applies`), for the fwd+bwd float32 rows of 2 to 41
    classes. The first ``P - rest`` positions (a multiple of 16) and the last
    ``rest`` are then computed apart (:func:`_position_parts`), and their
    sums added or their losses and gradients joined.

    XLA:CPU ran these passes several times slower over an odd number of
    positions: the forward at 65537x16 took 2.8-3.2 ms against 0.5-0.6 ms at
    65536x16 and 65538x16, the fwd+bwd at 104849x5 3.0 ms against 1.05 ms
    (the same compiled HLO but for the size; 2-core EPYC, jax 0.10.2). A
    multiple of 16 also lets the float32 rows of 9 to 41 classes group
    (:func:`_row_group`). Not for more classes: 16385x64 measured 1.3-1.4x
    slower in parts (the row reductions then read a copy of the slice), nor
    the forward of rows that take no slices (26209x19: 1.5x slower), nor
    small inputs (:func:`_cpu_small`; fwd+bwd 1000x19, 2001x10, 3001x5
    0.93-0.95x in parts), nor even counts, which ran fast in one part
    (fwd+bwd 65538x16, 104850x5, 52418x10, 26210x19, 200008x8 0.69-0.87x
    in parts, the forward 0.78-1.16x).

    Measured against one part, ``ab.py --base 20bc5d8 --reps 9 --block 10``
    (weighted mean, 10% ignored, 2-core EPYC): forward 65537x16 3.35x faster
    (0.38x optax before, 1.28x now), 104849x5 3.65x, 52417x10 4.66x, 65537x2
    2.42x, 6553x10 5.1x; fwd+bwd 65537x2 3.82x (0.75x to 2.86x optax),
    104849x5 1.86x, 26209x19 1.87x (0.98x to 1.83x optax), 3001x33 1.81x,
    6553x10 1.51x, 65537x16 1.44x, 52417x10 1.44x; ``reduction="none"``
    fwd+bwd (``--base 2d76f41 --reduction none``) 65537x2 3.64x (0.71x to
    2.60x optax), 104849x5 2.38x (0.91x to 2.15x), 26209x19 1.54x, 52417x10
    1.36x, 3001x33 1.33x, 65537x16 1.14x.
    """
    if jax.default_backend() != "cpu" or len(shape) < 2 or axis % len(shape) != len(shape) - 1:
        return 0
    c = shape[-1]
    positions = math.prod(shape[:-1])
    rest = positions % _POSITION_ALIGN
    if positions % 2 == 0 or positions < _POSITION_ALIGN or _cpu_small(shape):
        return 0
    if with_grad:
        applies = jnp.dtype(dtype) == jnp.float32 and 2 <= c <= 41
    else:
        main = jax.ShapeDtypeStruct((positions - rest, c), dtype)
        applies = _sliced_applies(main, 1)
    return rest if applies else 0


def _position_parts(rest: int, x: Array, *per_position: Array | None) -> list[tuple]:
    """``[(x, *per_position)]`` for the first ``P - rest`` positions and for
    the last ``rest`` (:func:`_aligned_rest`): ``x`` (classes last) as ``(P,
    C)``, each per-position array (or ``None``) as ``(P,)``; views, then
    slices that XLA fuses into their consumers."""
    c = x.shape[-1]
    flat = [x.reshape(-1, c)] + [None if v is None else v.reshape(-1) for v in per_position]
    split = flat[0].shape[0] - rest
    return [
        tuple(None if v is None else v[:split] for v in flat),
        tuple(None if v is None else v[split:] for v in flat),
    ]


def _by_parts(fn: Any, with_grad: bool, x: Array, axis: int, *per_position: Array | None) -> list:
    """``[fn(x, *per_position, axis)]``, or that of each of the two parts
    where :func:`_aligned_rest` says (class axis 1 then); join the results
    with :func:`_joined`."""
    rest = _aligned_rest(x.shape, axis, x.dtype, with_grad)
    if not rest:
        return [fn(x, *per_position, axis)]
    return [fn(*part, 1) for part in _position_parts(rest, x, *per_position)]


def _joined(values: list, shape: tuple[int, ...]) -> Array:
    """:func:`_by_parts`'s per-position (or per-logit) results as one array of ``shape``."""
    return values[0] if len(values) == 1 else jnp.concatenate(values).reshape(shape)


def _xla_losses(
    x: Array,
    t: Array,
    valid: Array,
    w: Array | None,
    eps: float,
    normalize: bool,
    axis: int,
    with_grad: bool,
    reduced: bool = False,
    grad_scale: Array | None = None,
) -> tuple[Array, Array | None]:
    """The XLA path's per-position losses (``t.shape``) and, ``with_grad``,
    their gradients (``x.shape``, compute dtype, times ``grad_scale``, one
    factor per position, if given): the formulation :func:`_cpu_exp_plan`
    picks, over :func:`_by_parts`. ``reduced``: for a reduced loss, whose
    caller converts the gradient with :func:`_to_dtype` (the plan of
    :func:`_plain_total_and_grad`), not for ``reduction="none"``, whose
    gradient reverse mode converts with XLA's ``convert``."""
    if not with_grad:

        def loss(x, t, valid, axis):
            return _index_loss_and_grad(x, t, valid, w, eps, normalize, axis, with_grad=False)[0]

        return _joined(_by_parts(loss, False, x, axis, t, valid), t.shape), None

    def one_part(x, t, valid, scale, axis):
        on_cpu = normalize and jax.default_backend() == "cpu"
        plan = _cpu_exp_plan(x, axis, reduced=reduced) if on_cpu else {}
        # Reverse mode ends the gradient's pass with XLA's convert to
        # bfloat16 (the transpose of x_dot's upcast in _index_loss_jvp),
        # which XLA:CPU does not vectorise: the whole pass runs scalar, where
        # _exp's polynomial is slower than XLA's exp (1953x128x10 bfloat16
        # fwd+bwd: 9.2-9.9 ms against 3.9-4.5).
        xla_exp = x.dtype == jnp.bfloat16 and not reduced
        return _index_loss_and_grad(
            x,
            t,
            valid,
            w,
            eps,
            normalize,
            axis,
            True,
            xla_exp=xla_exp,
            grad_scale=scale,
            scatter_target=_target_by_scatter(x, axis, normalize),
            **plan,
        )

    parts = _by_parts(one_part, True, x, axis, t, valid, grad_scale)
    return _joined([v for v, _ in parts], t.shape), _joined([g for _, g in parts], x.shape)


# ---------------------------------------------------------------------------
# jax.vmap: the batch folded into the positions
# ---------------------------------------------------------------------------


def _batch_broadcast(size: int, in_batched: Any, arrays: tuple) -> list[Array | None]:
    """The per-position (or per-example) ``arrays`` of a batched call, each
    with the batch's leading dimension of ``size``: broadcast where
    ``in_batched`` says it has none (``None`` stays ``None``).

    A fold computes the batched logits (``(size,) + S``, class axis ``axis``
    of ``S``) as one input with class axis ``axis + 1``: the same array, its
    positions all the examples'. Not as ``(size * S[0],) + S[1:]``: that
    view measured as fast in float32 and slower in bfloat16 (16 examples of
    32x8000, fwd+bwd 3.5 against 2.5 ms), its gradient reshaped back to the
    batch costing a pass of its own."""
    return [
        v if v is None or batched else jnp.broadcast_to(v, (size,) + jnp.shape(v))
        for v, batched in zip(arrays, in_batched, strict=True)
    ]


def _can_fold(in_batched: Any, *args: Any) -> bool:
    """Whether :func:`_batch_folded` folds a call ``(x, t, valid or where, w,
    ...)``: the logits batched, the class weights not (one set per example
    is not a per-position array)."""
    return bool(in_batched[0]) and not in_batched[3]


def _at_positions(s: Array, shape: tuple[int, ...]) -> Array:
    """One value per example (``s`` of shape ``(B,)``) at each of its
    positions (``shape``, ``(B, ...)``); a scalar ``s`` as it is."""
    if jnp.ndim(s) == 0:
        return s
    return jnp.broadcast_to(s.reshape(s.shape + (1,) * (len(shape) - 1)), shape)


def _example_sums(v: Array) -> Array:
    """Each example's sum of per-position values ``v`` (``(B, ...)``); an
    empty batch included."""
    return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def _batch_folded(body: Any, fold: Any, can_fold: Any) -> Any:
    """``body`` as is, but under ``jax.vmap`` computed by
    ``fold(size, in_batched, *args)`` on the batched arguments where
    ``can_fold(in_batched, *args)``, else by ``jax.vmap(body)``.

    The XLA path picks its formulation from the logits' shape, and under
    ``jax.vmap`` it sees one example's: a per-example loss (``vmap`` over
    rows, images or ensemble members) took the plan of a small input for the
    whole batch. Folded, the batch is one call on all the positions, planned
    for its real size. Only primal computations are wrapped (the body of a
    ``custom_jvp`` function, or a branch under one), never a function that
    reverse mode differentiates: ``custom_vmap`` has no transpose rule.
    """
    f = jax.custom_batching.custom_vmap(body)

    @f.def_vmap
    def rule(axis_size: int, in_batched: Any, *args: Any) -> tuple[Any, Any]:
        if can_fold(in_batched, *args):
            out = fold(axis_size, in_batched, *args)
        else:
            in_axes = tuple(0 if b else None for b in in_batched)
            out = jax.vmap(body, in_axes=in_axes, axis_size=axis_size)(*args)
        return out, jax.tree.map(lambda _: True, out)

    return f


def _batch_folded_differentiable(body: Any, fold: Any, can_fold: Any) -> Any:
    """:func:`_batch_folded` for a ``body`` that reverse mode may
    differentiate (one called by a JVP rule, which second-order
    differentiation differentiates): a ``custom_jvp`` whose derivative is
    ``body``'s own, around the folding ``custom_vmap``, so no derivative ever
    reaches the latter."""
    folded = _batch_folded(body, fold, can_fold)

    @jax.custom_jvp
    def f(*args: Any) -> Any:
        return folded(*args)

    @f.defjvp
    def f_jvp(primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        return jax.jvp(body, primals, tangents)

    return f


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _index_loss(
    x: Array,
    t: Array,
    valid: Array,
    w: Array | None,
    eps: float,
    normalize: bool,
    axis: int,
    pallas: bool = False,
) -> Array:
    # Primal only: evaluation never pays for the gradient.
    def xla(x, t, valid, w):
        return _xla_losses(x, t, valid, w, eps, normalize, axis, with_grad=False)[0]

    def fold(size, in_batched, x, t, valid, w):
        t, valid = _batch_broadcast(size, in_batched[1:3], (t, valid))
        return _xla_losses(x, t, valid, w, eps, normalize, axis + 1, with_grad=False)[0]

    def kernel(x, t, valid, w):
        return _kernel_stats_pass(x, t, valid, w, eps, axis)[0]

    xla = _batch_folded(xla, fold, _can_fold)

    # NLL's per-position loss is a gather: no kernel for it.
    use_kernel = normalize and _kernel_applies(pallas, x)
    return _kernels.dispatch(use_kernel, kernel, xla, x, t, valid, w)


@_index_loss.defjvp
def _index_loss_jvp(
    eps: float, normalize: bool, axis: int, pallas: bool, primals: tuple, tangents: tuple
) -> tuple[Array, Array]:
    # Liger-style fusion expressed as a JVP: dl = sum_c g_c dx_c. Reverse mode
    # transposes this into dx = g * dl, so the gradient is formed in the pass
    # that computes the loss and the backward only rescales it; forward mode
    # and higher orders keep working because g is built from ordinary ops.
    x, t, valid, w = primals
    x_dot = tangents[0]

    def xla(x, t, valid, w):
        return _xla_losses(x, t, valid, w, eps, normalize, axis, with_grad=True)

    def fold(size, in_batched, x, t, valid, w):
        t, valid = _batch_broadcast(size, in_batched[1:3], (t, valid))
        return _xla_losses(x, t, valid, w, eps, normalize, axis + 1, with_grad=True)

    # This rule's body is differentiated itself for second order: the fold
    # only where it is not (_batch_folded_differentiable).
    xla = _batch_folded_differentiable(xla, fold, _can_fold)

    def kernel(x, t, valid, w):
        # The kernel reads the logits once for the loss and the row
        # statistics; g stays an XLA expression of x and them, which XLA
        # fuses into its consumer (reverse mode: dx = g * dl, one read of x
        # and one write of dx), instead of a g buffer written and re-read.
        loss, m, log_s = _kernel_stats_pass(x, t, valid, w, eps, axis)
        stats = (m, log_s)
        _, grad = _index_loss_and_grad(
            x, t, valid, w, eps, normalize, axis, with_grad=True, stats=stats
        )
        return loss, grad

    use_kernel = normalize and _kernel_applies(pallas, x)
    loss, grad = _kernels.dispatch(use_kernel, kernel, xla, x, t, valid, w)
    assert grad is not None
    loss_dot = jnp.sum(grad * x_dot.astype(grad.dtype), axis=axis)
    return loss, loss_dot


def _xla_stats(
    x: Array, t: Array, valid: Array, w: Array | None, eps: float, axis: int
) -> tuple[Array, Array, Array]:
    """:func:`_kernel_stats_pass`'s result by XLA (its derivative)."""
    m, log_s = _row_stats(x, axis)
    stats = (jnp.squeeze(m, axis), jnp.squeeze(log_s, axis))
    loss, _ = _index_loss_and_grad(x, t, valid, w, eps, True, axis, with_grad=False, stats=stats)
    return (loss, *stats)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _kernel_stats_pass(
    x: Array, t: Array, valid: Array, w: Array | None, eps: float, axis: int
) -> tuple[Array, Array, Array]:
    """Cross-entropy's per-position ``(loss, m, log s)`` by the kernel (CUDA)."""
    from jaxloss._kernels.cross_entropy import cross_entropy_pallas

    # Inside shard_map: every operand varying over the same mesh axes.
    refs = (x, t, valid, w)
    x, t, valid, w = (None if a is None else _varying_like(a, *refs) for a in refs)
    config = dict(ignore_index=None, eps=eps, normalize=True, axis=axis)

    def run(x: Array, t: Array, valid: Array, w: Array | None) -> tuple[Array, ...]:
        one = _varying_like(jnp.ones((), jnp.float32), x)
        out, _ = cross_entropy_pallas(
            x, t, valid, w, one, with_grad=False, per_position=True, stats=True, **config
        )
        return out

    out = _partitioned(run, (x, t, valid, w), ("x", "pos", "pos", "rep"), ("pos",) * 3, axis)
    return tuple(v.astype(_compute_dtype(x.dtype)) for v in out)


@_kernel_stats_pass.defjvp
def _kernel_stats_pass_jvp(
    eps: float, axis: int, primals: tuple, tangents: tuple
) -> tuple[tuple[Array, Array, Array], tuple[Array, Array, Array]]:
    # Reached when the gradient itself is differentiated (pallas_call has no
    # differentiation rule): differentiate the XLA formulation instead.
    x, t, valid, w = primals
    return jax.jvp(lambda x: _xla_stats(x, t, valid, w, eps, axis), (x,), (tangents[0],))


def _broadcast_weight(w: Array, ndim: int, axis: int) -> Array:
    shape = [1] * ndim
    shape[axis] = w.shape[0]
    return w.reshape(shape)


def _weighted_gap_sum(
    x: Array, xc: Array, m: Array, w: Array | None, axis: int, forward: bool = False
) -> Array:
    """``sum_c w_c * (m - xc_c)`` along ``axis`` (no keepdims): label
    smoothing's weighted term, for logits ``x`` (``xc`` in the compute dtype,
    ``m`` each row's shift, keepdims); ``w = None``: unweighted, by the same
    sums, except for a float32 forward (``forward``: no gradient in the
    pass) over more than :data:`_GAP_SLICES_UNWEIGHTED_FWD_MAX` strided
    classes, which keeps ``jnp.sum``.

    Unweighted smoothing had kept ``jnp.sum`` (YNNPACK): with bfloat16
    logits through float32 copies of its own, fwd+bwd temporaries of
    401-439% of the logits (512x32000, 4x64x64x150, 8x128x128x19,
    4x150x64x64, 8x19x128x128, 2x64x128x19 bfloat16; now 4-53%). Unweighted
    ``label_smoothing=0.1``, both forms in one process, 2-core EPYC, fwd /
    fwd+bwd faster by: 512x32000 bfloat16 3.05x / 2.92x (1.33x -> 3.88x
    optax), 64x1000 bfloat16 fwd+bwd 1.75-1.93x (0.90-0.95x -> 1.67-1.74x);
    float32 8x128x128x19 1.42x / 1.26x, 4x64x64x150 1.27x / 1.35x,
    26210x19 1.45x / 1.28x, 8192x32 1.09x / 1.55x, 4096x1000 1.03x / 1.14x,
    2x64x128x19 1.22x / 1.28x; over axis 1 8x19x128x128 1.54x / 1.39x,
    8x64x64x64 1.13x / 1.19x, 4x150x64x64 fwd+bwd 1.11x, 32x150x1024 fwd+bwd
    1.33x; inputs under 2**15 logits 0.85-1.09x (noise of microseconds).

    On XLA:CPU summed by :func:`_row_sum` where the exponentials' row sums
    are (:func:`_native_row_sums`), for one row of classes, and where the
    positions span more than one dimension. ``jnp.sum`` of this product goes
    to YNNPACK, which took it slowly over more than two dimensions (the class
    weights broadcast into them), for 16-bit logits through a float32 copy of
    its own, and, for one row, after writing the row's shift out as a row.
    Collapsing the positions to one dimension instead (a free reshape) was
    faster still at 4x64x64x150 and 8x128x128x19 float32 (1.0 and 1.6 ms),
    but merges dimensions that a sharding splits: a sequence-sharded
    ``(batch, sequence, classes)`` batch then gathered its shards. The sum
    alone, 2-core EPYC, one process, median of 11, before -> now:
    4x64x64x150 float32 4.7 -> 1.4 ms, 8x128x128x19 5.4 -> 2.3 ms,
    8x19x128x128 5.8 -> 2.1 ms, 512x32000 bfloat16 33 -> 3.8 ms, 1x32000
    bfloat16 0.11 -> 0.04 ms; 3x4096 bfloat16 keeps ``jnp.sum`` (0.05 ms,
    0.09 ms by :func:`_row_sum`).

    Over a class axis that is not the last (NCHW), of up to
    :data:`_GAP_SLICES_MAX_CLASSES` classes, XLA:CPU summed the product
    slowly whatever the form (``jnp.sum``, :func:`_row_sum`, the flat view
    ``(N, C, H*W)``: 8-9 ms at 4x150x64x64 float32, 14 ms at 8x32x128x128),
    so the classes are summed slice by slice there (see
    :func:`_class_slice_sum`).
    """
    axis = axis % x.ndim
    if (
        w is None
        and forward
        and x.dtype.itemsize >= 4
        and axis != x.ndim - 1
        and x.shape[axis] > _GAP_SLICES_UNWEIGHTED_FWD_MAX
    ):
        return jnp.sum(m - xc, axis=axis)
    if _gap_slices_apply(x, axis):
        m_pos = jnp.squeeze(m, axis)
        if x.dtype == jnp.bfloat16:
            ones = jnp.ones((x.shape[axis],), jnp.float32)
            return _bf16_gap_slice_sum(x, m_pos, ones if w is None else w, axis)
        if w is None:
            return _class_slice_sum(lambda c, v: m_pos - v, xc, axis)
        return _class_slice_sum(lambda c, v: w[c] * (m_pos - v), xc, axis)
    gap = m - xc if w is None else _broadcast_weight(w, x.ndim, axis) * (m - xc)
    return _class_sum(gap, x, axis)


# Most classes :func:`_class_slice_sum` sums one by one: its program grows
# with the classes (compile 0.4 s at 150, 0.7 s at 256), and at 256 it
# measured no faster than the reduction (4x256x64x64: 20 against 16-24 ms,
# 4x256x32x32: 4.6 against 3.7 ms).
_GAP_SLICES_MAX_CLASSES = 200

# The unweighted float32 forward sums more strided classes than this by
# ``jnp.sum`` (see _weighted_gap_sum): the class slices measured 1.02-1.21x
# its speed at 48-100 classes but 0.82-0.87x at 150-200 (4x150x64x64,
# 4x150x32x32, 4x200x64x64, 32x150x1024; their fwd+bwd 1.11-1.33x faster).
_GAP_SLICES_UNWEIGHTED_FWD_MAX = 100


def _gap_slices_apply(x: Array, axis: int) -> bool:
    """Whether :func:`_weighted_gap_sum` sums class slices: XLA:CPU, a class
    axis that is not the last, 2 to :data:`_GAP_SLICES_MAX_CLASSES`
    classes."""
    axis = axis % x.ndim
    return (
        jax.default_backend() == "cpu"
        and axis != x.ndim - 1
        and 2 <= x.shape[axis] <= _GAP_SLICES_MAX_CLASSES
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _bf16_gap_slice_sum(x: Array, m_pos: Array, w: Array, axis: int) -> Array:
    """:func:`_weighted_gap_sum` by class slices of bfloat16 logits ``x``
    (``m_pos``: the shift, without the class axis), sliced as their bits.
    XLA:CPU took bfloat16 slices from a float32 copy of the logits, shared
    with the row statistics' sums: compiled temporaries of 204-232% of the
    logits, fwd+bwd and forward alike (4x150x64x64, 8x150x128x128,
    16x19x512x1024); as bits 5.3-42% for the fwd+bwd and 105-142% for the
    forward (a copy of the bits), and 1.0-1.3x faster. Differentiated (the
    bits are not) by the plain expression's derivative."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return _class_slice_sum(lambda c, v: w[c] * (m_pos - _from_bf16_bits(v)), bits, axis)


@_bf16_gap_slice_sum.defjvp
def _bf16_gap_slice_sum_jvp(axis: int, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    x, m_pos, w = primals
    x_dot, m_dot, w_dot = tangents
    xc, m = x.astype(jnp.float32), jnp.expand_dims(m_pos, axis)
    wb, wb_dot = (_broadcast_weight(v.astype(jnp.float32), x.ndim, axis) for v in (w, w_dot))
    m_dot = jnp.expand_dims(m_dot, axis)
    out_dot = jnp.sum(wb * (m_dot - x_dot.astype(jnp.float32)) + wb_dot * (m - xc), axis=axis)
    return _bf16_gap_slice_sum(x, m_pos, w, axis), out_dot


def _class_slice_sum(term: Any, x: Array, axis: int) -> Array:
    """``sum_c term(c, x[..., c, ...])`` over the class axis ``axis`` of
    ``x`` (logits in the compute dtype, or bfloat16 logits' bits: ``term``
    converts), no keepdims, as one elementwise chain over the class slices: XLA
    fuses it into one loop over the positions, each class a contiguous
    plane read once. 2-core EPYC, float32, one process, median of 21,
    ``jnp.sum`` -> slices: 4x150x64x64 9.3 -> 1.2-1.5 ms, 8x64x64x64 8.4 ->
    0.8 ms, 8x32x128x128 14.5 -> 1.1 ms, 8x19x128x128 5.1 -> 0.5 ms,
    4x150x32x32 2.2 -> 0.4 ms, 16x150x16x16 2.4 -> 0.2 ms (a blocked
    ``fori_loop`` over 16 or 32 classes: 2.3-3.3 ms and 11-53% temporaries;
    a dot with the weights: 2.7-3.0 ms and a transposed copy)."""
    acc = None
    for c in range(x.shape[axis]):
        v = term(c, jax.lax.index_in_dim(x, c, axis, keepdims=False))
        acc = v if acc is None else acc + v
    # Fused into a consumer over the logits' shape the chain would run once
    # per class: x * chain[:, None] took 177 ms against 2.2 ms at
    # 4x150x64x64 with the chain written out (by _whole), and an
    # optimization_barrier does not stop that fusion (XLA:CPU expands it
    # first). Its one caller, the smoothing term, feeds only the loss, and
    # no consumer of that loss fused it: reduction="none" followed by
    # x * l[:, None], exp(-l)[:, None] * x or (l[:, None] > 1) * x took
    # 2.5-6.8 ms, float32 and bfloat16, weights as an argument or a constant.
    # Sums that feed the gradient's pass (probability targets' sum of
    # w q', tried) do fuse so: 15-190 ms. _whole needs a runtime flag,
    # which over sharded positions is a collective; not taken.
    return acc


def _class_sum(v: Array, x: Array, axis: int, spread: bool = True, flat: bool = False) -> Array:
    """``jnp.sum(v, axis)`` (no keepdims) of a product ``v`` shaped like the
    logits ``x``, by :func:`_row_sum` on XLA:CPU where YNNPACK took such sums
    slowly (see :func:`_weighted_gap_sum`); without ``spread`` not for
    positions over several dimensions just because they are.

    ``flat`` (XLA:CPU, two or more dimensions after the class axis): by
    ``jnp.sum`` over the view ``(..., C, n)`` of those dimensions as one (a
    free reshape; see :func:`_soft_loss_jvp`). YNNPACK summed a product
    with the class weights broadcast along a strided class axis 7x slower
    over ``(N, C, H, W)`` than over ``(N, C, H*W)`` (4x150x64x64: 9.3 and
    1.4 ms), XLA's own reduction over that axis took 7-10 ms."""
    axis = axis % x.ndim
    cpu = jax.default_backend() == "cpu"
    if flat and cpu and x.ndim - axis - 1 >= 2:
        rest = v.shape[axis + 1 :]
        flat_v = v.reshape(v.shape[: axis + 1] + (math.prod(rest),))
        return jnp.sum(flat_v, axis=axis).reshape(v.shape[:axis] + rest)
    one_row = x.size == x.shape[axis] and axis == x.ndim - 1
    if _native_row_sums(x, axis) or (cpu and (one_row or (spread and x.ndim > 2))):
        return _row_sum(v, axis)
    return jnp.sum(v, axis=axis)


# ---------------------------------------------------------------------------
# index targets, reduced ("mean"/"sum"): one chunked pass, no full-size temps
# ---------------------------------------------------------------------------
#
# ``_index_loss`` above leaves fusion to XLA, which materialises every
# per-position statistic (max, sum of exponentials, target weight, loss): four
# float32 arrays the size of the label map. For a mean or a sum the loop below
# visits the positions chunk by chunk instead: each chunk's statistics live in
# chunk-sized buffers (cache-resident on CPU), the loss is summed on the fly,
# and -- under differentiation -- the chunk's d(logits) is written straight
# into a buffer in the logits' dtype, already scaled by the reduction's
# ``1 / denominator``. For ``jax.grad`` of the loss the cotangent is then
# exactly 1, XLA drops the rescale, and that buffer *is* the returned gradient:
# one read of the logits, one write of the gradient, temporaries of a few
# chunks.

# Logit elements per chunk. On XLA:CPU steps are at least 2**18 elements
# (1 MiB of float32), twice that for channels-last rows (not grouped ones,
# see _chunks); beyond that 1/1024 of the input keeps the chunk's few
# float32 temporaries well under 1% of the logits. Measured on the 2-core
# dev machine (same process, interleaved): channels-last fwd+bwd with 2**19
# against 2**18 was 1.09-1.17x faster at 16x512x1024x19, 16x256x256x19 and
# 8x128x128x150 and 1.04x at 2048x32000 (temporaries 0.4% of the logits at
# seg19, before grouping), while NCHW (16x19x256x256) fell off a cliff from
# 2**19 up (108 against 56-60 ms from 2**17 to 1.5 * 2**18).
#
# Accelerators need bigger steps still: on an H200 a step cost ~20 us
# whatever its size (160-256 steps of n/256: 3-7 ms, 0.15-0.24 of the copy
# floor, benchmarks/results/bench-full-NVIDIA_H200-*.json, rows jaxloss_xla),
# and the temporaries measured 0.15% of the logits at seg19's n/160 steps.
# So 32 steps: temporaries ~0.75%, launch cost ~0.6 ms (predicted from those
# figures, not yet measured).
_CPU_CHUNK_ELEMENTS = 1 << 18


def _chunk_elements(n: int, rows: bool = False) -> int:
    """Logit elements per chunk of ``n``; ``rows``: each position's classes
    are contiguous (channels-last)."""
    if jax.default_backend() == "cpu":
        return max(_CPU_CHUNK_ELEMENTS * (2 if rows else 1), n // 1024)
    return min(max(1 << 20, n // 32), 1 << 24)


def _groups(size: int) -> int:
    """How many groups the chunked loops keep whole along a dimension of
    ``size``: gcd(size, device count), so that a dimension sharded over the
    devices (GSPMD ``jit``) is sliced by each device locally."""
    return math.gcd(size, jax.device_count())


class _Chunking:
    """How the chunked loops cut the positions: into parts A (``first``
    dimensions) and B (``second``), each led by gcd(its first dimension,
    device count) groups that every chunk spans whole, so that a dimension
    sharded over the devices under GSPMD ``jit`` is sliced by each device
    locally (a slice along a sharded dimension would make XLA gather the
    whole array onto every device). Chunks are cut along A and B only.

    ``view``/``chunk`` are the shapes of the array and of one chunk, with the
    ``c`` classes before B (``classes_between``) or last, or none without
    ``c``; ``pview``/``pchunk`` the same without the classes. Dimensions of
    size 1 are left out: with them XLA:CPU laid the reshaped logits out
    differently from the loop's carry and copied them whole on one device.
    """

    def __init__(
        self,
        first: tuple[int, ...],
        second: tuple[int, ...],
        c: int | None = None,
        classes_between: bool = False,
        itemsize: int = 4,
        with_grad: bool = True,
    ) -> None:
        g0 = _groups(first[0]) if first else 1
        g1 = _groups(second[0]) if second else 1
        self.g0 = g0
        self.pa, self.pb = math.prod(first) // g0, math.prod(second) // g1
        rows = c is not None and not classes_between
        self.ra, self.rb = _chunks(self.pa, c or 1, self.pb, g0 * g1, itemsize, rows, with_grad)
        self.nb = -(-self.pb // self.rb)
        self.steps = -(-self.pa // self.ra) * self.nb
        order = ["g0", "a", "c", "g1", "b"] if classes_between else ["g0", "a", "g1", "b", "c"]
        full = {"g0": g0, "a": self.pa, "g1": g1, "b": self.pb, "c": c}
        part = {"g0": g0, "a": self.ra, "g1": g1, "b": self.rb, "c": c}
        self.dims = [d for d in order if (d == "c" and c is not None) or (d != "c" and full[d] > 1)]
        self.pdims = [d for d in self.dims if d != "c"]
        self.view = tuple(full[d] for d in self.dims)
        self.chunk = tuple(part[d] for d in self.dims)
        self.pview = tuple(full[d] for d in self.pdims)
        self.pchunk = tuple(part[d] for d in self.pdims)
        self.cax = self.dims.index("c") if c is not None else None

    @classmethod
    def of_logits(
        cls, shape: tuple[int, ...], axis: int, itemsize: int, with_grad: bool = True
    ) -> _Chunking:
        """The cut of logits of ``shape`` (class axis ``axis >= 0``), for a
        pass that writes the gradient or not (``with_grad``, see :func:`_chunks`).
        Channels-last (N, d1.., C): part A is N, part B d1..; otherwise the
        dimensions before the class axis and those after it."""
        lead, trail = shape[:axis], shape[axis + 1 :]
        c = shape[axis]
        if trail:
            return cls(lead, trail, c, classes_between=True, itemsize=itemsize, with_grad=with_grad)
        return cls(lead[:1], lead[1:], c, itemsize=itemsize, with_grad=with_grad)

    def at(self, i: Array) -> tuple[tuple[Array, ...], tuple[Array, ...], Array]:
        """Step ``i``'s chunk: its start in ``view``, its start in ``pview``,
        and ``fresh``, its positions that the chunk before it did not cover
        (the last chunk along each part is shifted back to fit)."""
        ia, ib = i // self.nb, i % self.nb
        a0 = jnp.minimum(ia * self.ra, self.pa - self.ra)
        b0 = jnp.minimum(ib * self.rb, self.pb - self.rb)
        at = {"a": a0, "b": b0}
        i0 = jnp.zeros((), a0.dtype)
        fresh = jnp.ones(self.pchunk, bool)
        for name, start, nominal in (("a", a0, ia * self.ra), ("b", b0, ib * self.rb)):
            if name in self.pdims:
                index = jax.lax.broadcasted_iota(jnp.int32, self.pchunk, self.pdims.index(name))
                fresh = fresh & (index + start >= nominal)
        return (
            tuple(at.get(d, i0) for d in self.dims),
            tuple(at.get(d, i0) for d in self.pdims),
            fresh,
        )


def _chunks(
    a: int,
    c: int,
    b: int,
    g: int = 1,
    itemsize: int = 4,
    rows: bool = False,
    with_grad: bool = True,
) -> tuple[int, int]:
    """Chunk extents ``(ra, rb)`` along the position parts ``A`` and ``B`` of
    the logits' view (``c`` classes a position of ``itemsize`` bytes each;
    each chunk spans ``g`` groups; ``rows``: a position's classes are
    contiguous, channels-last, else part B's positions are; ``with_grad``:
    the pass writes the gradient)."""
    # Grouped rows (_group_shifted_exp) hold the chunk's logits and exponentials
    # besides its gradient: half-size chunks keep the temporaries at 0.36% of
    # seg19's logits, as fast (fwd+bwd 1.25-1.30x optax either way). Not the
    # forward on XLA:CPU, which groups nothing: with half-size chunks (N,
    # 2048, C) ran at 0.78x optax over 41 classes and 0.92x over 33
    # (PERFORMANCE.md). Elsewhere, unmeasured, as before.
    cpu = jax.default_backend() == "cpu"
    grouped = rows and (with_grad or not cpu) and _grouped_classes(c, itemsize)
    target = max(1, _chunk_elements(g * a * c * b, rows and not grouped) // g)
    if c * b <= target:
        return _balanced(a, target // (c * b), itemsize * c * b), b
    return 1, _balanced(b, target // c, itemsize * (c if rows else 1))


def _balanced(n: int, want: int, stride: int) -> int:
    """A chunk extent near ``want`` (of ``n``) that cuts ``n`` into nearly equal
    chunks starting at 64-byte boundaries (``stride`` bytes a step).

    On XLA:CPU the chunk's slice and the elementwise code reading it run far
    slower from unaligned starts: at 16x256x256x19 float32, fwd+bwd took
    81-91 ms with 13797-position chunks against 57-73 ms with 13120 (20
    interleaved repetitions, same process; ``benchmarks/PERFORMANCE.md``). Equal
    chunks also keep the shifted last chunk's overlap small. Small chunks
    (tests) are only balanced.
    """
    want = max(1, min(n, want))
    count = -(-n // want)
    size = -(-n // count)
    align = 64 // math.gcd(stride, 64)
    if size >= 8 * align:
        size = -(-size // align) * align
    return min(n, size)


# XLA:CPU below this many bytes of logits: the whole-array formulation.
_CPU_LOOP_MIN_BYTES = 64 << 20


def _loop_writes_grad(x: Array) -> bool:
    """Whether the chunked loop suits ``x`` on the default backend.

    XLA:CPU converts every 16-bit floating op to float32, slices and in-place
    updates included; inside a loop that hoists a float32 copy of the whole
    input and turns each chunk's write into a rewrite of the whole buffer.
    There, 16-bit inputs take :func:`_plain_total_and_grad` instead (row
    statistics by fused reductions, the gradient one elementwise pass).
    For float32 the loop is 1.6-2.1x slower than the whole-array
    formulation at a few MiB (``bench.py --small`` shapes, aligned chunks;
    1.7-3.7x before them) and as fast from 80 MB up, where its temporaries
    (a few chunks instead of several per-position arrays) are what matters.
    """
    if jax.default_backend() != "cpu":
        return True
    return x.dtype.itemsize >= 4 and x.size * x.dtype.itemsize >= _CPU_LOOP_MIN_BYTES


# XLA:CPU channels-last rows of at least this many classes: the whole-array
# passes at any size (_takes_loop).
_CPU_WIDE_ROW_CLASSES = 1024


def _takes_loop(x: Array, axis: int) -> bool:
    """Whether the XLA path of logits ``x`` (class axis ``axis``) takes the
    chunked loop: where :func:`_loop_writes_grad` says, except XLA:CPU's
    channels-last rows of ``_CPU_WIDE_ROW_CLASSES`` classes or more.

    Those the whole-array passes compute faster and in less: their
    per-position arrays are under 0.5% of the logits, and they write the
    gradient once where the loop first fills its buffer with zeros (XLA:CPU
    has no uninitialised buffer). Compiled fwd+bwd / forward, loop against
    whole-array, interleaved in one process (2-core AMD EPYC, weighted mean,
    10% ignored): 16384x2048 float32 57.0 / 10.8 ms against 49.9 / 8.5
    (temporaries 1.6% against 0.3%), 8192x4096 58.6 / 11.2 against 51.2 /
    8.5, 32768x1024 55.3 / 11.4 against 52.4 / 8.6, 1024x32000 55.9 / 10.7
    against 49.3 / 8.1 (optax fwd+bwd 54-57 ms). Narrower rows hold more
    (about 5 floats a position: 3.5% of the logits over 150 classes, which
    the memory target of 1% rules out).
    """
    axis = axis % x.ndim
    wide = (
        jax.default_backend() == "cpu"
        and axis == x.ndim - 1
        and x.shape[axis] >= _CPU_WIDE_ROW_CLASSES
    )
    return _loop_writes_grad(x) and not wide


def _varying_axes(*refs: Array | None) -> tuple[Any, ...]:
    """The ``shard_map`` mesh axes that any of ``refs`` varies over (``()`` outside)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:  # older JAX: no varying-axis types
        return ()
    axes: list[Any] = []
    for ref in refs:
        if ref is None:
            continue
        aval = typeof(ref)
        manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10; before: .vma
        varying = manual.varying if manual is not None else getattr(aval, "vma", ())
        axes += [name for name in varying if name not in axes]
    return tuple(axes)


def _varying_like(value: Array, *refs: Array | None) -> Array:
    """``value`` cast to vary over every ``shard_map`` axis that ``refs`` vary over.

    A loop carry that starts as a constant but is updated from per-shard data
    must be declared varying up front inside ``shard_map`` (``check_vma``),
    else the loop fails with "the manual axis types do not match".
    """
    have = _varying_axes(value)
    axes = tuple(a for a in _varying_axes(*refs) if a not in have)
    return jax.lax.pcast(value, axes, to="varying") if axes else value


def _partitioned(
    run: Any, args: tuple, in_kinds: tuple, out_kinds: tuple, axis: int
) -> tuple[Array, ...]:
    """``run(*args)`` (a kernel call) partitioned over positions under GSPMD
    ``jit`` (:mod:`jaxloss._kernels.partition`); inside ``shard_map`` the call
    already sees one shard and runs as is."""
    if _varying_axes(*args):
        return tuple(run(*args))
    return partition.by_position(run, args, in_kinds, out_kinds, axis)


def _in_buffer(v: Array, keep: Array) -> Array:
    """``v`` (``keep`` is true), materialised as a conditional's result.

    XLA:CPU fused a chunk's dynamic slice into the elementwise pass reading
    it, and LLVM did not vectorise that pass (scalar code in the compiled
    kernel, vector code for the same pass over a static slice): at
    2x2x512x10240 float32 (``axis=1``) the loop's forward took 150-160 ms
    against 28-37 ms for the whole-array passes.
    ``jax.lax.optimization_barrier`` does not prevent the fusion (XLA:CPU
    removes it before fusing); a conditional does, its operand a buffer the
    size of one chunk. (Under ``vmap`` the predicate, the loop's index, is
    not batched: the conditional stays one.)
    """
    return jax.lax.cond(keep, lambda v: v, jnp.zeros_like, v)


def _buffered_chunk(xb: Array, axis: int, with_grad: bool) -> bool:
    """Whether the chunked loop reads each chunk ``xb`` from a buffer of its
    own, and writes its gradient to one before copying it into the whole
    (:func:`_in_buffer`): where the chunk's class slices
    (:func:`_sliced_applies`) make elementwise passes, 2 to 15 classes
    along a strided axis, forward and fwd+bwd.

    Both passes were scalar code (the gradient's too: its stacked classes
    written straight into the loop's buffer at the chunk's run-time start),
    and the fwd+bwd of 3-15 classes reduced the chunk over its strided
    classes (YNNPACK, 1.2 and 0.5 ms a chunk at 16x5x512x512). ``ab.py
    --base 4a54f25 --reps 6 --axis 1`` (2-core EPYC, float32, weighted mean,
    10% ignored): ``(2, C, 512, W)`` of 84 MB, C = 2 to 15, forward
    1.5-6.5x faster (1.5-3.1x optax before, 3.9-11x after), fwd+bwd
    1.3-3.1x (1.4-2.1x -> 1.9-4.9x); 16x5x512x512 forward 4.2x, fwd+bwd
    2.8x (0.54x -> 1.51x optax); 8x3x1024x1024 4.9x and 2.9x (0.77x ->
    2.24x); 4x12x512x896 4.0x and 1.6x (0.72x -> 1.13x). Not elsewhere,
    where the copies cost more than they saved: 16 classes forward
    0.77-0.82x (its pass vectorised already), 19-1000 classes forward
    0.72-0.82x and fwd+bwd (not sliced) 0.85-1.05x.
    """
    return xb.shape[axis] <= _BUFFERED_MAX_CLASSES and _sliced_applies(xb, axis, True, with_grad)


def _empty(shape: tuple[int, ...], dtype: Any) -> Array:
    # Not jax.lax.empty: as a fori_loop carry it breaks forward-over-forward
    # differentiation (jax.jacfwd(jax.jacfwd(loss)): "mul: arrays must have
    # the same number of dimensions") under JAX 0.10.
    return jnp.zeros(shape, dtype)


def _fused_pass(
    x: Array,
    t: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    *,
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    with_grad: bool,
) -> tuple[Array, Array | None]:
    """``(scale * sum_i l_i, scale * dl/dx)`` by a chunked loop (see above).

    ``l`` and the gradient are those of :func:`_index_loss_and_grad`; the
    gradient comes back in ``x.dtype``. Differentiating the gradient goes
    through :func:`_fused_total_and_grad` to the plain formulation instead.

    A ``scale`` of one value per example (``(B,)``, the batch leading ``x``,
    ``axis >= 1``: a batch folded under ``jax.vmap``, :func:`_pass`) gives
    one total per example: each chunk's losses summed by example, each
    position's gradient scaled by its example's scale.
    """
    cdt = _compute_dtype(x.dtype)
    shape = x.shape
    scale = scale.astype(cdt)
    zero = jnp.zeros((), cdt)
    per_example = jnp.ndim(scale) > 0
    on_cpu = jax.default_backend() == "cpu"
    if math.prod(shape[:axis] + shape[axis + 1 :]) == 0:
        return jnp.zeros(scale.shape, cdt), (jnp.zeros(shape, x.dtype) if with_grad else None)

    # All views are reshapes of contiguous dimensions, i.e. free.
    cut = _Chunking.of_logits(shape, axis, x.dtype.itemsize, with_grad)
    xs = x.reshape(cut.view)
    ts = t.reshape(cut.pview)
    ms = None if where is None else where.reshape(ts.shape)
    # Part A of the positions (g0 * pa of them, of_logits) leads with the
    # batch: an example spans `span` of them, at flat index g0 * pa + a.
    span = cut.g0 * cut.pa // shape[0]

    # The example depends on part A's dimensions only: it is computed, and
    # the losses summed by it (a sum over the other dimensions first), over
    # an array of those, the others of size 1. Per position (a scatter-add
    # of every position's loss, a gather of its scale), 2 x 19x512x1024
    # (classes first) ran 1.23-1.29x slower forward, 1.06-1.10x fwd+bwd.
    by_a = [k for k, d in enumerate(cut.pdims) if d in ("g0", "a")]
    rest = tuple(k for k in range(len(cut.pdims)) if k not in by_a)
    ashape = tuple(n if k in by_a else 1 for k, n in enumerate(cut.pchunk))

    def example_at(start: tuple[Array, ...]) -> Array:
        flat = jnp.zeros(ashape, jnp.int32)
        if "g0" in cut.pdims:
            flat = flat + cut.pa * jax.lax.broadcasted_iota(
                jnp.int32, ashape, cut.pdims.index("g0")
            )
        if "a" in cut.pdims:
            k = cut.pdims.index("a")
            flat = flat + start[k] + jax.lax.broadcasted_iota(jnp.int32, ashape, k)
        return flat // span

    # Rows grouped in pairs (_group_shifted_exp, with the gradient): each
    # chunk sliced from the logits viewed as rows of 2 * c, the view its
    # grouped exponentials and group max read. Sliced as rows of c, chunks
    # of one position dimension ran 1.2-1.5x slower (872448x24, 524288x40;
    # PERFORMANCE.md); groups of 4-16 positions measured 0.78-0.95x so.
    pairs = (
        normalize
        and with_grad
        and _row_group(cut.chunk, cut.cax, x.dtype) == 2
        and cut.cax == len(cut.view) - 1
        and cut.view[-2] % 2 == 0
    )
    if pairs:
        c = cut.view[-1]
        x_pairs = xs.reshape(cut.view[:-2] + (cut.view[-2] // 2, 2 * c))
        pair_chunk = cut.chunk[:-2] + (cut.chunk[-2] // 2, 2 * c)

    def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        total, g = carry
        # The positions a shifted last chunk shares with the one before are
        # not summed twice (``fresh``); their gradient is rewritten alike.
        xstart, start, fresh = cut.at(i)
        if pairs:
            pair_start = xstart[:-2] + (xstart[-2] // 2, xstart[-1])
            xb = jax.lax.dynamic_slice(x_pairs, pair_start, pair_chunk).reshape(cut.chunk)
        else:
            xb = jax.lax.dynamic_slice(xs, xstart, cut.chunk)
        buffered = on_cpu and normalize and _buffered_chunk(xb, cut.cax, with_grad)
        keep = i >= 0  # always: the buffers' conditional (_in_buffer)
        if buffered:
            xb = _in_buffer(xb, keep)
        tb = jax.lax.dynamic_slice(ts, start, cut.pchunk)
        mb = None if ms is None else jax.lax.dynamic_slice(ms, start, cut.pchunk)
        valid = _valid_mask(tb, mb, ignore_index)
        example = example_at(start) if per_example else None
        # XLA:CPU's float32 rows that _recomputed_exp picks (32 classes, and
        # 23-41 where a chunk's rows are not grouped) recompute the
        # exponentials in the gradient's pass, as the whole-array passes do:
        # fwd+bwd 1.08-1.22x faster at 640x1024x32, 655360x32, 2x327680x32.
        share = normalize and with_grad and not (on_cpu and _recomputed_exp(xb, cut.cax))
        # The chunk's loss and gradient: the same maths as every other path.
        loss, grad = _index_loss_and_grad(
            xb,
            tb,
            valid,
            w,
            eps,
            normalize,
            cut.cax,
            with_grad,
            share_exp=share,
            target_shift=share and _target_shift_applies(xb.shape, cut.cax, xb.dtype),
            chunked=True,
            grad_scale=(scale[example] if per_example else scale) if with_grad else None,
        )
        fresh_loss = jnp.where(fresh, loss, zero)
        if per_example:
            by_example = jnp.sum(fresh_loss, axis=rest, keepdims=True)
            total = total + jax.ops.segment_sum(
                by_example.reshape(-1), example.reshape(-1), num_segments=scale.shape[0]
            )
        else:
            total = total + jnp.sum(fresh_loss)
        if not with_grad:
            return total, g
        assert grad is not None
        grad = grad.astype(x.dtype)
        if buffered:  # its own pass, then a copy into the gradient
            grad = _in_buffer(grad, keep)
        g = jax.lax.dynamic_update_slice(g, grad, xstart)
        return total, g

    grad0 = _empty(xs.shape if with_grad else (0,) * xs.ndim, x.dtype)
    total0 = jnp.zeros(scale.shape, cdt)
    carry = tuple(_varying_like(v, xs, ts, ms, w, scale) for v in (total0, grad0))
    total, g = jax.lax.fori_loop(0, cut.steps, body, carry)
    # A zero scale (nothing to average) gives 0 even where a bad label made the sum NaN.
    total = _scaled(total, scale)
    if not with_grad:
        return total, None
    return total, g.reshape(shape)


def _weight_count(
    t: Array,
    where: Array | None,
    w: Array | None,
    ignore_index: int | None,
    num_classes: int,
    dtype: Any,
) -> Array:
    """``sum_i valid_i * w_{t_i}``, the weighted mean's denominator, chunk by chunk.

    (One fused reduction would be simpler, but XLA:CPU materialises its
    per-position operand.)
    """
    n = math.prod(t.shape)
    zero = jnp.zeros((), dtype)
    if n == 0:
        return zero
    logits = (*t.shape, num_classes)  # the logits' size, for _class_weight_at

    def count(tb: Array, valid: Array) -> Array:
        if w is None:
            return jnp.sum(valid, dtype=dtype)
        w_t = _class_weight_at(w.astype(dtype), _wide_labels(tb), logits, clip=True)
        return jnp.sum(jnp.where(valid, w_t, zero))

    if jax.default_backend() != "cpu":
        # One fused reduction: a GPU loop pays a launch and a host round trip
        # per step (measured on an H200: ~0.2 ms for 8M targets).
        return count(t, _valid_mask(t, where, ignore_index))
    # Chunks cut like _fused_pass's (sharding): part A the first dimension.
    cut = _Chunking(t.shape[:1], t.shape[1:], itemsize=t.dtype.itemsize)
    ts = t.reshape(cut.pview)
    ms = None if where is None else where.reshape(ts.shape)

    def body(i: Array, total: Array) -> Array:
        _, start, fresh = cut.at(i)
        tb = jax.lax.dynamic_slice(ts, start, cut.pchunk)
        mb = None if ms is None else jax.lax.dynamic_slice(ms, start, cut.pchunk)
        # A shifted last chunk skips what the one before counted (``fresh``).
        return total + count(tb, _valid_mask(tb, mb, ignore_index) & fresh)

    return jax.lax.fori_loop(0, cut.steps, body, _varying_like(zero, ts, ms, w))


def _valid_mask(t: Array, where: Array | None, ignore_index: int | None) -> Array:
    t = _wide_labels(t)
    valid = jnp.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    return valid if where is None else valid & where


def _fold_takes_loop(x: Array, axis: int, with_grad: bool) -> bool:
    """Whether a folded batch ``x`` (class axis ``axis``, batch leading) takes
    the chunked loop with one total and one scale per example
    (:func:`_fused_pass`), where the batch as one input takes the loop (one
    example does not: ``_pass``'s ``can_fold``): over a strided class axis;
    channels-last, the fwd+bwd of rows whose whole-array passes hold about
    the logits' size in temporaries (grouped rows, :func:`_row_group`,
    their exponentials materialised; up to 8 classes, the per-position
    arrays), as fast or faster in the loop. Not other rows, nor forwards,
    which ran faster in the whole-array passes (PERFORMANCE.md, "A batch
    that would take the chunked loop")."""
    if not _takes_loop(x, axis):
        return False
    if axis != x.ndim - 1:
        return True
    held = _row_group(x.shape, axis, x.dtype) > 1 or x.shape[axis] <= _FOLD_LOOP_MAX_CLASSES
    return with_grad and held


# Channels-last rows of at most this many classes: see _fold_takes_loop.
_FOLD_LOOP_MAX_CLASSES = 8


def _pass(
    x: Array,
    t: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    pallas: bool,
    with_grad: bool,
) -> tuple[Array, Array | None]:
    """``(scale * sum_i l_i, scale * dl/dx or None)``, gradient in ``x.dtype``:
    the Pallas kernel on CUDA (when enabled), else the XLA formulation."""
    config = dict(ignore_index=ignore_index, eps=eps, normalize=normalize, axis=axis)

    def xla(x, t, where, w, scale):
        if _takes_loop(x, axis):
            return _fused_pass(x, t, where, w, scale, with_grad=with_grad, **config)
        if not with_grad:

            def loss_sum(x, t, where, axis):
                valid = _valid_mask(t, where, ignore_index)
                loss = _index_loss_and_grad(x, t, valid, w, eps, normalize, axis, with_grad=False)
                return jnp.sum(loss[0])

            total = functools.reduce(jnp.add, _by_parts(loss_sum, False, x, axis, t, where))
            return _scaled(total, scale), None
        total, grad = _plain_total_and_grad(x, t, where, w, scale, **config)
        return total, _to_dtype(grad, x.dtype)

    def fold(size, in_batched, x, t, where, w, scale):
        # One scale and one total per example: the per-position losses (and
        # gradients) of all the positions, then each example's sum (scaled).
        batched = (*in_batched[1:3], in_batched[4])
        t, where, s = _batch_broadcast(size, batched, (t, where, scale))
        s = s.astype(_compute_dtype(x.dtype))
        if _fold_takes_loop(x, axis + 1, with_grad):
            return _fused_pass(
                x, t, where, w, s, with_grad=with_grad, **{**config, "axis": axis + 1}
            )
        valid = _valid_mask(t, where, ignore_index)
        # Each example's scale at its positions, for the gradient's pass.
        s_pos = _at_positions(s, valid.shape) if with_grad else None
        loss, grad = _xla_losses(
            x, t, valid, w, eps, normalize, axis + 1, with_grad, reduced=True, grad_scale=s_pos
        )
        total = _scaled_total(loss, None, s)
        return total, None if grad is None else _to_dtype(grad, x.dtype)

    def can_fold(in_batched, x, *args):
        # Where one example takes the chunked loop (large inputs on XLA:CPU,
        # and every other platform's XLA path), vmapped as it is (the loop
        # batched). Where one example does not, folded (vmapped, each
        # example's whole-array passes held the logits' size): into the loop
        # with a total per example where _fold_takes_loop says, else into
        # the whole-array passes.
        one = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
        return _can_fold(in_batched) and not _takes_loop(one, axis)

    xla = _batch_folded(xla, fold, can_fold)

    def kernel(x, t, where, w, scale):
        from jaxloss._kernels.cross_entropy import cross_entropy_pallas

        # Inside shard_map: every operand varying over the same mesh axes, so
        # the kernel's outputs can be typed by the logits' axes.
        refs = (x, t, where, w, scale)
        x, t, where, w, scale = (None if a is None else _varying_like(a, *refs) for a in refs)

        def run(*args: Array | None) -> tuple[Array, ...]:
            total, grad = cross_entropy_pallas(*args, with_grad=with_grad, **config)
            return (total, grad) if with_grad else (total,)

        out = _partitioned(
            run,
            (x, t, where, w, scale),
            ("x", "pos", "pos", "rep", "rep"),
            ("sum", "x") if with_grad else ("sum",),
            axis,
        )
        return out[0], (out[1] if with_grad else None)

    # The kernel computes in float32: float64 inputs (x64) keep the XLA path.
    use_kernel = _kernel_applies(pallas, x)
    return _kernels.dispatch(use_kernel, kernel, xla, x, t, where, w, scale)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8, 9))
def _fused_total_and_grad(
    x: Array,
    t: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    pallas: bool,
) -> tuple[Array, Array]:
    total, grad = _pass(
        x, t, where, w, scale, ignore_index, eps, normalize, axis, pallas, with_grad=True
    )
    assert grad is not None
    return total, grad


@_fused_total_and_grad.defjvp
def _fused_total_and_grad_jvp(
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    pallas: bool,
    primals: tuple,
    tangents: tuple,
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    # Reached only when the gradient itself is differentiated (jvp of grad,
    # hessian): differentiate the plain formulation instead of the loop or
    # the kernel (pallas_call has no differentiation rule).
    x, t, where, w, scale = primals

    def plain(x: Array) -> tuple[Array, Array]:
        total, grad = _plain_total_and_grad(
            x, t, where, w, scale, ignore_index, eps, normalize, axis, barrier=False
        )
        return total, grad.astype(x.dtype)

    return jax.jvp(plain, (x,), (tangents[0],))


def _to_dtype(g: Array, dtype: Any) -> Array:
    """``g.astype(dtype)``; float32 to bfloat16 on XLA:CPU by integer rounding,
    except for small inputs (:func:`_cpu_small`).

    XLA:CPU's ``convert`` to bfloat16 ran an elementwise pass 1.7x slower
    than adding half an ulp (ties to even) and dropping the low 16 bits:
    the same bits for every finite value and for infinities (rounding
    overflows to inf as ``convert`` does); a NaN is kept a NaN explicitly,
    whatever its payload. The bfloat16 fwd+bwd at 512x32000 measured
    1.24-1.25x faster (3 processes, each timing both executables
    interleaved; gradients bit-equal).

    A NaN is made the canonical quiet NaN while still a float32, before the
    rounding (whose carry would turn a NaN with a full payload into -0).
    Selected after it, on the integers, LLVM moved the select past the
    truncation onto a vector of bfloat16, which x86 has no instructions for:
    the pass ran 2.3x slower than with the float32 select (1000x1000
    ``exp`` then rounding, 1113 against 481 us; XLA's ``convert`` 731).

    Small inputs keep ``convert``: the rounding's integer operations would
    make XLA:CPU split their pass over both cores (see
    :func:`_target_by_scatter`).
    """
    if not (
        jax.default_backend() == "cpu"
        and g.dtype == jnp.float32
        and jnp.dtype(dtype) == jnp.bfloat16
        and not _cpu_small(g.shape)
    ):
        return g.astype(dtype)
    if g.ndim and g.shape[-1] == 2:
        # Pairs along a last axis of 2 (two classes, channels-last) written
        # as one uint32 each: a loop over that axis of 2 ran scalar.
        lo, hi = (_bf16_bits(g[..., k]) for k in (0, 1))
        return jax.lax.bitcast_convert_type(lo | (hi << 16), jnp.bfloat16)
    bits = _bf16_bits(g).astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def _bf16_bits(g: Array) -> Array:
    """float32 ``g`` rounded to bfloat16 (ties to even), the bits in the low
    half of a uint32 (:func:`_to_dtype`)."""
    g = jnp.where(jnp.isnan(g), jnp.full((), jnp.nan, g.dtype), g)
    u = jax.lax.bitcast_convert_type(g, jnp.uint32)
    return (u + (jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1)))) >> 16


def _exact_upcast(x: Array) -> Array:
    """``x.astype(float32)`` for bfloat16 ``x`` by moving bits, not by ``convert``.

    XLA's CSE would merge a second ``convert`` with the one feeding the row
    reductions; a conversion with two users is materialised (XLA:CPU: a full
    float32 copy of the logits). This one stays inside the gradient's fusion.
    """
    if x.dtype != jnp.bfloat16:
        return jax.lax.optimization_barrier(x).astype(_compute_dtype(x.dtype))
    return _from_bf16_bits(jax.lax.bitcast_convert_type(x, jnp.uint16))


def _from_bf16_bits(bits: Array) -> Array:
    """The float32 value of bfloat16 numbers given as their ``uint16`` bits."""
    wide = bits.astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(wide, jnp.uint32(16)), jnp.float32)


@jax.custom_jvp
def _upcast_apart(x: Array) -> Array:
    """:func:`_exact_upcast` that can be differentiated (as the conversion it is)."""
    return _exact_upcast(x)


@_upcast_apart.defjvp
def _upcast_apart_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    (x,), (x_dot,) = primals, tangents
    return _exact_upcast(x), x_dot.astype(_compute_dtype(x.dtype))


# Classes not last: float32 whose last dimension is shorter than this
# takes the view of _flat_view_applies.
_FLAT_VIEW_MAX_MINOR = 48


def _flat_view_applies(shape: tuple[int, ...], axis: int, dtype: Any) -> bool:
    """Whether XLA:CPU's whole-array fwd+bwd (:func:`_plain_total_and_grad`)
    runs on a view of the logits with the positions after the class axis as
    one dimension: float32, two or more dimensions after the classes, the
    last shorter than ``_FLAT_VIEW_MAX_MINOR``.

    XLA:CPU's elementwise loops run far slower over a short minor dimension:
    ``exp(x - x_t)`` over (65, 150, 16, 16) took 1.6 ms, over its (65, 150,
    256) view 0.57 ms. The gradient comes back through :func:`_whole`, so
    that it is still written over the exponentials' buffer (no full-size
    temporary): a reshape fused into the gradient's pass would give that
    pass another shape than the exponentials' and a buffer of its own.

    fwd+bwd against the plain path, ``ab.py --base 7523c50 --reps 20
    --axis 1`` (weighted mean, 10% ignored, 2-core EPYC), ~2.5M logits: maps
    of 12x12 3.3x faster, 16x16 2.3-2.9x (150 and 19 classes), 20x20 1.9x,
    24x24 1.8x, 32x32 1.6-1.7x, 24x40 1.07x (from 0.86-1.3x optax to
    1.2-3.4x); 8x8 0.98x. Not taken from a minor dimension of 48 (48x48
    0.92-0.94x, 64x64 0.90-1.14x).
    """
    return (
        jax.default_backend() == "cpu"
        and jnp.dtype(dtype) == jnp.float32
        and len(shape) - axis - 1 >= 2
        and shape[-1] < _FLAT_VIEW_MAX_MINOR
    )


@jax.custom_jvp
def _whole(v: Array, flag: Array) -> Array:
    """``v``, as the result of a while loop of 0 or 1 trips (1 where ``flag``)
    whose body multiplies it by a carried 1.

    The loop ends XLA's fusion there: ``v`` is materialised in the shape it
    was computed in, and a reshape after it is a free view of that buffer.
    Without it XLA:CPU fuses the reshape into ``v``'s pass (see
    :func:`_flat_view_applies`). ``flag`` is any runtime scalar (the trip
    changes nothing).
    """
    # Behind a barrier: a constant factor would be sunk into the body and the
    # loop then simplified away.
    one = jax.lax.optimization_barrier(jnp.ones((), v.dtype))

    def body(carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        _, value, factor = carry
        return jnp.zeros((), bool), value * factor, factor

    return jax.lax.while_loop(lambda carry: carry[0], body, (flag, v, one))[1]


@_whole.defjvp
def _whole_jvp(primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    return _whole(*primals), tangents[0]


def _plain_total_and_grad(
    x: Array,
    t: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    *,
    barrier: bool = True,
) -> tuple[Array, Array]:
    """``_fused_pass``'s result by whole-array ops: ``(total, grad)``, grad in
    the compute dtype, left as an expression for XLA to fuse into its consumer
    (except where :func:`_flat_view_applies`); over two parts of the
    positions where :func:`_aligned_rest` says (``barrier``: not when the
    gradient itself is differentiated)."""
    if barrier and _aligned_rest(x.shape, axis, x.dtype, with_grad=True):

        def part(x: Array, t: Array, where: Array | None, axis: int) -> tuple[Array, Array]:
            return _plain_total_and_grad(x, t, where, w, scale, ignore_index, eps, normalize, axis)

        parts = _by_parts(part, True, x, axis, t, where)
        return parts[0][0] + parts[1][0], _joined([g for _, g in parts], x.shape)
    if barrier and _flat_view_applies(x.shape, axis, x.dtype):
        # The positions after the classes as one dimension: views, i.e. free.
        n = math.prod(x.shape[axis + 1 :])
        pview = t.shape[:axis] + (n,)
        total, grad = _plain_total_and_grad(
            x.reshape(x.shape[: axis + 1] + (n,)),
            t.reshape(pview),
            None if where is None else where.reshape(pview),
            w,
            scale,
            ignore_index,
            eps,
            normalize,
            axis,
        )
        return total, _whole(grad, jnp.isnan(total)).reshape(x.shape)
    valid = _valid_mask(t, where, ignore_index)
    plan: dict[str, Any] = {}
    if barrier:
        plan = _cpu_exp_plan(x, axis, reduced=True)
        plan["scatter_target"] = _target_by_scatter(x, axis, normalize)
    s = scale.astype(_compute_dtype(x.dtype))
    loss, grad = _index_loss_and_grad(
        x, t, valid, w, eps, normalize, axis, True, grad_scale=s, **plan
    )
    assert grad is not None
    return _scaled_total(loss, None, s), grad


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8, 9))
def _index_total(
    x: Array,
    t: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    pallas: bool,
) -> Array:
    """``scale * sum_i l_i`` over all positions (0 when ``scale`` is 0)."""
    # Primal only: evaluation never pays for the gradient.
    return _pass(
        x, t, where, w, scale, ignore_index, eps, normalize, axis, pallas, with_grad=False
    )[0]


@_index_total.defjvp
def _index_total_jvp(
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    axis: int,
    pallas: bool,
    primals: tuple,
    tangents: tuple,
) -> tuple[Array, Array]:
    # As for _index_loss: the gradient g is formed in the loss's pass and
    # reverse mode transposes dl = sum(g * dx) into dx = g * ct. For
    # jax.grad of the loss ct is 1 and XLA returns g's buffer as is. Only
    # the logits are differentiated (weights and scale are constants).
    # Always through _fused_total_and_grad (its primal body is _pass, the
    # kernel's or XLA's), also where that is _plain_total_and_grad: only a
    # primal body is folded under jax.vmap (_batch_folded).
    total, grad = _fused_total_and_grad(*primals, ignore_index, eps, normalize, axis, pallas)
    cdt = total.dtype
    return total, jnp.sum(grad.astype(cdt) * tangents[0].astype(cdt))


# ---------------------------------------------------------------------------
# probability targets
# ---------------------------------------------------------------------------


def _weighted_targets(
    x: Array, q: Array, w: Array | None, eps: float, axis: int
) -> tuple[Any, Array, Array, Array]:
    """``(compute dtype, x in it, w_c q'_c in it, x for the row statistics)``
    with ``q' = (1 - eps) q + eps / C``. The row statistics take ``x`` as it
    is where its dtype computes in the compute dtype (a 16-bit ``x`` then
    has no float32 copy shared between the reductions: see
    :func:`_row_stats`)."""
    cdt = _compute_dtype(jnp.promote_types(x.dtype, q.dtype))
    xc = x.astype(cdt)
    qc = q.astype(cdt)
    if eps > 0.0:
        qc = qc * (1.0 - eps) + eps / x.shape[axis]
    if w is not None:
        qc = qc * _broadcast_weight(w.astype(cdt), x.ndim, axis)
    return cdt, xc, qc, x if _compute_dtype(x.dtype) == cdt else xc


def _soft_parts(
    x: Array,
    q: Array,
    w: Array | None,
    eps: float,
    axis: int,
    forward: bool = False,
    native: bool = False,
) -> tuple[Array, Array]:
    """``(w_c q'_c, -log p_c)`` in the compute dtype for :func:`_soft_loss`;
    ``forward``: for the loss alone (no derivative), ``native`` with
    XLA:CPU's own reductions.

    The forward of 16-bit logits (whose row statistics read ``x`` as it is,
    see :func:`_weighted_targets`):

    - over a strided class axis without ``native`` takes the max shift
      (:func:`_row_stats`), not the unshifted statistics: XLA:CPU then puts
      the whole forward in one YNNPACK fusion, as optax's. With the unshifted
      statistics the float32 conversion of ``x``, shared by the sum of
      ``exp(x)`` and the loss term, was written out (205-233% of the logits
      in temporaries; now 0%). ``ab.py --soft --axis 1 --dtype bfloat16
      --base cba4806``, forward, 2-core EPYC: 8x150x128x128 2.2x faster
      (0.60x -> 1.35x optax), 8x32x128x128 1.55x (0.80x -> 1.25x),
      8x24x128x128 1.46x (0.76x -> 1.11x), 8x48x96x96 1.40x (0.80x ->
      1.12x), 8x150x64x64 1.38x, 4x64x128x128 1.24x.
    - over a strided class axis with ``native`` (the unshifted statistics
      by XLA:CPU's own reductions) converts the loss term's ``x`` apart
      from theirs, through an optimization barrier, so that XLA's CSE does
      not merge the two conversions: bfloat16 8x19x128x128 1.6x faster
      (1.8x -> 3.0x optax), 8x8x128x128 1.06x. Channels-last rows keep the
      one conversion: apart, 512x32000, 64x1000 and 8x128x128x19 measured
      0.73-0.87x."""
    cdt, xc, qc, xs = _weighted_targets(x, q, w, eps, axis)
    narrow = xs.dtype != cdt  # 16-bit logits read as they are
    strided = axis % x.ndim != x.ndim - 1
    if forward and (native or (_unshifted_applies(xs, axis) and not (narrow and strided))):
        m, log_s = _unshifted_row_stats(xs, axis, native=native)
        if narrow and strided:  # native
            xc = jax.lax.optimization_barrier(xs).astype(cdt)
    else:
        m, log_s = _row_stats(xs, axis)
    return qc, (m.astype(cdt) - xc) + log_s.astype(cdt)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _soft_loss(
    x: Array, q: Array, w: Array | None, where: Array | None, eps: float, axis: int
) -> Array:
    """``-sum_c w_c q'_c log p_c`` with ``q' = (1 - eps) q + eps / C``, 0
    where the positions' mask ``where`` (or None) is False, and so are its
    derivatives there, whatever the logits (a non-finite row included).

    A custom JVP forms the derivative in the loss's pass, as for index
    targets (:func:`_index_loss_jvp`): ``dl/dx_c = A p_c - w_c q'_c`` with
    ``A = sum_c w_c q'_c``, and ``dl/dq_c = (1 - eps) w_c (-log p_c)``, each
    only where its input is differentiated (symbolic zeros). No tangent of
    ``w`` enters: the weights come through ``_checks.check_weight``, which
    stops their gradient.

    The forward (no derivative) takes the unshifted row statistics where
    the index targets' forward does (:func:`_unshifted_applies`): XLA:CPU
    handed the max to YNNPACK, which wrote it out broadcast to the logits'
    shape for the sums after it (``ab.py --soft --base dfe1e65``: 8192x32
    float32 3.9x faster, 26210x19 4.9x, 4x64x64x150 bfloat16 2.8x,
    2x64x128x19 bfloat16 2.9x, seg19 1.5x; other shapes 0.95-1.37x).

    On XLA:CPU where the fused fwd+bwd takes its own reductions
    (:func:`_soft_fused_applies`), the forward sums the loss by
    :func:`_row_sum` too, and over a strided class axis takes the row
    statistics by them (``_unshifted_row_stats(native=True)``). Forward
    against ``jnp.sum`` (YNNPACK), both in one process, two processes,
    2-core EPYC: 8x128x128x19 float32 1.14-1.18x faster, 4x64x64x150
    1.38-1.46x, 4096x1000 1.23-1.27x, 16384x64 1.2-1.3x, 26210x19
    1.0-1.15x, 2x64x128x19 1.0x, 8192x32 0.93-0.96x; over axis 1,
    8x19x128x128 1.3x (0.88x -> 1.13x optax), 8x24x128x128 1.4x, bfloat16
    8x19x128x128 1.7x (temporaries 242% -> 53% of the logits). Over 32 or
    150 strided classes XLA's reductions were 2-7x slower.

    Before all that, on XLA:CPU: few classes take the class slices
    (:func:`_soft_sliced_applies`), and float32 over a strided class axis
    before a small plane optax's own program (:func:`_soft_small_plane_applies`).

    Under ``jax.vmap`` the batch is folded into the positions
    (:func:`_batch_folded`)."""

    def body(x, q, w, where):
        return _masked(_soft_loss_values(x, q, w, eps, axis), where)

    def fold(size, in_batched, x, q, w, where):
        (where,) = _batch_broadcast(size, in_batched[3:], (where,))
        return _masked(_soft_loss_values(x, q, w, eps, axis + 1), where)

    return _batch_folded(body, fold, _can_fold_soft_loss)(x, q, w, where)


def _can_fold_soft_loss(in_batched: Any, *args: Any) -> bool:
    """:func:`_can_fold` for ``(x, q, w, where)``: the logits and the targets
    batched (shared targets would be copied for every example)."""
    return bool(in_batched[0]) and bool(in_batched[1]) and not in_batched[2]


def _masked(v: Array, where: Array | None, axis: int | None = None) -> Array:
    """``v``, 0 where the positions' mask ``where`` (or None) is False: ``v``
    per position, or shaped like the logits with the class ``axis``."""
    if where is None:
        return v
    keep = where if axis is None else jnp.expand_dims(where, axis)
    return jnp.where(keep, v, jnp.zeros((), v.dtype))


def _soft_loss_values(x: Array, q: Array, w: Array | None, eps: float, axis: int) -> Array:
    """:func:`_soft_loss`'s per-position values, every position."""
    if _soft_small_plane_applies(x, axis):  # optax's program
        _, xc, qw, _ = _weighted_targets(x, q, w, eps, axis)
        return -jnp.sum(qw * jax.nn.log_softmax(xc, axis=axis), axis=axis)
    if _soft_sliced_applies(x, axis):
        return _soft_sliced_loss(x, q, w, eps, axis)
    native = jax.default_backend() == "cpu" and _soft_fused_applies(x, axis)
    strided = axis % x.ndim != x.ndim - 1
    qw, neg_logp = _soft_parts(x, q, w, eps, axis, forward=True, native=native and strided)
    if native:
        return _row_sum(qw * neg_logp, axis)
    return _class_sum(qw * neg_logp, x, axis, spread=False, flat=strided)


# float32 probability targets over a strided class axis of at most this many
# classes followed by a plane of at most this many positions: the forward as
# optax's (_soft_small_plane_applies).
_SOFT_SMALL_PLANE_MAX_CLASSES = 256
# ... or more classes, where classes * plane is at most this; float32 either
# way over at least _SOFT_SMALL_PLANE_MIN_POSITIONS positions.
_SOFT_SMALL_PLANE_MAX_ROW = 150 * 1024
_SOFT_SMALL_PLANE_MIN_POSITIONS = 4096
_SOFT_SMALL_PLANE_MAX = 1024
# bfloat16 over more strided classes than this before such a plane: the same;
# over fewer (more than the native reductions take) before a plane of at most
# _SOFT_SMALL_PLANE_MAX_BF16 positions where classes * plane is at most
# _SOFT_SMALL_PLANE_MAX_ROW.
_SOFT_SMALL_PLANE_MIN_CLASSES_BF16 = 512
_SOFT_SMALL_PLANE_MAX_BF16 = 512


def _soft_small_plane_applies(x: Array, axis: int) -> bool:
    """Whether :func:`_soft_loss`'s forward over a strided class axis is
    optax's program, ``-sum(w q' log_softmax(x))`` (``jax.nn.log_softmax``
    of ``x`` in float32: the max shift and ``jnp`` sums), which XLA:CPU puts
    in YNNPACK fusions as it does optax's: float32, more classes than the native
    reductions take (``_SOFT_STRIDED_MAX_CLASSES``) and at most
    ``_SOFT_SMALL_PLANE_MAX_CLASSES``, followed by a plane of at most
    ``_SOFT_SMALL_PLANE_MAX`` positions. There the unshifted statistics and
    the flat view's sums ran at 0.62-0.89x optax; ``ab.py --soft --axis 1
    --base 6f42e90`` (forward,
    weighted mean, 2-core EPYC, two runs): 65x150x16x16 1.28-1.55x faster
    (0.62-0.74x -> 0.94-0.96x optax), 38x256x16x16 1.21-1.45x, 16x150x32x32
    1.01-1.29x, 38x64x32x32 1.15-1.24x, 295x33x16x16 1.12-1.20x,
    152x64x16x16 1.12x (0.89-1.03x optax now: the same fusion as
    optax's). Not on larger planes, where the statistics were the faster (4x64x128x128
    1.08-1.17x optax against 0.97x this way, 8x150x128x128 1.53x against
    1.02x), nor over 1000 classes (1.18-1.40x optax against 1.05-1.07x);
    bfloat16 measured the same either way (0.94-1.01x).

    And one class over a strided axis, any dtype and plane: the unshifted
    statistics (forced by the native reductions) took 9-24 ms at 9765x1x16x16
    (0.07-0.10x optax); now ``ab.py --soft --axis 1 --base 7350f23``
    (forward, 2-core EPYC) 9765x1x16x16 9.8-18x faster, 8x1x128x128 2.8-3.9x,
    float32 and bfloat16, 0.85-1.27x optax (its program). The class slices
    measured 0.33-0.58x optax there (:func:`_soft_sliced_applies` takes
    them for channels-last rows).

    And bfloat16 over more than ``_SOFT_SMALL_PLANE_MIN_CLASSES_BF16``
    classes before such a plane, where the max over the 16-bit logits
    (:func:`_row_stats`) had XLA:CPU write out the float32 conversion of
    ``x`` and the max broadcast to its shape (0.32-0.66x optax). Since the
    program took ``jax.nn.log_softmax`` (it had been :func:`_soft_parts`'s
    shifted statistics and ``jnp.sum``, 0.91-1.06x the same way for
    bfloat16), ``ab.py --soft --axis 1 --base 131eca0`` (forward, weighted
    mean, 2-core EPYC): bfloat16 9x1000x16x16 1.84-2.18x faster (0.44-0.59x
    -> 0.97-1.09x optax), 2x4096x16x16 1.91-2.05x, 1x4096x32x32 2.4x,
    12x768x16x16 2.0x, 3x700x32x32 1.50-1.74x, 2x1000x32x32 1.72x,
    16x1000x8x8 1.62x. It takes ``jax.nn.log_softmax`` itself, not
    :func:`_row_stats` of the conversion (which :func:`log_softmax` uses):
    that forms ``x - m`` for the exponentials and ``m - x`` for the loss
    apart, and XLA:CPU wrote the conversion and the broadcast max out again
    (``ab.py --base 6699faf``: 9x1000x16x16 0.50x, 2x4096x16x16 0.69x).
    Not 512 or fewer (30x300x16x16 0.99-1.01x,
    4x512x32x32 0.94x) nor planes of 4096 (1x1000x64x64 0.87x). float32:
    65x150x16x16 1.07x, 38x256x16x16 1.12x, 295x33x16x16 1.28x (0.98-1.00x
    optax); one class the same (0.97-1.08x).

    And bfloat16 over more than 19 classes (fewer take the native
    reductions) before a plane of at most ``_SOFT_SMALL_PLANE_MAX_BF16``
    positions where classes times plane is at most
    ``_SOFT_SMALL_PLANE_MAX_ROW``: ``ab.py --soft --axis 1 --dtype bfloat16
    --base 3da526f`` (forward, weighted mean, 2-core EPYC): 152x64x16x16
    1.06-1.09x faster (0.94x -> 0.99-1.01x optax), 76x128x16x16 1.16-1.23x,
    38x256x16x16 1.04-1.13x, 30x300x16x16 1.06-1.16x, 12x200x8x8
    1.09-1.21x, 38x64x32x16 1.34x; ``reduction="none"`` 97x100x16x16 1.71x
    (0.65x -> 1.11x optax). Not planes of 1024 (4x512x32x32 0.88-0.95x,
    38x64x32x32 0.94-1.05x) nor 10x480x32x16 (0.96x).

    And float32 over more than 256 such classes where classes times plane
    is at most ``_SOFT_SMALL_PLANE_MAX_ROW``: ``ab.py --soft --axis 1
    --base d8b1764`` (forward, weighted mean, 2-core EPYC, 2-5 runs):
    16x512x16x16 1.39-1.42x faster (0.70-0.72x -> 0.99-1.00x optax),
    19x512x16x16 1.36-1.44x, 17x600x16x16 1.32-1.52x, 24x512x16x16
    1.25-1.42x, 32x512x16x16 1.52-1.73x (0.56-0.66x -> 0.97-1.00x),
    8x300x32x16 1.10-1.31x. Not over more (13x768x16x16 0.88-0.98x,
    9x1000x16x16 0.87x, 7x384x32x32 0.82x, 5x512x32x32 0.81x).

    float32 only from ``_SOFT_SMALL_PLANE_MIN_POSITIONS`` positions: over
    fewer the statistics ran at 1.0-1.3x optax and optax's program at
    0.75-0.89x their speed (4x512x16x16 to 14x512x16x16, 8x600x16x16,
    4x300x32x16); from 4096 positions the program was the faster
    (16x64x16x16, 24x150x16x16, 8x150x32x32, 16x256x16x16: 1.03-1.41x).
    ``ab.py --soft --axis 1 --base e2d98d6`` (two runs): 4x150x16x16
    1.04-1.15x faster, 8x150x16x16 1.00-1.15x, 12x150x16x16 1.17-1.23x,
    10x64x16x16 1.13-1.14x, 8x256x16x16 1.09-1.19x, 12x256x16x16
    1.10-1.11x."""
    axis = axis % x.ndim
    c = x.shape[axis]
    if jax.default_backend() != "cpu" or axis == x.ndim - 1:
        return False
    if c == 1:
        return True
    plane = math.prod(x.shape[axis + 1 :])
    if plane > _SOFT_SMALL_PLANE_MAX:
        return False
    if x.dtype == jnp.float32:
        return (
            _SOFT_STRIDED_MAX_CLASSES[0] < c
            and x.size // c >= _SOFT_SMALL_PLANE_MIN_POSITIONS
            and (c <= _SOFT_SMALL_PLANE_MAX_CLASSES or c * plane <= _SOFT_SMALL_PLANE_MAX_ROW)
        )
    if x.dtype != jnp.bfloat16:
        return False
    return c > _SOFT_SMALL_PLANE_MIN_CLASSES_BF16 or (
        c > _SOFT_STRIDED_MAX_CLASSES[1]
        and plane <= _SOFT_SMALL_PLANE_MAX_BF16
        and c * plane <= _SOFT_SMALL_PLANE_MAX_ROW
    )


# Two float32 classes along an axis followed by a plane of at least this
# many positions (or along the last axis): the fwd+bwd from the class slices.
_SOFT_SLICED_GRAD_MIN_PLANE = 1024


def _soft_sliced_grad_applies(x: Array, axis: int) -> bool:
    """Whether the fwd+bwd of a mean or sum of probability targets takes the
    class slices (:func:`_soft_sliced_total_and_grad`): XLA:CPU, two float32
    classes, along the last axis or followed by a plane of at least
    ``_SOFT_SLICED_GRAD_MIN_PLANE`` positions. ``ab.py --soft --base
    7456c60`` (weighted mean, 2-core EPYC), fwd+bwd: 9765x128x2 1.49-1.52x
    faster (3.4-3.7x -> 5.2-5.5x optax), 8x256x256x2 1.69x, 8x2x256x256
    1.60x, 76x2x128x128 1.33-1.54x, 305x2x64x64 1.30x, 1220x2x32x32 1.36x
    (0.83x -> 1.13x optax), 1000x2 and 20000x2 1.0x. Not below: 4882x2x16x16
    0.88-0.90x; nor from 3 classes (the gradient's slices stacked along the
    class axis: 3 and 5 channels-last 0.57-0.96x, 5 over 16x16 maps 0.66x).

    One class of any 16- or 32-bit dtype too, under the same condition on the
    layout: ``ab.py --soft --base 7350f23`` (fwd+bwd, weighted mean): float32
    19531x128x1 7.5-11x faster (0.42x -> 3.3-4.7x optax), 1024x256x1 5.9x,
    bfloat16 19531x128x1 12-17x (0.38x -> 4.6-6.5x optax), 1024x256x1 7.4x;
    8x1x128x128 ``axis=1`` 1.1-1.3x. Below the plane (9765x1x16x16) float32
    measured 0.69x this way."""
    c = x.shape[axis]
    if jax.default_backend() != "cpu" or not (
        _one_class(x, axis) or (x.dtype == jnp.float32 and c == 2)
    ):
        return False
    axis = axis % x.ndim
    return axis == x.ndim - 1 or math.prod(x.shape[axis + 1 :]) >= _SOFT_SLICED_GRAD_MIN_PLANE


# bfloat16 probability targets over a strided class axis of at most this
# many classes: the forward from the class slices (_soft_sliced_applies).
_SOFT_SLICED_MAX_BF16_STRIDED = 12


def _soft_sliced_applies(x: Array, axis: int) -> bool:
    """Whether :func:`_soft_loss`'s forward takes the class slices
    (:func:`_soft_sliced_loss`): where the index targets' forward does
    (:func:`_sliced_applies`), and for bfloat16 logits over a strided class
    axis of 2 to ``_SOFT_SLICED_MAX_BF16_STRIDED`` classes, whose slices are
    contiguous runs of the positions. ``ab.py --soft --axis 1 --dtype
    bfloat16 --base 0d4c54a`` (forward, weighted mean, 2-core EPYC): 16x16
    maps of 2-12 classes 1.1-2.4x faster (2: 0.57x -> 1.37x optax, 4: 0.54x
    -> 1.32x), 128x128 maps of 2-12 classes 1.0-1.9x; 16 classes 0.60-0.72x.
    The index targets' forward measured 0.18-0.45x the same way (not
    taken).

    And one class along the last axis, any 16- or 32-bit dtype
    (:func:`_sliced_exps`: no exponential): the max and the row sums over
    the size-1 axis ran 14-17 ms at 19531x128x1, as optax's; ``ab.py --soft
    --base 7350f23`` (forward) float32 7.7-8.0x faster, bfloat16 9.1-11x,
    1024x256x1 6.6x. The index targets' forward keeps its own path there
    (3-7x optax)."""
    if _sliced_applies(x, axis):
        return True
    c = x.shape[axis]
    if jax.default_backend() != "cpu":
        return False
    if axis % x.ndim == x.ndim - 1:
        return _one_class(x, axis)
    return jnp.dtype(x.dtype) == jnp.bfloat16 and 2 <= c <= _SOFT_SLICED_MAX_BF16_STRIDED


def _one_class(x: Array, axis: int) -> bool:
    """Whether ``x`` has one class of a 16- or 32-bit dtype, which the
    class slices of probability targets take along the last axis
    (:func:`_soft_sliced_applies`, :func:`_soft_sliced_grad_applies`)."""
    return x.shape[axis] == 1 and jnp.dtype(x.dtype).itemsize in (2, 4)


def _soft_sliced_loss(x: Array, q: Array, w: Array | None, eps: float, axis: int) -> Array:
    """:func:`_soft_loss`'s forward from the class slices
    (:func:`_soft_sliced_applies`: XLA:CPU, float32 rows of 2 to 16 classes
    in either layout, bfloat16 pairs along the last axis and up to 12
    strided bfloat16 classes): ``sum_c w_c q'_c (m - x_c) + A log s`` with
    ``A = sum_c w_c q'_c``, all elementwise on the positions' shape
    (:func:`_class_slices`, :func:`_sliced_exps`), as the index targets'
    forward.

    The loss leaves through a select (NaN where ``s`` is, as the loss is
    there already): without it YNNPACK took the sum after it together with
    the producers it supports, and XLA wrote out the slices and the
    polynomial exponentials' parts between them (2.4-5x slower).

    Forward, ``ab.py --soft --base 4642163`` (weighted mean, 2-core EPYC):
    ``axis=1`` 4882x2x16x16 2.7x faster (0.47x -> 1.27x optax), 1953x5x16x16
    2.5x (0.60x -> 1.48x), 76x2x128x128 2.2-2.7x (0.30-0.59x -> 0.80-1.31x),
    16x5x128x128 1.6x, 8x16x128x128 1.4x, 976x10x16x16 0.8-1.7x (noise:
    optax/base 0.59-1.26x between runs); channels-last 9765x128x2 2.6x,
    3906x128x5 3.1x, 1953x128x10 1.5x, 1220x128x16 1.3x, 8x256x256x2 3.9x
    (7.8x optax); bfloat16 9765x128x2 3.0x, 8x256x256x2 2.0x; smoothed
    (``label_smoothing=0.1``) 1.2-2.7x."""
    return _soft_slice_terms(x, q, w, eps, axis)[0]


def _soft_slice_terms(
    x: Array, q: Array, w: Array | None, eps: float, axis: int
) -> tuple[Array, Array, list[Array], Array, list[Array]]:
    """``(loss, A, [exp(x_c - m)], s, [w_c q'_c])`` on the positions' shape
    from the class slices, for :func:`_soft_sliced_loss` and
    :func:`_soft_sliced_total_and_grad`; the loss NaN where ``s`` is."""
    cdt, _, qw, _ = _weighted_targets(x, q, w, eps, axis)
    xs = [v.astype(cdt) for v in _class_slices(x, axis)]
    qs = [jax.lax.index_in_dim(qw, k, axis, False) for k in range(len(xs))]
    m, es, s = _sliced_exps(xs)
    total_w = functools.reduce(jnp.add, qs)
    loss = functools.reduce(jnp.add, [v * (m - u) for v, u in zip(qs, xs, strict=True)])
    loss = loss + total_w * jnp.log(s)
    return jnp.where(jnp.isnan(s), s, loss), total_w, es, s, qs


def _soft_sliced_total_and_grad(
    x: Array, q: Array, where: Array | None, w: Array | None, scale: Array, eps: float, axis: int
) -> tuple[Array, Array]:
    """:func:`_soft_plain_total_and_grad` from the class slices
    (:func:`_soft_sliced_grad_applies`): the gradient ``scale (A p_c - w_c
    q'_c)`` formed per class on the positions' shape, the classes stacked at
    the end, as the index targets' two classes. A ``scale`` of shape
    ``(B,)``: one per example, as :func:`_soft_plain_total_and_grad`'s."""
    loss, total_w, es, s, qs = _soft_slice_terms(x, q, w, eps, axis)
    zero = jnp.zeros((), loss.dtype)
    sc = _at_positions(scale, loss.shape).astype(loss.dtype)
    inv = sc * total_w / s
    gs = [e * inv - sc * v for e, v in zip(es, qs, strict=True)]
    if where is not None:  # 0 where masked out, whatever the logits there
        gs = [jnp.where(where, g, zero) for g in gs]
    return _scaled_total(loss, where, scale), jnp.stack(gs, axis)


# The derivative of _soft_loss sums over a flat view of the positions after
# a class axis of this many classes or more (see _soft_loss_jvp); its loss
# term from this many (float32, 16-bit).
_SOFT_FLAT_MIN_CLASSES = 48
_SOFT_FLAT_LOSS_MIN_CLASSES = (34, 33)


def _soft_loss_jvp(eps: float, axis: int, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    """The derivative of :func:`_soft_loss` (see there). On XLA:CPU a class
    axis of ``_SOFT_FLAT_MIN_CLASSES`` or more followed by two or more
    dimensions is summed over their flat view (``_class_sum(flat=True)``;
    the forward does so from 25 classes, where :func:`_soft_fused_applies`
    does not apply). fwd+bwd of the mean, ``ab.py --soft --axis 1``, 2-core
    EPYC: float32 4x150x64x64 3.6-3.9x faster (0.21-0.28x -> 0.81-1.01x
    optax), 4x100x64x64 3.6x, 2x150x128x128 3.5x, 8x64x64x64 2.9-3.5x,
    4x64x96x96 2.4x, 8x48x96x96 1.7x; bfloat16 4x150x64x64 3.9x, 8x64x64x64
    4.2x; but 32 classes 0.66-0.97x (8x32x128x128, 8x32x64x64,
    4x32x128x128). The forward alone: 1.0-1.12x (over 32 to 150 classes).

    From ``_SOFT_FLAT_LOSS_MIN_CLASSES`` (34 float32, 33 16-bit) the loss
    term alone takes the flat view, the weights' sum ``A`` keeps
    :func:`_row_sum` below 48: XLA:CPU's reduction of ``w q' (-log p)``
    over the strided axis slowed from 34 classes (8xCx64x64 float32: 2.9 ms
    at 33, 4.0-4.1 at 34, 4.6-5.6 at 35, 5.2-5.8 at 40-44), its sum of
    ``w q'`` did not (0.3 ms at 40 alone, 2.9 ms for the loss term, 0.5
    over the view). fwd+bwd of the mean, ``ab.py --soft --axis 1 --base
    adeaacd``, 2-core EPYC: float32 8x34x64x64 1.52-1.58x faster (0.59x ->
    0.91x optax), 8x35x64x64 1.7-2.0x, 8x36-8x44 1.59-1.79x (0.49-0.62x ->
    0.87-0.99x), 4x35-4x44x128x128 1.47-1.82x, 16x40x32x32 1.70x,
    2x40x256x256 1.15x; bfloat16 8x33x64x64 1.62x, 8x36 1.84x, 8x40 1.62x,
    4x44x128x128 1.78x. At 33 float32 classes and below the view measured
    0.87-1.23x (33: 0.87-1.09x; 32: 0.85-0.93x; 28: 0.93-1.23x)."""
    x, q, w, where = primals
    x_dot, q_dot = tangents[:2]
    if isinstance(q_dot, SymbolicZero) and not isinstance(x_dot, SymbolicZero):
        # The logits' derivative alone (the usual case): under jax.vmap the
        # batch is folded into the positions, as the forward's.
        def body(x, q, w, where):
            return _soft_loss_and_x_grad(x, q, w, where, eps, axis)

        def fold(size, in_batched, x, q, w, where):
            (where,) = _batch_broadcast(size, in_batched[3:], (where,))
            return _soft_loss_and_x_grad(x, q, w, where, eps, axis + 1)

        folded = _batch_folded_differentiable(body, fold, _can_fold_soft_loss)
        loss, g = folded(x, q, w, where)
        return loss, jnp.sum(g * x_dot.astype(g.dtype), axis=axis)
    with_x = not isinstance(x_dot, SymbolicZero)
    loss, g, neg_logp = _soft_generic_terms(x, q, w, where, eps, axis, with_x)
    loss_dot = jnp.zeros_like(loss)
    if g is not None:
        loss_dot = loss_dot + jnp.sum(g * x_dot.astype(g.dtype), axis=axis)
    if not isinstance(q_dot, SymbolicZero):
        h = _masked(_target_grad(neg_logp, w, eps, axis), where, axis)
        loss_dot = loss_dot + jnp.sum(h * q_dot.astype(h.dtype), axis=axis)
    return loss, loss_dot


def _soft_loss_and_x_grad(
    x: Array, q: Array, w: Array | None, where: Array | None, eps: float, axis: int
) -> tuple[Array, Array]:
    """``(l, dl/dx)`` per position of :func:`_soft_loss`, both 0 where
    ``where`` is False: by :func:`_soft_loss_and_grad` where
    :func:`_soft_native_grad_applies`, else the generic terms."""
    if _soft_native_grad_applies(x, axis):
        loss, g = _soft_loss_and_grad(x, q, w, eps, axis)
        return _masked(loss, where), _masked(g, where, axis)
    loss, g, _ = _soft_generic_terms(x, q, w, where, eps, axis, True)
    assert g is not None
    return loss, g


def _soft_generic_terms(
    x: Array, q: Array, w: Array | None, where: Array | None, eps: float, axis: int, with_x: bool
) -> tuple[Array, Array | None, Array]:
    """``(l, dl/dx or None, -log p)`` of :func:`_soft_loss` from
    :func:`_soft_parts` and :func:`_class_sum` (``l`` and ``dl/dx`` 0 where
    ``where`` is False), ``dl/dx`` only ``with_x``."""
    qw, neg_logp = _soft_parts(x, q, w, eps, axis)
    c = x.shape[axis]
    flat = c >= _SOFT_FLAT_MIN_CLASSES
    # The loss term's threshold lies below the weights' sum's (34/33 < 48).
    flat_loss = c >= _SOFT_FLAT_LOSS_MIN_CLASSES[0 if x.dtype.itemsize >= 4 else 1]
    loss = _masked(_class_sum(qw * neg_logp, x, axis, flat=flat_loss), where)
    g = None
    if with_x:
        total = jnp.expand_dims(_class_sum(qw, x, axis, flat=flat), axis)
        g = _masked(jnp.exp(-neg_logp) * total - qw, where, axis)
    return loss, g, neg_logp


def _target_grad(neg_logp: Array, w: Array | None, eps: float, axis: int) -> Array:
    """``dl/dq_c = (1 - eps) w_c (-log p_c)``, the targets' gradient."""
    h = (1.0 - eps) * neg_logp
    if w is not None:
        h = h * _broadcast_weight(w.astype(h.dtype), neg_logp.ndim, axis)
    return h


_soft_loss.defjvp(_soft_loss_jvp, symbolic_zeros=True)


# 16-bit logits over a strided class axis: the per-position gradient by
# _soft_loss_and_grad from this many classes.
_SOFT_NONE_MIN_STRIDED_16BIT = 10


def _soft_native_grad_applies(x: Array, axis: int) -> bool:
    """Whether the derivative of :func:`_soft_loss` (``reduction="none"``)
    with respect to the logits alone takes :func:`_soft_loss_and_grad`:
    XLA:CPU where the reduced loss takes its fused fwd+bwd
    (:func:`_soft_fused_applies`), 16-bit logits over a strided class axis
    from ``_SOFT_NONE_MIN_STRIDED_16BIT`` classes.

    Before, every per-position derivative was :func:`_soft_loss_jvp`'s
    generic one (``_soft_parts`` and ``jnp`` sums), which XLA:CPU ran at
    0.59-0.82x optax for bfloat16 rows of 3-19 classes. fwd+bwd of the
    per-position losses averaged by the step, ``ab.py --soft --reduction
    none --base c652984`` (weighted, 2-core EPYC): bfloat16 channels-last
    9765x128x2 3.4x faster (1.24x -> 4.3x optax), 6510x128x3 2.5x,
    3906x128x5 2.4x (0.77x -> 1.85x), 1953x128x10 1.6x (0.74x -> 1.17x),
    1027x128x19 1.9x, 305x128x64 1.6x; float32 channels-last 9765x128x2
    1.8x, 3906x128x5 1.3x, 1953x128x10 1.2x, 1027x128x19 1.2x, 305x128x64
    1.2x, 2500x1000 2.3x (0.88x -> 2.0x), 78x32000 2.3x; over ``axis=1``
    16x16 maps float32 of 5, 10 and 19 classes 1.19-1.50x, 8x19x128x128
    1.41x, bfloat16 of 10 and 19 classes 1.17-1.59x, 8x12x128x128 1.19x.
    Not for bfloat16 over 2-8 strided classes (0.78-0.99x at 2-4, 0.86-1.16x
    at 5, 0.97x at 8: their generic derivative was already 1.2-2.4x optax).
    The gradient's exponentials of bfloat16 logits are XLA's (``xla_exp``,
    as for index targets in :func:`_index_loss_jvp`): the transpose's
    conversion to bfloat16 keeps the pass scalar, where :func:`_exp`'s
    polynomial was slower (1953x128x10: 15.2 against 7.8 ms)."""
    if jax.default_backend() != "cpu" or not _soft_fused_applies(x, axis):
        return False
    strided = axis % x.ndim != x.ndim - 1
    return not (
        strided
        and jnp.dtype(x.dtype).itemsize == 2
        and x.shape[axis] < _SOFT_NONE_MIN_STRIDED_16BIT
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _soft_loss_and_grad(
    x: Array, q: Array, w: Array | None, eps: float, axis: int
) -> tuple[Array, Array]:
    """``(l, dl/dx)`` per position for probability targets, the gradient
    ``A p - w q'`` in the compute dtype, from :func:`_soft_terms`' native
    reductions (XLA:CPU, :func:`_soft_native_grad_applies`), as the reduced
    loss forms it (:func:`_soft_plain_total_and_grad`). Reverse mode
    transposes ``sum(g * dx)`` into ``g * ct``. The native reductions have
    no derivative of their own: differentiating ``g`` (second order) goes
    through the plain expression."""
    return _soft_loss_and_grad_terms(x, q, w, eps, axis, True)


@_soft_loss_and_grad.defjvp
def _soft_loss_and_grad_jvp(
    eps: float, axis: int, primals: tuple, tangents: tuple
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    x, q, w = primals

    def plain(x: Array, q: Array) -> tuple[Array, Array]:
        return _soft_loss_and_grad_terms(x, q, w, eps, axis, False)

    return jax.jvp(plain, (x, q), tuple(tangents[:2]))


def _soft_loss_and_grad_terms(
    x: Array, q: Array, w: Array | None, eps: float, axis: int, native: bool
) -> tuple[Array, Array]:
    """``(l, A p - w q')`` from :func:`_soft_terms` (``native``: its XLA:CPU
    reductions, bfloat16's exponentials XLA's)."""
    loss, total_w, p, qw = _soft_terms(x, q, w, eps, axis, native, xla_exp=x.dtype == jnp.bfloat16)
    return loss, p * jnp.expand_dims(total_w, axis) - qw


# Probability targets, reduced ("mean"/"sum"): the gradient formed in the
# loss's pass, as for index targets (_index_total), from whole-array ops.


def _soft_terms(
    x: Array, q: Array, w: Array | None, eps: float, axis: int, native: bool, xla_exp: bool = False
) -> tuple[Array, Array, Array, Array]:
    """``(loss, A, p, q'')`` for the fwd+bwd of probability targets: the
    per-position loss and ``A = sum_c w_c q'_c`` (no keepdims), and the
    expressions ``p`` (the softmax) and ``q''_c = w_c q'_c``, left for XLA to
    fuse into the gradient's pass.

    ``native`` (XLA:CPU, :func:`_soft_fused_applies`): every reduction
    XLA:CPU's own. YNNPACK, which takes ``jnp.max``/``jnp.sum`` there, wrote
    out the operands it shared with the gradient's pass: the row max
    broadcast to the logits' shape, ``m - x``, ``w_c q'_c`` (fwd+bwd
    temporaries of 200% of the logits at 4096x32000 float32 and bfloat16).
    Classes along the last axis take :func:`_unshifted_row_stats` (one read
    for the max and the sum) and sum ``A`` and the loss apart; along another
    axis the max shift and one variadic reduction for the two
    (:func:`_row_sums`), each the faster there. fwd+bwd, both forms compiled
    in one process and timed interleaved, 2-3 processes, 2-core EPYC
    (unshifted and apart / max shift and variadic): 4x64x64x150 float32
    3.4-3.7 / 4.8-5.1 ms, 512x32000 bfloat16 21.9-23.2 / 32-35 ms,
    4096x1000 5.3-5.8 / 7.3-8.3 ms, 8x128x128x19 5.9-7.4 / 6.3-7.0 ms;
    8x19x128x128 (axis 1) 4.7-5.6 / 3.7-4.1 ms. The gradient's exponentials
    by :func:`_exp`; its ``p`` reads its own float32 view of 16-bit logits
    (:func:`_upcast_apart`, as the index targets'), or by XLA's ``exp``
    with ``xla_exp`` (see :func:`_soft_native_grad_applies`)."""
    cdt, xc, qc, xs = _weighted_targets(x, q, w, eps, axis)
    last = axis % x.ndim == x.ndim - 1
    if native and last:
        m, log_s = _unshifted_row_stats(xs, axis, native=True)
    elif native:
        m, log_s = _native_row_stats(xs, axis)
    else:
        m, log_s = _row_stats(xs, axis)
    m, log_s = m.astype(cdt), log_s.astype(cdt)
    if native and last:
        total_w, gap = _row_sum(qc, axis), _row_sum(qc * (m - xc), axis)
    elif native:
        total_w, gap = _row_sums((qc, qc * (m - xc)), axis)
    else:
        total_w, gap = jnp.sum(qc, axis=axis), jnp.sum(qc * (m - xc), axis=axis)
    loss = gap + total_w * jnp.squeeze(log_s, axis)
    apart = native and x.dtype.itemsize == 2
    xg = _upcast_apart(x).astype(cdt) if apart else xc
    p = (_exp if native and not xla_exp else jnp.exp)((xg - m) - log_s)
    return loss, total_w, p, qc


# XLA:CPU, classes not along the last axis: the fused fwd+bwd up to this many
# (float32; 16-bit logits).
_SOFT_STRIDED_MAX_CLASSES = (24, 19)


def _soft_fused_applies(x: Array, axis: int) -> bool:
    """Whether a reduced loss with probability targets takes the fused
    fwd+bwd (:func:`_soft_total_and_grad`): everywhere except XLA:CPU with
    more classes than ``_SOFT_STRIDED_MAX_CLASSES`` along an axis other than
    the last, where the derivative of :func:`_soft_loss` stays.

    fwd+bwd against that derivative, ``ab.py --soft --axis 1``, 8xCx128x128,
    2-core EPYC: float32 C = 12, 19, 24 1.13-1.55x faster, 28 0.95x, 32
    0.99x; bfloat16 C = 10, 16, 18, 19 1.26-1.40x (4x19x256x256 3.2x,
    16x19x64x64 1.40x), but 20, 22, 24 0.72-0.83x. Larger C: XLA:CPU's own
    reductions over the strided class axis were slow (4x150x64x64 float32
    0.21x optax against 0.25x, 4x64x96x96 0.26-0.34x against 0.33-0.42x)
    and YNNPACK's wrote out the logits-size operands they shared with the
    gradient (0.6-0.86x optax, temporaries 200%). From 48 classes the
    derivative of :func:`_soft_loss` sums over a flat view of the positions
    (:func:`_soft_loss_jvp`): 0.81-1.15x optax.

    Nor 16-bit logits of a small input (:func:`_cpu_small`), where XLA:CPU
    split the variadic reductions over both cores (as in
    :func:`_native_row_sums`): fwd+bwd 3x4096 and 160x100 bfloat16 0.44x and
    0.51x the speed of before (64x1000 1.23x); by ``jnp.max``/``jnp.sum``
    0.68x and 0.74x.
    """
    if jax.default_backend() != "cpu":
        return True
    if x.dtype.itemsize == 2 and _cpu_small(x.shape):
        return False
    if axis % x.ndim == x.ndim - 1:
        return True
    limit = _SOFT_STRIDED_MAX_CLASSES[0 if x.dtype.itemsize >= 4 else 1]
    return x.shape[axis] <= limit


def _soft_plain_total_and_grad(
    x: Array,
    q: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    eps: float,
    axis: int,
    *,
    barrier: bool = True,
) -> tuple[Array, Array]:
    """``(scale * sum_i l_i, scale * dl/dx)`` for probability targets, the
    gradient ``A p - w q'`` in the compute dtype, 0 where ``where`` is
    False (``barrier``: on XLA:CPU by its own reductions, see
    :func:`_soft_terms`; not when the gradient itself is differentiated).
    A ``scale`` of shape ``(B,)``: the positions are ``B`` examples' (the
    first dimension; a batch folded under ``jax.vmap``), one scale and one
    total each."""
    native = barrier and jax.default_backend() == "cpu"
    if native and _soft_sliced_grad_applies(x, axis):
        return _soft_sliced_total_and_grad(x, q, where, w, scale, eps, axis)
    loss, total_w, p, qw = _soft_terms(x, q, w, eps, axis, native)
    s_pos = _at_positions(scale.astype(loss.dtype), loss.shape)
    s_logits = jnp.expand_dims(s_pos, axis) if jnp.ndim(s_pos) else s_pos
    grad = _masked(p * jnp.expand_dims(s_pos * total_w, axis) - s_logits * qw, where, axis)
    return _scaled_total(loss, where, scale), grad


# XLA:CPU, float32 and bfloat16 probability targets over a strided class axis
# of at least _SOFT_FLAT_MIN_CLASSES classes: the fwd+bwd of inputs of this
# many logits or more takes the chunked loop (_soft_loop_total_and_grad).
_SOFT_LOOP_MIN_ELEMENTS = 1 << 22
# The forward alone takes it where the plane of positions after the class
# axis is larger than this.
_SOFT_LOOP_FORWARD_MIN_PLANE = 1 << 14


def _soft_loop_applies(x: Array, axis: int, forward: bool = False) -> bool:
    """Whether a reduced loss with probability targets takes the chunked
    loop :func:`_soft_loop_total_and_grad` for its fwd+bwd: XLA:CPU, float32
    or bfloat16 logits, at least ``_SOFT_LOOP_MIN_ELEMENTS``, a class axis other than
    the last of at least ``_SOFT_FLAT_MIN_CLASSES`` classes (where
    :func:`_soft_fused_applies` does not apply).

    ``forward`` (no derivative): only where the plane of positions after the
    class axis is larger than ``_SOFT_LOOP_FORWARD_MIN_PLANE``. Below, the
    whole-array forward (:func:`_soft_loss`) was the faster (``ab.py
    --soft --axis 1``, 2-core EPYC, loop against it: 4x64x128x128 0.75x,
    8x150x64x64 0.15x); above, the loop (2x64x180x180 1.0x, 4x48x180x180
    2.1x, 1x150x180x180 3.4x, 2x48x256x256 3.5x, 2x150x256x256 4.9x)."""
    if jax.default_backend() != "cpu" or axis % x.ndim == x.ndim - 1:
        return False
    axis = axis % x.ndim
    if forward and math.prod(x.shape[axis + 1 :]) <= _SOFT_LOOP_FORWARD_MIN_PLANE:
        return False
    return (
        x.dtype in (jnp.float32, jnp.bfloat16)
        and x.shape[axis] >= _SOFT_FLAT_MIN_CLASSES
        and x.size >= _SOFT_LOOP_MIN_ELEMENTS
    )


def _soft_chunk(
    xb: Array, qb: Array, w: Array | None, eps: float, cax: int, scale_grad: Array | None
) -> tuple[Array, Array | None]:
    """One chunk of :func:`_soft_loop_total_and_grad`: the per-position loss
    ``sum_c w_c q'_c (m - x_c) + A log s`` and, given ``scale_grad``, the
    gradient ``scale_grad * (A p - w q')``: :func:`_soft_terms`' maths, but
    with the exponentials shared by the row sum and the gradient (through
    ``_soft_terms``, which recomputes them, the loop measured 0.78-0.92x at
    4x64x128x128 float32)."""
    _, xb, qw, _ = _weighted_targets(xb, qb, w, eps, cax)
    m = jax.lax.stop_gradient(jnp.max(xb, axis=cax, keepdims=True))
    if scale_grad is None:
        log_s = jnp.log(jnp.sum(_exp(xb - m), axis=cax, keepdims=True))
    else:
        e, s, log_s = _shared_exp(xb, m, cax)
    total_w = jnp.sum(qw, axis=cax, keepdims=True)
    loss = jnp.sum(qw * (m - xb), axis=cax) + jnp.squeeze(total_w * log_s, cax)
    if scale_grad is None:
        return loss, None
    return loss, e * (scale_grad * total_w / s) - scale_grad * qw


def _soft_loop_total_and_grad(
    x: Array,
    q: Array,
    where: Array | None,
    w: Array | None,
    scale: Array,
    eps: float,
    axis: int,
    with_grad: bool = True,
) -> tuple[Array, Array | None]:
    """:func:`_soft_plain_total_and_grad` by a chunked loop over the
    positions, as the index targets' (:func:`_fused_pass`), where
    :func:`_soft_loop_applies`: each chunk's row statistics, sums and
    gradient from one read of its logits and targets, the gradient written
    into the loop's buffer in ``x.dtype`` (temporaries of a few chunks).

    Whole-array passes over a strided class axis of many classes were slow
    on XLA:CPU, and the slower the larger the plane of positions after the
    classes (YNNPACK's reductions and XLA's alike, optax too): float32
    fwd+bwd 2x150x256x256 360-600 ms, 8x150x128x128 (as many logits) 95-116
    ms. Their derivative of :func:`_soft_loss` (before this loop) also held
    200% of the logits in temporaries (bfloat16: 400%; through the loop
    200%, the bits of logits and targets copied once, see below). ``ab.py
    --soft --axis 1`` against that (weighted mean, 2-core EPYC;
    ``benchmarks/PERFORMANCE.md``, "Probability targets over a strided
    class axis, chunked")."""
    cdt = _compute_dtype(jnp.promote_types(x.dtype, q.dtype))
    axis = axis % x.ndim
    shape = x.shape
    scale = scale.astype(cdt)
    zero = jnp.zeros((), cdt)
    cut = _Chunking.of_logits(shape, axis, x.dtype.itemsize)
    # bfloat16 travels through the loop as its bits: XLA:CPU would convert
    # a bfloat16 slice or in-place update to float32 (see _loop_writes_grad),
    # hoisting a float32 copy of the whole input out of the loop. XLA:CPU
    # still copies each input once for the bitcast (a loop fusion, not a
    # view): temporaries of 200% of bfloat16 logits with bfloat16 targets.
    xs, qs = (_bf16_as_bits(v).reshape(cut.view) for v in (x, q))
    bits = xs.dtype == jnp.uint16
    ms = None if where is None else where.reshape(cut.pview)
    # The chunk without its dimensions of size 1 (a chunk of one leading
    # position ran 6-8x slower with it).
    chunk = tuple(n for k, n in enumerate(cut.chunk) if n > 1 or k == cut.cax)
    cax = sum(1 for k, n in enumerate(cut.chunk[: cut.cax]) if n > 1)
    pchunk = tuple(n for n in cut.pchunk if n > 1)

    def body(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        total, g = carry
        xstart, start, fresh = cut.at(i)
        xb, qb = (
            _bits_to_float(jax.lax.dynamic_slice(v, xstart, cut.chunk)).astype(cdt).reshape(chunk)
            for v in (xs, qs)
        )
        loss, grad = _soft_chunk(xb, qb, w, eps, cax, scale if with_grad else None)
        keep = fresh.reshape(pchunk)
        mb = None if ms is None else jax.lax.dynamic_slice(ms, start, cut.pchunk).reshape(pchunk)
        if mb is not None:
            keep = keep & mb
        total = total + jnp.sum(jnp.where(keep, loss, zero))
        if grad is None:
            return total, g
        if mb is not None:
            grad = jnp.where(jnp.expand_dims(mb, cax), grad, zero)
        grad = _bf16_bits(grad).astype(jnp.uint16) if bits else grad.astype(x.dtype)
        return total, jax.lax.dynamic_update_slice(g, grad.reshape(cut.chunk), xstart)

    grad0 = _empty(xs.shape if with_grad else (0,) * xs.ndim, xs.dtype)
    carry = tuple(_varying_like(v, xs, qs, ms, w, scale) for v in (zero, grad0))
    total, g = jax.lax.fori_loop(0, cut.steps, body, carry)
    total = _scaled(total, scale)
    if not with_grad:
        return total, None
    g = jax.lax.bitcast_convert_type(g, jnp.bfloat16) if bits else g
    return total, g.reshape(shape)


def _bf16_as_bits(v: Array) -> Array:
    """bfloat16 ``v`` as its ``uint16`` bits; any other ``v`` as it is."""
    return jax.lax.bitcast_convert_type(v, jnp.uint16) if v.dtype == jnp.bfloat16 else v


def _bits_to_float(v: Array) -> Array:
    """:func:`_bf16_as_bits` undone as float32 (exact); other ``v`` as it is."""
    return _from_bf16_bits(v) if v.dtype == jnp.uint16 else v


def _scaled_total(loss: Array, where: Array | None, scale: Array) -> Array:
    """``scale * sum(loss)`` over the positions ``where`` keeps, by
    :func:`_scaled`. A ``scale`` of shape ``(B,)``: the positions are ``B``
    examples' (the first dimension; a batch folded under ``jax.vmap``), one
    total each."""
    v = _masked(loss, where)
    return _scaled(_example_sums(v) if jnp.ndim(scale) else jnp.sum(v), scale)


def _scaled(total: Array, scale: Array) -> Array:
    """``scale * total`` for a summed loss ``total``, 0 when ``scale`` is 0
    whatever the sum (a mean over nothing: 0 even where a bad label made the
    sum NaN; torch_compat's NaN is set apart, :func:`_nan_if_nothing`). Every
    reduced loss is scaled here, the kernel's too."""
    s = scale.astype(total.dtype)
    return jnp.where(s != 0, s * total, jnp.zeros((), total.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _soft_total_and_grad(
    x: Array, q: Array, where: Array | None, w: Array | None, scale: Array, eps: float, axis: int
) -> tuple[Array, Array]:
    """:func:`_soft_plain_total_and_grad`, the gradient in ``x.dtype``.

    Whole-array ops, not a chunked loop as index targets'
    (:func:`_fused_pass`): at the full float32 sizes on XLA:CPU the loop cut
    the temporaries (8x512x512x150 3.3% -> 0.17% of the logits,
    16x512x1024x19 26% -> 0.22%, NCHW 37% -> 0.07%) but measured 0.64-0.80x
    the speed channels-last (chunks of 2**18 to 2**22 logits, with and
    without the unshifted statistics or the polynomial ``exp``; ``ab.py
    --soft --base b6b466d``), 1.04x NCHW. Except over a strided class axis
    of many classes (:func:`_soft_loop_applies`), where the whole-array
    passes were slower still: the loop of :func:`_soft_loop_total_and_grad`.
    """
    if _soft_loop_applies(x, axis):
        return _soft_loop_total_and_grad(x, q, where, w, scale, eps, axis)

    def body(x, q, where, w, scale):
        total, grad = _soft_plain_total_and_grad(x, q, where, w, scale, eps, axis)
        return total, _to_dtype(grad, x.dtype)

    def fold(size, in_batched, x, q, where, w, scale):
        batched = (in_batched[2], in_batched[4])
        where, scale = _batch_broadcast(size, batched, (where, scale))
        total, grad = _soft_plain_total_and_grad(x, q, where, w, scale, eps, axis + 1)
        return total, _to_dtype(grad, x.dtype)

    def can_fold(in_batched, x, q, *args):
        # Not where the batch as one input takes the chunked loop (which sums
        # inside its loop): vmapped as it is.
        batch_loop = _soft_loop_applies(x, axis + 1)
        return _can_fold(in_batched) and bool(in_batched[1]) and not batch_loop

    return _batch_folded(body, fold, can_fold)(x, q, where, w, scale)


@_soft_total_and_grad.defjvp
def _soft_total_and_grad_jvp(
    eps: float, axis: int, primals: tuple, tangents: tuple
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    # Reached only when the gradient itself is differentiated: the plain
    # expression, differentiated by JAX (as _fused_total_and_grad_jvp).
    x, q, where, w, scale = primals

    def plain(x: Array, q: Array) -> tuple[Array, Array]:
        total, grad = _soft_plain_total_and_grad(x, q, where, w, scale, eps, axis, barrier=False)
        return total, grad.astype(x.dtype)

    return jax.jvp(plain, (x, q), tuple(tangents[:2]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _soft_total(
    x: Array, q: Array, where: Array | None, w: Array | None, scale: Array, eps: float, axis: int
) -> Array:
    """``scale * sum_i l_i`` over the positions (``where``) for probability
    targets (0 when ``scale`` is 0); the forward is :func:`_soft_loss`'s,
    or where :func:`_soft_loop_applies` the chunked loop's without the
    gradient."""
    if _soft_loop_applies(x, axis, forward=True):
        return _soft_loop_total_and_grad(x, q, where, w, scale, eps, axis, with_grad=False)[0]
    return _scaled_total(_soft_loss(x, q, w, None, eps, axis), where, scale)


def _soft_total_jvp(eps: float, axis: int, primals: tuple, tangents: tuple) -> tuple[Array, Array]:
    # As _index_total_jvp: the gradient of the logits is formed in the loss's
    # pass, and reverse mode transposes sum(g * dx) into g * ct. The targets'
    # gradient, (1 - eps) w (-log p), only where they are differentiated.
    x, q, where, w, scale = primals
    x_dot, q_dot = tangents[:2]
    if isinstance(x_dot, SymbolicZero):
        total = _soft_total(x, q, where, w, scale, eps, axis)
        total_dot = jnp.zeros_like(total)
    else:
        total, grad = _soft_total_and_grad(x, q, where, w, scale, eps, axis)
        total_dot = jnp.sum(grad.astype(total.dtype) * x_dot.astype(total.dtype))
    if not isinstance(q_dot, SymbolicZero):
        h = _target_grad(_soft_parts(x, q, w, eps, axis)[1], w, eps, axis)
        s = scale.astype(h.dtype)
        h = _masked(s * h, where, axis)
        total_dot = total_dot + jnp.sum(h * q_dot.astype(h.dtype))
    return total, total_dot


_soft_total.defjvp(_soft_total_jvp, symbolic_zeros=True)


# ---------------------------------------------------------------------------
# reductions and the shared entry point
# ---------------------------------------------------------------------------


def _reduced_scale(
    reduction: str, denominator: Any, axis_name: Any, dtype: Any
) -> tuple[Array, Array]:
    """``(scale, nothing)``: the factor of a reduced loss's sum, gradient
    stopped (1 for "sum", ``1 / denominator()`` for "mean", summed over
    ``axis_name`` first), and whether a mean has nothing to average.

    The scale of a mean over nothing (all ignored, weights all 0, an empty
    batch) is 0, so every pass leaves the gradient 0 there; PyTorch's loss
    there is 0/0 = NaN, which the callers set from ``nothing`` (torch_compat)
    or leave 0 (jaxloss's own API)."""
    if reduction == "sum":
        return jnp.ones((), dtype), jnp.zeros((), bool)
    denom = denominator()
    if axis_name is not None:
        denom = jax.lax.psum(denom, axis_name)
    nothing = denom == 0
    scale = jnp.where(nothing, jnp.zeros((), dtype), 1 / jnp.where(nothing, 1, denom))
    return jax.lax.stop_gradient(scale), nothing


def _nan_if_nothing(total: Array, nothing: Array) -> Array:
    """PyTorch's mean over nothing: 0/0 = NaN whatever the sum (label
    smoothing's included), its gradient 0."""
    return jnp.where(nothing, jnp.full((), jnp.nan, total.dtype), total)


@functools.partial(
    jax.jit,
    static_argnames=(
        "ignore_index",
        "reduction",
        "eps",
        "axis",
        "axis_name",
        "normalize",
        "nan_if_empty",
        "pallas",
    ),
)
def _index_impl(
    x: Array,
    t: Array,
    w: Array | None,
    where: Array | None,
    *,
    ignore_index: int | None,
    reduction: str,
    eps: float,
    axis: int,
    axis_name: Any,
    normalize: bool,
    nan_if_empty: bool,
    pallas: bool = False,
) -> Array:
    if reduction == "none":
        valid = _valid_mask(t, where, ignore_index)
        return _index_loss(x, t, valid, w, eps, normalize, axis, pallas)
    # "mean"/"sum": the chunked pass, with the mean's 1/denominator folded in
    # so that the gradient it writes needs no rescaling.
    cdt = _compute_dtype(x.dtype)
    scale, nothing = _reduced_scale(
        reduction,
        lambda: _weight_count(t, where, w, ignore_index, x.shape[axis], cdt),
        axis_name,
        cdt,
    )
    total = _index_total(x, t, where, w, scale, ignore_index, eps, normalize, axis, pallas)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return _nan_if_nothing(total, nothing) if nan_if_empty else total


@functools.partial(
    jax.jit, static_argnames=("reduction", "eps", "axis", "axis_name", "nan_if_empty")
)
def _soft_impl(
    x: Array,
    q: Array,
    w: Array | None,
    where: Array | None,
    *,
    reduction: str,
    eps: float,
    axis: int,
    axis_name: Any,
    nan_if_empty: bool,
) -> Array:
    if reduction == "none":
        # 0 where masked out, and its gradient there, whatever the logits.
        return _soft_loss(x, q, w, where, eps, axis)
    cdt = _compute_dtype(jnp.promote_types(x.dtype, q.dtype))
    n = math.prod(x.shape) // x.shape[axis]
    scale, nothing = _reduced_scale(
        reduction,
        lambda: jnp.asarray(n, cdt) if where is None else jnp.sum(where, dtype=cdt),
        axis_name,
        cdt,
    )
    if _soft_fused_applies(x, axis) or _soft_loop_applies(x, axis):
        # The gradient formed in the loss's pass, the mean's 1/denominator
        # folded in (as _index_impl).
        total = _soft_total(x, q, where, w, scale, eps, axis)
    else:  # the derivative of _soft_loss (0 where masked out, as above)
        total = _scaled_total(_soft_loss(x, q, w, where, eps, axis), None, scale)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return _nan_if_nothing(total, nothing) if nan_if_empty else total


def _loss(
    inputs: Any,
    targets: Any,
    *,
    weight: Any,
    ignore_index: Any,
    reduction: Any,
    label_smoothing: Any,
    axis: Any,
    where: Any,
    axis_name: Any,
    normalize: bool,
    nan_if_empty: bool,
) -> Array:
    """Validate once at the boundary, then dispatch to the jitted core."""
    input_name = "logits" if normalize else "log_probs"
    x = _checks.as_float_input(inputs, input_name)
    axis = _checks.canonical_axis(axis, x.ndim)
    reduction = _checks.check_reduction(reduction)
    eps = _checks.check_label_smoothing(label_smoothing)
    ignore_index = _checks.check_ignore_index(ignore_index)
    num_classes = x.shape[axis]
    if num_classes == 0:
        raise ValueError(
            f"{input_name} must have at least one class; got {input_name}.shape="
            f"{tuple(x.shape)} with size 0 along the class axis {axis}."
        )
    w = _checks.check_weight(weight, num_classes, _compute_dtype(x.dtype))
    mask = _checks.check_where(where, _checks.position_shape(x.shape, axis))
    t = jnp.asarray(targets)

    if jnp.issubdtype(t.dtype, jnp.floating):
        if not normalize:
            raise TypeError(
                f"nll_loss takes integer class-index targets; got dtype {t.dtype}. "
                "Probability targets are supported by cross_entropy."
            )
        _checks.check_soft_targets(t, x.shape, input_name)
        return _soft_impl(
            x,
            t,
            w,
            mask,
            reduction=reduction,
            eps=eps,
            axis=axis,
            axis_name=axis_name,
            nan_if_empty=nan_if_empty,
        )

    t = _checks.as_index_targets(t)
    _checks.check_index_targets(t, x.shape, axis, input_name)
    _checks.check_target_values(t, num_classes, ignore_index, mask)
    return _index_impl(
        x,
        t,
        w,
        mask,
        ignore_index=ignore_index,
        reduction=reduction,
        eps=eps,
        axis=axis,
        axis_name=axis_name,
        normalize=normalize,
        nan_if_empty=nan_if_empty,
        # The kernel's maths is float32: float64 inputs (x64) keep the XLA path.
        pallas=_kernels.pallas_enabled() and x.dtype != jnp.float64,
    )


# ---------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------


def nll_loss(
    log_probs: Any,
    targets: Any,
    *,
    weight: Any = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    axis: int = -1,
    where: Any = None,
    axis_name: Any = None,
) -> Array:
    r"""Negative log-likelihood loss with PyTorch's semantics.

    .. math::

        \ell_i = -w_{t_i} \, x_{i, t_i}, \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i w_{t_i}}

    where the sums run over positions that are neither ``ignore_index`` nor
    masked out by ``where``.

    Args:
      log_probs: log-probabilities, floating, with the class axis ``axis``:
        shape ``(C,)``, ``(N, C)`` or any number of spatial dims either side.
      targets: integer class indices (any integer dtype) with the shape of
        ``log_probs`` without its class axis.
      weight: optional per-class weights of shape ``(C,)``. No gradient flows
        into them.
      ignore_index: a target value that contributes nothing (neither to the
        numerator nor the denominator of the mean); ``None`` ignores nothing.
      reduction: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"``
        (per-position losses, 0 at ignored positions).
      axis: the class axis; -1 (channels-last) by default, 1 for PyTorch's layout.
      where: optional boolean mask broadcastable to ``targets``; False
        positions are treated as ignored.
      axis_name: inside ``shard_map``/``pmap``, sum the numerator and
        denominator of ``"mean"`` (and the total of ``"sum"``) over this named
        axis, giving the global weighted mean.

    Returns:
      float32 (float64 under x64) scalar, or per-position losses for ``"none"``.
      When nothing is left to average, ``"mean"`` is 0.0 (PyTorch: NaN).

    Raises:
      ValueError / TypeError on bad shapes, dtypes, axis, weight or reduction,
      and on a concrete target outside ``[0, C)`` that is not ``ignore_index``.
      Under ``jit`` such a target makes its loss NaN instead.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxloss
      >>> log_probs = jnp.array([[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]])
      >>> targets = jnp.array([0, 1])
      >>> print(f"{jaxloss.nll_loss(log_probs, targets, reduction='sum'):.2f}")
      -1.80
      >>> print(f"{jaxloss.nll_loss(log_probs, targets):.2f}")
      -0.90
      >>> w = jnp.array([0.6, 0.2, 0.2])
      >>> print(f"{jaxloss.nll_loss(log_probs, targets, weight=w):.2f}")
      -0.75
    """
    return _loss(
        log_probs,
        targets,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=0.0,
        axis=axis,
        where=where,
        axis_name=axis_name,
        normalize=False,
        nan_if_empty=False,
    )


def cross_entropy(
    logits: Any,
    targets: Any,
    *,
    weight: Any = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    where: Any = None,
    axis_name: Any = None,
) -> Array:
    r"""Softmax cross-entropy with PyTorch's semantics.

    With class-index targets ``t`` and ``-\log p_c = \operatorname{lse}(x) - x_c``:

    .. math::

        \ell_i = (1 - \varepsilon)\, w_{t_i} (-\log p_{i,t_i})
                 + \frac{\varepsilon}{C} \sum_c w_c (-\log p_{i,c}), \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i w_{t_i}}

    over positions that are neither ignored nor masked out by ``where``.
    With probability targets ``q`` (a floating array shaped like ``logits``),
    ``\ell_i = -\sum_c w_c q'_{i,c} \log p_{i,c}`` with
    ``q' = (1 - \varepsilon) q + \varepsilon / C``, and ``"mean"`` divides by the
    number of positions (``ignore_index`` does not apply).

    The log-softmax is never materialised and no one-hot is built; under
    differentiation the gradient is formed in the same pass as the loss.

    Args:
      logits: unnormalised scores, floating, class axis ``axis``.
      targets: integer class indices shaped like ``logits`` without the class
        axis (uint8 masks with 255 = void work), or class probabilities
        shaped like ``logits``.
      weight: optional per-class weights of shape ``(C,)``.
      ignore_index: target value to ignore; ``None`` ignores nothing.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: ``eps`` in ``[0, 1]``, PyTorch's rule.
      axis: the class axis (-1 channels-last by default; 1 for NCHW).
      where: optional boolean mask broadcastable to the positions.
      axis_name: named axis to take a global mean over (``shard_map``/``pmap``).

    Returns:
      float32 (float64 under x64) loss. When nothing is left to average,
      ``"mean"`` is 0.0 with zero gradients (PyTorch returns NaN).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxloss
      >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
      >>> targets = jnp.array([0, 255], dtype=jnp.uint8)   # 255 = void
      >>> loss = jaxloss.cross_entropy(logits, targets, ignore_index=255)
      >>> print(f"{loss:.4f}")
      0.2413
      >>> grads = jax.grad(jaxloss.cross_entropy)(logits, targets, ignore_index=255)
      >>> print(grads[1])   # the ignored row gets no gradient
      [0. 0. 0.]
    """
    return _loss(
        logits,
        targets,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        axis=axis,
        where=where,
        axis_name=axis_name,
        normalize=True,
        nan_if_empty=False,
    )


def log_softmax(x: Any, axis: int = -1) -> Array:
    """Log-softmax in float32-or-wider maths, returned in the input's dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxloss
      >>> jaxloss.log_softmax(jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)
    """
    arr = _checks.as_float_input(x, "x")
    axis = _checks.canonical_axis(axis, arr.ndim)
    xc = arr.astype(_compute_dtype(arr.dtype))
    m, log_s = _row_stats(xc, axis)
    return ((xc - m) - log_s).astype(arr.dtype)
