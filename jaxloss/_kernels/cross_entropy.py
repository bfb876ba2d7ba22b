"""Pallas (Triton) kernel: cross-entropy / NLL loss and its gradient in one pass.

One program owns a tile of positions and all their classes. When a row of
classes fits on chip (``C <= _MAX_BLOCK_C``) the tile is read once: the row
statistics, the loss and -- with ``with_grad`` -- d(logits) all come from the
one load, and the gradient is written once, in the logits' dtype (the
Liger-Kernel trick). Larger vocabularies loop over class chunks twice: an
online log-sum-exp pass, then a pass that writes the gradient.

Layouts, without transposing copies:

* ``"flat"`` (the channels-last default when a row fits): the logits as a
  flat ``(P*C,)`` array, a ``(block_c, block_p)`` tile addressed by computed
  offsets, so that Triton puts threads along positions and every row
  reduction stays inside a thread (see ``_kernel``).
* ``"last"``: the ``(P, C)`` view of channels-last logits; a tile is
  ``(block_p, block_c)``, contiguous along classes (threads along classes:
  row reductions become warp shuffles, 3-5x slower at C = 19 on an H200;
  kept for the two-read loop, where rows are long).
* ``"mid"``: the ``(A, C, B)`` view of ``axis=1`` (NCHW) logits; a tile is
  ``(block_c, block_p)`` at one ``a``, contiguous along positions.

Block shapes are powers of two; the Triton lowering does not mask a block that
overhangs the array, so every load and store is masked explicitly (interpret
mode would mask it for us, which is why CI alone would not catch this).

Maths in float32 whatever the input dtype; see ``jaxloss._losses`` for the
formulas (``_index_loss_and_grad``) that this kernel reproduces.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxloss._losses import _scaled

Array = jax.Array

# Rows of up to this many classes are held on chip whole (single read).
_MAX_BLOCK_C = 4096
# Elements per tile (per program): 8K keeps registers in check at 4 warps.
_TILE_ELEMENTS = 8192

# Launch configurations measured faster than the defaults on a device, keyed
# by ``(layout, c, with_grad)``; values ``(block_c, block_p, num_warps,
# num_stages, gather)``. Filled by ``benchmarks/gpu_check.py`` in its own
# process (never by the library itself).
_TUNED: dict[tuple[str, int, bool], tuple[int, int, int, int, int]] = {}

Config = tuple[int, int, int, int, int]

# The "flat" layout's computed offsets are int32.
FLAT_MAX_ELEMENTS = 2**31


def _finite_shift(m: jax.Array) -> jax.Array:
    """The row max as the exponentials' shift, 0 for a row of -inf."""
    return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def split_tiles(block_c: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of the power-of-two tiles that make up ``block_c``
    lanes, largest first: ``20 -> [(0, 16), (16, 4)]``."""
    sizes = [1 << i for i in reversed(range(block_c.bit_length())) if block_c >> i & 1]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    return list(zip(offsets, sizes, strict=True))


def split_block(c: int) -> int:
    """Lanes for a row of ``c`` classes held as at most two power-of-two
    tiles: the largest power of two up to ``c`` plus the power of two that
    covers the rest (19 -> 16 + 4 = 20, 150 -> 128 + 32 = 160, 32 -> 32)."""
    top = _pow2_floor(c)
    return top + (int(pl.next_power_of_2(c - top)) if c > top else 0)


def block_sizes(c: int, n_pos: int, tile: int = _TILE_ELEMENTS) -> tuple[int, int]:
    """``(block_c, block_p)``: powers of two, ``block_c * block_p <= tile``."""
    block_c = min(pl.next_power_of_2(c), _MAX_BLOCK_C)
    block_p = max(1, tile // block_c)
    block_p = min(block_p, pl.next_power_of_2(max(n_pos, 1)))
    return block_c, _pow2_floor(block_p)


def _layout(channels_last: bool, gather: int, n_logits: int) -> str:
    """The kernel's view of the logits. The "flat" view computes its offsets
    in int32 (int64 would need x64 in JAX): from ``FLAT_MAX_ELEMENTS`` logits
    up, the 2-D "last" view, whose offsets Pallas widens itself."""
    if not channels_last:
        return "mid"
    return "flat" if gather and n_logits < FLAT_MAX_ELEMENTS else "last"


def launch_config(layout: str, c: int, n_pos: int, with_grad: bool) -> Config:
    """``(block_c, block_p, num_warps, num_stages, gather)`` for one call.

    The defaults come from timing candidates at the benchmark shapes on an
    H200 (``benchmarks/gpu_check.py``; jax 0.11.2; the runs are in
    ``benchmarks/PERFORMANCE.md``, "GPU timings"):

    * 32 to 64 logits per thread, 1 to 4 warps; bigger tiles starved the
      SM of resident programs (C = 19 channels-last fwd+bwd: 0.67 ms at 4
      warps and 128 positions, 1.25 ms at 16 warps and 1024). Runs on
      different machines ranked neighbours within ~15%;
    * rows as two power-of-two "split tiles" (:func:`split_block`; 16 + 4
      lanes for 19 classes): NCHW seg19 fwd+bwd 0.51 against 0.74 ms with
      one 32-lane tile, seg150 forward 0.60 against 0.77 ms. Only the
      channels-last gradient of rows up to 32 lanes keeps the padded tile
      (0.75 against 0.87 ms);
    * channels-last rows that fit use the "flat" addressing with the natural
      store (``gather=1``): threads along positions, row reductions inside a
      thread. Computed store offsets too (``gather=2``) cost 3x;
    * rows that do not fit loop over chunks of 2048 classes, one row per
      program: few rows in flight, so the second read mostly hits L2
      (0.67-0.73 of the copy floor at 8192 x 128256 bf16, about the 0.67
      that two reads from HBM would allow).
    """
    tuned = _TUNED.get((layout, c, with_grad))
    cap = pl.next_power_of_2(max(n_pos, 1))
    if tuned is not None:
        block_c, block_p, warps, stages, gather = tuned
        return block_c, min(block_p, cap), warps, stages, gather
    if c > _MAX_BLOCK_C:
        return 2048, 1, 4 if with_grad else 2, 1, 0
    block_c = pl.next_power_of_2(c)
    # Split tiles (two power-of-two tiles, 16 + 4 lanes for 19 classes):
    # everywhere but the channels-last gradient of narrow rows, where the
    # padded tile was faster (19 classes: 0.67 ms at 32 lanes, 0.87 at 20).
    lanes = block_c if layout != "mid" and with_grad and block_c <= 32 else split_block(c)
    if layout == "mid":
        if block_c > 32:  # 150 classes: 160 x 32 positions at 4 warps
            _, block_p = block_sizes(c, n_pos)
            return lanes, block_p, 4, 1, 0
        warps, per_thread, gather = 1, 64 if with_grad else 128, 0
    elif with_grad:
        warps, per_thread, gather = max(1, min(4, 128 // block_c)), 32, 1
    else:  # no gradient tile to hold
        warps, per_thread, gather = max(1, min(2, 64 // block_c)), 64, 1
    # Wide rows: enough warps that a thread holds at most per_thread logits.
    warps = max(warps, min(16, block_c // (32 * per_thread)))
    block_p = max(1, per_thread * 32 * warps // lanes)
    return lanes, _pow2_floor(min(block_p, cap)), warps, 1, gather


def _kernel(
    # inputs
    x_ref,
    t_ref,
    m_ref,
    w_ref,
    wt_ref,
    i_ref,
    scale_ref,
    # outputs
    loss_ref,
    *out_refs,
    # static configuration
    layout: str,
    c: int,
    n_pos: int,
    block_c: int,
    block_p: int,
    gather: int,
    ignore_index: int | None,
    eps: float,
    normalize: bool,
    has_where: bool,
    has_weight: bool,
    w_t_given: bool,
    per_position: bool,
    stats: bool,
    interpret: bool,
):
    f32 = jnp.float32
    # "last": (P, C) tiles (block_p, block_c). "mid": (A, C, B) tiles
    # (block_c, block_p) at one a. "flat": channels-last logits as a flat
    # (P*C,) array, tiles (block_c, block_p) addressed by computed offsets.
    last = layout == "last"
    cax = 1 if last else 0  # class axis of a tile
    if layout == "mid":
        a = pl.program_id(0)
        p0 = pl.program_id(1) * block_p
    else:
        pid = pl.program_id(0)
        p0 = pid * block_p
    # int32 offsets throughout, also under x64 (program ids are int32).
    i32 = jnp.int32
    pos = p0 + jnp.arange(block_p, dtype=i32)
    pos_ok = pos < n_pos
    if layout == "flat":
        # Class offsets scaled by a runtime 1: Triton then cannot prove the
        # load contiguous along classes, and lays threads out along positions,
        # so the row reductions stay inside a thread (no warp shuffles); L1
        # absorbs the strided access. (``gather == 2``: the store too.)
        one = i_ref[0]
        row = pos * c  # int32: the wrapper keeps "flat" below 2**31 logits

    def start(c0):
        # A split tile's static offset, made opaque: Pallas rejects a static
        # slice that overhangs the array (16 + 4 lanes past 19 classes) unless
        # it starts at 0; the mask covers the overhang.
        if isinstance(c0, int):
            return c0 * i_ref[0] if c0 > 0 else i32(0)
        return c0

    def tile(c0, bc, store=False):
        cls = jnp.arange(bc, dtype=i32)
        ci = c0 + cls
        if last:
            idx = (pl.ds(p0, block_p), pl.ds(start(c0), bc))
            mask = pos_ok[:, None] & (ci < c)[None, :]
        elif layout == "mid":
            idx = (a, pl.ds(start(c0), bc), pl.ds(p0, block_p))
            mask = (ci < c)[:, None] & pos_ok[None, :]
        else:
            cj = ci if (store and gather == 1) else c0 + cls * one
            idx = cj.astype(row.dtype)[:, None] + row[None, :]
            mask = (ci < c)[:, None] & pos_ok[None, :]
            if interpret:
                # Interpret mode stores masked lanes too (rewriting the old
                # value, which races with the owner's write of that address):
                # send them out of bounds, where scatters drop them. The
                # Triton store does not touch masked lanes.
                idx = jnp.where(mask, idx, n_pos * c)
        return idx, mask, ci

    def per_class(v):  # per-position vector -> broadcast along the class axis
        return v[None, :] if not last else v[:, None]

    def along(v):  # per-class vector -> broadcast along the position axis
        return v[:, None] if not last else v[None, :]

    pidx = (a, pl.ds(p0, block_p)) if layout == "mid" else pl.ds(p0, block_p)
    t = plgpu.load(t_ref.at[pidx], mask=pos_ok, other=0).astype(jnp.int32)
    valid = pos_ok
    if ignore_index is not None:
        valid = valid & (t != ignore_index)
    if has_where:
        valid = valid & (plgpu.load(m_ref.at[pidx], mask=pos_ok, other=0) != 0)
    in_range = (t >= 0) & (t < c)
    scale = scale_ref[0]
    nan = jnp.full((), jnp.nan, f32)
    zero = jnp.zeros((), f32)
    # Class weights: a chunk of them, unless only the target's weight matters
    # (no smoothing) and the caller passed it per position.
    load_w = has_weight and not w_t_given

    def load_x(c0, bc=block_c):
        idx, mask, ci = tile(c0, bc)
        x = plgpu.load(x_ref.at[idx], mask=mask, other=-jnp.inf).astype(f32)
        if load_w:
            w = plgpu.load(w_ref.at[pl.ds(start(c0), bc)], mask=ci < c, other=0.0).astype(f32)
        else:
            w = (ci < c).astype(f32)
        is_t = along(ci) == per_class(t)
        return mask, ci, x, w, is_t

    def chunk_stats(ci, x, w, is_t):
        x_t = jnp.sum(jnp.where(is_t, x, zero), axis=cax)
        w_t = jnp.sum(jnp.where(is_t, along(w), zero), axis=cax) if load_w else None
        m = jnp.max(x, axis=cax)
        # Padding columns (x = -inf, w = 0) are left out; a class of weight 0
        # is not: its w x is NaN at a logit of -inf, as in PyTorch (and the
        # XLA path), whose smoothing term sums w_c log p_c over every class.
        wx = jnp.sum(jnp.where(along(ci < c), along(w) * x, zero), axis=cax) if eps else None
        return x_t, w_t, m, wx

    n_chunks = -(-c // block_c)
    w_total = zero
    wx = None
    if n_chunks == 1:
        # The whole row at once, as one tile per binary digit of block_c (one
        # tile when it is a power of two; 16 + 4 lanes for 19 classes when
        # block_c is 20, instead of 32).
        tiles = [(c0, bc, *load_x(c0, bc)) for c0, bc in split_tiles(block_c)]
        parts = [chunk_stats(ci, x, w, is_t) for *_, ci, x, w, is_t in tiles]

        def combine(k, op=jnp.add):
            return functools.reduce(op, [p[k] for p in parts])

        x_t, m = combine(0), combine(2, jnp.maximum)
        w_t = combine(1) if load_w else None
        wx = combine(3) if eps else None
        # A row of -inf (padding, fully masked logits) would give -inf - -inf
        # = nan: shift it by 0 instead. A +inf logit gives NaN, as in PyTorch.
        m = _finite_shift(m)
        es = [jnp.exp(x - per_class(m)) for *_, x, _, _ in tiles]
        s = functools.reduce(jnp.add, [jnp.sum(e, axis=cax) for e in es])
        w_total = functools.reduce(jnp.add, [jnp.sum(w) for *_, w, _ in tiles])
    else:
        # Pass 1: online log-sum-exp over class chunks.
        zeros = jnp.zeros((block_p,), f32)

        def body(k, carry):
            m, s, x_t, w_t, wx, wsum = carry
            _, ci, x, w, is_t = load_x(k * block_c)
            cx_t, cw_t, cm, cwx = chunk_stats(ci, x, w, is_t)
            m_new = jnp.maximum(m, cm)
            m_safe = _finite_shift(m_new)
            # exp(-inf - m_safe) = 0 rescales the empty sum of a row's first
            # chunks (a shift of 0 there would overflow for logits below -88).
            s = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(x - per_class(m_safe)), axis=cax)
            w_t = w_t + cw_t if load_w else w_t
            wx = wx + cwx if eps else wx
            return m_new, s, x_t + cx_t, w_t, wx, wsum + jnp.sum(w)

        init = (jnp.full((block_p,), -jnp.inf, f32), zeros, zeros, zeros, zeros, zero)
        m, s, x_t, w_t, wx, w_total = jax.lax.fori_loop(i32(0), i32(n_chunks), body, init)
        m = _finite_shift(m)
    if not has_weight:
        w_t = jnp.ones((block_p,), f32)
        w_total = jnp.asarray(float(c), f32)
    elif w_t_given:
        w_t = plgpu.load(wt_ref.at[pidx], mask=pos_ok, other=0.0)

    if normalize:
        log_s = jnp.log(s)
        loss = w_t * ((m - x_t) + log_s)
        if eps > 0.0:
            smooth = (w_total * m - wx) + w_total * log_s
            loss = (1.0 - eps) * loss + (eps / c) * smooth
    else:
        loss = -w_t * x_t
    loss = jnp.where(valid, jnp.where(in_range, loss, nan), zero)
    if per_position:
        plgpu.store(loss_ref.at[pidx], loss, mask=pos_ok)
    elif layout == "mid":
        loss_ref[a, pl.program_id(1)] = jnp.sum(loss)
    else:
        loss_ref[pid] = jnp.sum(loss)
    if stats:  # the row statistics (m, log s) for a gradient formed outside
        m_out, log_s_out = out_refs[:2]
        plgpu.store(m_out.at[pidx], m, mask=pos_ok)
        plgpu.store(log_s_out.at[pidx], jnp.log(s), mask=pos_ok)
        out_refs = out_refs[2:]
    if not out_refs:
        return
    (g_ref,) = out_refs
    coef = jnp.where(valid, jnp.where(in_range, scale, nan), zero)
    inv_s = 1.0 / s

    def grad_tile(x, w, is_t, e=None):
        if not normalize:
            # A label out of range makes its whole row NaN (coef is NaN there).
            return jnp.where(is_t, per_class(-coef * w_t), per_class(coef * zero))
        p = (jnp.exp(x - per_class(m)) if e is None else e) * per_class(inv_s)
        g = per_class((1.0 - eps) * w_t) * (p - is_t.astype(f32))
        if eps > 0.0:
            g = g + (eps / c) * (w_total * p - along(w))
        # Selected, not multiplied: a skipped row of -inf logits has p = 0/0.
        return jnp.where(per_class(valid), per_class(coef) * g, zero)

    if n_chunks == 1:
        for (c0, bc, mask, _, x, w, is_t), e in zip(tiles, es, strict=True):
            idx = tile(c0, bc, store=True)[0]
            plgpu.store(g_ref.at[idx], grad_tile(x, w, is_t, e).astype(g_ref.dtype), mask=mask)
    else:
        # Pass 2: re-read the chunks, last first (the most recently read are
        # the likeliest still in L2), and write the gradient.
        def write(k, carry):
            c0 = (n_chunks - 1 - k) * block_c
            mask, _, x, w, is_t = load_x(c0)
            idx = tile(c0, block_c, store=True)[0]
            plgpu.store(g_ref.at[idx], grad_tile(x, w, is_t).astype(g_ref.dtype), mask=mask)
            return carry

        jax.lax.fori_loop(i32(0), i32(n_chunks), write, 0)


def cross_entropy_pallas(
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
    per_position: bool = False,
    stats: bool = False,
    interpret: bool = False,
    config: Config | None = None,
) -> tuple[Array, Array | None]:
    """Kernel entry point, the same contract as ``jaxloss._losses._fused_pass``.

    Returns ``(scale * sum_i l_i, scale * dl/dx)`` -- or, with
    ``per_position``, ``(l, dl/dx)`` with ``l`` shaped like ``t`` (and
    ``scale`` applied to the gradient only). ``config`` overrides
    :func:`launch_config`: ``(block_c, block_p, num_warps, num_stages,
    gather)``, each block a power of two (``block_c`` below ``C`` selects the
    two-read loop) except a ``block_c`` from ``C`` up, which may be any sum
    of powers of two: the row is then held as one tile per binary digit
    (:func:`split_tiles`; 20 lanes as 16 + 4 for C = 19 rather than 32);
    ``gather`` (channels-last only) 1 or 2 picks the "flat" addressing of
    :func:`_kernel`.

    ``stats`` (cross-entropy with ``per_position`` and without ``with_grad``)
    returns ``((l, m, log_s), None)`` instead: the row statistics of
    ``jaxloss._losses._row_stats``, shaped like ``t``, from which XLA forms
    the gradient where it is consumed (``reduction="none"``).
    """
    shape = x.shape
    c = shape[axis]
    a = math.prod(shape[:axis])
    b = math.prod(shape[axis + 1 :])
    f32 = jnp.float32
    if stats and (with_grad or not per_position or not normalize):
        raise ValueError("stats needs per_position=True, with_grad=False, normalize=True")
    if a * b == 0:
        loss = jnp.zeros(t.shape, f32) if per_position else jnp.zeros((), f32)
        if stats:
            return (loss, loss, loss), None
        return loss, (jnp.zeros(shape, x.dtype) if with_grad else None)
    last = b == 1
    n_pos = a if last else b
    if config is None:
        config = launch_config("last" if last else "mid", c, n_pos, with_grad)
    block_c, block_p, num_warps, num_stages, gather = config
    if block_c < c and block_c & (block_c - 1):
        raise ValueError(
            f"config block_c={block_c} is below C={c} (the two-read loop) and must then be "
            "a power of two; from C up it may be a sum of powers of two (split tiles)."
        )
    layout = _layout(last, gather, a * b * c)
    n_blocks = -(-n_pos // block_p)
    if layout == "mid":
        xv, tv = x.reshape(a, c, b), t.reshape(a, b)
        grid = (a, n_blocks)
        partial_shape = (a, n_blocks)
    else:
        xv = x.reshape(a * c) if layout == "flat" else x.reshape(a, c)
        tv = t.reshape(a)
        grid = (n_blocks,)
        partial_shape = (n_blocks,)
    # 8- and 16-bit labels are read as they are and widened after the load.
    tv = tv if tv.dtype.itemsize < 4 else tv.astype(jnp.int32)
    # A boolean mask travels as int8 (1 byte a position); none is a dummy.
    mv = jnp.zeros((1,), jnp.int8) if where is None else where.reshape(tv.shape).astype(jnp.int8)
    wv = jnp.zeros((1,), f32) if w is None else w.astype(f32)
    # Two-read loop without smoothing: the target's weight per position
    # (a gather of P values) instead of a chunk of C weights every step.
    w_t_given = w is not None and block_c < c and eps == 0.0
    if w_t_given:
        wtv = wv[jnp.clip(tv.astype(jnp.int32), 0, c - 1)]
    else:
        wtv = jnp.zeros((1,), f32)
    iv = jnp.ones((1,), jnp.int32)
    sv = jnp.reshape(scale.astype(f32), (1,))
    # Inside shard_map (check_vma) the outputs must say which mesh axes they
    # vary over: those of the logits (the caller casts every operand alike).
    typeof = getattr(jax, "typeof", None)
    mat = getattr(typeof(xv), "manual_axis_type", None) if typeof is not None else None
    kw = {} if mat is None else {"manual_axis_type": mat}
    loss_shape = jax.ShapeDtypeStruct(tv.shape if per_position else partial_shape, f32, **kw)
    out_shape = [loss_shape]
    if stats:
        out_shape += [jax.ShapeDtypeStruct(tv.shape, f32, **kw)] * 2
    if with_grad:
        out_shape.append(jax.ShapeDtypeStruct(xv.shape, x.dtype, **kw))
    kernel = functools.partial(
        _kernel,
        layout=layout,
        c=c,
        n_pos=n_pos,
        block_c=block_c,
        block_p=block_p,
        gather=gather,
        ignore_index=ignore_index,
        eps=eps,
        normalize=normalize,
        has_where=where is not None,
        has_weight=w is not None,
        w_t_given=w_t_given,
        per_position=per_position,
        stats=stats,
        interpret=bool(interpret),
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="jaxloss_cross_entropy_fwd_bwd" if with_grad else "jaxloss_cross_entropy_fwd",
    )(xv, tv, mv, wv, wtv, iv, sv)
    loss = outs[0]
    if stats:
        return tuple(o.reshape(t.shape) for o in outs), None
    if per_position:
        loss = loss.reshape(t.shape)
    else:
        loss = _scaled(jnp.sum(loss), scale)
    grad = outs[1].reshape(shape) if with_grad else None
    return loss, grad
