"""Positions in two parts on XLA:CPU (``_losses._aligned_rest``): channels-last
logits of an odd number ``P`` of positions are computed as the first ``P -
rest`` positions and the last ``rest = P % 16`` -- the forward where the
class slices apply, the float32 fwd+bwd of 2 to 41 classes.

Checked here: where it applies (at the library's small-input threshold and
with none, as in the rest of the suite), that the parts are really taken,
and losses, forward-only values and gradients against PyTorch and the NumPy
reference in float64 (every reduction, weights, label smoothing, ignored and
masked positions), against the one-part path, and under ``vmap`` and second
order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import (
    as_bfloat16,
    check_cross_entropy_configs,
    labelled_logits,
    weighting_configs,
)

import jaxloss
from jaxloss import _losses

IGN = 255


@pytest.mark.parametrize(
    "shape,dtype,forward,fwd_bwd",
    [
        ((65537, 16), jnp.float32, 1, 1),
        ((65536, 16), jnp.float32, 0, 0),  # a multiple of 16
        ((65538, 16), jnp.float32, 0, 0),  # even: one part
        ((4099, 7, 10), jnp.float32, 5, 5),  # positions 28693
        ((26209, 19), jnp.float32, 0, 1),  # no slices forward; grouped rows in parts
        ((8197, 41), jnp.float32, 0, 5),
        ((16385, 42), jnp.float32, 0, 0),  # more classes: neither
        ((65537, 17), jnp.float32, 0, 1),  # 17 classes: no slices
        ((65537, 2), jnp.bfloat16, 1, 0),  # bfloat16 pairs: slices forward
        ((65537, 5), jnp.bfloat16, 0, 0),
        ((65537, 5), jnp.float64, 0, 0),
        ((8, 5, 127, 127), jnp.float32, 0, 0),  # classes not last (axis=-3 below)
    ],
)
def test_where_it_applies(small_inputs, shape, dtype, forward, fwd_bwd):
    axis = 1 if len(shape) == 4 else len(shape) - 1
    assert _losses._aligned_rest(shape, axis, dtype, with_grad=False) == forward
    assert _losses._aligned_rest(shape, axis, dtype, with_grad=True) == fwd_bwd


def test_not_for_small_inputs(small_inputs, core_constants):
    """Under the small-input threshold, one part; with none small (the rest of
    the suite), the same shape in parts."""
    assert _losses._cpu_small((1001, 19))
    assert _losses._aligned_rest((1001, 19), 1, jnp.float32, with_grad=True) == 0
    core_constants("_CPU_SMALL_ELEMENTS", 0)
    assert _losses._aligned_rest((1001, 19), 1, jnp.float32, with_grad=True) == 9
    assert _losses._aligned_rest((15, 19), 1, jnp.float32, with_grad=True) == 0  # < 16


def _loss_fn(axis, kw):
    return lambda v, tt: jaxloss.cross_entropy(v, tt, axis=axis, **kw)


# Each splits with no input small: (positions, rest) = (37, 5), (21, 5), (45, 13),
# (63, 15), (303, 15), (35, 3), (37, 5).
CASES = [
    ((37, 5), jnp.float32),
    ((3, 7, 19), jnp.float32),
    ((5, 9, 2), jnp.float32),
    ((7, 9, 16), jnp.float32),
    ((303, 33), jnp.float32),
    ((5, 7, 10), jnp.float32),
    ((37, 2), jnp.bfloat16),
]


@pytest.mark.parametrize("shape,dtype", CASES, ids=[f"{s}-{jnp.dtype(d).name}" for s, d in CASES])
def test_matches_float64_oracles(shape, dtype):
    """Unweighted, and weighted with label smoothing; every reduction: loss,
    gradient and forward-only value (the six under one ``jit``)."""
    axis = len(shape) - 1
    assert _losses._aligned_rest(shape, axis, dtype, with_grad=False) or (
        _losses._aligned_rest(shape, axis, dtype, with_grad=True)
    )
    x, t, rng = labelled_logits(shape, -1, jnp.float32, 3, 0.2, IGN)
    if dtype == jnp.bfloat16:
        x, x64 = as_bfloat16(x)
    else:
        x64 = np.asarray(x, np.float64)
    w = rng.uniform(0.3, 2.0, shape[-1]).astype(np.float32)
    configs = weighting_configs(w, 0.2, IGN, ("aligned-cot", shape), t.shape)
    check_cross_entropy_configs(x, x64, t, axis, configs, jnp.dtype(dtype).name, forward=True)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_parts_are_taken_and_agree_with_one_part(core_constants, reduction):
    """The forward and the fwd+bwd call ``_position_parts``; with
    ``_POSITION_ALIGN`` 1 nothing is split, and the values agree."""
    x, t, rng = labelled_logits((5, 9, 10), -1, jnp.float32, 4, 0.2, IGN)
    where = jnp.asarray(rng.random(t.shape) < 0.8)
    kw = dict(weight=rng.uniform(0.5, 1.5, 10).astype(np.float32), ignore_index=IGN,
              label_smoothing=0.1, reduction=reduction, where=where)
    f = _loss_fn(-1, kw)
    calls = []
    parts = _losses._position_parts

    def counting(*args):
        calls.append(args[0])
        return parts(*args)

    core_constants("_position_parts", counting)

    def run():
        fwd = jax.jit(f)(x, t)
        val, grad = jax.jit(jax.value_and_grad(lambda v: jnp.sum(f(v, t) ** 2)))(x)
        return fwd, val, grad

    fwd, val, grad = run()
    assert calls == [13, 13]  # the forward, the fwd+bwd
    core_constants("_POSITION_ALIGN", 1)
    fwd1, val1, grad1 = run()
    assert len(calls) == 2
    np.testing.assert_allclose(fwd, fwd1, rtol=2e-6)
    np.testing.assert_allclose(val, val1, rtol=2e-6)
    np.testing.assert_allclose(grad, grad1, rtol=2e-5, atol=1e-8)


def test_a_bad_label_in_either_part_is_nan():
    x, t, _ = labelled_logits((37, 5), -1, jnp.float32, 5, 0.0, IGN)
    f = jax.jit(jax.value_and_grad(lambda v, tt: jaxloss.cross_entropy(v, tt)))
    for i in (3, 35):  # the first part, the last 5 positions
        bad = t.at[i].set(7)
        loss, grad = f(x, bad)
        assert np.isnan(loss) and np.all(np.isnan(grad[i]))
        assert np.isnan(jax.jit(jaxloss.cross_entropy)(x, bad))


def test_vmap_and_second_order_in_parts():
    x, t, rng = labelled_logits((3, 37, 5), -1, jnp.float32, 6, 0.2, IGN)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 5), jnp.float32)

    def loss(v, tt):
        return jaxloss.cross_entropy(v, tt, weight=w, ignore_index=IGN, label_smoothing=0.1)

    assert _losses._aligned_rest((37, 5), 1, jnp.float32, with_grad=True) == 5
    per_example = jax.jit(jax.vmap(jax.value_and_grad(loss)))(x, t)
    for i in range(3):
        want = jax.value_and_grad(loss)(x[i], t[i])
        np.testing.assert_allclose(per_example[0][i], want[0], rtol=2e-6)
        np.testing.assert_allclose(per_example[1][i], want[1], rtol=2e-5, atol=1e-8)
    # Second order: the Hessian-vector product of the float64 reference's
    # softmax rule, d/dx of the gradient along v.
    v = jnp.asarray(rng.standard_normal(x[0].shape), jnp.float32)
    hvp = jax.jvp(jax.grad(lambda a: loss(a, t[0])), (x[0],), (v,))[1]
    eps = 1e-3
    g = jax.grad(lambda a: loss(a, t[0]))
    fd = (np.asarray(g(x[0] + eps * v), np.float64) - np.asarray(g(x[0] - eps * v))) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-4)


def test_a_broadcast_where_in_parts():
    """``where`` of shape (7, 1) over positions (7, 9): as the full mask."""
    x, t, rng = labelled_logits((7, 9, 5), -1, jnp.float32, 7, 0.1, IGN)
    where = rng.random((7, 1)) < 0.6
    where[0] = True
    full = np.broadcast_to(where, (7, 9))
    assert _losses._aligned_rest(x.shape, 2, jnp.float32, with_grad=True) == 15
    for reduction in ("none", "mean"):
        def f(v, m, r=reduction):
            return jnp.sum(jaxloss.cross_entropy(v, t, ignore_index=IGN, where=m, reduction=r))

        a = jax.jit(jax.value_and_grad(f))(x, where)
        b = jax.jit(jax.value_and_grad(f))(x, full)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(jax.jit(f)(x, where), b[0], rtol=1e-6)


def test_shard_map_and_gspmd_with_odd_counts():
    """Inside ``shard_map`` each shard takes its own parts (37 positions a
    shard); under GSPMD ``jit`` over 3 devices the odd global count (111) is
    split in parts across the shards. Both as without sharding."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 4 on the CPU)")
    devices = np.array(jax.devices()[:4])
    x, t, _ = labelled_logits((4, 37, 5), -1, jnp.float32, 8, 0.2, IGN)
    assert _losses._aligned_rest((1, 37, 5), 2, jnp.float32, with_grad=True) == 5

    def local(a, b):
        return jax.lax.psum(jaxloss.cross_entropy(a, b, ignore_index=IGN, reduction="sum"), "d")

    mesh = Mesh(devices, ("d",))
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P())
    got = jax.jit(jax.value_and_grad(sharded))(x, t)
    whole = jax.jit(jax.value_and_grad(
        lambda a, b: jaxloss.cross_entropy(a, b, ignore_index=IGN, reduction="sum")
    ))
    want = whole(x, t)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-7)

    x3, t3 = x[:3], t[:3]
    assert _losses._aligned_rest(x3.shape, 2, jnp.float32, with_grad=True) == 15
    mesh3 = Mesh(devices[:3], ("d",))
    x3s = jax.device_put(x3, NamedSharding(mesh3, P("d")))
    got3, want3 = whole(x3s, t3), whole(x3, t3)
    np.testing.assert_allclose(got3[0], want3[0], rtol=1e-6)
    np.testing.assert_allclose(got3[1], want3[1], rtol=1e-5, atol=1e-7)
    fwd = jax.jit(lambda a: jaxloss.cross_entropy(a, t3, ignore_index=IGN))
    np.testing.assert_allclose(fwd(x3s), fwd(x3), rtol=1e-6)
