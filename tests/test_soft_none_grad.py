"""Probability targets with ``reduction="none"``, differentiated with
respect to the logits alone: on XLA:CPU the per-position loss and gradient
``A p - w q'`` come from the reduced loss's native reductions
(``_soft_loss_and_grad``, where ``_soft_native_grad_applies``), and are
differentiated again through the plain expression. These tests hold the
routing, the values (losses and gradients against PyTorch and NumPy in
float64), forward mode, second order, ``where`` and non-finite logits."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import reference
import torch  # noqa: F401  -- the suite must fail, not skip, without PyTorch
from jax.test_util import check_grads
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)
from test_functional import check_configs_against_oracles, default_cotangent, positions

import jaxloss
from jaxloss import _losses

F32, BF16 = np.float32, ml_dtypes.bfloat16

CASES = {  # name: (shape, class axis, dtype, takes _soft_loss_and_grad)
    "64x19": ((64, 19), -1, F32, True),
    "3x5x2": ((3, 5, 2), -1, F32, True),
    "4x6x64": ((4, 6, 64), -1, F32, True),
    "7": ((7,), 0, F32, True),
    "9x5-bf16": ((9, 5), -1, BF16, True),
    "3x4x19-bf16": ((3, 4, 19), -1, BF16, True),
    "2x19x3x4-axis1": ((2, 19, 3, 4), 1, F32, True),
    "2x24x3x4-axis1": ((2, 24, 3, 4), 1, F32, True),
    "2x2x3x4-axis1": ((2, 2, 3, 4), 1, F32, True),
    "2x10x3x4-axis1-bf16": ((2, 10, 3, 4), 1, BF16, True),
    "2x19x3x4-axis1-bf16": ((2, 19, 3, 4), 1, BF16, True),
    # not taken: more strided classes, fewer 16-bit strided ones
    "2x25x3x4-axis1": ((2, 25, 3, 4), 1, F32, False),
    "2x5x3x4-axis1-bf16": ((2, 5, 3, 4), 1, BF16, False),
    "2x20x3x4-axis1-bf16": ((2, 20, 3, 4), 1, BF16, False),
}


def _case(rng, shape, dtype):
    x = (3.0 * rng.standard_normal(shape)).astype(dtype)
    # Unnormalised targets in [0, 2), as PyTorch allows; float32 values the
    # logits' dtype can hold (the NumPy reference reads them as floats).
    q = rng.uniform(0.0, 2.0, shape).astype(dtype).astype(F32)
    return x, q


def test_where_it_applies():
    for shape, axis, dtype, takes in CASES.values():
        x = jax.ShapeDtypeStruct(shape, dtype)
        assert _losses._soft_native_grad_applies(x, axis) == takes, shape


def test_the_rule_is_what_runs(monkeypatch):
    """The derivative calls ``_soft_loss_and_grad`` exactly where
    ``_soft_native_grad_applies`` says, and not when the targets are
    differentiated too (their gradient needs ``-log p``)."""
    calls = []
    inner = _losses._soft_loss_and_grad

    def spy(*args):
        calls.append(args[0].shape)
        return inner(*args)

    monkeypatch.setattr(_losses, "_soft_loss_and_grad", spy)
    for name, (shape, axis, dtype, takes) in CASES.items():
        x, q = _case(rng_for("soft-none-spy", name), shape, dtype)

        def total(a, b, axis=axis):
            return jnp.sum(jaxloss.cross_entropy(a, b, axis=axis, reduction="none"))

        calls.clear()
        jax.jit(jax.grad(total)).lower(x, q)
        assert calls == ([shape] if takes else []), name
        calls.clear()
        jax.jit(jax.grad(total, argnums=(0, 1))).lower(x, q)
        assert calls == [], name


def test_losses_and_gradients_match_oracles():
    """Weighted with label smoothing or not, a random cotangent per position:
    loss and gradient against PyTorch and NumPy in float64, all under one
    ``jit``."""
    configs = {}
    for (name, (shape, axis, dtype, _)), (weighted, eps) in itertools.product(
        CASES.items(), ((False, 0.0), (True, 0.1))
    ):
        rng = rng_for("soft-none", name, weighted)
        x, q = _case(rng, shape, dtype)
        c = shape[axis]
        kw = dict(weight=rng.uniform(0.5, 2.0, c).astype(F32) if weighted else None,
                  label_smoothing=eps)
        cot = default_cotangent("ce", x, axis, "none")
        configs[f"{name} w={weighted} eps={eps}"] = ("ce", x, q, axis, "none", kw, cot)
    check_configs_against_oracles(configs)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_where_and_non_finite_logits(dtype):
    """``where`` zeroes the masked positions' losses and gradients whatever
    their logits; a row of -inf and a +inf logit at counted positions give
    NaN losses and gradients, as PyTorch's."""
    for axis, shape in ((-1, (6, 5, 19)), (1, (6, 19, 5))):
        rng = rng_for("soft-none-bad", axis, str(np.dtype(dtype)))
        x, q = _case(rng, shape, dtype)
        x64 = np.asarray(x, np.float64)
        rows = [(0, 0), (1, 1)]
        for k, pos in enumerate(rows):
            idx = list(pos)
            idx.insert(axis % 3, slice(None))
            if k == 0:
                x64[tuple(idx)] = -np.inf
            else:
                x64[tuple(idx)[: axis % 3] + (3,) + tuple(idx)[axis % 3 + 1 :]] = np.inf
        pos_shape = positions(x64, axis)
        where = rng.random(pos_shape) < 0.7
        where[rows[0]] = where[rows[1]] = True
        where[2, 2] = False
        cot = rng.uniform(0.5, 2.0, pos_shape).astype(F32)
        w = rng.uniform(0.5, 2.0, shape[axis]).astype(F32)
        kw = dict(weight=w, axis=axis, reduction="none", label_smoothing=0.1)
        xb = x64.astype(dtype)

        def f(a, b, m, kw=kw):
            return jaxloss.cross_entropy(a, b, where=m, **kw)

        loss, vjp = jax.vjp(lambda a, f=f, q=q, m=where: f(a, q, m), jnp.asarray(xb))
        (grad,) = vjp(jnp.asarray(cot))
        loss, grad = np.asarray(loss, np.float64), np.asarray(grad, np.float64)
        tl, tg = torch_loss_and_grad(
            to_torch_layout(np.asarray(xb, np.float64), axis), to_torch_layout(q, axis),
            cot * where, nll=False, weight=w, reduction="none", label_smoothing=0.1,
        )
        tl = np.where(where, tl, 0.0)
        tg = np.moveaxis(tg, 1, axis % 3)
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
        assert np.isnan(tl).sum() == 2
        bad_rows = np.isnan(tl)
        ok = np.expand_dims(~bad_rows, axis % 3)
        key = "bfloat16" if dtype == BF16 else "float32"
        assert_close(np.where(bad_rows, 0.0, loss), np.where(bad_rows, 0.0, tl),
                     LOSS_TOL["float32"], "loss vs pytorch")
        assert_close(np.where(ok, grad, 0.0), np.where(ok, tg, 0.0), GRAD_TOL[key],
                     "grad vs pytorch")
        assert np.all(np.isnan(np.where(ok, 0.0, grad)) | ok)
        masked = np.expand_dims(~where, axis % 3) & np.ones(shape, bool)
        assert np.all(grad[masked] == 0.0) and np.all(loss[~where] == 0.0)


def test_forward_mode_and_second_order():
    """``jax.jvp``, forward-over-reverse and reverse-over-reverse through
    the rule (numerical checks of order 2), and a Hessian-vector product
    against the NumPy reference's finite differences of its gradient."""
    for shape, axis in (((5, 7), -1), ((2, 6, 3, 2), 1)):
        rng = rng_for("soft-none-order2", shape)
        x, q = _case(rng, shape, F32)
        x = x.astype(np.float64).astype(F32)
        w = rng.uniform(0.5, 2.0, shape[axis]).astype(F32)
        cot = jnp.asarray(rng.uniform(0.5, 2.0, positions(x, axis)).astype(F32))
        assert _losses._soft_native_grad_applies(jnp.asarray(x), axis)

        def f(a, axis=axis, w=w, cot=cot, q=q):
            per = jaxloss.cross_entropy(a, q, weight=w, axis=axis, reduction="none",
                                        label_smoothing=0.1)
            return jnp.sum(per * cot)

        # Compiled: each transform of f one program, not op by op.
        check_grads(jax.jit(f), (jnp.asarray(x),), order=2, modes=["fwd", "rev"], atol=2e-2,
                    rtol=2e-2)
        v = rng.standard_normal(shape).astype(F32)
        hvp = jax.jit(lambda a, v, f=f: jax.jvp(jax.grad(f), (a,), (v,))[1])(x, v)

        def ref_grad(a, axis=axis, w=w, cot=cot, q=q):
            return reference.loss_and_grad(a, q.astype(np.float64), weight=w,
                                           reduction="none", label_smoothing=0.1, axis=axis,
                                           cotangent=np.asarray(cot, np.float64))[1]

        h = 1e-4
        x64 = x.astype(np.float64)
        want = (ref_grad(x64 + h * v) - ref_grad(x64 - h * v)) / (2 * h)
        assert_close(np.asarray(hvp, np.float64), want, (1e-4, 1e-6), "Hessian-vector product")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "name", ["64x19", "3x4x19-bf16", "2x19x3x4-axis1", "2x25x3x4-axis1", "2x5x3x4-axis1-bf16"]
)
def test_masked_positions_take_no_gradient_whatever_their_logits(name, reduction):
    """``where=False`` positions count as ignored: with a row of -inf, a
    +inf logit and a NaN logit there, the loss and the gradients of the
    logits and of the targets (the two apart and together) are those of the
    same call with finite logits there, and 0 there, no NaN anywhere; each
    class axis and path (the native and the generic derivative, and the
    reduced loss over more strided classes than the fused one takes)."""
    shape, axis, dtype, _ = CASES[name]
    rng = rng_for("soft-masked", name, reduction)
    x, q = _case(rng, shape, dtype)
    pos = positions(x, axis)
    where = rng.random(pos) < 0.6
    where.flat[:3] = False
    where.flat[-1] = True
    bad = np.ascontiguousarray(np.moveaxis(np.asarray(x, np.float64), axis, -1))
    bad.reshape(-1, shape[axis])[0] = -np.inf
    bad.reshape(-1, shape[axis])[1, 1] = np.inf
    bad.reshape(-1, shape[axis])[2, 0] = np.nan
    bad = np.moveaxis(bad, -1, axis).astype(dtype)
    assert np.isnan(np.asarray(bad, np.float64)).sum() == 1
    w = rng.uniform(0.5, 2.0, shape[axis]).astype(F32)
    cot = jnp.asarray(rng.uniform(0.5, 2.0, pos).astype(F32))

    def f(a, b):
        loss = jaxloss.cross_entropy(a, b, weight=w, axis=axis, reduction=reduction,
                                     label_smoothing=0.1, where=where)
        return jnp.sum(loss * cot) if reduction == "none" else loss

    masked = np.expand_dims(~where, axis) & np.ones(shape, bool)
    for argnums in (0, 1, (0, 1)):
        got = jax.jit(jax.value_and_grad(f, argnums=argnums))(bad, q)
        want = jax.jit(jax.value_and_grad(f, argnums=argnums))(x, q)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            g, h = np.asarray(g, np.float64), np.asarray(h, np.float64)
            assert not np.isnan(g).any(), (argnums, name)
            # the non-finite rows may switch the batch's row statistics to
            # the max shift: rounding apart
            key = "bfloat16" if dtype == BF16 else "float32"
            assert_close(g, h, GRAD_TOL[key], f"{argnums}")
            if g.shape == shape:
                assert np.all(g[masked] == 0.0), argnums
