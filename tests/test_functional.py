"""jaxloss.nll_loss / cross_entropy: losses and gradients against live PyTorch
and the NumPy float64 reference, over a broad sweep of shapes, layouts,
weights, ignore indices, reductions, label smoothing and target kinds."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import reference
import torch  # noqa: F401  -- the suite must fail, not skip, without PyTorch
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    check_each,
    check_soft_reduced,
    check_soft_reduced_each,
    jax_loss_and_grad,
    jax_losses_and_grads,
    nothing_to_average,
    rng_for,
    soft_reduced_results,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss

REDUCTIONS = ("mean", "sum", "none")

# PyTorch-layout shapes (N, C, d1, ...) with the class axis at 1; (C,) is 1-D.
SHAPES = {
    "1d": (5,),
    "2d": (6, 5),
    "3d": (3, 4, 5),
    "4d": (2, 3, 4, 3),
    "5d": (2, 4, 2, 3, 2),
}

# Both layouts of every shape; a 1-D (C,) input has only one.
SHAPE_LAYOUTS = [(shape, layout) for shape in SHAPES for layout in ("last", "first")
                 if not (shape == "1d" and layout == "first")]
SHAPE_LAYOUT_IDS = [f"{shape}-{layout}" for shape, layout in SHAPE_LAYOUTS]


def make_input(rng, shape_torch, layout, dtype=np.float32, scale=2.0):
    """An input in the requested layout, plus its class axis."""
    x = (scale * rng.standard_normal(shape_torch)).astype(dtype)
    if len(shape_torch) == 1:
        return x, (0 if layout == "first" else -1)
    if layout == "last":
        return np.moveaxis(x, 1, -1).copy(), -1
    return x, 1


def make_targets(rng, pos_shape, num_classes, ignore_index, dtype=np.int32, frac=0.3):
    t = rng.integers(0, num_classes, size=pos_shape)
    if ignore_index is not None and not 0 <= ignore_index < num_classes:
        t = np.where(rng.random(pos_shape) < frac, ignore_index, t)
        if t.size > 1:  # make sure both kinds of position occur
            t.flat[0] = ignore_index
            t.flat[1] = 0
    return t.astype(dtype)


def positions(x, axis):
    return x.shape[: axis % x.ndim] + x.shape[axis % x.ndim + 1 :]


def cotangent_for(rng, reduction, pos_shape):
    if reduction == "none":
        return rng.uniform(0.5, 2.0, size=pos_shape).astype(np.float32)
    return np.float32(1.7)


def default_cotangent(fn_name, x, axis, reduction):
    return cotangent_for(rng_for(fn_name, x.shape, reduction), reduction, positions(x, axis))


def jaxloss_call(fn_name, axis, reduction, *, weight=None, ignore_index=-100,
                 label_smoothing=0.0, where=None):
    """``(fn, kwargs)`` of jaxloss for one configuration."""
    nll = fn_name == "nll"
    kw = {"weight": None if weight is None else jnp.asarray(weight),
          "ignore_index": ignore_index, "reduction": reduction, "axis": axis}
    if not nll:
        kw["label_smoothing"] = label_smoothing
    if where is not None:
        kw["where"] = jnp.asarray(where)
    return (jaxloss.nll_loss if nll else jaxloss.cross_entropy), kw


def check_against_oracles(
    fn_name, x, t, axis, reduction, *, weight=None, ignore_index=-100,
    label_smoothing=0.0, where=None, cotangent=None, torch_too=True, dtype_key=None,
    computed=None,
):
    """jaxloss's loss and gradient (or ``computed``, those of
    ``jax_loss_and_grad`` for the same call) against the NumPy reference and
    PyTorch."""
    if cotangent is None:
        cotangent = default_cotangent(fn_name, x, axis, reduction)
    nll = fn_name == "nll"
    if computed is None:
        fn, kw = jaxloss_call(fn_name, axis, reduction, weight=weight,
                              ignore_index=ignore_index, label_smoothing=label_smoothing,
                              where=where)
        computed = jax_loss_and_grad(fn, jnp.asarray(x), jnp.asarray(t), cotangent, **kw)
    loss, grad, raw_loss, raw_grad = computed
    key = dtype_key or str(np.asarray(x).dtype)
    x64 = np.asarray(x).astype(np.float64)

    ref_loss, ref_grad = reference.loss_and_grad(
        x64, np.asarray(t), weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, axis=axis, where=where, normalize=not nll,
        cotangent=cotangent,
    )
    assert_close(loss, ref_loss, LOSS_TOL[key], "loss vs reference")
    assert_close(grad, ref_grad, GRAD_TOL[key], "grad vs reference")

    if torch_too:
        assert where is None
        t = np.asarray(t)
        soft = np.issubdtype(t.dtype, np.floating)
        # Positions are (N, d1, ...) in both layouts, so index targets and a
        # "none" cotangent need no moving; probability targets move like x.
        t_loss, t_grad = torch_loss_and_grad(
            to_torch_layout(x64, axis), to_torch_layout(t, axis) if soft else t, cotangent,
            nll=nll, weight=weight, reduction=reduction, label_smoothing=label_smoothing,
            # ignore_index does not apply to probability targets; PyTorch
            # insists on its default there.
            ignore_index=-100 if soft else ignore_index,
        )
        if reduction == "mean" and not soft and np.isnan(t_loss) and nothing_to_average(
            t, weight, ignore_index, x64.shape[axis]
        ):
            # Nothing to average (e.g. a 1-D input whose one target is ignored):
            # PyTorch's 0/0 = NaN, jaxloss's deliberate 0.0 (checked above).
            assert float(ref_loss) == 0.0
            return raw_loss, raw_grad
        assert_close(loss, t_loss, LOSS_TOL[key], "loss vs torch")
        grad_torch_layout = to_torch_layout(grad, axis)
        assert_close(grad_torch_layout, t_grad, GRAD_TOL[key], "grad vs torch")
    return raw_loss, raw_grad


def check_configs_against_oracles(configs: dict, also=None) -> None:
    """``check_against_oracles`` for every ``name: (fn_name, x, t, axis,
    reduction, kwargs, cotangent)`` in ``configs``, jaxloss's losses and
    gradients for all of them computed under one ``jit``
    (``oracles.jax_losses_and_grads``: one compilation, not one each); then
    each checked on its own, and ``also(reduction, x, axis, loss, grad)`` if
    given. A failure names every configuration that failed (``check_each``)."""
    calls = []
    for fn_name, x, t, axis, reduction, kw, cot in configs.values():
        loss_fn, kwargs = jaxloss_call(fn_name, axis, reduction, **kw)
        calls.append((loss_fn, jnp.asarray(x), jnp.asarray(t), cot, kwargs))
    results = jax_losses_and_grads(calls)

    def check(fn_name, x, t, axis, reduction, kw, cot, computed):
        loss, grad = check_against_oracles(
            fn_name, x, t, axis, reduction, cotangent=cot, computed=computed, **kw
        )
        if also is not None:
            also(reduction, x, axis, loss, grad)

    check_each(
        {name: (*config, computed)
         for (name, config), computed in zip(configs.items(), results, strict=True)},
        check,
    )


def check_forwards_alone(configs: dict, tol_key: str | None = None) -> None:
    """The forward alone (no gradient in its pass) of every cross-entropy
    configuration of ``check_configs_against_oracles``'s form, all under one
    ``jit``, against the NumPy reference in float64 within ``LOSS_TOL`` of
    ``tol_key`` (default: the logits' dtype)."""

    def forwards(args):
        return [jaxloss.cross_entropy(x, t, axis=axis, reduction=reduction, **kw)
                for (x, t), (_, _, _, axis, reduction, kw, _) in zip(
                    args, configs.values(), strict=True)]

    gots = jax.jit(forwards)([(c[1], c[2]) for c in configs.values()])
    for (key, (_, x, t, axis, reduction, kw, _)), got in zip(configs.items(), gots, strict=True):
        t = np.asarray(t)
        t = t.astype(np.float64) if np.issubdtype(t.dtype, np.floating) else t
        want, _ = reference.loss_and_grad(np.asarray(x, np.float64), t, axis=axis,
                                          reduction=reduction, **kw)
        assert_close(np.asarray(got, np.float64), want,
                     LOSS_TOL[tol_key or str(np.asarray(x).dtype)], f"{key} forward alone")


# ---------------------------------------------------------------------------
# the main sweep: index targets
# ---------------------------------------------------------------------------


SWEEP_WEIGHTED = (False, True)
# ignore_index: None (nothing ignored), 1 (inside [0, C)), 255 (outside, void);
# the default -100 is exercised by the tests further below.
SWEEP_IGNORE = (None, 1, 255)


def _sweep_case(fn, shape, layout, weighted, ignore_index, reduction):
    """One configuration's inputs and keyword arguments."""
    rng = rng_for(fn, shape, layout, weighted, ignore_index, reduction)
    x, axis = make_input(rng, SHAPES[shape], layout)
    num_classes = x.shape[axis]
    t = make_targets(rng, positions(x, axis), num_classes, ignore_index)
    weight = rng.uniform(0.2, 2.0, num_classes).astype(np.float32) if weighted else None
    name = "nll" if fn == "nll" else "ce"
    kw = dict(weight=weight, ignore_index=ignore_index,
              label_smoothing=0.15 if fn == "ce_ls" else 0.0)
    return name, x, t, axis, kw, default_cotangent(name, x, axis, reduction)


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS, ids=SHAPE_LAYOUT_IDS)
@pytest.mark.parametrize("fn", ["nll", "ce", "ce_ls"])
def test_index_targets_sweep(fn, shape, layout):
    """Every weighting, ``ignore_index`` and reduction (18 configurations) of
    one loss, shape and layout. jaxloss's losses and gradients for all of
    them are computed under one ``jit`` (``oracles.jax_losses_and_grads``:
    one compilation, not 18), then each is checked on its own; a failure
    names every configuration that failed."""
    configs = {}
    for w, i, r in itertools.product(SWEEP_WEIGHTED, SWEEP_IGNORE, REDUCTIONS):
        name, x, t, axis, kw, cot = _sweep_case(fn, shape, layout, w, i, r)
        configs[f"weighted={w} ignore_index={i} reduction={r}"] = (name, x, t, axis, r, kw, cot)

    def dtypes_and_shapes(reduction, x, axis, loss, grad):
        assert loss.dtype == jnp.float32 and grad.dtype == jnp.float32
        assert loss.shape == (positions(x, axis) if reduction == "none" else ())
        assert grad.shape == x.shape

    check_configs_against_oracles(configs, also=dtypes_and_shapes)


@pytest.mark.parametrize("shape", ["2d", "4d", "5d"])
def test_layouts_agree_by_moveaxis(shape):
    """The same data in either layout gives the same loss and (moved) gradient."""
    rng = rng_for("layouts", shape)
    x_first, _ = make_input(rng, SHAPES[shape], "first")
    x_last = np.moveaxis(x_first, 1, -1)
    t = make_targets(rng, positions(x_first, 1), x_first.shape[1], 255)
    w = jnp.asarray(rng.uniform(0.5, 1.5, x_first.shape[1]), jnp.float32)
    kw = dict(weight=w, ignore_index=255, label_smoothing=0.1, reduction="none")
    f = lambda x, axis: jnp.sum(jaxloss.cross_entropy(x, t, axis=axis, **kw) ** 2)
    l_first, g_first = jax.value_and_grad(f)(x_first, 1)
    l_last, g_last = jax.value_and_grad(f)(x_last, -1)
    np.testing.assert_allclose(l_first, l_last, rtol=1e-6)
    np.testing.assert_allclose(np.moveaxis(np.asarray(g_first), 1, -1), g_last, rtol=1e-6,
                               atol=1e-7)
    if x_first.ndim < 4:
        return
    # A middle class axis (axis=2, negative spelling) also agrees.
    x_mid = np.moveaxis(x_first, 1, 2)
    l_mid, g_mid = jax.value_and_grad(f)(x_mid, 2 - x_mid.ndim)
    np.testing.assert_allclose(l_first, l_mid, rtol=1e-6)
    np.testing.assert_allclose(np.moveaxis(np.asarray(g_mid), 2, 1), g_first, rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("num_classes", [1, 3, 19, 150])
def test_odd_num_classes(num_classes):
    """NLL, cross-entropy and cross-entropy with label smoothing, every
    reduction (9 configurations under one ``jit``), weighted, some labels
    ignored."""
    configs = {}
    for fn, reduction in itertools.product(["nll", "ce", "ce_ls"], REDUCTIONS):
        rng = rng_for("oddC", num_classes, fn, reduction)
        x, axis = make_input(rng, (4, num_classes, 3), "last")
        t = make_targets(rng, positions(x, axis), num_classes, 255)
        weight = rng.uniform(0.2, 2.0, num_classes).astype(np.float32)
        name = "nll" if fn == "nll" else "ce"
        kw = dict(weight=weight, ignore_index=255, label_smoothing=0.3 if fn == "ce_ls" else 0.0)
        cot = default_cotangent(name, x, axis, reduction)
        configs[f"{fn} reduction={reduction}"] = (name, x, t, axis, reduction, kw, cot)
    check_configs_against_oracles(configs)


def test_label_smoothing_with_weight_and_ignore():
    """Label smoothing 0, 0.05, 0.5 and 1 with class weights and
    ignore_index -100 (40% ignored), every reduction: 12 configurations under
    one ``jit``."""
    configs = {}
    for label_smoothing, reduction in itertools.product([0.0, 0.05, 0.5, 1.0], REDUCTIONS):
        rng = rng_for("ls", label_smoothing, reduction)
        x, axis = make_input(rng, (3, 6, 4), "first")
        t = make_targets(rng, positions(x, axis), 6, -100, frac=0.4)
        weight = rng.uniform(0.1, 3.0, 6).astype(np.float32)
        kw = dict(weight=weight, ignore_index=-100, label_smoothing=label_smoothing)
        cot = default_cotangent("ce", x, axis, reduction)
        configs[f"label_smoothing={label_smoothing} reduction={reduction}"] = (
            "ce", x, t, axis, reduction, kw, cot
        )
    check_configs_against_oracles(configs)


# ---------------------------------------------------------------------------
# probability targets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS, ids=SHAPE_LAYOUT_IDS)
def test_probability_targets(shape, layout):
    """Every weighting, label smoothing and reduction (12 configurations) of
    one shape and layout, computed under one ``jit`` and checked each on its
    own (as ``test_index_targets_sweep``)."""
    keys = list(itertools.product((False, True), (0.0, 0.2), REDUCTIONS))
    cases, calls = [], []
    for weighted, label_smoothing, reduction in keys:
        rng = rng_for("soft", shape, layout, weighted, label_smoothing, reduction)
        x, axis = make_input(rng, SHAPES[shape], layout)
        q = np.exp(reference.log_softmax(rng.standard_normal(x.shape), axis=axis))
        q = q.astype(np.float32)
        weight = rng.uniform(0.2, 2.0, x.shape[axis]).astype(np.float32) if weighted else None
        kw = dict(weight=weight, label_smoothing=label_smoothing)
        cot = default_cotangent("ce", x, axis, reduction)
        cases.append((x, q, axis, reduction, kw, cot))
        # ignore_index does not apply to probability targets (PyTorch refuses
        # a non-default one; jaxloss's native API accepts and disregards it).
        for ignore_index in (-100, 0):
            fn, kwargs = jaxloss_call("ce", axis, reduction, ignore_index=ignore_index, **kw)
            calls.append((fn, jnp.asarray(x), jnp.asarray(q), cot, kwargs))
    results = jax_losses_and_grads(calls)

    def check(case, computed, other):
        x, q, axis, reduction, kw, cot = case
        loss, _ = check_against_oracles(
            "ce", x, q, axis, reduction, cotangent=cot, computed=computed, **kw
        )
        assert loss.dtype == jnp.float32
        # Equal up to rounding: another static argument is another program
        # (XLA:GPU summed in another order, 1 ulp apart).
        np.testing.assert_allclose(other[0], loss, rtol=1e-6)

    check_each(
        {f"weighted={w} label_smoothing={ls} reduction={r}": (case, *results[2 * i : 2 * i + 2])
         for i, ((w, ls, r), case) in enumerate(zip(keys, cases, strict=True))},
        check,
    )


def test_probability_targets_that_are_one_hot_match_index_targets():
    rng = rng_for("onehot")
    x, axis = make_input(rng, (4, 5, 3), "last")
    t = rng.integers(0, 5, size=positions(x, axis))
    q = np.eye(5, dtype=np.float32)[t]
    for ls in (0.0, 0.3):
        a = jaxloss.cross_entropy(x, q, label_smoothing=ls)  # unweighted: same mean rule
        b = jaxloss.cross_entropy(x, t, label_smoothing=ls)
        np.testing.assert_allclose(a, b, rtol=1e-6)


# ---------------------------------------------------------------------------
# nothing to average: all ignored, empty batch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["nw", "w"])
@pytest.mark.parametrize("fn", ["nll", "ce", "ce_ls"])
def test_all_ignored(fn, weighted, reduction):
    rng = rng_for("allign", fn, weighted, reduction)
    x, axis = make_input(rng, (3, 4, 2), "last")
    t = np.full(positions(x, axis), 255, np.uint8)
    weight = rng.uniform(0.2, 2.0, 4).astype(np.float32) if weighted else None
    func = jaxloss.nll_loss if fn == "nll" else jaxloss.cross_entropy
    kw = {"weight": weight, "ignore_index": 255, "reduction": reduction}
    if fn != "nll":
        kw["label_smoothing"] = 0.2 if fn == "ce_ls" else 0.0
    f = lambda x: jnp.sum(func(x, t, **kw))
    loss, grad = jax.value_and_grad(f)(jnp.asarray(x))
    # jaxloss's deliberate difference: 0.0 and zero gradients, not NaN.
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(x))
    # PyTorch: NaN for the mean, 0 for sum / none.
    t_loss, _ = torch_loss_and_grad(np.moveaxis(x, -1, 1), t, 1.0, nll=fn == "nll",
                                    weight=weight, ignore_index=255, reduction=reduction,
                                    label_smoothing=kw.get("label_smoothing", 0.0))
    if reduction == "mean":
        assert np.isnan(t_loss)
    else:
        np.testing.assert_array_equal(np.sum(t_loss), 0.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0)], ids=str)
def test_empty_batch(shape, soft, reduction):
    x, axis = make_input(rng_for("empty", shape), shape, "last")
    t = (np.zeros(x.shape, np.float32) if soft
         else np.zeros(positions(x, axis), np.int32))
    f = lambda x: jaxloss.cross_entropy(x, t, reduction=reduction)
    loss = f(jnp.asarray(x))
    assert loss.shape == (positions(x, axis) if reduction == "none" else ())
    if reduction != "none":
        assert float(loss) == 0.0  # PyTorch: NaN for the mean, 0 for the sum
        grad = jax.grad(f)(jnp.asarray(x))
        assert grad.shape == x.shape
    t_loss, _ = torch_loss_and_grad(np.moveaxis(x, -1, 1),
                                    np.moveaxis(t, -1, 1) if soft else t, 1.0, nll=False,
                                    reduction=reduction)
    if reduction == "mean":
        assert np.isnan(t_loss)
    else:
        assert t_loss.shape == loss.shape
        np.testing.assert_array_equal(np.sum(t_loss), 0.0)


# ---------------------------------------------------------------------------
# target dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target_dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fn", ["nll", "ce"])
def test_target_dtypes(fn, target_dtype):
    rng = rng_for("tdtype", fn, np.dtype(target_dtype).name)
    x, axis = make_input(rng, (3, 5, 4), "last")
    ignore = 255 if target_dtype == np.uint8 else -1
    if target_dtype == np.int8 or target_dtype == np.int16:
        ignore = -1
    t = make_targets(rng, positions(x, axis), 5, ignore, dtype=np.int64).astype(target_dtype)
    w = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    check_against_oracles(fn, x, t, axis, "mean", weight=w, ignore_index=ignore)


def test_uint8_void_mask_with_default_ignore_index_is_an_invalid_label():
    """255 in a uint8 mask is a class index unless ignore_index=255 says otherwise."""
    x = jnp.zeros((2, 4))
    t = np.array([0, 255], np.uint8)
    with pytest.raises(ValueError, match="255"):
        jaxloss.cross_entropy(x, t)
    assert float(jaxloss.cross_entropy(x, t, ignore_index=255)) == pytest.approx(np.log(4))


def test_int64_targets_and_float64_inputs_under_x64():
    rng = rng_for("x64")
    with jax.enable_x64(True):
        x, axis = make_input(rng, (3, 7, 4), "first", dtype=np.float64)
        t = make_targets(rng, positions(x, axis), 7, -100, dtype=np.int64)
        w = rng.uniform(0.5, 1.5, 7)
        for fn in ("nll", "ce"):
            for reduction in REDUCTIONS:
                loss, grad = check_against_oracles(
                    fn, x, t, axis, reduction, weight=w,
                    label_smoothing=0.0 if fn == "nll" else 0.1,
                    cotangent=cotangent_for(rng, reduction, positions(x, axis)).astype(np.float64),
                )
                assert loss.dtype == jnp.float64 and grad.dtype == jnp.float64


# ---------------------------------------------------------------------------
# input dtypes and numerical stability
# ---------------------------------------------------------------------------


INF_WEIGHT_CASES = {  # name: (shape, class axis, dtype)
    "6x5": ((6, 5), -1, np.float32),
    "2x5x3x4-axis1": ((2, 5, 3, 4), 1, np.float32),
    "8x64x19": ((8, 64, 19), -1, np.float32),
    "4x300-bf16": ((4, 300), -1, ml_dtypes.bfloat16),
    "1x32000-bf16": ((1, 32000), -1, ml_dtypes.bfloat16),
}


@pytest.mark.parametrize("through", ["xla", "kernel"])
def test_infinite_weight_of_a_class_no_label_takes(request, through):
    """Without label smoothing a class's weight enters only where a label
    takes it: an infinite weight on a class no label takes leaves the loss
    and the gradient finite, as in PyTorch (the sum of all weights times
    ``eps = 0`` once made the whole gradient NaN). Every reduction, against
    PyTorch and the NumPy reference in float64, all configurations under one
    ``jit`` (``check_configs_against_oracles``)."""
    if through == "kernel":
        request.getfixturevalue("kernel_everywhere")
    configs = {}
    for name, (shape, axis, dtype) in INF_WEIGHT_CASES.items():
        rng = rng_for("inf-weight", name)
        x = (2.0 * rng.standard_normal(shape)).astype(dtype)
        c = shape[axis]
        t = rng.integers(0, c - 1, positions(x, axis))  # never the last class
        if t.size > 1:
            t.reshape(-1)[0] = 255
        w = rng.uniform(0.5, 2.0, c).astype(np.float32)
        w[-1] = np.inf
        kw = dict(weight=w, ignore_index=255)
        for reduction in REDUCTIONS:
            cot = default_cotangent("ce", x, axis, reduction)
            configs[f"{name} reduction={reduction}"] = ("ce", x, t, axis, reduction, kw, cot)

    def finite(reduction, x, axis, loss, grad):
        assert np.isfinite(loss).all() and np.isfinite(grad).all()

    check_configs_against_oracles(configs, also=finite)


MINUS_INF_CASES = {  # name: (shape, class axis, dtype)
    "6x5": ((6, 5), -1, np.float32),
    "2x5x3x4-axis1": ((2, 5, 3, 4), 1, np.float32),
    "8x64x19": ((8, 64, 19), -1, np.float32),
    "4x300-bf16": ((4, 300), -1, ml_dtypes.bfloat16),
    "2x5000-bf16": ((2, 5000), -1, ml_dtypes.bfloat16),  # the kernel's two-read loop
}


@pytest.mark.parametrize("through", ["xla", "kernel"])
def test_minus_inf_logits_with_label_smoothing(request, through):
    """Logits of -inf (masked classes) under label smoothing and class
    weights, as PyTorch computes them: the smoothing term sums
    ``w_c log p_c`` over every class, so a -inf logit makes the position's
    loss +inf, or NaN where that class's weight is 0 (``0 * -inf``), and its
    gradient stays finite; a target on a -inf logit gives +inf. The kernel
    once left classes of weight 0 out of that sum (finite losses where
    PyTorch and the XLA path give NaN). Every reduction, against PyTorch and
    the NumPy reference in float64, all under one ``jit``."""
    if through == "kernel":
        request.getfixturevalue("kernel_everywhere")
    configs = {}
    for name, (shape, axis, dtype) in MINUS_INF_CASES.items():
        rng = rng_for("minus-inf", name)
        c = shape[axis]
        rows = 2.0 * rng.standard_normal(np.moveaxis(np.empty(shape), axis, -1).shape)
        t = rng.integers(2, c, rows.shape[:-1])
        flat, tl = rows.reshape(-1, c), t.reshape(-1)  # views: channels-last
        flat[0, 0] = -np.inf  # class 0, weight 0: NaN
        if tl.size > 2:
            flat[1, 1] = -np.inf  # class 1, weight > 0: +inf
            flat[2, tl[2]] = -np.inf  # the target's logit: +inf
        x = np.moveaxis(rows, -1, axis)
        w = rng.uniform(0.5, 2.0, c).astype(np.float32)
        w[0] = 0.0
        kw = dict(weight=w, ignore_index=255, label_smoothing=0.1)
        for reduction in REDUCTIONS:
            cot = default_cotangent("ce", x, axis, reduction)
            configs[f"{name} reduction={reduction}"] = (
                "ce", x.astype(dtype), t, axis, reduction, kw, cot)

    def as_pytorch(reduction, x, axis, loss, grad):
        assert np.isnan(loss).any() and np.isfinite(grad).all()
        if reduction == "none":
            assert np.isnan(loss.reshape(-1)[0])
            assert loss.size < 3 or np.all(loss.reshape(-1)[1:3] == np.inf)

    with np.errstate(invalid="ignore"):  # the oracles' 0 * -inf
        check_configs_against_oracles(configs, also=as_pytorch)


ONE_ROW_CASES = {  # name: (shape, dtype)
    "7": ((7,), np.float32),
    "1x1000": ((1, 1000), np.float32),
    "1x1x300": ((1, 1, 300), np.float32),
    "1x20000-bf16": ((1, 20000), ml_dtypes.bfloat16),
    "1x32000-bf16": ((1, 32000), ml_dtypes.bfloat16),
    "1x40000-bf16": ((1, 40000), ml_dtypes.bfloat16),
}


def test_one_row_weighted_label_smoothing(small_inputs):
    """One row of classes with class weights and label smoothing (the
    smoothing term's weighted sum is XLA:CPU's own reduction there, see
    ``_weighted_gap_sum``; at the library's threshold of small inputs, which
    these rows are): unbatched ``(C,)`` logits, one position, one position
    over two dimensions, bfloat16 rows below and above the 16-bit native
    sums' threshold; every reduction, against PyTorch and the NumPy reference
    in float64, all under one ``jit``."""
    configs = {}
    for name, (shape, dtype) in ONE_ROW_CASES.items():
        rng = rng_for("one-row", name)
        x = (2.0 * rng.standard_normal(shape)).astype(dtype)
        c = shape[-1]
        t = np.asarray(rng.integers(0, c, positions(x, -1)))
        w = rng.uniform(0.5, 2.0, c).astype(np.float32)
        kw = dict(weight=w, ignore_index=255, label_smoothing=0.1)
        for reduction in REDUCTIONS:
            cot = default_cotangent("ce", x, -1, reduction)
            configs[f"{name} reduction={reduction}"] = ("ce", x, t, -1, reduction, kw, cot)
    check_configs_against_oracles(configs)


STRIDED_SMOOTHING_CASES = {  # name: (shape, class axis, dtype, class slices summed)
    "2x2x5x3-axis1": ((2, 2, 5, 3), 1, np.float32, True),
    "2x19x4x5-axis1": ((2, 19, 4, 5), 1, np.float32, True),
    "2x150x3x4-axis1": ((2, 150, 3, 4), 1, np.float32, True),
    "1x200x2x3-axis1": ((1, 200, 2, 3), 1, np.float32, True),
    "1x201x2x3-axis1": ((1, 201, 2, 3), 1, np.float32, False),
    "2x40x3x4-axis1-bf16": ((2, 40, 3, 4), 1, ml_dtypes.bfloat16, True),
    "3x50x7-axis1": ((3, 50, 7), 1, np.float32, True),
    "30x8-axis0": ((30, 8), 0, np.float32, True),
    "2x3x25x4-axis2": ((2, 3, 25, 4), 2, np.float32, True),
    "2x5x3x25-axis3": ((2, 5, 3, 25), 3, np.float32, False),
}


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_strided_label_smoothing(weighted):
    """Label smoothing over a class axis that is not the last (the smoothing
    term summed class slice by class slice on XLA:CPU up to
    ``_GAP_SLICES_MAX_CLASSES`` classes, see ``_losses._weighted_gap_sum``):
    2 to 201 classes, axis 0, 1 and 2, float32 and bfloat16, channels-last
    as the control; with class weights (every reduction) and without (the
    mean and "none"), against PyTorch and the NumPy reference in float64,
    all under one ``jit`` (a test for each half: two smaller programs
    compile faster than one, and the two workers can share them); and the
    forward alone (no gradient in its pass: the unweighted float32 forward
    over more than ``_GAP_SLICES_UNWEIGHTED_FWD_MAX`` classes keeps
    ``jnp.sum``) against the same reference."""
    from jaxloss import _losses

    configs = {}
    for name, (shape, axis, dtype, slices) in STRIDED_SMOOTHING_CASES.items():
        rng = rng_for("strided-smoothing", name, weighted)
        x = (2.0 * rng.standard_normal(shape)).astype(dtype)
        x.reshape(-1)[:3] += 60.0  # rows far from 0: the gaps, not m W - sum w x
        assert _losses._gap_slices_apply(jnp.asarray(x), axis) == slices, name
        c = shape[axis]
        t = np.asarray(rng.integers(0, c, positions(x, axis)))
        t.reshape(-1)[-1] = 255
        w = rng.uniform(0.5, 2.0, c).astype(np.float32) if weighted else None
        kw = dict(weight=w, ignore_index=255, label_smoothing=0.1)
        # Unweighted, not "sum": the mean's path with another scale.
        for reduction in REDUCTIONS if weighted else ("mean", "none"):
            cot = default_cotangent("ce", x, axis, reduction)
            key = f"{name} weighted={weighted} reduction={reduction}"
            configs[key] = ("ce", x, t, axis, reduction, kw, cot)
    check_configs_against_oracles(configs)
    check_forwards_alone(configs)


SOFT_GRAD_CASES = {  # name: (shape, class axis, dtype)
    "6x5": ((6, 5), -1, np.float32),
    "2x5x3x4-axis1": ((2, 5, 3, 4), 1, np.float32),
    "3x4x40-bf16": ((3, 4, 40), -1, ml_dtypes.bfloat16),
}


def test_probability_targets_gradients_of_logits_and_targets():
    """Probability targets are differentiable (as in PyTorch): the loss and
    its gradients with respect to the logits and to the targets (through
    ``_soft_loss``'s custom JVP, transposed), against PyTorch (float64,
    ``target.requires_grad``) and a NumPy formula of the target gradient,
    ``(1 - eps) w_c (-log p_c)`` times each position's cotangent. Targets
    are not normalised (PyTorch does not require it), so that the logits'
    gradient ``A p_c - w_c q'_c`` has ``A != 1``. Every reduction, with and
    without weights and label smoothing."""
    cases = {}
    for (name, (shape, axis, dtype)), reduction, smoothed in itertools.product(
        SOFT_GRAD_CASES.items(), REDUCTIONS, (False, True)
    ):
        rng = rng_for("soft-grads", name, reduction, smoothed)
        x = (2.0 * rng.standard_normal(shape)).astype(dtype)
        q = rng.uniform(0.0, 1.0, shape).astype(dtype)
        c = shape[axis]
        w = rng.uniform(0.5, 2.0, c).astype(np.float32) if smoothed else None
        eps = 0.1 if smoothed else 0.0
        cot = default_cotangent("ce", x, axis, reduction)
        cases[f"{name} reduction={reduction} smoothed={smoothed}"] = (
            x, q, axis, reduction, w, eps, cot
        )

    def check(x, q, axis, reduction, w, eps, cot):
        kw = dict(axis=axis, reduction=reduction, label_smoothing=eps,
                  weight=None if w is None else jnp.asarray(w))
        loss, vjp = jax.vjp(lambda a, b: jaxloss.cross_entropy(a, b, **kw),
                            jnp.asarray(x), jnp.asarray(q))
        gx, gq = vjp(jnp.broadcast_to(jnp.asarray(cot, loss.dtype), loss.shape))
        assert gx.dtype == x.dtype and gq.dtype == q.dtype
        loss, gx, gq = (np.asarray(v, np.float64) for v in (loss, gx, gq))
        x64, q64 = np.asarray(x, np.float64), np.asarray(q, np.float64)
        tl, tgx, tgq = torch_loss_and_grad(
            to_torch_layout(x64, axis), to_torch_layout(q64, axis), cot, nll=False,
            weight=w, reduction=reduction, label_smoothing=eps, target_grad=True,
        )
        back = (lambda g: g) if x.ndim == 1 else (lambda g: np.moveaxis(g, 1, axis))
        logp = reference.log_softmax(x64, axis)
        wb = np.ones(x.shape[axis]) if w is None else np.asarray(w, np.float64)
        wb = wb.reshape([-1 if d == axis % x.ndim else 1 for d in range(x.ndim)])
        per_pos = np.broadcast_to(np.asarray(cot, np.float64), positions(x, axis))
        if reduction == "mean":
            per_pos = per_pos / np.prod(positions(x, axis))
        gq_np = (1.0 - eps) * wb * -logp * np.expand_dims(per_pos, axis)
        key = "bfloat16" if x.dtype == ml_dtypes.bfloat16 else "float32"
        assert_close(loss, tl, LOSS_TOL[key], "loss vs pytorch")
        assert_close(gx, back(tgx), GRAD_TOL[key], "d/dlogits vs pytorch")
        assert_close(gq, back(tgq), GRAD_TOL[key], "d/dtargets vs pytorch")
        assert_close(gq, gq_np, GRAD_TOL[key], "d/dtargets vs numpy")

    check_each(cases, check)


def soft_case(rng, shape, axis, large, dtype) -> tuple:
    """Logits (``large``: one row's near 100, its sum of ``exp`` out of the
    unshifted range), unnormalised probability targets and class weights."""
    x = 3.0 * rng.standard_normal(shape)
    if large:
        x[(0,) * (len(shape) - 1)] += 100.0
    q = rng.uniform(0.0, 1.0, shape).astype(dtype)
    return x.astype(dtype), q, rng.uniform(0.5, 2.0, shape[axis]).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("large", [False, True], ids=["moderate", "large"])
def test_probability_targets_forward_only(dtype, large, monkeypatch):
    """The forward of probability targets without differentiation (on
    XLA:CPU the unshifted row statistics, ``_unshifted_row_stats``; a batch
    with a row of logits near 100 takes the max shift; bfloat16 over more
    than 19 strided classes the max shift always; before small planes
    float32 over 25-256 strided classes, or more where classes times plane
    is small, over enough positions, and bfloat16 over more than 512
    optax's program, ``_soft_small_plane_applies``) equals PyTorch in
    float64 and the loss of the differentiated path, per position, weighted
    and smoothed, channels-last and ``axis=1``; bfloat16 also over more
    than 19 classes before a plane of at most 512 positions where classes
    times plane is small (1x40x24x24, a plane of 576, keeps the max shift).
    The number of positions from which float32 takes optax's program is
    lowered to 12 here (2x300x3x4 and 2x30x3x4 take it, 1x300x2x3 and
    1x40x2x3 not)."""
    from jaxloss import _losses

    monkeypatch.setattr(_losses, "_SOFT_SMALL_PLANE_MIN_POSITIONS", 12)
    cases = []
    for shape, axis in (((64, 19), -1), ((2, 7, 5, 6), 1), ((3, 4, 300), -1), ((2, 30, 3, 4), 1),
                        ((2, 50, 3, 4), 1), ((2, 150, 4, 5), 1), ((2, 513, 3, 2), 1),
                        ((2, 300, 3, 4), 1), ((1, 300, 2, 3), 1), ((1, 40, 2, 3), 1),
                        ((1, 40, 24, 24), 1)):
        rng = rng_for("soft-forward", shape, large, str(np.dtype(dtype)))
        x, q, w = soft_case(rng, shape, axis, large, dtype)
        c = shape[axis]
        narrow = c <= 256 or c * x[0, 0].size <= 150 * 1024
        f32_plane = 24 < c and np.prod(positions(x, axis)) >= 12 and narrow
        plane = x[0, 0].size
        bf16_plane = c > 512 or (c > 19 and plane <= 512 and c * plane <= 150 * 1024)
        small_plane = axis == 1 and (f32_plane if dtype == np.float32 else bf16_plane)
        assert _losses._soft_small_plane_applies(jnp.asarray(x), axis) == small_plane
        bad = None
        if small_plane:  # a row of -inf and a +inf logit: NaN, as PyTorch's
            bad = np.asarray(x, np.float64)
            bad[0, :, 0, 0] = -np.inf
            bad[-1, 3, 1, 1] = np.inf
        kw = dict(weight=jnp.asarray(w), axis=axis, reduction="none", label_smoothing=0.1)
        cases.append((shape, axis, x, q, w, kw, bad))

    # The forwards (and those of the non-finite logits) under one jit, the
    # differentiated path's losses under another.
    def forwards(args):
        return [(jaxloss.cross_entropy(a, b, **kw),
                 None if bad is None else jaxloss.cross_entropy(bad, b, **kw))
                for (a, b, bad), (*_, kw, _) in zip(args, cases, strict=True)]

    def differentiated(args):
        return [jax.vjp(lambda a, b=b, kw=kw: jaxloss.cross_entropy(a, b, **kw), a)[0]
                for (a, b), (*_, kw, _) in zip(args, cases, strict=True)]

    args = [(x, q, None if bad is None else bad.astype(dtype)) for *_, x, q, _, _, bad in cases]
    outs = jax.jit(forwards)(args)
    with_grads = jax.jit(differentiated)([(x, q) for *_, x, q, _, _, _ in cases])
    for (shape, axis, x, q, w, _, bad), (got, got_bad), with_grad in zip(
        cases, outs, with_grads, strict=True
    ):
        got = np.asarray(got, np.float64)
        x64, q64 = np.asarray(x, np.float64), np.asarray(q, np.float64)
        want, _ = torch_loss_and_grad(
            to_torch_layout(x64, axis), to_torch_layout(q64, axis), np.ones(positions(x, axis)),
            nll=False, weight=w, reduction="none", label_smoothing=0.1,
        )
        assert_close(got, want, LOSS_TOL["float32"], f"{shape} forward vs pytorch")
        assert_close(got, np.asarray(with_grad, np.float64), LOSS_TOL["float32"],
                     f"{shape} forward vs the differentiated loss")
        if bad is not None:
            want, _ = torch_loss_and_grad(
                to_torch_layout(bad, axis), to_torch_layout(q64, axis),
                np.ones(positions(x, axis)), nll=False, weight=w, reduction="none",
                label_smoothing=0.1,
            )
            np.testing.assert_array_equal(np.isnan(got_bad), np.isnan(want))
            assert np.isnan(want).sum() == 2


SLICED_SOFT_CASES = {  # name: (shape, class axis, dtype): 2 to 16 classes
    "300x2": ((300, 2), -1, np.float32),
    "6x7x5": ((6, 7, 5), -1, np.float32),
    "2x3x16": ((2, 3, 16), -1, np.float32),
    "4x2x3x5-axis1": ((4, 2, 3, 5), 1, np.float32),
    "3x16x4x5-axis1": ((3, 16, 4, 5), 1, np.float32),
    "9x3x7-axis0": ((3, 9, 7), 0, np.float32),
    "64x2-bf16": ((64, 2), -1, ml_dtypes.bfloat16),  # the pairs read as uint32
    "3x5x2-bf16": ((3, 5, 2), -1, ml_dtypes.bfloat16),
    "4x3x5x6-axis1-bf16": ((4, 3, 5, 6), 1, ml_dtypes.bfloat16),  # contiguous slices
    "2x12x3x4-axis1-bf16": ((2, 12, 3, 4), 1, ml_dtypes.bfloat16),
}


def test_probability_targets_forward_by_class_slices():
    """The forward alone of probability targets over 2 to 16 classes takes
    each class as an array of the positions (``_soft_sliced_loss``, where
    ``_soft_sliced_applies``): float32 either layout, bfloat16 pairs along
    the last axis and up to 12 strided bfloat16 classes; weighted or not,
    smoothed or not, every reduction, with ``where``. Against PyTorch and
    NumPy in float64: ``"none"`` with a row of logits near 100 (beyond the
    unshifted range), a row of -inf and a +inf logit (NaN, as PyTorch); the
    reductions with those two rows masked out.
    All under one ``jit``."""
    from jaxloss import _losses

    configs, wants = {}, {}
    for (name, (shape, axis, dtype)), weighted, eps in itertools.product(
        SLICED_SOFT_CASES.items(), (True, False), (0.0, 0.1)
    ):
        rng = rng_for("soft-sliced", name, weighted, eps)
        x = (2.0 * rng.standard_normal(shape)).astype(np.float64)
        rows = np.moveaxis(x, axis, -1)  # a view of x; its first three positions:
        first = (0,) * (x.ndim - 2)
        rows[first + (0,)] += 100.0
        rows[first + (1,)] = -np.inf
        rows[first + (2, -1)] = np.inf
        x = x.astype(dtype)
        assert _losses._soft_sliced_applies(jnp.asarray(x), axis), name
        q = rng.uniform(0.0, 1.0, shape).astype(dtype)
        w = rng.uniform(0.5, 2.0, shape[axis]).astype(np.float32) if weighted else None
        where = rng.random(positions(x, axis)) < 0.8
        where.reshape(-1)[:3] = (True, False, False)
        for reduction in REDUCTIONS:
            mask = None if reduction == "none" else where
            key = f"{name} weighted={weighted} eps={eps} {reduction}"
            configs[key] = (x, q, dict(weight=w, axis=axis, reduction=reduction,
                                       label_smoothing=eps, where=mask))
            x64, q64 = np.asarray(x, np.float64), np.asarray(q, np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):  # the non-finite rows
                want, _ = reference.loss_and_grad(x64, q64, weight=w, reduction=reduction,
                                                  label_smoothing=eps, axis=axis, where=mask)
            tl, _ = torch_loss_and_grad(
                to_torch_layout(x64, axis), to_torch_layout(q64, axis), np.ones(want.shape),
                nll=False, weight=w, reduction="none", label_smoothing=eps,
            ) if reduction == "none" else (None, None)
            wants[key] = (want, tl)

    def forwards(args):
        return [jaxloss.cross_entropy(x, q, **kw)
                for (x, q), (_, _, kw) in zip(args, configs.values(), strict=True)]

    gots = jax.jit(forwards)([(c[0], c[1]) for c in configs.values()])
    for (key, (want, tl)), got in zip(wants.items(), gots, strict=True):
        got = np.asarray(got, np.float64)
        assert_close(got, want, LOSS_TOL["float32"], f"{key} vs numpy")
        if tl is not None:
            assert np.isnan(got).sum() == 2, key
            assert_close(got, tl, LOSS_TOL["float32"], f"{key} vs pytorch")
        else:
            assert np.isfinite(got), key


SLICED_SOFT_GRAD_CASES = {  # name: (shape, class axis): two float32 classes
    "300x2": ((300, 2), -1),
    "3x5x2": ((3, 5, 2), -1),
    "2x2x32x33-axis1": ((2, 2, 32, 33), 1),
    "3x2x1024-axis1": ((3, 2, 1024), 1),
}


def test_probability_targets_two_classes_fwd_bwd_by_class_slices():
    """The mean and the sum of two float32 classes of probability targets,
    differentiated, take the class slices (``_soft_sliced_total_and_grad``,
    where ``_soft_sliced_grad_applies``): weighted, smoothed or not, with a
    ``where`` mask and a row of logits near 100, loss and gradient against
    PyTorch and NumPy in float64 (``check_soft_reduced``). A row of -inf and
    a +inf logit masked out by ``where`` add nothing and get a zero
    gradient."""
    from jaxloss import _losses

    cases = {}
    for (name, (shape, axis)), (reduction, eps) in itertools.product(
        SLICED_SOFT_GRAD_CASES.items(), (("mean", 0.1), ("sum", 0.0))
    ):
        rng = rng_for("soft-sliced-grad", name, reduction, eps)
        x, q, w = soft_case(rng, shape, axis, True, np.float32)
        assert _losses._soft_sliced_grad_applies(jnp.asarray(x), axis), name
        where = rng.random(positions(x, axis)) < 0.8
        where.flat[0] = True  # the row of large logits counts
        cases[f"{name} {reduction} eps={eps}"] = (x, q, axis, reduction, w, eps, where)

    def check(x, q, axis, reduction, w, eps, where, computed):
        check_soft_reduced(x, q, axis, reduction, w, eps, where, computed)
        bad = np.moveaxis(x.copy(), axis, -1)
        first = (0,) * (x.ndim - 2)
        bad[first + (1,)] = -np.inf
        bad[first + (2, 0)] = np.inf
        bad = np.moveaxis(bad, -1, axis)
        mask = where.copy()
        mask.reshape(-1)[1:3] = False
        kw = dict(weight=w, axis=axis, reduction=reduction, label_smoothing=eps, where=mask)
        f = jax.jit(jax.value_and_grad(lambda a: jaxloss.cross_entropy(a, q, **kw)))
        loss, grad = f(bad)
        want, want_grad = f(np.where(np.isfinite(bad), bad, 0.0).astype(np.float32))
        assert_close(loss, want, LOSS_TOL["float32"], "masked non-finite rows")
        grad, want_grad = np.moveaxis(np.asarray(grad), axis, -1), np.moveaxis(
            np.asarray(want_grad), axis, -1)
        assert np.all(grad[first + (1,)] == 0) and np.all(grad[first + (2,)] == 0)
        assert_close(grad, want_grad, GRAD_TOL["float32"], "masked non-finite rows' gradient")

    computed = soft_reduced_results(cases)
    check_each({name: (*args, computed[name]) for name, args in cases.items()}, check)


SOFT_REDUCED_CASES = {  # name: (shape, class axis)
    "64x19": ((64, 19), -1),
    "3x4x300": ((3, 4, 300), -1),
    "2x4100": ((2, 4100), -1),  # rows summed in blocks (_row_sum)
    "2x7x5x6-axis1": ((2, 7, 5, 6), 1),
    "2x30x3x4-axis1": ((2, 30, 3, 4), 1),  # more classes than _SOFT_STRIDED_MAX_CLASSES
    "2x40x3x4-axis1": ((2, 40, 3, 4), 1),  # the loss term flat (_SOFT_FLAT_LOSS_MIN_CLASSES)
    "2x50x3x4-axis1": ((2, 50, 3, 4), 1),  # ... summed over a flat view (_SOFT_FLAT_MIN_CLASSES)
}


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("large", [False, True], ids=["moderate", "large"])
def test_probability_targets_reduced_fwd_bwd(dtype, large):
    """The mean and the sum of probability targets under differentiation
    (``_soft_total_and_grad``: the gradient formed in the loss's pass; on
    XLA:CPU by its own reductions, for classes along the last axis from the
    unshifted row statistics, or with a row of logits near 100 the max
    shift), weighted, smoothed, with a ``where`` mask and a cotangent of
    1.7: loss and gradient against PyTorch (``reduction="none"``, each
    position's cotangent its share of the mean) and NumPy in float64, and
    the loss against the forward alone."""
    cases = {}
    for (name, (shape, axis)), reduction in itertools.product(
        SOFT_REDUCED_CASES.items(), ("mean", "sum")
    ):
        rng = rng_for("soft-reduced", name, reduction, large, str(np.dtype(dtype)))
        x, q, w = soft_case(rng, shape, axis, large, dtype)
        where = rng.random(positions(x, axis)) < 0.8
        where.flat[0] = True  # the row of large logits counts
        cases[f"{name} {reduction}"] = (x, q, axis, reduction, w, 0.1, where)

    check_soft_reduced_each(cases)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inputs(dtype):
    """NLL, cross-entropy, with label smoothing and with probability targets,
    every reduction (12 configurations under one ``jit``): a float32 loss and
    a gradient in the logits' dtype."""
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    configs = {}
    for reduction, kind in itertools.product(REDUCTIONS, ["nll", "ce", "ce_ls", "soft"]):
        rng = rng_for("half", dtype, reduction, kind)
        x, axis = make_input(rng, (4, 6, 3), "last", dtype=np_dtype)
        w = rng.uniform(0.5, 1.5, 6).astype(np.float32)
        if kind == "soft":
            t = np.exp(reference.log_softmax(rng.standard_normal(x.shape), axis)).astype(
                np.float32
            )
        else:
            t = make_targets(rng, positions(x, axis), 6, 255, dtype=np.uint8)
        name = "nll" if kind == "nll" else "ce"
        kw = dict(weight=w, ignore_index=255, label_smoothing=0.1 if kind == "ce_ls" else 0.0)
        cot = default_cotangent(name, x, axis, reduction)
        configs[f"{kind} reduction={reduction}"] = (name, x, t, axis, reduction, kw, cot)

    def dtypes(reduction, x, axis, loss, grad):
        assert loss.dtype == jnp.float32
        assert grad.dtype == jnp.dtype(dtype)

    check_configs_against_oracles(configs, also=dtypes)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["ce", "ce_ls", "soft"])
def test_stability_large_logits(kind, reduction):
    rng = rng_for("big", kind, reduction)
    x, axis = make_input(rng, (5, 7, 3), "first", scale=1e4)
    x[0, :, 0] = 1e4  # a tie at the maximum
    x[1, :, 0] = -1e4
    x[1, 3, 0] = 1e4
    w = rng.uniform(0.5, 1.5, 7).astype(np.float32)
    if kind == "soft":
        t = np.exp(reference.log_softmax(rng.standard_normal(x.shape), axis)).astype(np.float32)
    else:
        t = make_targets(rng, positions(x, axis), 7, -100)
    loss, grad = check_against_oracles("ce", x, t, axis, reduction, weight=w,
                                       label_smoothing=0.1 if kind == "ce_ls" else 0.0,
                                       torch_too=False)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))


def test_stability_keeps_small_log_term_next_to_huge_logits():
    """lse - x_t for logits ~1e4 that differ by O(1): the log term must survive."""
    x = np.array([[1e4, 1e4 - 1.0, 1e4 - 2.0]], np.float32)
    t = np.array([1])
    expected = -reference.log_softmax(x.astype(np.float64))[0, 1]
    np.testing.assert_allclose(jaxloss.cross_entropy(x, t), expected, rtol=1e-6)
    np.testing.assert_allclose(jaxloss.nll_loss(jaxloss.log_softmax(x), t), expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# where
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fn", ["nll", "ce_ls", "soft"])
@pytest.mark.parametrize("broadcast", [False, True], ids=["full", "bcast"])
def test_where_mask(fn, reduction, broadcast):
    rng = rng_for("where", fn, reduction, broadcast)
    x, axis = make_input(rng, (3, 5, 4), "last")  # positions (3, 4)
    w = rng.uniform(0.5, 1.5, 5).astype(np.float32)
    where = rng.random((3, 1) if broadcast else (3, 4)) < 0.6
    where[0] = True
    if fn == "soft":
        t = np.exp(reference.log_softmax(rng.standard_normal(x.shape), axis)).astype(np.float32)
    else:
        t = make_targets(rng, positions(x, axis), 5, 255, dtype=np.uint8)
    check_against_oracles("nll" if fn == "nll" else "ce", x, t, axis, reduction, weight=w,
                          ignore_index=255, label_smoothing=0.2 if fn == "ce_ls" else 0.0,
                          where=where, torch_too=False)


def test_where_equals_ignore_index_and_hides_invalid_labels():
    rng = rng_for("where-eq")
    x, axis = make_input(rng, (6, 4), "last")
    t = rng.integers(0, 4, 6).astype(np.int32)
    where = np.array([True, False, True, True, False, True])
    t_ign = np.where(where, t, -100)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 4), jnp.float32)
    for reduction in REDUCTIONS:
        f = lambda x, tt, wh, r=reduction: jnp.sum(
            jaxloss.cross_entropy(x, tt, weight=w, label_smoothing=0.1, reduction=r, where=wh))
        a, ga = jax.value_and_grad(f)(x, t, where)
        b, gb = jax.value_and_grad(f)(x, t_ign, None)
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(ga, gb, rtol=1e-6)
        # A masked-out position may hold any label, even an invalid one.
        c = f(x, np.where(where, t, 99), where)
        np.testing.assert_allclose(c, a, rtol=1e-6)


def test_ignore_index_none_counts_every_position():
    rng = rng_for("ign-none")
    x, axis = make_input(rng, (5, 3), "last")
    t = np.array([0, 1, 2, 1, 0], np.int32)
    a = jaxloss.cross_entropy(x, t, ignore_index=None)
    b = jaxloss.cross_entropy(x, t, ignore_index=1)
    expected, _ = reference.loss_and_grad(x, t, ignore_index=None)
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    assert not np.isclose(a, b)
    with pytest.raises(ValueError, match="-100"):
        jaxloss.cross_entropy(x, np.array([0, 1, 2, 1, -100]), ignore_index=None)
