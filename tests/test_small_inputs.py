"""Small inputs on XLA:CPU (``_losses._cpu_small``): fewer logits than
``_losses._CPU_SMALL_ELEMENTS`` keep the plain formulations -- not the
grouped rows (``_row_group``), not the float32 channels-last forward's
class slices (``_sliced_applies``).

The rest of the suite runs with no input small (see ``conftest.py``); the
tests here take the library's own threshold (the ``small_inputs``
fixture): where the path changes at it, and the small inputs' losses and
gradients against PyTorch and the NumPy reference in float64, at shapes
that the grouped rows or the class slices take from the threshold up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    check_cross_entropy_configs,
    labelled_logits,
    torch_loss_and_grad,
    weighting_configs,
)

import jaxloss
from jaxloss import _losses

IGN = 255


def _spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_the_threshold_is_the_library_default(small_inputs):
    assert _losses._CPU_SMALL_ELEMENTS == small_inputs > 0
    n = small_inputs
    assert _losses._cpu_small((n - 1,))
    assert not _losses._cpu_small((n,))


@pytest.mark.parametrize(
    "small,large",
    # the same class count on either side of the threshold (1 << 15 logits)
    [((2048, 10), (4096, 10)), ((16, 64, 19), (32, 64, 19)), ((512, 33), (1024, 33))],
)
def test_grouped_rows_from_the_threshold_up(small_inputs, small, large):
    assert np.prod(small) < small_inputs <= np.prod(large)
    # (the class axis non-negative, as the core passes it)
    assert _losses._row_group(small, len(small) - 1, jnp.float32) == 1
    assert _losses._row_group(large, len(large) - 1, jnp.float32) > 1


@pytest.mark.parametrize(
    "small,large",
    [((2048, 5), (8192, 5)), ((16, 16, 16), (128, 16, 16))],
    ids=["5", "16"],
)
def test_float32_channels_last_forward_slices_from_the_threshold_up(small_inputs, small, large):
    assert np.prod(small) < small_inputs <= np.prod(large)
    assert not _losses._sliced_applies(_spec(small), -1)
    assert _losses._sliced_applies(_spec(large), -1)


def test_what_small_inputs_keep(small_inputs):
    """The 2-class fwd+bwd by slices, the forward's slices with the classes
    on axis 1 and channels-last where positions * (C + 4) is under
    ``_SLICED_ONE_THREAD`` (no pass there that XLA:CPU splits at these
    sizes), and bfloat16 pairs, forward too."""
    assert _losses._sliced_applies(_spec((2048, 2)), -1, with_grad=True)
    assert _losses._sliced_applies(_spec((4, 5, 32, 32)), 1)
    assert _losses._SLICED_ONE_THREAD == 4096
    for tiny, split in [((256, 10), (384, 10)), ((680, 2), (690, 2)), ((2, 102, 16), (2, 103, 16))]:
        assert _losses._sliced_applies(_spec(tiny), -1)
        assert not _losses._sliced_applies(_spec(split), -1)
    assert _losses._sliced_applies(_spec((2048, 2), jnp.bfloat16), -1)
    assert _losses._sliced_applies(_spec((2048, 2), jnp.bfloat16), -1, with_grad=True)


def _case(shape, axis, seed):
    x, t, rng = labelled_logits(shape, axis, jnp.float32, seed, 0.2, IGN)
    return np.asarray(x), np.asarray(t), rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)


# Each below the threshold; from it up, these class counts take the grouped
# rows (10, 19, 33) or the forward's slices (5, 16). And one with the
# classes on axis 1 (class slices at every size).
SHAPES = [((2048, 10), -1), ((16, 64, 19), -1), ((512, 33), -1), ((2048, 5), -1),
          ((16, 16, 16), -1), ((4, 5, 32, 32), 1)]


@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{s}-ax{a}" for s, a in SHAPES])
def test_matches_float64_oracles(small_inputs, shape, axis):
    """Unweighted, and weighted with label smoothing; every reduction: loss,
    gradient and forward-only value (the six under one ``jit``)."""
    assert _losses._cpu_small(shape)
    x, t, w = _case(shape, axis, 0)
    configs = weighting_configs(w, 0.1, IGN, ("small-cot", shape), t.shape)
    check_cross_entropy_configs(
        jnp.asarray(x), x.astype(np.float64), jnp.asarray(t), axis, configs, "float32",
        forward=True,
    )


def test_small_fwd_bwd_compiles_without_the_grouped_rows(small_inputs, core_constants):
    """At 2048x10 the compiled fwd+bwd has no ``dot`` (the grouped rows' row
    sums); with no input small it has, and the two agree."""
    x, t, w = _case((2048, 10), -1, 1)

    def step():
        f = jax.jit(jax.value_and_grad(
            lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), weight=w, ignore_index=IGN)
        ))
        return f.lower(x).compile().as_text(), f(x)

    text, (loss, grad) = step()
    assert " dot(" not in text
    core_constants("_CPU_SMALL_ELEMENTS", 0)
    text0, (loss0, grad0) = step()
    assert " dot(" in text0
    np.testing.assert_allclose(loss, loss0, rtol=2e-6)
    np.testing.assert_allclose(grad, grad0, rtol=2e-5, atol=1e-8)


def test_small_16bit_probability_targets_keep_the_derivative(small_inputs, core_constants):
    """The mean of 16-bit probability targets of a small input keeps
    ``_soft_loss``'s derivative (the fused fwd+bwd's reductions were slower
    there); from the threshold up, and with no input small, the fused
    fwd+bwd (``_soft_total_and_grad``). Both against PyTorch in float64."""
    assert not _losses._soft_fused_applies(_spec((160, 100), jnp.bfloat16), 1)
    assert _losses._soft_fused_applies(_spec((400, 100), jnp.bfloat16), 1)
    assert _losses._soft_fused_applies(_spec((160, 100)), 1)
    rng = np.random.default_rng(7)
    x = jnp.asarray(3.0 * rng.standard_normal((160, 100)), jnp.bfloat16)
    q = jnp.asarray(rng.uniform(0.0, 1.0, (160, 100)), jnp.bfloat16)
    w = rng.uniform(0.5, 2.0, 100).astype(np.float32)

    def step():
        f = jax.jit(jax.value_and_grad(
            lambda v: jaxloss.cross_entropy(v, q, weight=w, label_smoothing=0.1)
        ))
        loss, grad = f(x)
        return np.float64(loss), np.asarray(grad.astype(jnp.float32), np.float64)

    small = step()
    core_constants("_CPU_SMALL_ELEMENTS", 0)
    fused = step()
    tl, tg = torch_loss_and_grad(
        np.asarray(x, np.float64), np.asarray(q, np.float64), 1.0, nll=False, weight=w,
        label_smoothing=0.1,
    )
    for name, (loss, grad) in (("small", small), ("fused", fused)):
        assert_close(loss, tl, LOSS_TOL["float32"], f"{name} loss")
        assert_close(grad, tg, GRAD_TOL["bfloat16"], f"{name} gradient")
