"""jaxloss.torch_compat against torch.nn.functional / torch.nn: class dim 1
(0 for 1-D input), legacy size_average/reduce, PyTorch's NaN for a mean over
nothing, LogSoftmax(dim)."""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    check_each,
    jax_losses_and_grads,
    rng_for,
    torch_loss_and_grad,
    warnings_as_errors,
)

import jaxloss
from jaxloss import torch_compat

REDUCTIONS = ("mean", "sum", "none")
# PyTorch layout: class dim 1, or 0 for a 1-D input.
SHAPES = [(5,), (6, 5), (3, 5, 4), (2, 5, 3, 4), (2, 3, 2, 2, 3)]


def make(key, shape, ignore_index=-100, soft=False):
    rng = rng_for(key)
    x = rng.standard_normal(shape).astype(np.float32)
    c = shape[0] if len(shape) == 1 else shape[1]
    if soft:
        q = rng.random(shape)
        return x, (q / q.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)).astype(
            np.float32)
    pos = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = rng.integers(0, c, pos)
    if t.size > 1:
        t = np.where(rng.random(pos) < 0.3, ignore_index, t)
        t.flat[0] = 0
    return x, t.astype(np.int64)


def compat_loss_and_grad(fn, x, t, cotangent, **kw):
    loss, vjp = jax.vjp(lambda x: fn(x, t, **kw), jnp.asarray(x))
    (g,) = vjp(jnp.broadcast_to(jnp.asarray(cotangent, loss.dtype), loss.shape))
    return loss, g


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("fn", ["nll", "ce", "ce_ls"])
def test_functions_match_torch(fn, shape):
    """Unweighted with PyTorch's default ignore_index, weighted with an
    ignore_index inside and outside [0, C), every reduction (9
    configurations), under one ``jit``."""
    weighting = [(False, -100), (True, 2), (True, 255)]
    check_functions(fn, shape, [(*w, r) for w, r in itertools.product(weighting, REDUCTIONS)])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
def test_probability_targets_match_torch(shape):
    # Probability targets take no ignore_index (see the test further below).
    check_functions(
        "soft", shape, list(itertools.product((False, True), (-100,), REDUCTIONS))
    )


def check_functions(fn, shape, keys):
    """torch_compat's ``fn`` against PyTorch for every ``(weighted,
    ignore_index, reduction)`` in ``keys``, its losses and gradients computed
    under one ``jit`` (``oracles.jax_losses_and_grads``)."""
    compat = torch_compat.nll_loss if fn == "nll" else torch_compat.cross_entropy
    ls = 0.2 if fn in ("ce_ls", "soft") else 0.0
    cases, calls = [], []
    for weighted, ignore_index, reduction in keys:
        key = (fn, shape, weighted, ignore_index, reduction)
        x, t = make(key, shape, ignore_index, soft=fn == "soft")
        rng = rng_for("ct", key)
        c = shape[0] if len(shape) == 1 else shape[1]
        w = rng.uniform(0.3, 2.0, c).astype(np.float32) if weighted else None
        pos = () if len(shape) == 1 else shape[:1] + shape[2:]
        ct = rng.uniform(0.5, 2.0, pos) if reduction == "none" else 1.3
        kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction)
        cases.append((x, t, ct, kw))
        extra = {} if fn == "nll" else {"label_smoothing": ls}
        calls.append((compat, jnp.asarray(x), jnp.asarray(t), ct, {**kw, **extra}))
    results = jax_losses_and_grads(calls)

    def check(case, computed):
        x, t, ct, kw = case
        loss, g = computed[:2]
        t_loss, t_g = torch_loss_and_grad(x, t, ct, nll=fn == "nll", label_smoothing=ls, **kw)
        assert loss.shape == t_loss.shape
        assert_close(loss, t_loss, LOSS_TOL["float32"], "loss")
        if not np.isnan(t_loss).any():  # a 1-D input whose one target is ignored: see below
            assert_close(g, t_g, GRAD_TOL["float32"], "grad")

    check_each(
        {f"weighted={w} ignore_index={i} reduction={r}": (case, computed)
         for (w, i, r), case, computed in zip(keys, cases, results, strict=True)},
        check,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5,), (4, 5, 3)], ids=lambda s: f"{len(s)}d")
def test_classes_match_torch_nn(shape, reduction):
    x, t = make(("cls", shape, reduction), shape, 255)
    c = shape[0] if len(shape) == 1 else shape[1]
    w = np.linspace(0.5, 2.0, c).astype(np.float32)
    pairs = [
        (torch_compat.NLLLoss(weight=w, ignore_index=255, reduction=reduction),
         torch.nn.NLLLoss(weight=torch.tensor(w), ignore_index=255, reduction=reduction)),
        (torch_compat.CrossEntropyLoss(weight=w, ignore_index=255, reduction=reduction,
                                       label_smoothing=0.1),
         torch.nn.CrossEntropyLoss(weight=torch.tensor(w), ignore_index=255,
                                   reduction=reduction, label_smoothing=0.1)),
    ]
    for ours, theirs in pairs:
        got = ours(x, t)
        want = theirs(torch.tensor(x), torch.tensor(t)).numpy()
        assert_close(got, want, LOSS_TOL["float32"])
        assert_close(ours.forward(x, t), want, LOSS_TOL["float32"])


def test_class_dim_is_1_and_0_for_1d():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    t = np.array([[0, 1, 2, 0], [2, 2, 1, 0]])
    assert_close(torch_compat.cross_entropy(x, t),
                 F.cross_entropy(torch.tensor(x), torch.tensor(t)).numpy(), LOSS_TOL["float32"])
    # A channels-last (N, d, C) input with matching targets is refused, as in PyTorch.
    with pytest.raises(ValueError, match="targets must have the shape of"):
        torch_compat.cross_entropy(np.moveaxis(x, 1, -1), t)
    x1 = x[0, :, 0]
    assert_close(torch_compat.cross_entropy(x1, np.int64(2)),
                 F.cross_entropy(torch.tensor(x1), torch.tensor(2)).numpy(), LOSS_TOL["float32"])


# ---------------------------------------------------------------------------
# legacy size_average / reduce
# ---------------------------------------------------------------------------

LEGACY = list(itertools.product([None, True, False], repeat=2))


def torch_legacy(fn, *args, **kwargs):
    with warnings.catch_warnings():  # PyTorch's own (User)Warning
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def expected_reduction(size_average, reduce):
    """PyTorch's documented mapping, written out case by case."""
    if size_average is None and reduce is None:
        return "sum"  # the explicit reduction passed below wins
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"


@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=str)
@pytest.mark.parametrize("fn", ["nll", "ce"])
def test_legacy_size_average_reduce(fn, size_average, reduce):
    x, t = make(("legacy", fn), (4, 3, 2), 1)
    ours = torch_compat.nll_loss if fn == "nll" else torch_compat.cross_entropy
    theirs = F.nll_loss if fn == "nll" else F.cross_entropy
    kw = dict(size_average=size_average, reduce=reduce, reduction="sum", ignore_index=1)
    mapped = expected_reduction(size_average, reduce)
    if size_average is None and reduce is None:
        with warnings_as_errors():  # no warning at all
            got = ours(x, t, **kw)
    else:
        with pytest.warns(DeprecationWarning, match=r"size_average and reduce args will be "
                          rf"deprecated, please use reduction='{mapped}'"):
            got = ours(x, t, **kw)
    want = torch_legacy(theirs, torch.tensor(x), torch.tensor(t), **kw).numpy()
    assert got.shape == want.shape
    assert got.shape == ((4, 2) if mapped == "none" else ())
    assert_close(got, want, LOSS_TOL["float32"])
    np.testing.assert_allclose(got, ours(x, t, ignore_index=1, reduction=mapped))


@pytest.mark.parametrize("size_average,reduce", LEGACY, ids=str)
@pytest.mark.parametrize("cls", ["NLLLoss", "CrossEntropyLoss"])
def test_legacy_arguments_of_the_classes(cls, size_average, reduce):
    x, t = make(("legacy-cls", cls), (4, 3), 1)
    kw = dict(size_average=size_average, reduce=reduce, reduction="none")
    if size_average is None and reduce is None:
        ours = getattr(torch_compat, cls)(**kw)
    else:
        with pytest.warns(DeprecationWarning, match="size_average and reduce args"):
            ours = getattr(torch_compat, cls)(**kw)
    theirs = torch_legacy(getattr(torch.nn, cls), **kw)
    with warnings_as_errors():  # calling warns no more
        got = ours(x, t)
    want = theirs(torch.tensor(x), torch.tensor(t)).numpy()
    assert got.shape == want.shape
    assert_close(got, want, LOSS_TOL["float32"])


# ---------------------------------------------------------------------------
# PyTorch's NaN for a mean over nothing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True], ids=["nw", "w"])
@pytest.mark.parametrize("fn", ["nll", "ce", "ce_ls"])
def test_all_ignored_mean_is_nan(fn, weighted):
    x, _ = make(("allign", fn), (3, 4, 2))
    t = np.full((3, 2), 255, np.uint8)
    w = np.array([0.5, 1.0, 2.0, 1.5], np.float32) if weighted else None
    ls = 0.1 if fn == "ce_ls" else 0.0
    for reduction in REDUCTIONS:
        kw = dict(weight=w, ignore_index=255, reduction=reduction)
        if fn == "nll":
            got, g = compat_loss_and_grad(torch_compat.nll_loss, x, t, 1.0, **kw)
        else:
            got, g = compat_loss_and_grad(torch_compat.cross_entropy, x, t, 1.0,
                                          label_smoothing=ls, **kw)
        want, t_g = torch_loss_and_grad(x, t, 1.0, nll=fn == "nll", label_smoothing=ls, **kw)
        if reduction == "mean":
            assert np.isnan(want) and np.isnan(got)
        else:
            np.testing.assert_array_equal(got, want)
        # PyTorch's gradient is 0 (no position contributes), NaN loss or not.
        np.testing.assert_array_equal(t_g, 0.0)
        np.testing.assert_array_equal(g, t_g)


@pytest.mark.parametrize("through", ["xla", "kernel"])
@pytest.mark.parametrize("fn", ["nll", "ce", "ce_ls"])
def test_gradients_where_pytorchs_are_nan_for_rows_that_contribute_nothing(request, fn, through):
    """The README's two gradients that are not PyTorch's: where PyTorch's
    gradient is NaN although the row adds nothing to the loss, torch_compat's
    is 0, and the loss is PyTorch's (NaN included).

    - a mean whose denominator is 0 although targets are counted (their
      class weights 0): PyTorch's rows of those targets are 0/0 = NaN;
    - cross-entropy, an ignored row whose log-softmax is NaN (every logit
      -inf, a +inf or a NaN logit): PyTorch's 0 * NaN.

    Everywhere else the gradients are equal, and PyTorch's NaNs are checked
    to be there (this fails if either side changes). Through the XLA path
    and the Pallas kernel (interpret mode): with the weights' zero
    denominator the first gave +inf for the smoothed mean, the kernel
    NaN or +-inf gradients, before both took these rules."""
    if through == "kernel":
        request.getfixturevalue("kernel_everywhere")
    nll, ls = fn == "nll", 0.1 if fn == "ce_ls" else 0.0
    compat = torch_compat.nll_loss if nll else torch_compat.cross_entropy
    kw = {} if nll else dict(label_smoothing=ls)
    x, _ = make(("nan-grad", fn), (4, 5, 2))
    t = np.array([[0, 255], [1, 255], [255, 0], [1, 1]], np.int64)
    w = np.array([0.0, 0.0, 1.0, 2.0, 0.5], np.float32)
    bad_rows = x.copy()
    bad_rows[0, :, 1] = -np.inf  # ignored rows: all -inf, a +inf, a NaN
    bad_rows[1, 3, 1] = np.inf
    bad_rows[2, 2, 0] = np.nan
    cases = [(x, "mean", w)]  # counted targets all of weight 0
    if not nll:  # NLL's gradient does not read the ignored rows
        cases += [(bad_rows, r, None) for r in REDUCTIONS] + [(bad_rows, "mean", w[::-1])]
    for xi, reduction, wi in cases:
        args = dict(weight=wi, ignore_index=255, reduction=reduction)
        cot = np.full((4, 2), 0.5) if reduction == "none" else 1.0
        want, t_g = torch_loss_and_grad(xi, t, cot, nll=nll, **args, **kw)
        got, g = compat_loss_and_grad(compat, xi, t, cot, **args, **kw)
        assert_close(got, want, LOSS_TOL["float32"], f"{reduction} {wi}")  # NaN == NaN
        assert np.isnan(t_g).any(), (reduction, wi)
        assert_close(g, np.where(np.isnan(t_g), 0.0, t_g), GRAD_TOL["float32"])
    if nll:
        return
    # A counted row of weight 0 whose log-softmax is NaN keeps its NaN
    # gradient row (0 * NaN), in PyTorch, torch_compat and the native API
    # (whose mean over nothing is 0); every other row 0.
    x_nan = x.copy()
    x_nan[3, 1, 0] = np.nan  # position (3, 0): target 1, weight 0
    args = dict(weight=w, ignore_index=255, **kw)
    _, t_g = torch_loss_and_grad(x_nan, t, 1.0, nll=False, reduction="mean", **args)
    got, g = compat_loss_and_grad(compat, x_nan, t, 1.0, reduction="mean", **args)
    native, g_native = compat_loss_and_grad(jaxloss.cross_entropy, x_nan, t, 1.0, axis=1, **args)
    assert np.isnan(got) and float(native) == 0.0
    nan_row = np.zeros(t_g.shape, bool)
    nan_row[3, :, 0] = True
    assert np.isnan(t_g[nan_row]).all()
    for grad in (g, g_native):
        grad = np.asarray(grad)
        assert np.isnan(grad[nan_row]).all()
        np.testing.assert_array_equal(grad[~nan_row], 0.0)


@pytest.mark.parametrize("soft", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4)], ids=str)
def test_empty_batch_mean_is_nan(shape, soft):
    x = np.zeros(shape, np.float32)
    t = np.zeros(x.shape, np.float32) if soft else np.zeros(shape[:1] + shape[2:], np.int64)
    for reduction in REDUCTIONS:
        got = torch_compat.cross_entropy(x, t, reduction=reduction)
        want = F.cross_entropy(torch.tensor(x), torch.tensor(t), reduction=reduction).numpy()
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # NaN == NaN here
        if not soft:
            got = torch_compat.nll_loss(x, t, reduction=reduction)
            want = F.nll_loss(torch.tensor(x), torch.tensor(t), reduction=reduction).numpy()
            np.testing.assert_array_equal(got, want)


def test_probability_targets_refuse_a_non_default_ignore_index():
    x, q = make("soft-ign", (2, 3), soft=True)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point"):
        F.cross_entropy(torch.tensor(x), torch.tensor(q), ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index is not supported for floating point"):
        torch_compat.cross_entropy(x, q, ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index is not supported for floating point"):
        torch_compat.CrossEntropyLoss(ignore_index=0)(x, q)


# ---------------------------------------------------------------------------
# LogSoftmax(dim)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_log_softmax_dim(dim):
    x = rng_for("lsm", dim).standard_normal((2, 3, 4)).astype(np.float32)
    want = torch.nn.LogSoftmax(dim=dim)(torch.tensor(x)).numpy()
    np.testing.assert_allclose(torch_compat.LogSoftmax(dim=dim)(x), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(torch_compat.LogSoftmax(dim).forward(x), want, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(torch_compat.log_softmax(x, dim=dim), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_log_softmax_implicit_dim_is_pytorchs_legacy_choice(ndim):
    x = rng_for("lsm-none", ndim).standard_normal((2, 3, 4, 5)[:ndim]).astype(np.float32)
    with pytest.warns(UserWarning, match="Implicit dimension choice for log_softmax"):
        want = F.log_softmax(torch.tensor(x), dim=None).numpy()
    with pytest.warns(UserWarning, match="Implicit dimension choice for log_softmax"):
        got = torch_compat.log_softmax(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_log_softmax_keeps_dtype_and_feeds_nll():
    x = rng_for("lsm-nll").standard_normal((4, 5)).astype(np.float32)
    t = np.array([0, 4, 2, 1])
    y = torch_compat.LogSoftmax(dim=1)(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        torch_compat.NLLLoss()(torch_compat.LogSoftmax(dim=1)(x), t),
        torch_compat.CrossEntropyLoss()(x, t), rtol=1e-6)
