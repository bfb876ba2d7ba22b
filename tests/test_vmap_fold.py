"""``jax.vmap`` of the losses: the batch folded into one call over all the
positions (``_losses._batch_folded``), so that the XLA path is planned for
the batch's size, not one example's. Per-example losses and gradients
against PyTorch and the NumPy reference (float64), against a Python loop,
the fallbacks where the batch cannot be folded, and other transforms over
the vmapped loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import (
    nothing_to_average,
    rng_for,
    spy_calls,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss
from jaxloss import _losses

W = np.array([0.5, 2.0, 1.0, 1.5, 0.25, 3.0, 1.25], np.float32)
# (function, jaxloss keywords, reference keywords)
CONFIGS = {
    "ce": (jaxloss.cross_entropy, {}, {}),
    "ce_w_ls_ign": (
        jaxloss.cross_entropy,
        {"weight": W, "label_smoothing": 0.2, "ignore_index": 255},
        {"weight": W.astype(np.float64), "label_smoothing": 0.2, "ignore_index": 255},
    ),
    "nll_w_ign": (
        jaxloss.nll_loss,
        {"weight": W, "ignore_index": 255},
        {"weight": W.astype(np.float64), "ignore_index": 255, "normalize": False},
    ),
}
# One example's logits (7 classes) and class axis: a row, rows, a channels-last
# map, a class-first map (PyTorch's unbatched (C, d1, d2)), classes between.
EXAMPLES = {
    "row": ((7,), 0),
    "rows": ((5, 7), 1),
    "map_last": ((3, 4, 7), 2),
    "map_first": ((7, 3, 4), 0),
    "between": ((2, 7, 3), 1),
}
REDUCTIONS = ("mean", "sum", "none")
B = 3


def batch(key, example, ignore_index=255, dtype=np.float32):
    """``B`` examples of ``example``'s shape: logits, labels (about a quarter
    set to ``ignore_index``), the class axis of one example."""
    shape, axis = EXAMPLES[example]
    rng = rng_for(*key)
    x = (2.0 * rng.standard_normal((B,) + shape)).astype(dtype)
    pos = (B,) + shape[:axis] + shape[axis + 1 :]
    t = rng.integers(0, shape[axis], pos)
    t = np.where(rng.random(pos) < 0.25, ignore_index, t).astype(np.int32)
    t.reshape(B, -1)[:, 0] = 1  # every example has a label to average
    return x, t, axis


def oracles(config, x, t, axis, reduction, cot):
    """Per-example ``[(loss, grad, name)]`` of PyTorch and the reference, the
    gradient that of ``sum(loss * cot)``; PyTorch only where its mean has a
    denominator (else it gives NaN where jaxloss gives 0)."""
    fn, _, ref_kw = CONFIGS[config]
    nll = fn is jaxloss.nll_loss
    out = []
    for i in range(B):
        rl, rg = reference.loss_and_grad(
            x[i], t[i], axis=axis, reduction=reduction, cotangent=cot[i], **ref_kw
        )
        out.append([(rl, rg, "numpy")])
        kw = {k: v for k, v in ref_kw.items() if k != "normalize"}
        c = x.shape[1 + axis]
        empty = nothing_to_average(t[i], kw.get("weight"), kw.get("ignore_index"), c)
        if reduction == "mean" and empty:
            continue
        x64 = np.asarray(x[i], np.float64)
        tl, tg = torch_loss_and_grad(
            to_torch_layout(x64, axis), t[i], cot[i], nll=nll, reduction=reduction, **kw
        )
        tg = tg if x64.ndim == 1 else np.moveaxis(tg, 1, axis)
        out[-1].append((tl, tg, "pytorch"))
    return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("example", list(EXAMPLES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_vmap_matches_pytorch_and_reference(config, example, reduction):
    fn, kw, _ = CONFIGS[config]
    key = ("vmap-fold", config, example, reduction)
    x, t, axis = batch(key, example, ignore_index=kw.get("ignore_index", -100))
    f = functools.partial(fn, reduction=reduction, axis=axis, **kw)
    rng = rng_for("vmap-fold-cot", config, example, reduction)
    cot = rng.uniform(0.5, 2.0, t.shape if reduction == "none" else (B,)).astype(np.float32)

    def weighted(x, t, c):
        return jnp.sum(f(x, t) * c)

    loss = jax.jit(jax.vmap(f))(x, t)
    grad = jax.jit(jax.vmap(jax.grad(weighted)))(x, t, cot)
    assert_matches_oracles(config, x, t, axis, reduction, cot, loss, grad)


def assert_matches_oracles(config, x, t, axis, reduction, cot, loss, grad, note=""):
    """Each example's ``loss`` and ``grad`` (that of ``sum(loss * cot)``)
    equal :func:`oracles`'."""
    for i, per_example in enumerate(oracles(config, x, t, axis, reduction, cot)):
        for ol, og, name in per_example:
            msg = f"{name} example {i} {note}"
            np.testing.assert_allclose(loss[i], ol, rtol=2e-5, atol=2e-6, err_msg=msg)
            np.testing.assert_allclose(grad[i], og, rtol=2e-5, atol=2e-6, err_msg=msg)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "example, folded", [("row", (B, 7)), ("map_last", (B, 3, 4, 7)), ("map_first", (B, 7, 3, 4))]
)
def test_vmap_plans_for_the_whole_batch(monkeypatch, example, folded, reduction):
    # The forward (mean/sum: a total per example; none: the losses), and
    # vmap of the gradient, see all the positions.
    shapes = spy_calls(monkeypatch, ("_xla_losses",))
    x, t, axis = batch(("plan", example), example)
    f = functools.partial(jaxloss.cross_entropy, reduction=reduction, axis=axis, ignore_index=255)
    jax.jit(jax.vmap(f))(x, t)
    assert folded in shapes, shapes
    shapes.clear()
    jax.jit(jax.vmap(jax.grad(lambda x, t: jnp.sum(f(x, t)))))(x, t)
    assert folded in shapes, shapes


LOOP_FOLD_CASES = [
    (example, chunk)
    for example in ("map_last", "map_first")
    for chunk in (None, 40)
] + [("map_last", 100), ("between", 40), ("between", 70)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("example, chunk", LOOP_FOLD_CASES)
def test_vmap_folds_a_batch_that_would_take_the_loop(monkeypatch, example, reduction, chunk):
    # On XLA:CPU float32 logits of _CPU_LOOP_MIN_BYTES or more take the
    # chunked loop. A batch that would take it as one input, of examples
    # that would not, is folded: over a strided class axis into the loop
    # with one total and one scale per example, channels-last the gradient
    # of rows of up to 8 classes too, their forward into the whole-array
    # passes (vmapped, each example's whole-array passes held the logits'
    # size in temporaries); examples that take the loop
    # themselves are vmapped as they are. The threshold lowered to these
    # sizes, and chunks of 40 logits (a chunk spans examples; the last one
    # shifted back); losses and gradients against PyTorch and the NumPy reference
    # either way, and against a loop over 4 examples (4 host devices: the
    # loop's device groups split the batch). Classes between two position
    # dimensions: an example spans 2 of the loop's leading positions, and
    # chunks of 70 logits take 3 of them (a chunk ends inside an example);
    # channels-last, chunks of 2 examples (100 logits; the last one shifted).
    config = "ce_w_ls_ign"
    fn, kw, _ = CONFIGS[config]
    x, t, axis = batch(("loop-fold", example, reduction), example)
    f = functools.partial(fn, reduction=reduction, axis=axis, **kw)
    cot = rng_for("loop-fold-cot", example, reduction).uniform(0.5, 2.0, (B,)).astype(np.float32)
    g = jax.grad(lambda x, t, c: f(x, t) * c)
    x4, t4 = np.concatenate([x, -x[:1]]), np.concatenate([t, t[1:2]])
    cot4 = np.concatenate([cot, cot[:1]])
    if chunk is not None:
        monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", chunk)
    shapes = spy_calls(monkeypatch, ("_xla_losses", "_fused_pass"))
    loops = spy_calls(monkeypatch, ("_fused_pass",))
    one = x[0].nbytes
    for threshold, folded in ((one + 1, True), (one, False)):
        monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", threshold)
        _losses._index_impl.clear_cache()
        jax.clear_caches()
        assert _losses._loop_writes_grad(jnp.asarray(x))  # the batch as one input
        assert _losses._loop_writes_grad(jnp.asarray(x[0])) != folded
        shapes.clear()
        loss = jax.jit(jax.vmap(f))(x, t)
        loops.clear()
        grad = jax.jit(jax.vmap(g))(x, t, cot)
        assert (x.shape in shapes) == folded, (threshold, shapes)
        # The gradient of the folded batch through the loop: over 7 classes
        # either layout (channels-last rows of up to 8 classes, _fold_takes_loop).
        assert (x.shape in loops) == folded, (threshold, loops)
        assert_matches_oracles(config, x, t, axis, reduction, cot, loss, grad, f"folded={folded}")
        got = jax.jit(jax.vmap(f))(x4, t4), jax.jit(jax.vmap(g))(x4, t4, cot4)
        want = loop(f, x4, t4), loop(g, x4, t4, cot4)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"folded={folded}")


def test_vmap_folded_gradient_keeps_the_temporaries_small():
    # Folded, the gradient is written where the exponentials were, as
    # without vmap: no temporary the size of the logits (a reshape of the
    # batch into the rows, B * 10 of them, once cost one).
    x = jax.ShapeDtypeStruct((64, 10, 1000), jnp.float32)
    t = jax.ShapeDtypeStruct((64, 10), jnp.int32)
    f = functools.partial(jaxloss.cross_entropy, ignore_index=255)
    mem = jax.jit(jax.vmap(jax.grad(f))).lower(x, t).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.05 * 64 * 10 * 1000 * 4, mem.temp_size_in_bytes


def loop(f, *args, in_axes=None):
    in_axes = in_axes or (0,) * len(args)
    pairs = list(zip(args, in_axes, strict=True))
    n = next(np.shape(a)[ax] for a, ax in pairs if ax is not None)
    take = lambda a, ax, i: a if ax is None else a[(slice(None),) * ax + (i,)]
    f = jax.jit(f)  # one example at a time: one compilation, not op by op
    outs = [f(*(take(a, ax, i) for a, ax in pairs)) for i in range(n)]
    return jax.tree.map(lambda *v: jnp.stack(v), *outs)


def jvp(f, x, dx):
    """The tangent of ``f`` at ``x`` along ``dx``, compiled."""
    return jax.jit(lambda x, dx: jax.jvp(f, (x,), (dx,))[1])(x, dx)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_fallbacks_and_broadcasts(reduction):
    # Folded with shared labels or a shared mask; vmapped as they are where
    # the logits are shared or each example has its own class weights; and
    # over a batch axis that is not the first.
    x, t, axis = batch(("fallbacks", reduction), "map_last")
    rng = rng_for("fallbacks-where", reduction)
    where = rng.random(t.shape) < 0.8
    w = rng.uniform(0.5, 2.0, (B, 7)).astype(np.float32)
    ce = functools.partial(jaxloss.cross_entropy, reduction=reduction, ignore_index=255)
    cases = [
        (lambda x, t: ce(x, t), (x, t[0]), (0, None)),
        (lambda x, m: ce(x, t[0], where=m), (x, where), (0, 0)),
        (lambda x, t: ce(x, t), (x[0], t), (None, 0)),
        (lambda x, w: ce(x, t[0], weight=w), (x, w), (0, 0)),
        (lambda x, t: ce(x, t), (np.moveaxis(x, 0, 2), np.moveaxis(t, 0, 2)), (2, 2)),
    ]
    for f, args, in_axes in cases:
        expected = loop(f, *args, in_axes=in_axes)
        got = jax.jit(jax.vmap(f, in_axes))(*args)
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)
        g = lambda *a, f=f: jnp.sum(f(*a))
        expected = loop(jax.grad(g), *args, in_axes=in_axes)
        got = jax.jit(jax.vmap(jax.grad(g), in_axes))(*args)
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nested_vmap_and_transforms_over_vmap(reduction):
    x, t, axis = batch(("nested", reduction), "rows")
    f = functools.partial(
        jaxloss.cross_entropy, reduction=reduction, ignore_index=255, weight=W, label_smoothing=0.1
    )
    per = lambda x, t: jnp.sum(f(x, t))
    # vmap of vmap: every row an example of its own.
    nested = jax.jit(jax.vmap(jax.vmap(per)))(x, t)
    expected = loop(lambda a, b: loop(per, a, b), x, t)
    np.testing.assert_allclose(nested, expected, rtol=2e-6, atol=1e-6)
    # Reverse mode, forward mode and second order over a vmapped loss.
    total = lambda x: jnp.sum(jax.vmap(per)(x, t))
    looped = lambda x: sum(per(x[i], t[i]) for i in range(B))
    np.testing.assert_allclose(
        jax.jit(jax.grad(total))(x), jax.jit(jax.grad(looped))(x), rtol=2e-6, atol=1e-6
    )
    dx = rng_for("nested-dx", reduction).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(
        jvp(total, x, dx), jvp(looped, x, dx), rtol=2e-5, atol=1e-5
    )
    xs, ts = x[:, :2], t[:, :2]  # small Hessians
    total_s = lambda x: jnp.sum(jax.vmap(per)(x, ts))
    looped_s = lambda x: sum(per(x[i], ts[i]) for i in range(B))
    # Forward over reverse (jax.hessian) and reverse over reverse.
    for second in (jax.hessian, lambda fn: jax.jacrev(jax.grad(fn))):
        np.testing.assert_allclose(
            jax.jit(second(total_s))(xs), jax.jit(second(looped_s))(xs), rtol=1e-4, atol=1e-6
        )
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.hessian(per)))(xs, ts),
        loop(jax.hessian(per), xs, ts),
        rtol=1e-4,
        atol=1e-6,
    )


def test_vmap_invalid_label_is_nan_in_its_example_only():
    x, t, axis = batch(("invalid",), "rows")
    t[1, 2] = 9  # out of [0, 7), not ignored
    for reduction in ("mean", "sum"):
        f = functools.partial(jaxloss.cross_entropy, reduction=reduction, ignore_index=255)
        loss = np.asarray(jax.jit(jax.vmap(f))(x, t))
        grad = np.asarray(jax.jit(jax.vmap(jax.grad(f)))(x, t))
        assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()
        assert np.isnan(grad[1]).any() and np.isfinite(grad[[0, 2]]).all()
    f = functools.partial(jaxloss.cross_entropy, reduction="none", ignore_index=255)
    loss = np.asarray(jax.jit(jax.vmap(f))(x, t))
    assert np.isnan(loss[1, 2]) and np.isfinite(np.delete(loss.reshape(-1), 1 * 5 + 2)).all()


def test_vmap_bfloat16_matches_a_loop():
    x, t, axis = batch(("bf16",), "map_last")
    xb = jnp.asarray(x, jnp.bfloat16)
    for reduction in REDUCTIONS:
        f = functools.partial(
            jaxloss.cross_entropy, reduction=reduction, ignore_index=255, weight=W
        )
        g = lambda x, t, f=f: jnp.sum(f(x, t))
        np.testing.assert_allclose(
            np.asarray(jax.jit(jax.vmap(f))(xb, t), np.float32),
            np.asarray(loop(f, xb, t), np.float32),
            rtol=1e-6,
            atol=1e-6,
        )
        got = np.asarray(jax.jit(jax.vmap(jax.grad(g)))(xb, t).astype(jnp.float32))
        want = np.asarray(loop(jax.grad(g), xb, t).astype(np.float32))
        # bfloat16 gradients: equal to within one bfloat16 rounding.
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_through_the_kernel(kernel_everywhere, reduction):
    # As on a GPU: the kernel's branch, batched as Pallas batches it (the
    # fold is the XLA branch's), matches a loop over the examples.
    x, t, axis = batch(("kernel", reduction), "map_last")
    f = functools.partial(
        jaxloss.cross_entropy, reduction=reduction, ignore_index=255, weight=W, label_smoothing=0.1
    )
    g = lambda x, t: jnp.sum(f(x, t))
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, t), loop(f, x, t), rtol=2e-6, atol=1e-6)
    got = jax.jit(jax.vmap(jax.grad(g)))(x, t)
    np.testing.assert_allclose(got, loop(jax.grad(g), x, t), rtol=2e-6, atol=1e-6)
    assert kernel_everywhere, "the kernel was not called"


@pytest.mark.traces_kernel
def test_vmap_lowers_for_cuda_with_the_kernel():
    s = jax.ShapeDtypeStruct
    f = functools.partial(jaxloss.cross_entropy, ignore_index=255, weight=W)
    step = jax.jit(jax.vmap(jax.value_and_grad(f)))
    args = (s((4, 64, 7), jnp.float32), s((4, 64), jnp.int32))
    text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("example", ["row", "rows", "map_last", "map_first", "between"])
def test_vmap_probability_targets_match_the_reference(example, reduction):
    # Probability targets, class weights, label smoothing and a mask: per
    # example against the NumPy reference (float64) and a loop; PyTorch
    # takes no mask, so it checks the examples where the mask keeps all.
    shape, axis = EXAMPLES[example]
    rng = rng_for("vmap-soft", example, reduction)
    x = (2.0 * rng.standard_normal((B,) + shape)).astype(np.float32)
    q = np.exp(reference.log_softmax(rng.standard_normal((B,) + shape), axis=axis + 1))
    q = q.astype(np.float32)
    pos = (B,) + shape[:axis] + shape[axis + 1 :]
    where = rng.random(pos) < 0.8
    where[0] = True
    where.reshape(B, -1)[:, 0] = True
    cot = rng.uniform(0.5, 2.0, pos if reduction == "none" else (B,)).astype(np.float32)
    kw = dict(weight=W, label_smoothing=0.1, axis=axis, reduction=reduction)
    f = lambda x, q, m: jaxloss.cross_entropy(x, q, where=m, **kw)
    g = lambda x, q, m, c: jnp.sum(f(x, q, m) * c)
    loss = jax.jit(jax.vmap(f))(x, q, where)
    grad = jax.jit(jax.vmap(jax.grad(g)))(x, q, where, cot)
    np.testing.assert_allclose(loss, loop(f, x, q, where), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(grad, loop(jax.grad(g), x, q, where, cot), rtol=2e-6, atol=1e-6)
    ref_kw = dict(kw, weight=W.astype(np.float64))
    for i in range(B):
        rl, rg = reference.loss_and_grad(x[i], q[i], where=where[i], cotangent=cot[i], **ref_kw)
        np.testing.assert_allclose(loss[i], rl, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(grad[i], rg, rtol=2e-5, atol=2e-6)
    x64, q64 = np.asarray(x[0], np.float64), np.asarray(q[0], np.float64)
    tl, tg = torch_loss_and_grad(
        to_torch_layout(x64, axis),
        to_torch_layout(q64, axis),
        cot[0],
        nll=False,
        weight=W.astype(np.float64),
        reduction=reduction,
        label_smoothing=0.1,
    )
    np.testing.assert_allclose(loss[0], tl, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        grad[0], tg if x64.ndim == 1 else np.moveaxis(tg, 1, axis), rtol=2e-5, atol=2e-6
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, axis", [((3, 4, 7), -1), ((30, 2, 3), 0)])
def test_vmap_probability_targets_plan_for_the_whole_batch(monkeypatch, shape, axis, reduction):
    # The forward and vmap of the gradient see all the positions: that of
    # the mean and sum, and _soft_loss's derivative (reduction="none", and
    # on XLA:CPU the reduced loss over more than 24 strided classes).
    names = ("_soft_loss_values", "_soft_terms", "_soft_parts")
    shapes = spy_calls(monkeypatch, names)
    rng = rng_for("soft-plan", reduction, shape)
    x = rng.standard_normal((B,) + shape).astype(np.float32)
    q = np.full(x.shape, 1 / shape[axis], np.float32)
    f = functools.partial(jaxloss.cross_entropy, reduction=reduction, axis=axis)
    jax.jit(jax.vmap(f))(x, q)
    assert (B,) + shape in shapes, shapes
    shapes.clear()
    jax.jit(jax.vmap(jax.grad(lambda x, q: jnp.sum(f(x, q)))))(x, q)
    assert (B,) + shape in shapes, shapes


@pytest.mark.parametrize(
    "shape, axis, reduction",
    [((5, 7), 1, "none"), ((7, 3, 4), 0, "none"), ((30, 2, 3), 0, "mean"), ((30, 2), 0, "sum")],
)
def test_vmap_probability_target_gradients_and_transforms(shape, axis, reduction):
    # _soft_loss's derivative folded (reduction="none"; the reduced loss over
    # more than 24 strided classes on XLA:CPU): gradients of the logits, of
    # the targets (not folded), both, in bfloat16, over shared targets and
    # per-example weights (not folded), and transforms over the vmapped
    # loss, against a loop over the examples.
    rng = rng_for("vmap-soft-grad", shape, reduction)
    x = (2.0 * rng.standard_normal((B,) + shape)).astype(np.float32)
    q = np.exp(reference.log_softmax(rng.standard_normal((B,) + shape), axis=axis + 1))
    q = q.astype(np.float32)
    c = shape[axis]
    w = np.linspace(0.5, 2.0, c, dtype=np.float32)
    ws = rng.uniform(0.5, 2.0, (B, c)).astype(np.float32)
    kw = dict(label_smoothing=0.1, axis=axis, reduction=reduction)
    per = lambda x, q: jnp.sum(jaxloss.cross_entropy(x, q, weight=w, **kw) ** 2)
    tol = dict(rtol=2e-5, atol=2e-6)
    for argnums in (0, 1, (0, 1)):
        g = jax.grad(per, argnums)
        got = jax.jit(jax.vmap(g))(x, q)
        want = loop(g, x, q)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, **tol)
    g = jax.grad(per)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(g, (0, None)))(x, q[0]), loop(g, x, q[0], in_axes=(0, None)), **tol
    )
    gw = jax.grad(lambda x, q, w: jnp.sum(jaxloss.cross_entropy(x, q, weight=w, **kw) ** 2))
    np.testing.assert_allclose(jax.jit(jax.vmap(gw))(x, q, ws), loop(gw, x, q, ws), **tol)
    xb, qb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(q, jnp.bfloat16)
    got = np.asarray(jax.jit(jax.vmap(g))(xb, qb).astype(jnp.float32))
    want = np.asarray(loop(g, xb, qb).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-5)
    # Nested vmap, reverse, forward and second order over a vmapped loss.
    nested = jax.jit(jax.vmap(jax.vmap(g)))(x[None], q[None])
    np.testing.assert_allclose(nested[0], loop(g, x, q), **tol)
    total = lambda x: jnp.sum(jax.vmap(per)(x, q))
    looped = lambda x: sum(per(x[i], q[i]) for i in range(B))
    dx = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_allclose(
        jvp(total, x, dx), jvp(looped, x, dx), rtol=2e-5, atol=1e-5
    )
    for second in (jax.hessian, lambda fn: jax.jacrev(jax.grad(fn))):
        np.testing.assert_allclose(
            jax.jit(second(total))(x), jax.jit(second(looped))(x), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_over_an_empty_batch(reduction):
    # No examples: empty losses and gradients, as vmapped op by op (the
    # fold's per-example sums once reshaped a batch of 0 with -1 and failed).
    x = np.zeros((0, 3, 5), np.float32)
    t = np.zeros((0, 3), np.int32)
    q = np.full((0, 3, 5), 0.2, np.float32)
    for y in (t, q):
        f = functools.partial(jaxloss.cross_entropy, reduction=reduction)
        g = lambda x, y, f=f: jnp.sum(f(x, y))
        assert jax.jit(jax.vmap(f))(x, y).shape == ((0, 3) if reduction == "none" else (0,))
        assert jax.jit(jax.vmap(jax.grad(g)))(x, y).shape == (0, 3, 5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("c", [1, 2])
def test_vmap_probability_targets_of_one_and_two_classes(c, reduction):
    # One class and two float32 classes take the class slices on XLA:CPU,
    # folded too (a batch of one class once took the generic terms: a loss
    # of 1e-6 where one example alone, and PyTorch, give exactly 0).
    rng = rng_for("vmap-soft-slices", c, reduction)
    x = (3.0 * rng.standard_normal((B, 64, c))).astype(np.float32)
    q = rng.uniform(0.1, 1.0, x.shape).astype(np.float32)
    q = q / q.sum(-1, keepdims=True)
    where = rng.random((B, 64)) < 0.8
    w = np.linspace(0.5, 2.0, c, dtype=np.float32)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    f = lambda x, q, m: jaxloss.cross_entropy(x, q, where=m, **kw)
    loss = jax.jit(jax.vmap(f))(x, q, where)
    grad = jax.jit(jax.vmap(jax.grad(f)))(x, q, where)
    np.testing.assert_allclose(loss, loop(f, x, q, where), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, loop(jax.grad(f), x, q, where), rtol=1e-6, atol=1e-7)
    if c == 1:  # log p = 0: the loss and its gradient are exactly 0
        assert not np.any(np.asarray(loss)) and not np.any(np.asarray(grad))
    ref_kw = dict(kw, weight=w.astype(np.float64))
    for i in range(B):
        rl, rg = reference.loss_and_grad(x[i], q[i], where=where[i], axis=1, **ref_kw)
        np.testing.assert_allclose(loss[i], rl, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(grad[i], rg, rtol=2e-5, atol=2e-6)


def test_fold_takes_the_loop_where_the_whole_array_passes_hold_the_logits():
    # XLA:CPU, float32 batches of 64 MiB or more (the batch would take the
    # loop as one input): strided classes always; channels-last the
    # fwd+bwd of grouped rows or of up to 8 classes, whose whole-array
    # passes held 65-150% of the logits.
    def takes(shape, axis, with_grad=True):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return _losses._fold_takes_loop(x, axis, with_grad)

    assert takes((2, 512, 1024, 19), 3)  # grouped by 16 positions
    assert takes((2, 853, 1024, 12), 3)  # by 4
    assert takes((2, 3413, 1024, 3), 3)
    assert takes((2, 19, 512, 1024), 1, with_grad=False)
    assert not takes((2, 512, 1024, 19), 3, with_grad=False)
    assert takes((2, 426, 1024, 24), 3)  # grouped in pairs
    assert not takes((2, 320, 1024, 32), 3)  # not grouped
    assert not takes((2, 256, 256, 150), 3)
    assert not takes((2, 256, 1024, 19), 3)  # 40 MB: the batch takes no loop


def test_vmap_folded_rows_through_the_loop_hold_little():
    # 2 x (512, 1024, 19) float32, vmapped fwd+bwd: 117-122% of the logits
    # in temporaries through the whole-array passes, now the loop's chunks.
    x = jax.ShapeDtypeStruct((2, 512, 1024, 19), jnp.float32)
    t = jax.ShapeDtypeStruct((2, 512, 1024), jnp.int32)
    f = functools.partial(jaxloss.cross_entropy, ignore_index=255)
    mem = jax.jit(jax.vmap(jax.grad(f))).lower(x, t).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.05 * 2 * 512 * 1024 * 19 * 4, mem.temp_size_in_bytes
