"""One class (C = 1): cross-entropy's ``log p`` is ``x - x``, so each
position's loss is 0 and its gradient 0, NaN at a non-finite logit (as in
PyTorch) and at a label other than 0 that is not ignored (under ``jit``);
NLL's loss is ``-w_0 x``. On XLA:CPU probability targets then take the
class slices (``_soft_sliced_applies``, ``_soft_sliced_grad_applies``) or,
the forward over a strided class axis, optax's program
(``_soft_small_plane_applies``), and index targets no target shift
(``_target_shift_applies``). These tests hold the values against PyTorch
and NumPy in float64, losses and gradients."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch  # noqa: F401  -- the suite must fail, not skip, without PyTorch
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)
from test_functional import (
    check_configs_against_oracles,
    check_forwards_alone,
    default_cotangent,
    positions,
)

import jaxloss
from jaxloss import _losses

F32, BF16 = np.float32, ml_dtypes.bfloat16
IGN = 255

CASES = {  # name: (shape, class axis, dtype)
    "300x1": ((300, 1), -1, F32),
    "4x9x1": ((4, 9, 1), -1, F32),
    "4x1x5x6-axis1": ((4, 1, 5, 6), 1, F32),
    "1x7-axis0": ((1, 7), 0, F32),
    "1": ((1,), 0, F32),
    "8x1x32x33-axis1": ((8, 1, 32, 33), 1, F32),  # a plane of 1024 or more
    "64x1-bf16": ((64, 1), -1, BF16),
    "2x1x4x8-axis1-bf16": ((2, 1, 4, 8), 1, BF16),
}
INDEX_CONFIGS = (("ce", False, 0.0), ("ce", True, 0.2), ("nll", True, 0.0))


def _logits(rng, shape, dtype):
    return (3.0 * rng.standard_normal(shape)).astype(dtype)


def test_where_it_applies():
    """Probability targets: the forward over a strided class axis is optax's
    program, along the last axis the class slices; the fwd+bwd takes the
    class slices along the last axis or before a plane of 1024 positions.
    Index targets keep their paths, without the target shift."""
    for shape, axis, dtype in CASES.values():
        x = jax.ShapeDtypeStruct(shape, dtype)
        strided = axis % len(shape) != len(shape) - 1
        assert _losses._soft_small_plane_applies(x, axis) == strided
        assert _losses._soft_sliced_applies(x, axis) == (not strided)
        plane = math.prod(shape[axis % len(shape) + 1 :])
        assert _losses._soft_sliced_grad_applies(x, axis) == (not strided or plane >= 1024)
        assert not _losses._sliced_applies(x, axis)
    for shape, axis in (((1 << 20, 1), -1), ((4, 1, 512, 512), 1)):
        assert not _losses._target_shift_applies(shape, axis, jnp.float32)
        assert _losses._target_shift_applies(shape[:axis] + (2,) + shape[axis:][1:], axis,
                                             jnp.float32)
    f16 = jax.ShapeDtypeStruct((64, 1), jnp.float16)
    assert _losses._soft_sliced_applies(f16, -1) and _losses._soft_sliced_grad_applies(f16, -1)
    # Not float64 (XLA:CPU's passes were measured for 16- and 32-bit floats).
    f64 = jax.ShapeDtypeStruct((64, 1), jnp.float64)
    assert not _losses._soft_sliced_applies(f64, -1)
    assert not _losses._soft_sliced_grad_applies(f64, -1)


def test_index_targets():
    """Cross-entropy unweighted, and weighted with label smoothing, and NLL
    (whose loss ``-w_0 x`` is not 0); every reduction, about a third of the
    labels ignored, float32 and bfloat16, each class axis; all under one
    ``jit``."""
    configs = {}
    for (name, (shape, axis, dtype)), (fn, weighted, eps), reduction in itertools.product(
        CASES.items(), INDEX_CONFIGS, ("mean", "sum", "none")
    ):
        rng = rng_for("one-class", name, fn, weighted, reduction)
        x = _logits(rng, shape, dtype)
        pos = positions(x, axis)
        t = np.where(rng.random(pos) < 0.3, IGN, 0).astype(np.int32)
        if t.size > 1:
            t.flat[:2] = (IGN, 0)
        kw = dict(weight=np.array([1.7], F32) if weighted else None, ignore_index=IGN)
        if fn == "ce":
            kw["label_smoothing"] = eps
        cot = default_cotangent(fn, x, axis, reduction)
        configs[f"{name} {fn} w={weighted} eps={eps} {reduction}"] = (
            fn, x, t, axis, reduction, kw, cot)
    check_configs_against_oracles(configs)


def test_index_targets_where_the_target_shift_would_apply():
    """2**20 positions, as many logits as ``_target_shift_applies`` asks for
    (which one class does not take): the weighted, smoothed mean and
    ``"none"``, loss and gradient."""
    rng = rng_for("one-class-large")
    x = _logits(rng, (1 << 20, 1), F32)
    t = np.where(rng.random(1 << 20) < 0.1, IGN, 0).astype(np.int32)
    kw = dict(weight=np.array([1.7], F32), ignore_index=IGN, label_smoothing=0.1)
    configs = {r: ("ce", x, t, -1, r, kw, default_cotangent("ce", x, -1, r))
               for r in ("mean", "none")}
    check_configs_against_oracles(configs)


def test_probability_targets():
    """Targets in [0, 2) (PyTorch does not ask them to sum to 1), weighted
    with label smoothing or not, every reduction; loss and gradient, and the
    forward alone, all under one ``jit``."""
    configs = {}
    for (name, (shape, axis, dtype)), (weighted, eps), reduction in itertools.product(
        CASES.items(), ((False, 0.0), (True, 0.1)), ("mean", "sum", "none")
    ):
        rng = rng_for("one-class-soft", name, weighted, reduction)
        x = _logits(rng, shape, dtype)
        # float32 targets (bfloat16 values for bfloat16 logits): the NumPy
        # reference takes a bfloat16 array for class indices. The test below
        # gives bfloat16 ones.
        q = rng.uniform(0.0, 2.0, shape).astype(dtype).astype(F32)
        kw = dict(weight=np.array([0.6], F32) if weighted else None, label_smoothing=eps)
        cot = default_cotangent("ce", x, axis, reduction)
        configs[f"{name} w={weighted} eps={eps} {reduction}"] = (
            "ce", x, q, axis, reduction, kw, cot)
    check_configs_against_oracles(configs)
    check_forwards_alone(configs, tol_key="float32")


def _plant(x):
    """+inf, -inf and NaN logits at the first three positions of ``x`` (a
    copy, float64; one class: the elements are the positions, in order)."""
    x = np.array(x, np.float64)
    x.reshape(-1)[:3] = (np.inf, -np.inf, np.nan)
    return x


def test_non_finite_logits_and_bad_labels():
    """``reduction="none"`` under ``jit``: +inf, -inf and NaN logits at valid
    positions give a NaN loss and gradient, as PyTorch's; a non-finite logit
    at an ignored position gives 0 and a zero gradient (PyTorch's gradient
    is NaN there); a label of 1 or -1 (not ignored) gives NaN, not a
    clamped class. Index and probability targets, float32 and bfloat16,
    both layouts."""
    fns = {
        "index": lambda x, t, axis: jaxloss.cross_entropy(
            x, t, axis=axis, ignore_index=IGN, reduction="none", label_smoothing=0.1),
        "soft": lambda x, t, axis: jaxloss.cross_entropy(x, t, axis=axis, reduction="none"),
    }
    for (name, (shape, axis, dtype)), kind in itertools.product(
        [(k, v) for k, v in CASES.items() if v[0] != (1,)], fns
    ):
        rng = rng_for("one-class-bad", name, kind)
        x64 = _plant(_logits(rng, shape, np.float64))
        x = x64.astype(dtype)
        pos = positions(x, axis)
        if kind == "index":
            t = np.zeros(pos, np.int32)
            t.reshape(-1)[3:6] = (IGN, 1, -1)
            x64.reshape(-1)[3] = np.inf  # an ignored position
            x = x64.astype(dtype)
            target = t
        else:
            target = rng.uniform(0.0, 2.0, shape).astype(dtype)

        def f(v, tt, kind=kind, axis=axis):
            loss, vjp = jax.vjp(lambda a: fns[kind](a, tt, axis), v)
            return loss, vjp(jnp.ones(loss.shape, loss.dtype))[0]

        loss, grad = jax.jit(f)(x, target)
        loss = np.asarray(loss, np.float64)
        grad = np.moveaxis(np.asarray(grad.astype(jnp.float32), np.float64), axis, -1)[..., 0]
        if kind == "index":
            ok = t == 0
            tl, tg = torch_loss_and_grad(to_torch_layout(x64, axis), np.where(ok, t, IGN),
                                         np.ones(pos), nll=False, ignore_index=IGN,
                                         reduction="none", label_smoothing=0.1)
            bad = ~ok & (t != IGN)
            assert np.isnan(loss[bad]).all() and np.isnan(grad[bad]).all(), name
            ign = t == IGN
            assert (loss[ign] == 0).all() and (grad[ign] == 0).all(), name
        else:
            ok = np.ones(pos, bool)
            tl, tg = torch_loss_and_grad(to_torch_layout(x64, axis),
                                         to_torch_layout(np.asarray(target, np.float64), axis),
                                         np.ones(pos), nll=False, reduction="none")
        tg = tg[:, 0] if x.ndim > 1 else tg
        tol = LOSS_TOL["float32"]
        np.testing.assert_array_equal(np.isnan(loss[ok]), np.isnan(tl[ok]), name)
        assert np.isnan(loss.reshape(-1)[:3]).all(), name
        assert_close(loss[ok], tl[ok], tol, f"{name} {kind} loss")
        np.testing.assert_array_equal(np.isnan(grad[ok]), np.isnan(tg[ok]), name)
        assert_close(grad[ok], tg[ok], GRAD_TOL["float32"], f"{name} {kind} gradient")
