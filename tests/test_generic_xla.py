"""The XLA formulation of the backends other than XLA:CPU (TPU; a GPU with the
Pallas kernel off), run on this machine.

``jaxloss._losses`` chooses each of its XLA:CPU formulations by
``jax.default_backend() == "cpu"`` as it traces, so on the CPU of CI the
formulation that a TPU, or a GPU without the kernel, compiles is otherwise
never run: the fixture ``other_backend`` shows the core a backend named
``"tpu"`` (its module's ``jax`` behind a proxy that answers every other
name with JAX's own), and the tests check that formulation against PyTorch
and NumPy in float64: losses, forward-only values and gradients, index and
probability targets, weights, label smoothing, ignored and masked positions,
every reduction, float32 and 16-bit logits, the class axis last and not; the
chunked loop over several chunks; ``vmap``, ``jvp`` and second order; and
under ``jit`` with the logits sharded over the 4 host devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import reference
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import (
    GRAD_TOL,
    LOSS_TOL,
    as_bfloat16,
    assert_close,
    check_cross_entropy_configs,
    check_each,
    check_grads_of_reductions,
    jax_losses_and_grads,
    labelled_logits,
    rng_for,
    to_torch_layout,
    torch_loss_and_grad,
    weighting_configs,
)

import jaxloss
from jaxloss import _losses

IGN = 255


class _OtherBackend:
    """``jax`` for ``jaxloss._losses``, with a default backend of ``"tpu"``."""

    def __getattr__(self, name: str):
        return getattr(jax, name)

    @staticmethod
    def default_backend() -> str:
        return "tpu"


_OTHER = _OtherBackend()  # one instance: the traces' state compares it by identity


@pytest.fixture
def other_backend(core_constants):
    """The core sees a backend named "tpu"; the kernel is off (on a GPU it
    would still be dispatched to, by the platform of the lowering)."""
    core_constants("jax", _OTHER)
    with jaxloss.disable_pallas():
        yield


def test_the_core_sees_another_backend(other_backend):
    """The proxy takes effect: none of the XLA:CPU formulations applies, and
    the chunked loop writes the gradient whatever the input's size (each
    differs on XLA:CPU, as the next test checks)."""
    x16 = jnp.ones((256, 256), jnp.bfloat16)
    x32 = jnp.ones((4, 150, 8, 8), jnp.float32)
    assert _losses.jax.default_backend() == "tpu"
    assert not _losses._native_row_sums(x16, -1)
    assert not _losses._gap_slices_apply(x32, 1)
    assert not _losses._unshifted_applies(x32, 1)
    assert _losses._loop_writes_grad(x16)


def test_the_same_checks_differ_on_xla_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's formulations")
    x16 = jnp.ones((256, 256), jnp.bfloat16)
    x32 = jnp.ones((4, 150, 8, 8), jnp.float32)
    assert _losses._native_row_sums(x16, -1)
    assert _losses._gap_slices_apply(x32, 1)
    assert _losses._unshifted_applies(x32, 1)
    assert not _losses._loop_writes_grad(x16)


# (shape, axis, dtype). The last three exceed the 2**20 logits of one chunk of
# the loop on other backends (_chunk_elements): two chunks, the last shifted.
INDEX_CASES = [
    ((4, 16, 16, 19), -1, jnp.float32),
    ((4, 19, 16, 16), 1, jnp.float32),
    ((64, 150), -1, jnp.float32),
    ((4, 150, 8, 8), 1, jnp.bfloat16),
    ((16, 1000), -1, jnp.bfloat16),
    ((300, 2), -1, jnp.float16),
    ((7, 1), -1, jnp.float32),
    ((2, 64, 64, 150), -1, jnp.float32),
    ((2, 150, 64, 64), 1, jnp.float32),
    ((1024, 1100), -1, jnp.bfloat16),
]


def _ids(cases) -> list[str]:
    return ["x".join(map(str, s)) + f"-axis{a}-{jnp.dtype(d).name}" for s, a, d in cases]


def _logits(shape, axis, dtype, seed) -> tuple:
    """``(x, x64, t, rng)``: logits in ``dtype`` and the same values in float64,
    int32 labels with 20% ignored."""
    x, t, rng = labelled_logits(shape, axis, jnp.float32, seed, 0.2, IGN)
    if dtype == jnp.bfloat16:
        x, x64 = as_bfloat16(x)
    else:
        x = x.astype(dtype)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
    return x, x64, t, rng


@pytest.mark.parametrize("shape,axis,dtype", INDEX_CASES, ids=_ids(INDEX_CASES))
def test_index_targets_match_float64_oracles(other_backend, shape, axis, dtype):
    """Unweighted, and weighted with label smoothing; every reduction: loss,
    gradient and forward-only value against PyTorch and NumPy."""
    x, x64, t, rng = _logits(shape, axis, dtype, 11)
    w = rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)
    configs = weighting_configs(w, 0.2, IGN, ("other-backend-cot", shape), t.shape)
    check_cross_entropy_configs(x, x64, t, axis, configs, jnp.dtype(dtype).name, forward=True)


def test_the_loop_runs_several_chunks(other_backend):
    """The last three INDEX_CASES reach the chunked loop (a ``scan``: the
    trip count is static) with two chunks."""
    for shape, axis, _ in INDEX_CASES[-3:]:
        n = int(np.prod(shape))
        assert _losses._chunk_elements(n) < n <= 2 * _losses._chunk_elements(n)
        x = jnp.ones(shape, jnp.float32)
        t = jnp.zeros(shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :], jnp.int32)
        grad = jax.grad(lambda v, t=t, a=axis: jaxloss.cross_entropy(v, t, axis=a))
        jaxpr = str(jax.make_jaxpr(grad)(x))
        assert "scan[" in jaxpr and "length=2" in jaxpr, shape


NLL_CASES = [
    ((4, 16, 16, 19), -1, jnp.float32),
    ((4, 19, 16, 16), 1, jnp.bfloat16),
    ((2, 150, 64, 64), 1, jnp.float32),
]


@pytest.mark.parametrize("shape,axis,dtype", NLL_CASES, ids=_ids(NLL_CASES))
def test_nll_matches_float64_oracles(other_backend, shape, axis, dtype):
    """nll_loss of log-probabilities, weighted and not, every reduction."""
    x, x64, t, rng = _logits(shape, axis, jnp.float32, 12)
    logp = reference.log_softmax(x64, axis=axis)
    x = jnp.asarray(logp.astype(np.float32)).astype(dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w = rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)
    configs = weighting_configs(w, 0.0, IGN, ("other-backend-nll", shape), t.shape)
    for kw, _ in configs.values():
        del kw["label_smoothing"]
    calls = [(jaxloss.nll_loss, x, t, cot, {**kw, "axis": axis}) for kw, cot in configs.values()]
    results = jax_losses_and_grads(calls)
    key = jnp.dtype(dtype).name

    def check(kw, cot, res):
        loss, g = res[0], res[1]
        tl, tg = torch_loss_and_grad(to_torch_layout(x64, axis), np.asarray(t), cot, nll=True, **kw)
        tg = np.moveaxis(tg, 1, axis)
        rl, rg = reference.loss_and_grad(x64, np.asarray(t), axis=axis, cotangent=cot,
                                         normalize=False, **kw)
        for want_l, want_g, name in ((tl, tg, "pytorch"), (rl, rg, "numpy")):
            assert_close(loss, want_l, LOSS_TOL[key], f"loss vs {name}")
            assert_close(g, want_g, GRAD_TOL[key], f"grad vs {name}")

    check_each({name: (*configs[name], res) for name, res in zip(configs, results, strict=True)},
               check)


SOFT_CASES = [
    ((4, 16, 16, 19), -1, jnp.float32),
    ((4, 40, 16, 16), 1, jnp.float32),
    ((32, 1000), -1, jnp.bfloat16),
    ((2, 150, 64, 64), 1, jnp.float32),
]


@pytest.mark.parametrize("shape,axis,dtype", SOFT_CASES, ids=_ids(SOFT_CASES))
def test_probability_targets_match_float64_oracles(other_backend, shape, axis, dtype):
    """Probability targets, weighted with label smoothing and not, every
    reduction, with and without a mask (``where``: NumPy only, PyTorch has
    none): the loss, the logits' gradient and the forward-only value."""
    x, x64, t, rng = _logits(shape, axis, dtype, 13)
    q = np.exp(reference.log_softmax(rng.standard_normal(shape), axis=axis)).astype(np.float32)
    w = rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)
    pos = t.shape
    where = rng.random(pos) < 0.8
    configs = {}
    for weighted, masked, reduction in [(a, b, r) for a in (False, True) for b in (False, True)
                                        for r in ("none", "mean", "sum")]:
        kw = dict(weight=w if weighted else None, label_smoothing=0.1 if weighted else 0.0,
                  reduction=reduction, where=where if masked else None)
        cot = (rng_for("soft-cot", shape, reduction).uniform(0.5, 1.5, pos).astype(np.float32)
               if reduction == "none" else 1.0)
        configs[f"weighted={weighted} where={masked} {reduction}"] = (kw, cot)

    def run(x, q):
        out = []
        for kw, cot in configs.values():
            f = lambda a, kw=kw: jaxloss.cross_entropy(a, q, axis=axis, **kw)  # noqa: E731
            loss, vjp = jax.vjp(f, x)
            (g,) = vjp(jnp.broadcast_to(jnp.asarray(cot, jnp.float32).astype(loss.dtype),
                                        loss.shape))
            out.append((loss, g, f(x)))
        return out

    results = jax.jit(run)(x, jnp.asarray(q))
    key = jnp.dtype(dtype).name

    def check(kw, cot, loss, g, fwd):
        assert g.dtype == x.dtype
        g = np.asarray(g.astype(jnp.float32), np.float64)
        rl, rg = reference.loss_and_grad(x64, q.astype(np.float64), axis=axis, cotangent=cot,
                                         **kw)
        oracles = [(rl, rg, "numpy")]
        if kw["where"] is None:
            torch_kw = {k: v for k, v in kw.items() if k != "where"}
            tl, tg = torch_loss_and_grad(to_torch_layout(x64, axis), to_torch_layout(q, axis),
                                         cot, nll=False, **torch_kw)
            oracles.append((tl, np.moveaxis(tg, 1, axis), "pytorch"))
        for want_l, want_g, name in oracles:
            assert_close(loss, want_l, LOSS_TOL[key], f"loss vs {name}")
            assert_close(fwd, want_l, LOSS_TOL[key], f"forward vs {name}")
            assert_close(g, want_g, GRAD_TOL[key], f"grad vs {name}")

    check_each(
        {name: (*configs[name], *res) for name, res in zip(configs, results, strict=True)}, check
    )


def test_masked_index_targets_match_numpy(other_backend):
    """``where`` with index targets (NumPy: PyTorch has no mask), weights and
    smoothing, every reduction, over two chunks of the loop."""
    shape, axis = (2, 150, 64, 64), 1
    x, x64, t, rng = _logits(shape, axis, jnp.float32, 14)
    where = jnp.asarray(rng.random(t.shape) < 0.7)
    w = rng.uniform(0.3, 2.0, shape[axis]).astype(np.float32)
    calls = []
    for reduction in ("none", "mean", "sum"):
        cot = rng.uniform(0.5, 1.5, t.shape).astype(np.float32) if reduction == "none" else 1.0
        kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1, reduction=reduction,
                  where=where, axis=axis)
        calls.append((jaxloss.cross_entropy, x, t, cot, kw))
    for (_, _, _, cot, kw), (loss, g, *_) in zip(calls, jax_losses_and_grads(calls), strict=True):
        rl, rg = reference.loss_and_grad(x64, np.asarray(t), cotangent=cot,
                                         **{**kw, "where": np.asarray(where)})
        assert_close(loss, rl, LOSS_TOL["float32"], f"loss {kw['reduction']}")
        assert_close(g, rg, GRAD_TOL["float32"], f"grad {kw['reduction']}")


@pytest.mark.parametrize("soft", [False, True], ids=["index", "soft"])
def test_transforms(other_backend, soft):
    """``vmap`` equals a loop; ``jvp`` equals the gradient's inner product;
    second-order derivatives pass ``check_grads`` (float64 logits)."""
    shape, axis = (3, 5, 6, 7), -3  # classes 5, for the batch and for each example
    x, x64, t, rng = _logits(shape, axis, jnp.float32, 15)
    w = rng.uniform(0.5, 1.5, shape[axis]).astype(np.float32)
    target = (jnp.asarray(np.exp(reference.log_softmax(rng.standard_normal(shape), axis=axis)),
                          jnp.float32) if soft else t)
    kw = dict(weight=w, label_smoothing=0.1, axis=axis)
    if not soft:
        kw["ignore_index"] = IGN

    def f(v, tt, reduction="mean"):
        return jaxloss.cross_entropy(v, tt, reduction=reduction, **kw)

    batched = jax.jit(jax.vmap(f))(x, target)
    looped = jnp.stack([f(x[i], target[i]) for i in range(shape[0])])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)

    v = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    _, tangent = jax.jvp(lambda a: f(a, target), (x,), (v,))
    grad = jax.grad(lambda a: f(a, target))(x)
    np.testing.assert_allclose(float(tangent), float(jnp.sum(grad * v)), rtol=1e-5, atol=1e-6)

    with jax.enable_x64(True):
        t_64 = jnp.asarray(np.asarray(target, np.float64)) if soft else target
        kw["weight"] = w.astype(np.float64)
        check_grads_of_reductions(
            lambda a, r: f(a, t_64, reduction=r), jnp.asarray(x64), ("none", "mean", "sum")
        )


def test_16bit_forward_over_reverse(other_backend):
    """``jvp`` of ``value_and_grad`` for bfloat16 logits (the tangents of the
    16-bit reads) against the NumPy reference's ``<dl/dx, v>``."""
    shape, axis = (6, 4, 30), -1
    x, x64, t, rng = _logits(shape, axis, jnp.bfloat16, 16)
    v = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, shape[axis]).astype(np.float32)
    kw = dict(weight=w, ignore_index=IGN, label_smoothing=0.1, axis=axis)

    def value(a):
        return jaxloss.cross_entropy(a, t, **kw)

    (loss, _), (loss_dot, _) = jax.jvp(jax.value_and_grad(value), (x,),
                                       (jnp.asarray(v, jnp.bfloat16),))
    v64 = np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32), np.float64)
    rl, rg = reference.loss_and_grad(x64, np.asarray(t), cotangent=1.0, **kw)
    assert_close(loss, rl, LOSS_TOL["bfloat16"], "loss")
    np.testing.assert_allclose(float(loss_dot), float(np.sum(rg * v64)), rtol=2e-3, atol=1e-5)


def test_ml_dtypes_bfloat16_inputs(other_backend):
    """NumPy bfloat16 inputs (ml_dtypes) take the same path as JAX arrays."""
    shape = (64, 19)
    x, x64, t, _ = _logits(shape, -1, jnp.bfloat16, 17)
    loss = jaxloss.cross_entropy(np.asarray(x).astype(ml_dtypes.bfloat16), np.asarray(t),
                                 ignore_index=IGN)
    rl, _ = reference.loss_and_grad(x64, np.asarray(t), ignore_index=IGN)
    assert_close(loss, rl, LOSS_TOL["bfloat16"], "loss")


@pytest.mark.parametrize(
    "shape,axis,spec,soft",
    [
        ((8, 8, 4, 6), -1, P("data"), False),
        ((8, 6, 8, 4), 1, P("data"), False),
        ((2, 8, 4, 6), -1, P(None, "data"), False),  # height
        ((2, 16, 40), -1, P(None, "data"), False),  # sequence
        ((8, 8, 4, 6), -1, P("data"), True),
        ((8, 30, 4, 4), 1, P("data"), True),
    ],
    ids=["last", "first", "last-height", "lm-sequence", "soft-last", "soft-first"],
)
def test_gspmd_sharded_logits(other_backend, core_constants, shape, axis, spec, soft):
    """Under ``jit`` with the logits sharded over 4 devices (a TPU slice's
    data parallelism), the formulation of other backends gathers no logits,
    labels or targets, and value and gradient equal one device's. Index
    targets take the chunked loop, here in chunks of 64 logits (on a TPU
    2**20 and up), so that chunks meet the shards' edges."""
    if len(jax.devices()) < 4:
        pytest.skip("needs the 4 host devices that conftest.py forces")
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x, _, t, rng = _logits(shape, axis, jnp.float32, 18)
    c = shape[axis]
    if soft:
        t = jnp.asarray(np.exp(reference.log_softmax(rng.standard_normal(shape), axis=axis)),
                        jnp.float32)
    w = jnp.linspace(0.5, 2.0, c)

    def step(x, t):
        return jax.value_and_grad(
            lambda v: jaxloss.cross_entropy(
                v, t, weight=w, axis=axis, label_smoothing=0.1,
                **({} if soft else {"ignore_index": IGN}),
            )
        )(x)

    want = jax.jit(step)(x, t)
    core_constants("_chunk_elements", lambda n, rows=False: 64)
    ax = axis % len(shape)
    t_spec = spec if soft else P(*[e for i, e in enumerate(spec) if i != ax])
    shardings = (NamedSharding(mesh, spec), NamedSharding(mesh, t_spec))
    sharded = jax.jit(step, in_shardings=shardings)
    text = sharded.lower(x, t).compile().as_text()
    got = sharded(x, t)
    if not soft:
        assert "while" in text  # the chunked loop
    assert "all-gather" not in text
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-7)
