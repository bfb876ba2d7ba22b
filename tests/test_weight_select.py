"""XLA:CPU's class-weight lookup by selects (``_losses._class_weight_at``):
for at most ``_WEIGHT_SELECT_MAX_CLASSES`` classes and inputs that are not
small, ``w[t]`` is a chain of selects instead of a gather. These tests check
where it applies, that it equals the gather (clipped labels too), and the
weighted losses that take it against PyTorch and NumPy in float64 at the
library's own sizes (the rest of the suite, whose inputs are small, takes
it too: conftest.py sets ``_CPU_SMALL_ELEMENTS`` to 0)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch  # noqa: F401  -- the suite must fail, not skip, without PyTorch
from oracles import rng_for
from test_functional import check_configs_against_oracles, default_cotangent, positions

import jaxloss
from jaxloss import _losses

IGN = 255
BIG = 1 << 15  # the library's _CPU_SMALL_ELEMENTS (the suite sets it to 0)


def _ops(c, shape):
    w = jnp.linspace(0.5, 2.0, c)
    t = jnp.zeros(shape[:-1], jnp.int32)
    return jax.jit(lambda w, t: _losses._class_weight_at(w, t, shape)).lower(w, t).as_text()


def test_where_it_applies():
    assert _losses._WEIGHT_SELECT_MAX_CLASSES == 5
    for c in range(2, 6):
        text = _ops(c, (BIG // c + 1, c))
        assert "gather" not in text and "select" in text, c
    assert "gather" in _ops(6, (BIG, 6))  # more classes


def test_small_inputs_keep_the_gather(small_inputs):
    assert "gather" in _ops(2, (small_inputs // 2 - 1, 2))
    assert "gather" not in _ops(2, (small_inputs // 2, 2))


def test_equals_the_gather():
    rng = rng_for("weight-select")
    for c in range(1, 6):
        w = jnp.asarray(rng.uniform(0.1, 3.0, c), jnp.float32)
        t = jnp.asarray(rng.integers(-3, c + 3, BIG), jnp.int32)
        shape = (BIG, c)
        t_in = jnp.clip(t, 0, c - 1)
        np.testing.assert_array_equal(_losses._class_weight_at(w, t_in, shape), w[t_in])
        np.testing.assert_array_equal(
            _losses._class_weight_at(w, t, shape, clip=True), w[jnp.clip(t, 0, c - 1)]
        )


CASES = {  # name: (shape, class axis, dtype), each at least BIG logits
    "17000x2": ((17000, 2), -1, np.float32),
    "90x128x3": ((90, 128, 3), -1, np.float32),
    "4x5x41x41-axis1": ((4, 5, 41, 41), 1, np.float32),
    "2x2x128x128-axis1": ((2, 2, 128, 128), 1, np.float32),
    "17000x2-bf16": ((17000, 2), -1, ml_dtypes.bfloat16),
    "4x5x41x41-axis1-bf16": ((4, 5, 41, 41), 1, ml_dtypes.bfloat16),
}


def test_weighted_losses_match_oracles():
    """Weighted cross-entropy (label smoothing 0 and 0.1) and NLL, every
    reduction, ~10% ignored, against PyTorch and NumPy in float64; all
    under one ``jit``."""
    configs = {}
    for (name, (shape, axis, dtype)), (fn, eps), reduction in itertools.product(
        CASES.items(), (("ce", 0.0), ("ce", 0.1), ("nll", 0.0)), ("mean", "sum", "none")
    ):
        rng = rng_for("weight-select", name, fn, eps, reduction)
        x = (2.0 * rng.standard_normal(shape)).astype(dtype)
        c = shape[axis]
        pos = positions(x, axis)
        t = np.where(rng.random(pos) < 0.1, IGN, rng.integers(0, c, pos)).astype(np.int32)
        kw = dict(weight=rng.uniform(0.5, 2.0, c).astype(np.float32), ignore_index=IGN)
        if fn == "ce":
            kw["label_smoothing"] = eps
        cot = default_cotangent(fn, x, axis, reduction)
        configs[f"{name} {fn} eps={eps} {reduction}"] = (fn, x, t, axis, reduction, kw, cot)
    check_configs_against_oracles(configs)


def test_a_label_out_of_range_is_nan_under_jit():
    """A label of C or -1 (not ignored) makes the weighted mean NaN, as
    everywhere; ignored labels count nothing."""
    rng = rng_for("weight-select-bad")
    x = rng.standard_normal((BIG, 3)).astype(np.float32)
    w = jnp.asarray([0.5, 1.0, 2.0])
    f = jax.jit(lambda x, t: jaxloss.cross_entropy(x, t, weight=w, ignore_index=IGN))
    t = np.full(BIG, IGN, np.int32)
    t[:3] = (0, 1, 2)
    assert np.isfinite(f(x, t))
    for bad in (3, -1):
        t[5] = bad
        assert np.isnan(f(x, t)), bad
