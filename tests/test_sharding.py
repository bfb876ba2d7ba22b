"""The loss over a batch sharded on 4 devices equals the 1-device loss.

conftest.py forces 4 host CPU devices. Each shard holds a very different
fraction of ignored positions, so a mean of per-device means would be wrong:
only a global sum of numerators and of (weighted) denominators is right.
Covered: GSPMD ``jit`` with ``NamedSharding``, ``shard_map`` with
``axis_name`` (functions, the linen and the NNX modules), ``reduction="sum"``,
probability targets.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import check_each

import jaxloss
from jaxloss import _losses

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
    """``(loss, gradients)`` pairs: the loss and every gradient leaf."""
    (lg, gg), (lw, gw) = got, want
    np.testing.assert_allclose(float(lg), float(lw), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(gg), jax.tree.leaves(gw), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("layer", ["linen", "nnx"])
def test_module_axis_name(data, layer):
    """The linen module (class weights a tuple field) and the NNX module
    (class weights an array attribute)."""
    feats, proj, labels = data
    if layer == "linen":
        kw = dict(weight=tuple(float(w) for w in WEIGHT), ignore_index=IGNORE,
                  label_smoothing=0.1)
        make = jaxloss.CrossEntropyLoss

        def module_loss(module, proj, feats, labels):
            return module.apply({}, feats @ proj, labels)
    else:
        from jaxloss import nnx as jnnx

        kw = dict(weight=WEIGHT, ignore_index=IGNORE, label_smoothing=0.1)
        make = jnnx.CrossEntropyLoss

        def module_loss(module, proj, feats, labels):
            return module(feats @ proj, labels)

    global_module = make(**kw)
    sharded_module = make(axis_name="data", **kw)
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
@pytest.mark.traces_kernel
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


# ---------------------------------------------------------------------------
# GSPMD jit through the kernel: each device runs it on its own positions
# ---------------------------------------------------------------------------


def _logits(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32) * 2.0
    return jnp.asarray(x)


def _labels(shape, num_classes, seed=1):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, num_classes, size=shape)
    t[rng.random(shape) < 0.2] = IGNORE
    return jnp.asarray(t.astype(np.int32))


def _step(reduction, axis, weight, smoothing=0.0):
    def loss(x, t):
        out = jaxloss.cross_entropy(
            x,
            t,
            weight=weight,
            ignore_index=IGNORE,
            reduction=reduction,
            axis=axis,
            label_smoothing=smoothing,
        )
        # "none": a nonlinear use of the per-position losses, so their
        # cotangent differs per position.
        return jnp.sum(out * out) if reduction == "none" else out

    return jax.value_and_grad(loss)


@pytest.mark.parametrize(
    "layout,spec", [("last", P("data")), ("last", P(None, "data")), ("first", P("data"))]
)
def test_gspmd_jit_runs_the_kernel_on_each_shard(kernel_everywhere, layout, spec):
    """Under ``jit`` with sharded logits the kernel (a custom call XLA would
    otherwise run on the all-gathered batch) sees one device's positions, and
    the loss and gradient equal the one-device XLA path's: "mean", "sum" with
    label smoothing and "none", the three steps under one ``jit`` each way,
    then each checked (``check_each``)."""
    c = 6
    x = _logits((8, 8, 4, c))
    t = _labels((8, 8, 4), c)
    axis = -1
    if layout == "first":
        x, axis = jnp.moveaxis(x, -1, 1), 1
    weight = jnp.linspace(0.5, 2.0, c)
    reductions = ("mean", "sum", "none")

    def steps(x, t):
        return {
            r: _step(r, axis, weight, 0.1 if r == "sum" else 0.0)(x, t) for r in reductions
        }

    with jaxloss.disable_pallas():  # (a function of its own: jit caches traces)
        want = jax.jit(lambda x, t: steps(x, t))(x, t)
    assert not kernel_everywhere

    mesh = _mesh()
    x_spec = spec if layout == "last" or spec == P("data") else None
    t_spec = P(*spec)
    got = jax.jit(
        steps, in_shardings=(NamedSharding(mesh, x_spec), NamedSharding(mesh, t_spec))
    )(x, t)
    check_each({r: (got[r], want[r]) for r in reductions}, _assert_close)
    local = list(x.shape)
    local[list(spec).index("data")] //= N_DEV
    shapes = [k["logits_shape"] for k in kernel_everywhere]
    assert shapes.count(tuple(local)) == len(reductions), shapes  # one per step


@pytest.mark.parametrize(
    "shape,x_spec,t_spec,local",
    [
        # vocabulary-parallel rows: the classes' mesh axis moves to the rows
        ((8, 4, 8), P("data", None, "model"), P("data"), (2, 4, 8)),
        ((8, 16), P(None, "model"), P(), (4, 16)),
        # 6 rows and 2x2 devices: the second position dimension takes it
        ((6, 4, 8), P(None, None, ("data", "model")), P(), (6, 1, 8)),
        # no position dimension divides: the classes are gathered
        ((3, 8), P(None, "model"), P(), (3, 8)),
    ],
    ids=["rows+classes", "classes", "second-dim", "gathered"],
)
def test_gspmd_class_axis_sharded(kernel_everywhere, shape, x_spec, t_spec, local):
    """Logits sharded along the classes (a vocabulary-parallel LM head): the
    kernel needs whole rows, so each device gets whole rows of a share of the
    positions (an all-to-all) rather than every class of its positions (an
    all-gather); where no position dimension divides, the classes are
    gathered. Values and gradients equal the one-device XLA path's."""
    c = shape[-1]
    x, t = _logits(shape), _labels(shape[:-1], c)
    with jaxloss.disable_pallas():
        want = jax.jit(_step("mean", -1, jnp.linspace(0.5, 2.0, c)))(x, t)
    step = _step("mean", -1, jnp.linspace(0.5, 2.0, c))
    mesh = Mesh(np.array(jax.devices()[:N_DEV]).reshape(2, 2), ("data", "model"))
    step = jax.jit(step, in_shardings=(NamedSharding(mesh, x_spec), NamedSharding(mesh, t_spec)))
    got = step(x, t)
    _assert_close(got, want)
    assert local in {k["logits_shape"] for k in kernel_everywhere}
    if local != shape:  # no all-gather whose result holds whole rows of logits
        text = step.lower(x, t).compile().as_text()
        results = [ln.split("all-gather(")[0] for ln in text.splitlines() if "all-gather(" in ln]
        assert not [r for r in results if "f32[" in r and f",{c}]" in r], results


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gspmd_vmap_and_hessian_through_the_kernel(kernel_everywhere, reduction):
    """``vmap`` (the kernel's own batching, unpartitioned) and a
    hessian-vector product (the XLA formulation) under sharded ``jit``."""
    c = 5
    x, t = _logits((8, 4, 4, c)), _labels((8, 4, 4), c)

    def functions():
        step = jax.vmap(_step(reduction, -1, WEIGHT))
        hvp_of = jax.grad(lambda x, t: _step(reduction, -1, WEIGHT)(x, t)[0])
        return step, lambda x, t: jax.jvp(lambda x: hvp_of(x, t), (x,), (x,))[1]

    with jaxloss.disable_pallas():
        want, want_hvp = (jax.jit(f)(x, t) for f in functions())
    step, hvp = functions()
    batch = NamedSharding(_mesh(), P("data"))
    got = jax.jit(step, in_shardings=(batch, batch))(x, t)
    got_hvp = jax.jit(hvp, in_shardings=(batch, batch))(x, t)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_hvp), np.asarray(want_hvp), rtol=1e-4, atol=1e-6)
    assert kernel_everywhere


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.traces_kernel
def test_gspmd_jit_lowers_a_partitioned_kernel_for_cuda(reduction):
    """For CUDA, sharded ``jit`` lowers the kernel call as a custom
    partitioning (the partitioner calls back per shard at compile time); on
    one device the Triton call is lowered in place."""
    c = 5
    x, t = _logits((8, 4, 4, c)), _labels((8, 4, 4), c)
    batch = NamedSharding(_mesh(), P("data"))

    def lowered(**kw):
        step = _step(reduction, -1, WEIGHT)  # a fresh function: jit caches traces
        return jax.jit(step, **kw).trace(x, t).lower(lowering_platforms=("cuda",)).as_text()

    assert "CustomSPMDPartitioning" in lowered(in_shardings=(batch, batch))
    single = lowered()
    assert "triton" in single and "CustomSPMDPartitioning" not in single
    with jaxloss.disable_pallas():
        assert "CustomSPMDPartitioning" not in lowered(in_shardings=(batch, batch))


@pytest.mark.parametrize(
    "shape,axis,dtype,spec",
    [
        ((8, 8, 4, 6), -1, jnp.float32, P("data")),
        ((8, 6, 8, 4), 1, jnp.float32, P("data")),
        ((64, 40), -1, jnp.bfloat16, P("data")),
        ((2, 8, 4, 6), -1, jnp.float32, P(None, "data")),  # height
        ((2, 6, 8, 4), 1, jnp.float32, P(None, None, "data")),  # height, axis=1
        ((2, 16, 40), -1, jnp.bfloat16, P(None, "data")),  # sequence
        # 20 classes along axis 1: smoothing's weighted term by class slices
        ((8, 20, 4, 6), 1, jnp.float32, P("data")),
        ((8, 20, 4, 6), 1, jnp.bfloat16, P("data")),
        ((2, 20, 8, 4), 1, jnp.float32, P(None, None, "data")),
    ],
    ids=[
        "last", "first", "rows-bf16", "last-height", "first-height", "lm-sequence",
        "first-20", "first-20-bf16", "first-20-height",
    ],
)
def test_gspmd_xla_loop_slices_each_shard_locally(monkeypatch, shape, axis, dtype, spec):
    """The XLA formulation's chunked loop (accelerators without the kernel,
    e.g. TPUs; XLA:CPU for large inputs; forced here) under ``jit`` with the
    logits sharded along the batch, or along the first dimension of the
    positions' second part (height, sequence): every chunk spans the groups
    of those dimensions whole, so no device gathers another's logits or
    labels (a slice along a sharded dimension would), and value and gradient
    equal the one-device whole-array path's."""
    c = shape[axis]
    x = _logits(shape).astype(dtype)
    pos = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    t = _labels(pos, c)
    weight = jnp.linspace(0.5, 2.0, c)
    with jaxloss.disable_pallas():
        want = jax.jit(_step("mean", axis, weight, 0.1))(x, t)
        monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 64)
        monkeypatch.setattr(_losses, "_CPU_LOOP_MIN_BYTES", 0)
        monkeypatch.setattr(_losses, "_loop_writes_grad", lambda x: True)
        _losses._index_impl.clear_cache()  # the core's jit cache misses these
        x_s = NamedSharding(_mesh(), spec)
        t_s = NamedSharding(_mesh(), P(*[e for i, e in enumerate(spec) if i != axis % len(shape)]))
        step = jax.jit(_step("mean", axis, weight, 0.1), in_shardings=(x_s, t_s))
        text = step.lower(x, t).compile().as_text()
        got = step(x, t)
    _losses._index_impl.clear_cache()
    assert "while" in text  # the loop ran
    assert "all-gather" not in text
    # float32 over 2-15 strided classes: each chunk in a buffer of its own
    # (_buffered_chunk, a conditional), sharded as the rest.
    assert ("conditional" in text) == (dtype == jnp.float32 and axis == 1 and c < 16)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(got[1], np.float32),
        np.asarray(want[1], np.float32),
        rtol=1e-2 if dtype == jnp.bfloat16 else 1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gspmd_uneven_shards_are_not_fed_to_the_kernel(kernel_everywhere, reduction):
    """6 rows over 4 devices (a sharding constraint inside ``jit``): XLA pads
    the last shard, and padding must not reach the kernel as positions (it
    would add to the sum). That dimension is gathered instead; the values
    equal the one-device XLA path's."""
    c = 5
    x, t = _logits((6, 4, c)), _labels((6, 4), c)
    rows = NamedSharding(_mesh(), P("data"))

    def constrained(x, t):
        return jax.lax.with_sharding_constraint(x, rows), t

    def step():
        inner = _step(reduction, -1, WEIGHT)
        return jax.jit(lambda x, t: inner(*constrained(x, t)))

    with jaxloss.disable_pallas():
        want = step()(x, t)
    _assert_close(step()(x, t), want)
    assert kernel_everywhere
    assert all(k["logits_shape"][0] == 6 for k in kernel_everywhere), kernel_everywhere


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gspmd_where_and_nll_through_the_kernel(kernel_everywhere, reduction):
    """A ``where`` mask sharded with the positions, and NLL, through the
    partitioned kernel: equal to the one-device XLA path."""
    c = 5
    x, t = _logits((8, 4, c)), _labels((8, 4), c)
    mask = jnp.asarray(np.random.default_rng(3).random((8, 4)) < 0.7)

    def step():
        def loss(x, t, m):
            ce = jaxloss.cross_entropy(
                x, t, weight=WEIGHT, where=m, reduction=reduction, label_smoothing=0.1
            )
            lp = jaxloss.log_softmax(x)
            return ce + jaxloss.nll_loss(lp, t, weight=WEIGHT, where=m, reduction=reduction)

        return jax.value_and_grad(loss)

    with jaxloss.disable_pallas():
        want = jax.jit(step())(x, t, mask)
    rows = NamedSharding(_mesh(), P("data"))
    got = jax.jit(step(), in_shardings=(rows,) * 3)(x, t, mask)
    _assert_close(got, want)
    assert (2, 4, c) in {k["logits_shape"] for k in kernel_everywhere}
    assert any(not k["normalize"] for k in kernel_everywhere)  # NLL reached it too


def test_partitioning_api_mismatch_warns_and_falls_back(kernel_everywhere, monkeypatch):
    """Should a JAX release change ``custom_partitioning``'s API, the kernel
    still runs (unpartitioned, as before partitioning existed), with a warning."""
    from jaxloss._kernels import partition

    class Moved:
        def __init__(self, fun):
            self.fun = fun

        def def_partition(self, **kwargs):
            raise TypeError("def_partition() got an unexpected keyword argument")

    monkeypatch.setattr(partition, "custom_partitioning", Moved)
    c = 5
    x, t = _logits((8, 4, c)), _labels((8, 4), c)
    with jaxloss.disable_pallas():
        want = jax.jit(_step("mean", -1, WEIGHT))(x, t)
    rows = NamedSharding(_mesh(), P("data"))
    with pytest.warns(RuntimeWarning, match="cannot partition the GPU kernel"):
        got = jax.jit(_step("mean", -1, WEIGHT), in_shardings=(rows, rows))(x, t)
    _assert_close(got, want)
    assert {k["logits_shape"] for k in kernel_everywhere} == {(8, 4, c)}


# ---------------------------------------------------------------------------
# probability targets
# ---------------------------------------------------------------------------


def _soft_step_fns(kw: dict, mesh):
    """``(step, one, sharded)``: value and gradients of logits and targets,
    the one-device loss of probability targets with ``kw``, and the same by
    ``shard_map`` over the batch with ``axis_name``."""

    def step(loss):
        return jax.value_and_grad(loss, argnums=(0, 1))

    def one(x, q, where):
        return jaxloss.cross_entropy(x, q, where=where, **kw)

    sharded = shard_map(
        lambda x, q, where: jaxloss.cross_entropy(x, q, where=where, axis_name="data", **kw),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P("data")),
        out_specs=P(),
    )
    return step, one, sharded


def _assert_each_close(results: dict, want) -> None:
    for name, got in results.items():
        try:
            _assert_close(got, want)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize(
    "shape,axis",
    [((8, 4, 6, 19), -1), ((8, 19, 4, 6), 1), ((8, 50, 3, 4), 1)],
    ids=["channels-last", "axis1-19", "axis1-50"],
)
def test_probability_targets_sharded_match_one_device(shape, axis):
    """The mean of probability targets (weighted, smoothed, a ``where`` mask
    that leaves each shard a different count) over a batch sharded on 4
    devices, by ``shard_map`` with ``axis_name`` and by GSPMD ``jit``: loss
    and gradients of the logits and of the targets equal the one-device
    ones (the fused fwd+bwd's reductions, the unshifted statistics' ``cond``
    and the flat view's sums run per shard)."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(2.0 * rng.standard_normal(shape), jnp.float32)
    q = jnp.asarray(rng.uniform(0.0, 1.0, shape), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, shape[axis]), jnp.float32)
    pos = shape[:axis % len(shape)] + shape[axis % len(shape) + 1 :]
    where = jnp.asarray(rng.random(pos) < np.linspace(0.2, 0.9, 8).reshape(-1, 1, 1))
    mesh = _mesh()
    step, one, sharded = _soft_step_fns(dict(weight=w, axis=axis, label_smoothing=0.1), mesh)
    want = jax.jit(step(one))(x, q, where)
    got_shard_map = jax.jit(step(sharded))(x, q, where)
    put = [jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, q, where)]
    got_gspmd = jax.jit(step(one))(*put)
    _assert_each_close({"shard_map": got_shard_map, "gspmd": got_gspmd}, want)


@pytest.mark.parametrize("spec", [P("data"), P(None, None, "data")], ids=["batch", "height"])
def test_probability_targets_loop_sharded_match_one_device(monkeypatch, spec):
    """The chunked loop of probability targets over a strided class axis
    (``_soft_loop_total_and_grad``, forced at this size), mean, weighted,
    smoothed, with a ``where`` mask: under GSPMD ``jit`` with the batch or
    the height sharded on 4 devices (no device gathers another's logits)
    and by ``shard_map`` with ``axis_name``, loss and gradients of logits
    and targets equal the one-device whole-array path's."""
    shape, axis = (8, 50, 8, 3), 1
    rng = np.random.default_rng(12)
    x = jnp.asarray(2.0 * rng.standard_normal(shape), jnp.float32)
    q = jnp.asarray(rng.uniform(0.0, 0.08, shape), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, shape[axis]), jnp.float32)
    where = jnp.asarray(rng.random((8, 8, 3)) < 0.7)
    mesh = _mesh()
    step, one, sharded = _soft_step_fns(dict(weight=w, axis=axis, label_smoothing=0.1), mesh)
    want = jax.jit(step(one))(x, q, where)
    monkeypatch.setattr(_losses, "_SOFT_LOOP_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_losses, "_CPU_CHUNK_ELEMENTS", 64)
    _losses._soft_impl.clear_cache()
    try:
        pos_spec = P(*[e for i, e in enumerate(spec) if i != axis])
        shardings = (NamedSharding(mesh, spec),) * 2 + (NamedSharding(mesh, pos_spec),)
        gspmd = jax.jit(step(one), in_shardings=shardings)
        text = gspmd.lower(x, q, where).compile().as_text()
        got_gspmd = gspmd(x, q, where)
        got_shard_map = jax.jit(step(sharded))(x, q, where)
    finally:
        _losses._soft_impl.clear_cache()
    assert "while" in text  # the loop ran
    assert "all-gather" not in text
    _assert_each_close({"shard_map": got_shard_map, "gspmd": got_gspmd}, want)


def test_vmap_inside_shard_map_and_over_a_sharded_batch():
    """Per-example losses (``jax.vmap``, the batch folded into the
    positions) of a batch sharded on 4 devices: inside ``shard_map`` and
    under GSPMD ``jit``, each example's loss and gradient as alone."""
    mesh = _mesh()
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((8, 3, 4, C)).astype(np.float32))
    t = rng.integers(0, C, (8, 3, 4))
    t = jnp.asarray(np.where(rng.random(t.shape) < 0.3, IGNORE, t).astype(np.int32))
    q = jax.nn.softmax(jnp.asarray(rng.standard_normal(x.shape).astype(np.float32)))
    ce = functools.partial(jaxloss.cross_entropy, weight=WEIGHT, ignore_index=IGNORE)
    step = jax.vmap(jax.value_and_grad(ce))
    for y in (t, q):
        want = [jax.value_and_grad(ce)(x[i], y[i]) for i in range(8)]
        want = (jnp.stack([v for v, _ in want]), jnp.stack([g for _, g in want]))
        spec = (P("data"), P("data"))
        mapped = jax.jit(shard_map(step, mesh=mesh, in_specs=spec, out_specs=spec))(x, y)
        sharding = NamedSharding(mesh, P("data"))
        gspmd = jax.jit(step)(jax.device_put(x, sharding), jax.device_put(y, sharding))
        for got in (mapped, gspmd):
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
