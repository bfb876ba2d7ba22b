"""The loss over a batch sharded on 4 devices equals the 1-device loss.

conftest.py forces 4 host CPU devices. Each shard holds a very different
fraction of ignored positions, so a mean of per-device means would be wrong:
only a global sum of numerators and of (weighted) denominators is right.
Covered: GSPMD ``jit`` with ``NamedSharding``, ``shard_map`` with
``axis_name`` (functions and the linen module), ``reduction="sum"``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxloss

try:
    shard_map = jax.shard_map
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map

N_DEV = 4
C = 5
IGNORE = 255
WEIGHT = jnp.array([0.3, 1.0, 2.5, 0.7, 4.0])


def _mesh() -> Mesh:
    devices = jax.devices()
    if len(devices) < N_DEV:
        pytest.fail(f"conftest.py should force {N_DEV} CPU devices; got {len(devices)}")
    return Mesh(np.array(devices[:N_DEV]), ("data",))


def _batch():
    """8 images (2 per device) of 4x4 pixels, 3 features, uint8 labels."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(8, 4, 4, 3)).astype(np.float32)
    proj = rng.normal(size=(3, C)).astype(np.float32)
    labels = rng.integers(0, C, size=(8, 4, 4)).astype(np.uint8)
    ignored_fraction = [0.97, 0.97, 0.0, 0.0, 0.5, 0.5, 0.8, 0.2]  # per image
    for i, frac in enumerate(ignored_fraction):
        labels[i][rng.random((4, 4)) < frac] = IGNORE
    labels[0, 0, 0] = 2  # shard 0 keeps a single counted pixel
    return jnp.asarray(feats), jnp.asarray(proj), jnp.asarray(labels)


def _loss(proj, feats, labels, **kw):
    logits = feats @ proj  # channels-last (N, H, W, C)
    return jaxloss.cross_entropy(
        logits, labels, weight=WEIGHT, ignore_index=IGNORE, label_smoothing=0.1, **kw
    )


def _value_and_grads(fn, proj, feats, labels):
    return jax.value_and_grad(fn, argnums=(0, 1))(proj, feats, labels)


def _assert_close(got, want):
    (lg, (gp, gf)), (lw, (wp, wf)) = got, want
    np.testing.assert_allclose(float(lg), float(lw), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gp), np.asarray(wp), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gf), np.asarray(wf), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data():
    return _batch()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gspmd_jit_matches_one_device(data, reduction):
    proj, feats, labels = data[1], data[0], data[2]
    loss = functools.partial(_loss, reduction=reduction)
    want = _value_and_grads(loss, proj, feats, labels)

    mesh = _mesh()
    batch = NamedSharding(mesh, P("data"))
    feats_s = jax.device_put(feats, batch)
    labels_s = jax.device_put(labels, batch)
    proj_r = jax.device_put(proj, NamedSharding(mesh, P()))
    assert len(feats_s.sharding.device_set) == N_DEV
    got = jax.jit(functools.partial(_value_and_grads, loss))(proj_r, feats_s, labels_s)
    _assert_close(got, want)


def _shard_mapped(local_loss):
    """Global loss from a per-shard loss that reduces over ``axis_name="data"``."""
    return shard_map(
        local_loss,
        mesh=_mesh(),
        in_specs=(P(), P("data"), P("data")),
        out_specs=P(),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_shard_map_axis_name_matches_one_device(data, reduction):
    feats, proj, labels = data
    want = _value_and_grads(functools.partial(_loss, reduction=reduction), proj, feats, labels)
    sharded = _shard_mapped(functools.partial(_loss, reduction=reduction, axis_name="data"))
    got = jax.jit(functools.partial(_value_and_grads, sharded))(proj, feats, labels)
    _assert_close(got, want)


def test_shard_map_nll_loss_axis_name(data):
    feats, proj, labels = data

    def nll(proj, feats, labels, **kw):
        log_probs = jaxloss.log_softmax(feats @ proj)
        return jaxloss.nll_loss(log_probs, labels, weight=WEIGHT, ignore_index=IGNORE, **kw)

    want = _value_and_grads(nll, proj, feats, labels)
    sharded = _shard_mapped(functools.partial(nll, axis_name="data"))
    got = jax.jit(functools.partial(_value_and_grads, sharded))(proj, feats, labels)
    _assert_close(got, want)


def test_linen_module_axis_name(data):
    feats, proj, labels = data
    kw = dict(weight=tuple(float(w) for w in WEIGHT), ignore_index=IGNORE, label_smoothing=0.1)
    global_module = jaxloss.CrossEntropyLoss(**kw)
    sharded_module = jaxloss.CrossEntropyLoss(axis_name="data", **kw)

    def module_loss(module, proj, feats, labels):
        return module.apply({}, feats @ proj, labels)

    want = _value_and_grads(functools.partial(module_loss, global_module), proj, feats, labels)
    sharded = _shard_mapped(functools.partial(module_loss, sharded_module))
    got = jax.jit(functools.partial(_value_and_grads, sharded))(proj, feats, labels)
    _assert_close(got, want)


def test_mean_of_local_means_would_be_wrong(data):
    """Sanity check of the setup: without axis_name the shards disagree."""
    feats, proj, labels = data
    global_mean = float(_loss(proj, feats, labels))
    local_means = [
        float(_loss(proj, feats[2 * d : 2 * d + 2], labels[2 * d : 2 * d + 2]))
        for d in range(N_DEV)
    ]
    assert abs(np.mean(local_means) - global_mean) > 0.05 * abs(global_mean)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shard_map_body_lowers_with_the_kernel_for_cuda(data, reduction):
    """Inside ``shard_map`` the CUDA branch holds the Triton kernel (its
    outputs typed as varying over the mesh axis); on this CPU the XLA branch
    runs and equals the one-device loss (the tests above)."""
    proj, feats, labels = data[1], data[0], data[2]
    mesh = _mesh()
    def loss(proj, feats, labels):
        if reduction == "none":  # per-position losses: the kernel's row statistics
            return jax.lax.psum(jnp.sum(_loss(proj, feats, labels, reduction="none")), "data")
        return _loss(proj, feats, labels, axis_name="data")

    sharded = _shard_mapped(loss)
    args = (
        jax.device_put(proj, NamedSharding(mesh, P())),
        jax.device_put(feats, NamedSharding(mesh, P("data"))),
        jax.device_put(labels, NamedSharding(mesh, P("data"))),
    )
    step = jax.jit(functools.partial(_value_and_grads, sharded))
    text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text
    with jaxloss.disable_pallas():
        step = jax.jit(functools.partial(_value_and_grads, _shard_mapped(loss)))
        assert "triton" not in step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
