"""The float32 fwd+bwd that recomputes its exponentials on XLA:CPU
(``_losses._recomputed_exp``): channels-last rows of 23 to 41 classes that
are not grouped, from the library's small-input threshold up to 2**20
logits, take the row max, one pass of the exponentials and their sum, and
the gradient's pass, instead of materialised exponentials shared by both.

Checked here: where it applies (at the library's small-input threshold),
that the compiled step writes no full-size array but the gradient, losses
and gradients against PyTorch and the NumPy reference in float64 (every
reduction, weights, label smoothing, ignored and masked positions), a bad
label, and agreement with the shared path under ``jvp``, ``vmap`` and
second order.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import (
    check_cross_entropy_configs,
    labelled_logits,
    under_transforms,
    weighting_configs,
)

import jaxloss
from jaxloss import _losses

IGN = 255


@pytest.mark.parametrize(
    "shape,dtype,axis,recomputed",
    [
        ((3000, 33), jnp.float32, -1, True),
        ((3008, 33), jnp.float32, -1, False),  # 3008 = 188 x 16: grouped rows
        ((8192, 32), jnp.float32, -1, True),  # 32 classes are never grouped
        ((6, 50, 50, 30), jnp.float32, -1, True),  # grouped by 8 along 50: no
        ((6, 50, 48, 30), jnp.float32, -1, False),  # 48 = 6 x 8: grouped
        ((1500, 23), jnp.float32, -1, True),
        ((1500, 41), jnp.float32, -1, True),
        ((1500, 22), jnp.float32, -1, False),  # fewer classes
        ((1500, 42), jnp.float32, -1, False),  # more classes
        ((1000, 32), jnp.float32, -1, False),  # small: 32000 logits
        ((32766, 32), jnp.float32, -1, True),  # 1048512 logits
        ((32768, 32), jnp.float32, -1, False),  # 2**20: YNNPACK's sums
        ((3000, 33), jnp.float64, -1, False),
        ((3000, 33), jnp.bfloat16, -1, False),
        ((2, 33, 64, 64), jnp.float32, 1, False),  # classes not last
    ],
)
def test_where_it_applies(small_inputs, shape, dtype, axis, recomputed):
    x = jax.ShapeDtypeStruct(shape, dtype)
    on_cpu = jax.default_backend() == "cpu"
    assert _losses._recomputed_exp(x, axis) == (recomputed and on_cpu)
    if jnp.dtype(dtype).itemsize >= 4:  # a 16-bit plan holds an array (its float32 view)
        plan = _losses._cpu_exp_plan(x, axis, reduced=True)
        assert (plan == {}) == (recomputed and on_cpu)


def _full_size_outputs(text: str, shape: tuple[int, ...]) -> list[str]:
    """The entry computation's instructions, parameters aside, whose result
    is a float32 array of ``shape`` (the logits' shape, in XLA's
    layout-less spelling)."""
    entry = text[text.index("\nENTRY") :]
    full = re.compile(r"= " + re.escape("f32[" + ",".join(map(str, shape)) + "]"))
    return [ln for ln in entry.splitlines()[1:] if full.search(ln) and "parameter(" not in ln]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's formulation")
def test_the_gradient_is_the_only_full_size_array(small_inputs, core_constants):
    """Recomputed, the compiled fwd+bwd writes one (P, C) float32 array, the
    gradient; sharing, the exponentials as well (once the class range is
    empty)."""
    x, t, _ = labelled_logits((3000, 33), -1, jnp.float32, 1, 0.1, IGN)

    def text():
        f = jax.value_and_grad(lambda v: jaxloss.cross_entropy(v, t, ignore_index=IGN))
        return jax.jit(f).lower(x).compile().as_text()

    full = _full_size_outputs(text(), x.shape)
    assert len(full) == 1, full
    core_constants("_RECOMPUTED_EXP_CLASSES", range(0))
    shared = _full_size_outputs(text(), x.shape)
    assert len(shared) == 2, shared


CASES = [(1026, 33), (2, 26, 26, 32), (1202, 28), (3, 13, 37, 27)]


@pytest.mark.parametrize("shape", CASES, ids=["x".join(map(str, s)) for s in CASES])
def test_matches_float64_oracles(small_inputs, shape):
    """Unweighted, and weighted with label smoothing; every reduction: loss
    and gradient (the six under one ``jit``)."""
    assert _losses._recomputed_exp(jax.ShapeDtypeStruct(shape, jnp.float32), -1)
    x, t, rng = labelled_logits(shape, -1, jnp.float32, 8, 0.2, IGN)
    w = rng.uniform(0.3, 2.0, shape[-1]).astype(np.float32)
    configs = weighting_configs(w, 0.2, IGN, ("recomputed-cot", shape), t.shape)
    check_cross_entropy_configs(x, np.asarray(x, np.float64), t, -1, configs, "float32")


def test_a_bad_label_is_nan(small_inputs):
    """Under ``jit`` (eager calls raise instead)."""
    x, t, _ = labelled_logits((1026, 33), -1, jnp.float32, 9, 0.1, IGN)
    bad = t.at[700].set(33)
    kw = dict(ignore_index=IGN)
    step = jax.jit(jax.value_and_grad(lambda v, tt: jaxloss.cross_entropy(v, tt, **kw)))
    loss, grad = step(x, bad)
    assert np.isnan(loss) and np.all(np.isnan(grad[700]))

    def rows_and_grad(v, tt):
        per_row, vjp = jax.vjp(lambda a: jaxloss.cross_entropy(a, tt, reduction="none", **kw), v)
        return per_row, vjp(jnp.ones_like(per_row))[0]

    per_row, g = jax.jit(rows_and_grad)(x, bad)
    assert np.isnan(per_row[700]) and np.sum(np.isnan(per_row)) == 1
    assert np.all(np.isnan(g[700])) and not np.any(np.isnan(np.delete(np.asarray(g), 700, 0)))


def test_agrees_with_the_shared_path(small_inputs, core_constants):
    """``value_and_grad`` of the mean with a mask, ``jvp`` of the per-position
    losses, ``vmap`` and a Hessian-vector product: the same, to float32
    rounding, with the class range empty (shared exponentials)."""
    x, t, rng = labelled_logits((2, 1026, 33), -1, jnp.float32, 10, 0.2, IGN)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 33), jnp.float32)
    where = jnp.asarray(rng.random(t.shape) < 0.9)
    dx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1)

    def run():
        assert _losses._recomputed_exp(x[0], -1) == recomputed
        return under_transforms(jaxloss.cross_entropy, x, t, where, dx, **kw)

    recomputed = True
    got = run()
    core_constants("_RECOMPUTED_EXP_CLASSES", range(0))
    recomputed = False
    want = run()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-7)
