"""The public API routed through the Pallas kernel (interpret mode, on CPU).

``jax.lax.platform_dependent`` picks the kernel on CUDA only, so on this CPU
the ``kernel_everywhere`` fixture (``conftest.py``) makes
:func:`jaxloss._kernels.dispatch` take the kernel branch and runs the kernel
in interpret mode. Every reduction then goes
through the kernel as it would on a GPU, and is checked against PyTorch, the
NumPy reference and the XLA path: losses, gradients for a random cotangent,
forward mode, second order and ``vmap``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    check_each,
    data_mesh,
    jax_losses_and_grads,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
)

import jaxloss

IGN = 255


def _case(shape, axis, dtype, seed):
    rng = rng_for("kernel_api", shape, axis, seed)
    c = shape[axis]
    pos = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    t = rng.integers(0, c, pos)
    t[rng.random(pos) < 0.2] = IGN
    w = np.linspace(0.5, 2.0, c).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(t, jnp.int32), jnp.asarray(w)


CASES = [
    ((7, 19), -1, jnp.float32),
    ((2, 3, 4, 19), -1, jnp.float32),
    ((2, 19, 3, 5), 1, jnp.float32),
    ((3, 150), -1, jnp.bfloat16),
    ((2, 5000), -1, jnp.float32),  # the two-read loop
]


@pytest.mark.parametrize("shape,axis,dtype", CASES, ids=[f"{s}-ax{a}" for s, a, _ in CASES])
def test_cross_entropy_through_the_kernel(kernel_everywhere, shape, axis, dtype):
    """Every reduction, with and without label smoothing (6 configurations):
    losses and gradients for a random cotangent under one ``jit``, each
    checked against NumPy and PyTorch."""
    x, t, w = _case(shape, axis, dtype, 0)
    keys = list(itertools.product(["none", "mean", "sum"], [0.0, 0.1]))
    calls = []
    for reduction, smoothing in keys:
        kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=smoothing,
                  axis=axis)
        out = jax.eval_shape(lambda x, kw=kw: jaxloss.cross_entropy(x, t, **kw), x)
        ct = jnp.asarray(rng_for("ct", shape).standard_normal(out.shape), out.dtype)
        calls.append((jaxloss.cross_entropy, x, t, ct, kw))
    results = jax_losses_and_grads(calls)
    assert kernel_everywhere, "the kernel was not reached"
    dt = jnp.dtype(dtype).name
    xs = np.asarray(x.astype(jnp.float32), np.float64)

    def check(reduction, smoothing, ct, loss, g):
        assert g.dtype == x.dtype and g.shape == x.shape
        ct = np.asarray(ct, np.float64)
        g = np.asarray(g.astype(jnp.float32))
        kw = dict(weight=np.asarray(w), ignore_index=IGN, reduction=reduction,
                  label_smoothing=smoothing)
        want_l, want_g = reference.loss_and_grad(xs, np.asarray(t), axis=axis, cotangent=ct, **kw)
        assert_close(loss, want_l, LOSS_TOL[dt], "loss vs NumPy")
        assert_close(g, want_g, GRAD_TOL[dt], "grad vs NumPy")
        tl, tg = torch_loss_and_grad(to_torch_layout(xs, axis), np.asarray(t), ct, nll=False, **kw)
        assert_close(loss, tl, LOSS_TOL[dt], "loss vs PyTorch")
        assert_close(to_torch_layout(g, axis), tg, GRAD_TOL[dt], "grad vs PyTorch")

    check_each(
        {f"reduction={r} label_smoothing={ls}": (r, ls, call[3], *res[2:])
         for (r, ls), call, res in zip(keys, calls, results, strict=True)},
        check,
    )


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_none_takes_row_statistics_from_the_kernel(kernel_everywhere, reduction):
    x, t, w = _case((6, 19), -1, jnp.float32, 1)
    jax.grad(lambda x: jnp.sum(jaxloss.cross_entropy(x, t, weight=w, reduction=reduction)))(x)
    stats = [k.get("stats", False) for k in kernel_everywhere]
    assert any(stats) == (reduction == "none")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_nll_through_the_kernel(kernel_everywhere, reduction):
    x, t, w = _case((5, 4, 19), -1, jnp.float32, 2)
    logp = jax.nn.log_softmax(x, axis=-1)
    t = t.at[0, 1].set(40)  # out of range under jit: a NaN row, never a clamped class

    @jax.jit  # traced labels: checked by NaN, not by ValueError
    def loss_and_grad(v, t):
        loss, vjp = jax.vjp(
            lambda v: jaxloss.nll_loss(v, t, weight=w, ignore_index=IGN, reduction=reduction), v
        )
        return loss, vjp(jnp.ones_like(loss))[0]

    loss, g = loss_and_grad(logp, t)
    bad = np.zeros(t.shape, bool)
    bad[0, 1] = True
    if reduction == "none":
        assert np.isnan(loss[0, 1]) and np.isfinite(np.asarray(loss)[~bad]).all()
    else:
        assert np.isnan(loss)
    assert np.isnan(g[0, 1]).all() and np.isfinite(np.asarray(g)[~bad]).all()


def test_none_bad_label_gives_a_nan_row(kernel_everywhere):
    x, t, w = _case((5, 19), -1, jnp.float32, 3)
    t = t.at[2].set(19)

    @jax.jit
    def loss_and_grad(v, t):
        loss, vjp = jax.vjp(
            lambda v: jaxloss.cross_entropy(v, t, weight=w, ignore_index=IGN, reduction="none"), v
        )
        return loss, vjp(jnp.ones_like(loss))[0]

    loss, g = loss_and_grad(x, t)
    assert np.isnan(loss[2]) and np.isnan(g[2]).all()
    assert np.isfinite(np.delete(np.asarray(loss), 2)).all()
    assert np.isfinite(np.delete(np.asarray(g), 2, 0)).all()


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_forward_mode_second_order_and_vmap_through_the_kernel(kernel_everywhere, reduction):
    x, t, w = _case((4, 7), -1, jnp.float32, 4)
    x = x.astype(jnp.float64) if jax.config.jax_enable_x64 else x

    def f(v):
        return jnp.sum(
            jaxloss.cross_entropy(
                v, t, weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=0.1
            )
            ** 2
        )

    # Each transform compiled (one program, not op by op); the XLA path's
    # reverse-mode gradient against the kernel's forward mode.
    def transforms(first):
        stacked = jnp.stack([x, 2 * x])
        return jax.jit(lambda x, xs: (first(f)(x), jax.hessian(f)(x), jax.vmap(f)(xs)))(x, stacked)

    with jaxloss.disable_pallas():
        want_g, want_h, want_v = transforms(jax.grad)
    assert not kernel_everywhere
    got_g, got_h, got_v = transforms(jax.jacfwd)
    assert kernel_everywhere  # the kernel's branch was traced
    tol = (2e-5, 2e-6)
    assert_close(got_g, want_g, tol, "jacfwd")
    assert_close(got_h, want_h, (2e-4, 2e-6), "hessian")
    assert_close(got_v, want_v, tol, "vmap")


@pytest.mark.parametrize("through", ["xla", "kernel"])
@pytest.mark.parametrize(
    "dtype,c,ignore",
    [(np.uint8, 19, 255), (np.uint8, 300, 255), (np.int8, 19, -100), (np.int16, 300, -100)],
    ids=["uint8", "uint8-C300", "int8", "int16-C300"],
)
def test_narrow_labels_match_pytorch(request, through, dtype, c, ignore):
    """8- and 16-bit labels travel through the core as they are (no int32
    copy) and are widened at each use: losses and gradients equal PyTorch's,
    every reduction, with 300 classes too (a uint8 comparison with 300 would
    wrap) and with ignore_index 255 (uint8) or -100 (signed); a label out of
    range gives a NaN row. The three reductions (each with its own data) are
    computed under one ``jit``, then each is checked (``check_each``)."""
    calls = request.getfixturevalue("kernel_everywhere") if through == "kernel" else None
    w = np.linspace(0.5, 2.0, c).astype(np.float32)
    out_of_range = np.iinfo(dtype).max >= c  # a label c can be written
    cases = {}
    for reduction in ("none", "mean", "sum"):
        rng = rng_for("narrow", dtype.__name__, c, reduction)
        x = (2.0 * rng.standard_normal((3, 7, c))).astype(np.float32)
        t = rng.integers(0, min(c, np.iinfo(dtype).max + 1), (3, 7)).astype(dtype)
        t[0, 0] = ignore
        ct = rng.standard_normal((3, 7)) if reduction == "none" else 1.0
        bad = t.copy()
        if out_of_range:
            bad[1, 2] = c
        cases[reduction] = (x, t, ct, bad)

    def run(args):
        out = {}
        for reduction, (x, t, ct, bad) in args.items():

            def f(v, t=t, ct=ct, reduction=reduction):
                out = jaxloss.cross_entropy(
                    v, t, weight=jnp.asarray(w), ignore_index=ignore, reduction=reduction
                )
                return jnp.sum(out * ct)

            per = jaxloss.cross_entropy(x, bad, ignore_index=ignore, reduction="none")
            out[reduction] = (*jax.value_and_grad(f)(x), per)
        return out

    results = jax.jit(run)(
        {r: tuple(jnp.asarray(a) for a in case) for r, case in cases.items()}
    )

    def check(reduction, x, t, ct, got_v, got_g, per):
        want_l, want_g = torch_loss_and_grad(
            to_torch_layout(x, -1),
            t,
            ct,
            nll=False,
            weight=w,
            ignore_index=ignore,
            reduction=reduction,
        )
        assert_close(got_v, np.sum(want_l * ct), LOSS_TOL["float32"], "loss")
        assert_close(got_g, np.moveaxis(want_g, 1, -1), GRAD_TOL["float32"], "grad")
        if out_of_range:  # NaN, never clamped
            per = np.asarray(per)
            assert np.isnan(per[1, 2]) and np.isfinite(np.delete(per.reshape(-1), 7 + 2)).all()

    check_each(
        {r: (r, *cases[r][:3], *results[r]) for r in cases},
        check,
    )
    assert calls is None or calls, "the kernel was not reached"
    if calls:
        assert jnp.dtype(dtype) in {k.get("label_dtype") for k in calls}


@pytest.mark.parametrize("through", ["xla", "kernel"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_remat_scan_pmap_and_vjp(request, through, reduction):
    """The gradient under ``jax.checkpoint`` (two policies), inside a
    ``lax.scan`` that accumulates over micro-batches, under ``pmap`` and
    ``lax.map``, and from ``jax.vjp`` with a cotangent of 3, on either path,
    equals the XLA path's plain ``jax.grad``."""
    calls = request.getfixturevalue("kernel_everywhere") if through == "kernel" else None
    x, t, w = _case((4, 6, 5), -1, jnp.float32, 5)

    def f(v):
        out = jaxloss.cross_entropy(
            v, t, weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=0.1
        )
        return jnp.sum(out * out) if reduction == "none" else out

    with jaxloss.disable_pallas():
        want = jax.jit(jax.grad(lambda v: f(v) + 0.0))(x)  # a trace of its own

    def accumulated(v):  # two identical micro-batches, averaged
        return jax.lax.scan(lambda c, vi: (c + f(vi), None), 0.0, jnp.stack([v, v]))[0] / 2

    nothing = jax.checkpoint_policies.nothing_saveable
    n_dev = min(2, jax.local_device_count())  # one GPU: pmap over one copy
    got = {
        "checkpoint": jax.jit(jax.grad(jax.checkpoint(f)))(x),
        "checkpoint nothing_saveable": jax.jit(jax.grad(jax.checkpoint(f, policy=nothing)))(x),
        "scan": jax.jit(jax.grad(accumulated))(x),
        "pmap": jax.pmap(jax.grad(f))(jnp.stack([x] * n_dev))[-1],
        "lax.map": jax.jit(lambda v: jax.lax.map(jax.grad(f), v))(jnp.stack([x, x]))[1],
        "vjp": jax.vjp(f, x)[1](jnp.float32(3.0))[0] / 3,
    }
    for name, g in got.items():
        assert_close(g, want, (2e-5, 2e-6), name)
    assert calls is None or calls, "the kernel was not reached"


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_shard_map_through_the_kernel(kernel_everywhere, reduction):
    """The kernel inside ``shard_map`` equals one device. (Interpret mode cannot
    run under ``check_vma``; the typed CUDA lowering is checked in
    ``test_sharding.py``.) No collective is differentiated: each shard's
    gradient of its own sum is its slice of the global gradient."""
    from jax.sharding import PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # older jax
        from jax.experimental.shard_map import shard_map
    x, t, w = _case((8, 3, 19), -1, jnp.float32, 5)
    mesh = data_mesh()
    step = 8 // mesh.size
    kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=0.1)

    def total(x, t):
        return jnp.sum(jaxloss.cross_entropy(x, t, **kw) ** 2)

    def local(x, t):
        value, grad = jax.value_and_grad(total)(x, t)
        return jax.lax.psum(value, "data"), grad

    sharded = jax.jit(
        shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=(P(), P("data")),
            check_vma=False,
        )
    )
    got_l, got_g = sharded(x, t)
    assert kernel_everywhere
    with jaxloss.disable_pallas():  # the XLA path, shard by shard
        parts = [
            jax.value_and_grad(total)(x[i : i + step], t[i : i + step]) for i in range(0, 8, step)
        ]
    want_l = sum(v for v, _ in parts)
    want_g = jnp.concatenate([g for _, g in parts])
    assert_close(got_l, want_l, (1e-5, 1e-6))
    assert_close(got_g, want_g, (2e-5, 2e-6))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_infinite_logits_match_the_xla_path(kernel_everywhere, reduction):
    """-inf logits (masked classes) and a row of them: the kernel's statistics
    give the XLA path's values and gradients, NaNs included."""
    x, t, w = _case((6, 19), -1, jnp.float32, 6)
    x = x.at[0, :5].set(-jnp.inf).at[1].set(-jnp.inf).at[2, 3].set(jnp.inf)
    t = t.at[0].set(7).at[1].set(IGN).at[2].set(4).at[3].set(1)
    where = jnp.ones(t.shape, bool).at[3].set(False)

    def run(x):
        loss, vjp = jax.vjp(
            lambda v: jaxloss.cross_entropy(
                v, t, weight=w, ignore_index=IGN, reduction=reduction, where=where
            ),
            x,
        )
        return loss, vjp(jnp.ones_like(loss))[0]

    got = run(x)
    with jaxloss.disable_pallas():
        want = run(x)
    assert kernel_everywhere
    for g, v in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(v))
        np.testing.assert_allclose(g, v, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("through_kernel", [False, True], ids=["xla", "kernel"])
@pytest.mark.parametrize("c", [19, 5000], ids=["one-read", "two-read"])
def test_extreme_logits_match_pytorch(request, through_kernel, c):
    """Rows with -inf (masked classes, a whole row of them), +inf, and logits
    far below exp's range (-1e9, or -200 everywhere; in the two-read loop the
    first chunk all -1e9): PyTorch's losses and gradients, NaNs included,
    with and without label smoothing (masked classes make its loss inf).
    Ignored rows keep a zero gradient (PyTorch's is NaN for a row of -inf)."""
    calls = request.getfixturevalue("kernel_everywhere") if through_kernel else None
    x, t, w = _case((8, c), -1, jnp.float32, 9)
    x = np.array(x)
    t = np.array(t)
    x[0, 1::2] = -np.inf  # masked classes
    t[0] = 2
    x[1] = -np.inf  # a whole row of -inf, valid: NaN
    t[1] = 0
    x[2] = -np.inf  # the same, ignored
    t[2] = IGN
    x[3, 3] = np.inf  # +inf: NaN, as in PyTorch
    t[3] = 4
    x[4, : c // 2] = -1e9  # the first half far below exp's range
    t[4] = c - 1
    x[5] -= 200.0  # every logit below -88
    t[5] = 1
    x[6, 5:] = -1e9
    t[6] = 5
    t[7] = 0
    for reduction, eps in (("none", 0.0), ("sum", 0.0), ("none", 0.1)):
        kw = dict(weight=w, ignore_index=IGN, reduction=reduction, label_smoothing=eps)
        loss, vjp = jax.vjp(
            lambda v, kw=kw: jaxloss.cross_entropy(v, jnp.asarray(t), **kw), jnp.asarray(x)
        )
        ct = np.ones(loss.shape, np.float32)
        (g,) = vjp(jnp.asarray(ct))
        kw["weight"] = np.asarray(w)
        tl, tg = torch_loss_and_grad(x, t, ct, nll=False, **kw)
        tg[t == IGN] = 0.0
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(tl), err_msg=reduction)
        np.testing.assert_array_equal(np.isnan(g), np.isnan(tg), err_msg=reduction)
        np.testing.assert_allclose(loss, tl, rtol=2e-5, atol=2e-6, err_msg=reduction)
        np.testing.assert_allclose(g, tg, rtol=2e-5, atol=2e-6, err_msg=reduction)
    assert calls is None or calls


@pytest.mark.parametrize(
    "shape,axis", [((7, 19), -1), ((2, 19, 3, 5), 1), ((2, 5000), -1)], ids=["flat", "mid", "loop"]
)
def test_float32_logits_under_x64_through_the_kernel(kernel_everywhere, shape, axis):
    """Under x64 the kernel keeps int32 offsets (int64 targets, float32 logits)."""
    with jax.enable_x64(True):
        x, t, w = _case(shape, axis, jnp.float32, 7)
        t = t.astype(jnp.int64)
        for reduction in ("mean", "none"):

            def f(v, reduction=reduction):
                loss = jaxloss.cross_entropy(
                    v, t, weight=w, ignore_index=IGN, axis=axis, reduction=reduction
                )
                return jnp.sum(loss)

            got = jax.value_and_grad(f)(x)
            with jaxloss.disable_pallas():
                want = jax.value_and_grad(f)(x)
            assert got[1].dtype == jnp.float32
            assert_close(got[0], want[0], (2e-5, 2e-6))
            assert_close(got[1], want[1], (2e-5, 5e-7))


@pytest.mark.parametrize(
    "shape,axis", [((64, 64, 19), -1), ((4, 19, 32, 32), 1), ((64, 32003), -1)], ids=str
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.traces_kernel
def test_narrow_labels_lower_for_cuda(shape, axis, reduction):
    """The Triton kernel loads uint8 labels as they are (widened after the
    load): the CUDA lowering accepts it in every layout and the two-read loop,
    and the labels reach the custom call as uint8 (no int32 copy first)."""
    s = jax.ShapeDtypeStruct
    pos = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))

    def f(x, t):
        return jnp.sum(
            jaxloss.cross_entropy(x, t, ignore_index=255, axis=axis, reduction=reduction)
        )

    lowered = jax.jit(jax.grad(f)).trace(s(shape, jnp.float32), s(pos, jnp.uint8))
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert calls and all("ui8>" in line for line in calls), calls


@pytest.mark.traces_kernel
def test_export_for_cuda_and_for_several_platforms():
    """``jax.export``. For CUDA alone the kernel is exported (its Triton custom
    call has no compatibility guarantee, so JAX's check on that target is
    disabled by name). For several platforms with the CPU among them, under
    ``disable_pallas``: the XLA path exports to each, no kernel in it, and
    the exported function called here equals the loss, value and gradient.
    (With the kernel, a module for CPU and CUDA does not lower: JAX lowers
    each kept branch of ``platform_dependent`` for every platform of the
    module, and ``pallas_call`` refuses the CPU; jax-ml/jax#28594.)"""
    from jax import export

    x, t, _ = _case((4, 19, 16, 16), 1, jnp.float32, 0)

    def new_step():
        # A new function each time: the export under disable_pallas must not
        # depend on disable_pallas retracing (tested below).
        def step(x, t):
            return jax.value_and_grad(
                lambda v: jaxloss.cross_entropy(v, t, axis=1, ignore_index=IGN, label_smoothing=0.1)
            )(x)

        return jax.jit(step)

    check = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    cuda = export.export(new_step(), platforms=("cuda",), disabled_checks=[check])(x, t)
    assert "__gpu$xla.gpu.triton" in cuda.mlir_module()
    with jaxloss.disable_pallas():
        several = export.export(new_step(), platforms=("cpu", "cuda", "tpu"))(x, t)
    assert "triton" not in several.mlir_module()
    (loss, grad), (want_loss, want_grad) = several.call(x, t), new_step()(x, t)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-9)


@pytest.mark.traces_kernel
def test_disable_pallas_retraces_a_function_traced_with_the_kernel():
    """A jitted step traced (for CUDA) with the kernel is traced again inside
    ``disable_pallas`` -- without it -- and outside again takes its first
    trace: the block changes every ``jax.jit`` cache key. Before, the step
    kept its first trace inside the block, the kernel included."""
    if getattr(jax, "make_user_context", None) is None:
        pytest.skip("this JAX has no jax.make_user_context")
    x, t, _ = _case((8, 64, 19), -1, jnp.float32, 0)
    step = jax.jit(jax.value_and_grad(lambda v: jaxloss.cross_entropy(v, t, ignore_index=IGN)))

    def uses_kernel():
        return "__gpu$xla.gpu.triton" in step.trace(x).lower(lowering_platforms=("cuda",)).as_text()

    assert uses_kernel()
    with jaxloss.disable_pallas():
        assert not uses_kernel()
        got = step(x)
        want = jaxloss.cross_entropy(x, t, ignore_index=IGN)
    assert uses_kernel()
    np.testing.assert_allclose(float(got[0]), float(want), rtol=1e-6)
