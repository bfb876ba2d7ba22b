"""Shared oracles for the tests: live PyTorch, jaxloss under ``jax.vjp``, tolerances.

``torch`` is imported at module top on purpose: without it the suite fails
at collection, it never skips.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
import zlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import reference
import torch
import torch.nn.functional as F

import jaxloss
from jaxloss._kernels import TRITON_DEPRECATION


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    """Every warning raises, except the one JAX itself gives (jax >= 0.11 on a
    GPU) each time it lowers the Pallas Triton kernel: not this library's to
    silence for a caller who asked for errors, nor what these tests check."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
        yield


def data_mesh():
    """A 1-D ``("data",)`` mesh over 4 devices, or 2 or 1 where there are
    fewer (one GPU: one shard)."""
    from jax.sharding import Mesh

    n = max(k for k in (1, 2, 4) if k <= len(jax.devices()))
    return Mesh(np.array(jax.devices()[:n]), ("data",))


# (rtol, atol) keyed by the *input* dtype. Losses are computed in float32 (or
# float64) whatever the input dtype, so a 16-bit input's loss is as accurate
# as a float32 one's (the oracles see the same, already rounded, inputs);
# its gradient is rounded to the input dtype.
LOSS_TOL = {
    "float64": (1e-12, 1e-12),
    "float32": (2e-5, 2e-6),
    "bfloat16": (2e-5, 2e-6),
    "float16": (2e-5, 2e-6),
}
GRAD_TOL = {
    "float64": (1e-12, 1e-14),
    # A gradient entry p - 1 with p close to 1 carries an absolute error of a
    # few float32 ulps of 1 (1.2e-7 each) in any implementation; XLA:GPU's
    # reduction="none" path showed 1.6e-7 on an H200 (1 case of 748).
    "float32": (2e-5, 5e-7),
    "bfloat16": (1.6e-2, 1e-5),  # 8 significant bits
    "float16": (2e-3, 1e-6),  # 11 significant bits
}


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from the test's parameters (stable across runs)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def as_bfloat16(x) -> tuple:
    """``(x rounded to bfloat16, the same values in float64)``: oracles in
    float64 then see exactly the logits jaxloss does."""
    xb = jnp.asarray(x, jnp.bfloat16)
    return xb, np.asarray(xb.astype(jnp.float32), np.float64)


def labelled_logits(shape, axis, dtype, seed, ignore_frac, ignore_index) -> tuple:
    """``(x, t, rng)``: logits ``3 N(0, 1)`` of ``shape`` (drawn in float32,
    then cast to ``dtype``), int32 labels over the other axes with a fraction
    ``ignore_frac`` set to ``ignore_index``, and the generator, to draw more.

    NumPy draws: ``jax.random`` compiles its generator for every new shape
    (0.5-3 s each on a 2-core CPU, again after every cache clear)."""
    axis = axis % len(shape)
    pos = shape[:axis] + shape[axis + 1 :]
    rng = np.random.default_rng(seed)
    x = jnp.asarray((3.0 * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)
    t = rng.integers(0, shape[axis], size=pos)
    t = np.where(rng.random(pos) < ignore_frac, ignore_index, t).astype(np.int32)
    return x, jnp.asarray(t), rng


def to_torch_layout(x: np.ndarray, axis: int) -> np.ndarray:
    """Move the class axis to PyTorch's place: dim 1, or dim 0 for a 1-D input."""
    x = np.asarray(x)
    return x if x.ndim == 1 else np.moveaxis(x, axis, 1)


def module_case(name: str, axis: int, reduction: str) -> tuple:
    """``x, t, where`` of the module tests (linen and NNX): logits (3, 5, 4)
    with 5 classes on ``axis`` (1, or -1 moved last), uint8 labels ~30%
    void (255), a ``where`` mask keeping ~80%."""
    rng = rng_for(name, axis, reduction)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    pos = (3, 4)
    x = x if axis == 1 else np.moveaxis(x, 1, -1)
    t = np.where(rng.random(pos) < 0.3, 255, rng.integers(0, 5, pos)).astype(np.uint8)
    where = rng.random(pos) < 0.8
    return x, t, where


# The seed's 2-D example: N=5 images of 16 channels on 10x10, a 3x3 VALID
# convolution to C=4 classes on 8x8, log-softmax, NLL.
SEED_2D = {"N": 5, "C_IN": 16, "HW": 10, "C": 4}


def seed_2d_data() -> tuple:
    """``x_nchw, target, w_oihw, b`` of the seed's 2-D example (PyTorch layouts)."""
    n, c_in, hw, c = SEED_2D["N"], SEED_2D["C_IN"], SEED_2D["HW"], SEED_2D["C"]
    rng = rng_for("seed-2d")
    x_nchw = rng.standard_normal((n, c_in, hw, hw)).astype(np.float32)
    target = rng.integers(0, c, (n, hw - 2, hw - 2)).astype(np.int64)
    w_oihw = (0.2 * rng.standard_normal((c, c_in, 3, 3))).astype(np.float32)
    b = (0.1 * rng.standard_normal(c)).astype(np.float32)
    return x_nchw, target, w_oihw, b


def torch_seed_2d(x_nchw, target, w_oihw, b) -> tuple:
    """PyTorch: conv2d -> LogSoftmax(dim=1) -> NLLLoss, in float64; the loss
    and the gradients of the convolution's weight (OIHW) and bias."""
    w = torch.tensor(w_oihw, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(torch.tensor(x_nchw, dtype=torch.float64), w, bias)
    hw = SEED_2D["HW"] - 2
    assert y.shape == (SEED_2D["N"], SEED_2D["C"], hw, hw)
    loss = torch.nn.NLLLoss()(torch.nn.LogSoftmax(dim=1)(y), torch.tensor(target))
    loss.backward()
    return loss.item(), w.grad.numpy(), bias.grad.numpy()


def torch_loss_and_grad(
    x: np.ndarray,
    target: np.ndarray,
    cotangent,
    *,
    nll: bool,
    weight=None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    target_grad: bool = False,
    legacy: dict | None = None,
) -> tuple:
    """PyTorch (float64) loss and input gradient; ``x`` in PyTorch's layout.
    With ``target_grad`` (probability targets) the targets' gradient too, a
    third element. ``legacy``: ``size_average``/``reduce`` passed on (PyTorch
    then maps them to the reduction itself)."""
    xt = torch.tensor(np.ascontiguousarray(x, np.float64), requires_grad=True)
    target = np.asarray(target)
    if np.issubdtype(target.dtype, np.floating):
        tt = torch.tensor(np.ascontiguousarray(target, np.float64), requires_grad=target_grad)
    else:
        tt = torch.tensor(target.astype(np.int64))
    kw = {
        "weight": None if weight is None else torch.tensor(np.asarray(weight, np.float64)),
        # PyTorch has no "ignore nothing"; -100 never occurs where None is tested.
        "ignore_index": -100 if ignore_index is None else int(ignore_index),
        "reduction": reduction,
        **(legacy or {}),
    }
    if nll:
        loss = F.nll_loss(xt, tt, **kw)
    else:
        loss = F.cross_entropy(xt, tt, label_smoothing=label_smoothing, **kw)
    loss.backward(torch.tensor(np.asarray(cotangent, np.float64)).expand_as(loss).contiguous())
    if target_grad:
        return loss.detach().numpy(), xt.grad.numpy(), tt.grad.numpy()
    return loss.detach().numpy(), xt.grad.numpy()


def nothing_to_average(t, weight, ignore_index, num_classes: int) -> bool:
    """Whether a mean over index targets ``t`` has a denominator of 0: every
    target ignored, or the weights of the targets all 0."""
    t = np.asarray(t).reshape(-1).astype(np.int64)
    valid = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    w = np.ones(num_classes) if weight is None else np.asarray(weight, np.float64)
    return float(np.sum(np.where(valid, w[np.clip(t, 0, num_classes - 1)], 0.0))) == 0.0


def float64_oracles(x64, t, axis, cot, **kw) -> list:
    """``[(loss, grad, name)]`` of PyTorch and the NumPy reference in float64
    for cross-entropy, gradients in ``x64``'s layout (``kw``: the loss's
    keyword arguments, ``cot`` the loss's cotangent)."""
    tl, tg = torch_loss_and_grad(to_torch_layout(x64, axis), t, cot, nll=False, **kw)
    tg = tg if np.ndim(x64) == 1 else np.moveaxis(tg, 1, axis)
    rl, rg = reference.loss_and_grad(x64, t, axis=axis, cotangent=cot, **kw)
    return [(tl, tg, "pytorch"), (rl, rg, "numpy")]


def jax_loss_and_grad(fn, x, target, cotangent, **kwargs) -> tuple:
    """jaxloss loss and ``vjp`` with ``cotangent``; returns numpy copies and the raw arrays.

    Loss and ``vjp`` under one ``jit`` (``jax_losses_and_grads`` of one
    call): one compilation per call, where an eager ``vjp`` compiles its
    forward and its transpose apart (the suite's most frequent helper; 2x
    its time)."""
    return jax_losses_and_grads([(fn, x, target, cotangent, kwargs)])[0]


def jax_losses_and_grads(calls: list) -> list:
    """:func:`jax_loss_and_grad` for several calls under one ``jit``; ``calls``
    is a list of ``(fn, x, target, cotangent, kwargs)``, the result a list of
    the same tuples ``jax_loss_and_grad`` returns.

    For a group of tests' configurations, each compiled on its own costs the
    fixed cost of an XLA:CPU compilation each time (~0.1 s here): 18
    configurations of the index-target sweep take ~3 s together, ~5.3 s
    apart. The calls' inputs are independent, so no value is shared."""
    kwargs = [(fn, kw) for fn, _, _, _, kw in calls]

    def losses_and_grads(args):
        out = []
        for (fn, kw), (x_, target_, cotangent_) in zip(kwargs, args, strict=True):
            loss, vjp = jax.vjp(lambda a, fn=fn, kw=kw, t=target_: fn(a, t, **kw), x_)
            (g,) = vjp(jnp.broadcast_to(cotangent_.astype(loss.dtype), loss.shape))
            out.append((loss, g))
        return out

    args = [(x, t, jnp.asarray(ct)) for _, x, t, ct, _ in calls]
    return [
        (
            np.asarray(loss, np.float64),
            np.asarray(g.astype(jnp.float32) if g.dtype == jnp.bfloat16 else g, np.float64),
            loss,
            g,
        )
        for loss, g in jax.jit(losses_and_grads)(args)
    ]


def config_losses_and_grads(fn, x, t, configs: dict, **kwargs) -> dict:
    """:func:`jax_losses_and_grads` of ``fn(x, t, **kw, **kwargs)`` for every
    ``name: (kw, cotangent)`` in ``configs`` (the form ``weighting_configs``
    gives), under one ``jit``: ``{name: (kw, cotangent, loss, grad, raw loss,
    raw grad)}``, the arguments ``check_each`` passes to a check."""
    results = jax_losses_and_grads(
        [(fn, jnp.asarray(x), jnp.asarray(t), cot, {**kw, **kwargs})
         for kw, cot in configs.values()]
    )
    return {name: (*configs[name], *res) for name, res in zip(configs, results, strict=True)}


def config_forwards(x, t, axis: int, configs: dict) -> dict:
    """``jaxloss.cross_entropy(x, t, axis=axis, **kw)`` (forward only) for
    every ``name: kw`` in ``configs``, under one ``jit``: ``{name: loss}``."""

    def forwards(v, t):
        return {name: jaxloss.cross_entropy(v, t, axis=axis, **kw) for name, kw in configs.items()}

    return jax.jit(forwards)(jnp.asarray(x), jnp.asarray(t))


def check_each(cases: dict, check) -> None:
    """``check(*args)`` for every ``name: args`` in ``cases``; then one
    failure naming every case that failed, with its message (a test that
    checks a group of configurations, e.g. computed under one ``jit``)."""
    failed = []
    for name, args in cases.items():
        try:
            check(*args)
        except AssertionError as e:
            failed.append(f"--- {name}:\n{e}")
    assert not failed, f"{len(failed)} of {len(cases)} failed\n" + "\n".join(failed)


def weighting_configs(w, smoothing: float, ignore_index: int, cot_key: tuple, cot_shape) -> dict:
    """``{name: (kwargs, cotangent)}`` for ``check_cross_entropy_configs``:
    unweighted and unsmoothed, or weighted by ``w`` with label smoothing
    ``smoothing``; every reduction. A "none" cotangent is drawn uniform in
    [0.5, 1.5) of ``cot_shape`` from ``rng_for(*cot_key, reduction)``; the
    others are 1."""
    configs = {}
    for (weighted, ls), reduction in itertools.product(
        [(False, 0.0), (True, smoothing)], ["none", "mean", "sum"]
    ):
        kw = dict(weight=w if weighted else None, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=ls)
        rng = rng_for(*cot_key, reduction)
        cot = rng.uniform(0.5, 1.5, cot_shape).astype(np.float32) if reduction == "none" else 1.0
        configs[f"weighted={weighted} label_smoothing={ls} reduction={reduction}"] = (kw, cot)
    return configs


def check_cross_entropy_configs(
    x, x64, t, axis, configs: dict, dtype_key: str, forward: bool = False
) -> None:
    """jaxloss.cross_entropy of logits ``x`` (the same values in float64:
    ``x64``) and labels ``t`` for every ``name: (kwargs, cotangent)`` in
    ``configs``: its loss and gradient for the cotangent (and, with
    ``forward``, its forward-only value) for all of them under one ``jit``,
    each call with its own copy of ``x`` (no value shared); then each, the
    gradient in ``x``'s dtype, against PyTorch and NumPy in float64
    (``float64_oracles``) within the tolerances of ``dtype_key``. A failure
    names every configuration that failed (``check_each``)."""
    items = list(configs.values())

    def run(xs, t):
        out = []
        for (xg, xf), (kw, cot) in zip(xs, items, strict=True):
            f = lambda a, kw=kw: jaxloss.cross_entropy(a, t, axis=axis, **kw)  # noqa: E731
            loss, vjp = jax.vjp(f, xg)
            ct = jnp.asarray(cot, jnp.float32).astype(loss.dtype)
            (g,) = vjp(jnp.broadcast_to(ct, loss.shape))
            out.append((loss, g, f(xf) if forward else None))
        return out

    results = jax.jit(run)([(x, x)] * len(items), t)

    def check(kw, cot, loss, g, fwd):
        assert g.dtype == x.dtype, f"gradient dtype {g.dtype}, logits {x.dtype}"
        g = g.astype(jnp.float32) if g.dtype == jnp.bfloat16 else g
        for want_loss, want_grad, name in float64_oracles(x64, np.asarray(t), axis, cot, **kw):
            assert_close(loss, want_loss, LOSS_TOL[dtype_key], f"loss vs {name}")
            assert_close(g, want_grad, GRAD_TOL[dtype_key], f"grad vs {name}")
            if forward:
                assert_close(fwd, want_loss, LOSS_TOL[dtype_key], f"forward vs {name}")

    check_each(
        {name: (*item, *res) for name, item, res in zip(configs, items, results, strict=True)},
        check,
    )


def assert_close(actual, expected, tol, what: str = "") -> None:
    rtol, atol = tol
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), np.asarray(expected, np.float64),
        rtol=rtol, atol=atol, err_msg=what,
    )


def assert_rows_match_pytorch(x, t, loss_tol, grad_tol, **kw) -> None:
    """jaxloss's ``reduction="none"`` cross-entropy of channels-last ``x`` and
    its gradient (cotangent ones) equal PyTorch's in float64, NaNs at the
    same places; rows whose label is ``kw["ignore_index"]`` keep jaxloss's
    zero gradient (PyTorch's is NaN for a row of -inf there)."""
    kw = dict(kw, reduction="none")
    loss, vjp = jax.vjp(lambda v: jaxloss.cross_entropy(v, jnp.asarray(t), **kw), jnp.asarray(x))
    (g,) = vjp(jnp.ones(loss.shape, jnp.float32))
    tl, tg = torch_loss_and_grad(to_torch_layout(x, -1), t, np.ones(t.shape), nll=False, **kw)
    tg = np.moveaxis(tg, 1, -1) if np.ndim(x) > 2 else tg
    tg[t == kw["ignore_index"]] = 0.0
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(tg))
    np.testing.assert_allclose(loss, tl, rtol=loss_tol[0], atol=loss_tol[1])
    np.testing.assert_allclose(g, tg, rtol=grad_tol[0], atol=grad_tol[1])


def plant_non_finite_rows(x: np.ndarray, t: np.ndarray, ignore_index: int) -> None:
    """In channels-last ``x`` of shape (2, >= 7, C >= 4), in place: a valid row
    of -inf at [0, 2] (target 3: NaN in PyTorch), an ignored row of -inf at
    [1, 4] (zero in jaxloss) and one +inf logit at [1, 6, 2] (target 2: NaN)."""
    x[0, 2] = -np.inf
    t[0, 2] = 3
    x[1, 4] = -np.inf
    t[1, 4] = ignore_index
    x[1, 6, 2] = np.inf
    t[1, 6] = 2


def under_transforms(fn, x, t, where, dx, **kw) -> tuple:
    """``fn`` (a jaxloss loss taking ``where``, ``x`` batched along its first
    axis) under the transforms a training loop uses, each jitted:
    ``value_and_grad`` of the reduced loss with the mask ``where``, ``jvp``
    of the per-position losses along ``dx``, ``vmap`` of ``value_and_grad``
    over the first axis, and a Hessian-vector product of the first item."""

    def reduced(v, tt, wh):
        return fn(v, tt, where=wh, **kw)

    vg = jax.jit(jax.value_and_grad(reduced))(x, t, where)
    per = jax.jit(lambda v, d: jax.jvp(
        lambda a: fn(a, t, reduction="none", **kw), (v,), (d,)))(x, dx)
    batched = jax.jit(jax.vmap(jax.value_and_grad(reduced)))(x, t, where)
    hvp = jax.jit(lambda v, d: jax.jvp(
        jax.grad(lambda a: reduced(a, t[0], where[0])), (v,), (d,))[1])(x[0], dx[0])
    return vg, per, batched, hvp


def _soft_reduced_kwargs(axis, reduction, w, eps, where) -> dict:
    return dict(weight=None if w is None else jnp.asarray(w), axis=axis, reduction=reduction,
                label_smoothing=eps, where=None if where is None else jnp.asarray(where))


def soft_reduced_results(cases: dict, cot=1.7) -> dict:
    """jaxloss's side of :func:`check_soft_reduced` for every ``name: (x, q,
    axis, reduction, w, eps, where)`` in ``cases``: ``{name: (loss, grad,
    raw grad, forward alone)}``, the losses and gradients (cotangent
    ``cot``) of all the cases under one ``jit`` and their forwards alone
    under another (two compilations, not two a case)."""
    kws = {name: _soft_reduced_kwargs(*args[2:]) for name, args in cases.items()}
    results = jax_losses_and_grads(
        [(jaxloss.cross_entropy, jnp.asarray(args[0]), jnp.asarray(args[1]), np.float32(cot),
          kws[name]) for name, args in cases.items()]
    )
    forwards = jax.jit(
        lambda xq: {name: jaxloss.cross_entropy(x, q, **kws[name]) for name, (x, q) in xq.items()}
    )({name: (args[0], args[1]) for name, args in cases.items()})
    return {
        name: (loss, grad, raw_grad, forwards[name])
        for name, (loss, grad, _, raw_grad) in zip(cases, results, strict=True)
    }


def check_soft_reduced_each(cases: dict) -> None:
    """:func:`check_soft_reduced` for every ``name: (x, q, axis, reduction, w,
    eps, where)`` in ``cases`` (cotangent 1.7), jaxloss's side of all of them
    computed together (:func:`soft_reduced_results`); one failure naming
    every case that failed (:func:`check_each`)."""
    computed = soft_reduced_results(cases)
    check_each(
        {name: (*args, computed[name]) for name, args in cases.items()}, check_soft_reduced
    )


def check_soft_reduced(x, q, axis, reduction, w, eps, where, computed, cot=1.7) -> None:
    """A reduced cross-entropy of probability targets ``q`` (``where`` may be
    None), differentiated with cotangent ``cot``: loss and gradient against
    PyTorch (``reduction="none"``, each position's cotangent its share of
    the reduction) and NumPy in float64, the loss also against the forward
    alone; the gradient in ``x``'s dtype. ``computed``: jaxloss's side,
    as :func:`soft_reduced_results` gives it (with the same ``cot``)."""
    import ml_dtypes

    loss, grad, raw_grad, forward = computed
    assert raw_grad.dtype == x.dtype
    x64, q64 = np.asarray(x, np.float64), np.asarray(q, np.float64)
    mask = np.ones(np.delete(x.shape, axis % x.ndim), bool) if where is None else where
    share = mask / (mask.sum() if reduction == "mean" else 1.0)
    # PyTorch's per-position losses keep the positions' order (the class
    # axis moved to dim 1 leaves the others in place).
    tl, tg = torch_loss_and_grad(
        to_torch_layout(x64, axis), to_torch_layout(q64, axis), cot * share,
        nll=False, weight=w, reduction="none", label_smoothing=eps,
    )
    torch_loss = np.sum(tl * share)
    back = (lambda g: g) if x.ndim == 1 else (lambda g: np.moveaxis(g, 1, axis))
    rl, rg = reference.loss_and_grad(x64, q64, weight=w, reduction=reduction,
                                     label_smoothing=eps, axis=axis, where=where,
                                     cotangent=cot)
    key = "bfloat16" if x.dtype == ml_dtypes.bfloat16 else "float32"
    assert_close(loss, torch_loss, LOSS_TOL["float32"], "loss vs pytorch")
    assert_close(loss, rl, LOSS_TOL["float32"], "loss vs numpy")
    assert_close(np.asarray(forward, np.float64), loss, LOSS_TOL["float32"], "forward alone")
    assert_close(grad, back(tg), GRAD_TOL[key], "gradient vs pytorch")
    assert_close(grad, rg, GRAD_TOL[key], "gradient vs numpy")


def check_grads_of_reductions(f, x, reductions, **tol) -> None:
    """``check_grads`` to order 2, forward and reverse, of ``f(x, r)`` for
    every reduction ``r``: the losses as one jitted function's outputs (a
    third of the compilations of one check per reduction); on a failure each
    reduction is checked alone, to name it."""
    from jax.test_util import check_grads

    check = functools.partial(check_grads, args=(x,), order=2, modes=("fwd", "rev"), **tol)
    try:
        check(jax.jit(lambda x: tuple(f(x, r) for r in reductions)))
    except AssertionError:
        failed = []
        for r in reductions:
            try:
                check(jax.jit(functools.partial(f, r=r)))
            except AssertionError as e:
                failed.append(f"--- reduction={r}:\n{e}")
        raise AssertionError(
            "the reductions together failed; alone:\n" + ("\n".join(failed) or "none")
        ) from None


def spy_calls(monkeypatch, names, record=None) -> list:
    """What ``record(*args, **kwargs)`` makes of every call of the core's
    functions ``names`` (``jaxloss._losses.<name>``; by default the first
    argument's shape), appended to one list, with the traces cleared first
    (a cached trace makes no call). Stacked spies each see the calls."""
    from jaxloss import _losses

    record = record or (lambda x, *args, **kwargs: tuple(x.shape))
    calls = []
    for name in names:
        real = getattr(_losses, name)

        def spy(*args, real=real, **kwargs):
            calls.append(record(*args, **kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(_losses, name, spy)
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    return calls
