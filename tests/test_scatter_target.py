"""The target's term of the gradient added by a scatter on XLA:CPU
(``_losses._target_by_scatter``): small inputs (fewer logits than the
library's threshold) of 16-bit logits for cross-entropy, of any dtype for
NLL, with more than two classes. Their fwd+bwd then shares float32
exponentials, leaves ``-b [c == t]`` to one scatter-add after the
elementwise pass, folds the mean's scale into the per-position factors and
converts to bfloat16 by XLA's ``convert``, so that XLA:CPU keeps every
full-size pass on one thread.

Checked here: where it applies (at the library's small-input threshold),
that the compiled step scatters and splits no full-size pass (and did
without it), losses and gradients against PyTorch and the NumPy reference in
float64 (every reduction, weights, label smoothing, ignored positions, both
class-axis layouts, NLL), bad labels and non-finite rows, and agreement
with the unscattered path under ``where``, ``jvp``, ``vmap`` and second
order.
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
    as_bfloat16,
    assert_close,
    check_cross_entropy_configs,
    check_each,
    config_losses_and_grads,
    labelled_logits,
    plant_non_finite_rows,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
    under_transforms,
    weighting_configs,
)

import jaxloss
from jaxloss import _losses

IGN = 255
ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.parametrize(
    "shape,dtype,axis,normalize,scattered",
    [
        ((1600, 10), jnp.bfloat16, -1, True, True),
        ((16, 1000), jnp.bfloat16, -1, True, True),
        ((3, 4096), jnp.float16, -1, True, True),
        ((4, 10, 16, 16), jnp.bfloat16, 1, True, True),  # classes on axis 1
        ((1600, 10), jnp.float32, -1, True, False),  # float32 cross-entropy: no
        ((1600, 10), jnp.float32, -1, False, True),  # float32 NLL: yes
        ((4000, 2), jnp.bfloat16, -1, True, False),  # two classes: no
        ((4000, 2), jnp.float32, -1, False, False),
        ((4096, 8), jnp.bfloat16, -1, True, False),  # 2**15 logits: not small
        ((4096, 8), jnp.float32, -1, False, False),
    ],
)
def test_where_it_applies(small_inputs, shape, dtype, axis, normalize, scattered):
    x = jax.ShapeDtypeStruct(shape, dtype)
    ax = axis % len(shape)
    assert _losses._target_by_scatter(x, ax, normalize) == (scattered and ON_CPU)
    if normalize and scattered and ON_CPU:
        # and the exponentials are shared (the 16-bit inputs' plan)
        assert _losses._cpu_exp_plan(x, ax, reduced=True) == dict(share_exp=True)


def _split_full_size_passes(text: str, shape: tuple[int, ...]) -> list[str]:
    """The entry computation's fusions with a result of ``shape`` (any
    dtype) that XLA:CPU splits over threads (``outer_dimension_partitions``
    not empty)."""
    entry = text[text.index("\nENTRY") :]
    full = re.compile(r"= \w+\[" + ",".join(map(str, shape)) + r"\]")
    split = re.compile(r'outer_dimension_partitions":\["')
    return [ln for ln in entry.splitlines() if full.search(ln) and split.search(ln)]


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's formulation")
@pytest.mark.parametrize("loss", ["cross_entropy", "nll_loss"])
def test_no_full_size_pass_is_split(small_inputs, core_constants, loss):
    """bfloat16 1600x10, weighted mean: the compiled fwd+bwd has a scatter and
    no full-size pass split over threads; not scattering, its gradient's
    pass was split (XLA:CPU's cost model counted it compute-bound)."""
    x, t, rng = labelled_logits((1600, 10), -1, jnp.bfloat16, 3, 0.1, IGN)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 10), jnp.float32)
    fn = getattr(jaxloss, loss)

    def text():
        f = jax.value_and_grad(lambda v: fn(v, t, weight=w, ignore_index=IGN))
        return jax.jit(f).lower(x).compile().as_text()

    scattered = text()
    assert " scatter(" in scattered
    assert _split_full_size_passes(scattered, x.shape) == []
    core_constants("_target_by_scatter", lambda *a, **k: False)
    plain = text()
    assert " scatter(" not in plain
    assert len(_split_full_size_passes(plain, x.shape)) == 1


SHAPES = [((1600, 10), -1), ((8, 50, 19), -1), ((16, 1000), -1), ((4, 10, 16, 16), 1)]


@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{s}-ax{a}" for s, a in SHAPES])
def test_cross_entropy_matches_float64_oracles(small_inputs, shape, axis):
    """bfloat16 logits, unweighted, and weighted with label smoothing; every
    reduction: loss, gradient and forward-only value (its gathers: see
    test_forward_gathers_in_range), the six under one ``jit``."""
    assert _losses._target_by_scatter(jax.ShapeDtypeStruct(shape, jnp.bfloat16), axis % len(shape))
    x, t, rng = labelled_logits(shape, axis, jnp.float32, 5, 0.2, IGN)
    xb, x64 = as_bfloat16(x)
    w = rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)
    configs = weighting_configs(w, 0.2, IGN, ("scatter-cot", shape), t.shape)
    check_cross_entropy_configs(xb, x64, t, axis, configs, "bfloat16", forward=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,axis", SHAPES[:3], ids=[f"{s}" for s, _ in SHAPES[:3]])
def test_nll_matches_float64_oracles(small_inputs, shape, axis, dtype):
    """Weighted NLL of log-probabilities, every reduction: the three losses
    and gradients under one ``jit`` (``config_losses_and_grads``), then each
    against PyTorch and NumPy in float64 (``check_each``)."""
    assert _losses._target_by_scatter(jax.ShapeDtypeStruct(shape, dtype), 1, normalize=False)
    x, t, rng = labelled_logits(shape, axis, jnp.float32, 6, 0.2, IGN)
    logp = jax.nn.log_softmax(x, axis=axis).astype(dtype)
    x64 = np.asarray(logp.astype(jnp.float32), np.float64)
    w = rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)
    configs = {}
    for reduction in ("none", "mean", "sum"):
        crng = rng_for("scatter-nll-cot", shape, reduction)
        cot = crng.uniform(0.5, 1.5, t.shape).astype(np.float32) if reduction == "none" else 1.0
        configs[reduction] = (dict(weight=w, ignore_index=IGN, reduction=reduction), cot)
    name = jnp.dtype(dtype).name

    def check(kw, cot, loss, grad, _, g):
        assert g.dtype == dtype
        tl, tg = torch_loss_and_grad(
            to_torch_layout(x64, axis), np.asarray(t), cot, nll=True, **kw
        )
        rl, rg = reference.loss_and_grad(x64, np.asarray(t), normalize=False, cotangent=cot, **kw)
        for want_loss, want_grad, who in [
            (tl, np.moveaxis(tg, 1, -1), "pytorch"),
            (rl, rg, "numpy"),
        ]:
            assert_close(loss, want_loss, LOSS_TOL[name], f"loss vs {who}")
            assert_close(grad, want_grad, GRAD_TOL[name], f"grad vs {who}")

    check_each(config_losses_and_grads(jaxloss.nll_loss, logp, t, configs), check)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_a_bad_label_is_nan(small_inputs, fn):
    """Under ``jit`` (eager calls raise instead): NaN in the mean, and in
    ``"none"``'s row and that row of its gradient only."""
    x, t, _ = labelled_logits((1600, 10), -1, jnp.bfloat16, 9, 0.1, IGN)
    bad = t.at[700].set(10)
    loss_fn = getattr(jaxloss, fn)
    step = jax.jit(jax.value_and_grad(lambda v, tt: loss_fn(v, tt, ignore_index=IGN)))
    loss, grad = step(x, bad)
    assert np.isnan(loss) and np.all(np.isnan(np.asarray(grad[700], np.float32)))
    assert np.isnan(jax.jit(lambda v, tt: loss_fn(v, tt, ignore_index=IGN))(x, bad))
    assert not np.isnan(jax.jit(lambda v, tt: loss_fn(v, tt, ignore_index=IGN))(x, t))

    def rows_and_grad(v, tt):
        per_row, vjp = jax.vjp(lambda a: loss_fn(a, tt, ignore_index=IGN, reduction="none"), v)
        return per_row, vjp(jnp.ones_like(per_row))[0]

    per_row, g = jax.jit(rows_and_grad)(x, bad)
    g = np.asarray(g, np.float32)
    assert np.isnan(per_row[700]) and np.sum(np.isnan(per_row)) == 1
    assert np.all(np.isnan(g[700])) and not np.any(np.isnan(np.delete(g, 700, 0)))


def test_non_finite_rows_match_pytorch(small_inputs):
    """A valid row of -inf and a +inf logit: NaN, as in PyTorch; an ignored
    row of -inf: zero gradient."""
    x, t, _ = labelled_logits((2, 800, 10), -1, jnp.float32, 11, 0.1, IGN)
    x, t = np.array(x), np.array(t)
    plant_non_finite_rows(x, t, IGN)
    xb = jnp.asarray(x, jnp.bfloat16)
    assert _losses._target_by_scatter(xb, 2)
    loss, vjp = jax.vjp(
        lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), ignore_index=IGN, reduction="none"), xb
    )
    (g,) = vjp(jnp.ones(loss.shape, jnp.float32))
    x64 = np.asarray(xb.astype(jnp.float32), np.float64)
    tl, tg = torch_loss_and_grad(to_torch_layout(x64, -1), t, np.ones(t.shape), nll=False,
                                 ignore_index=IGN, reduction="none")
    tg = np.moveaxis(tg, 1, -1)
    tg[t == IGN] = 0.0
    g = np.asarray(g.astype(jnp.float32), np.float64)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(tg))
    assert_close(loss, tl, LOSS_TOL["bfloat16"], "loss")
    assert_close(g, tg, GRAD_TOL["bfloat16"], "grad")


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_agrees_with_the_unscattered_path(small_inputs, core_constants, fn):
    """``value_and_grad`` of the mean with a mask, ``jvp`` of the per-position
    losses, ``vmap`` and a Hessian-vector product: the same, to bfloat16
    rounding of the gradients, with ``_target_by_scatter`` off."""
    x, t, rng = labelled_logits((2, 800, 19), -1, jnp.bfloat16, 10, 0.2, IGN)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 19), jnp.float32)
    where = jnp.asarray(rng.random(t.shape) < 0.9)
    dx = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    loss_fn = getattr(jaxloss, fn)
    kw = dict(weight=w, ignore_index=IGN)
    if fn == "cross_entropy":
        kw["label_smoothing"] = 0.1

    def run():
        assert _losses._target_by_scatter(x[0], 1, fn == "cross_entropy") == scattered
        return under_transforms(loss_fn, x, t, where, dx, **kw)

    scattered = ON_CPU
    got = run()
    core_constants("_target_by_scatter", lambda *a, **k: False)
    scattered = False
    want = run()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-6
        )


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's formulation")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_forward_gathers_in_range(small_inputs, core_constants, dtype):
    """A small input's gathers of the target logit and weight take unsigned
    indices and no bounds handling (``_take_in_range``): the compiled
    bfloat16 forward at 3200x5 splits no per-position pass over threads,
    where the plain gathers' pass was split; the losses agree."""
    x, t, rng = labelled_logits((3200, 5), -1, dtype, 12, 0.1, IGN)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 5), jnp.float32)

    def forward():  # (labels and weights as arguments: constants would be folded)
        f = jax.jit(lambda v, tt, ww: jaxloss.cross_entropy(v, tt, weight=ww, ignore_index=IGN))
        return f.lower(x, t, w).compile().as_text(), f(x, t, w)

    text, loss = forward()
    assert _split_full_size_passes(text, (3200,)) == []
    in_range = _losses._take_in_range

    def plain(a, idx, axis, shape):  # the gathers of inputs that are not small
        return in_range(a, idx, axis, (small_inputs,))

    core_constants("_take_in_range", plain)
    text0, loss0 = forward()
    if dtype == jnp.bfloat16:
        assert len(_split_full_size_passes(text0, (3200,))) == 1
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
