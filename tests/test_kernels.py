"""The Pallas kernel in interpret mode (CPU) against the XLA path, and its CUDA lowering.

Interpret mode masks blocks that overhang the array edge by itself; the
Triton lowering does not, so the kernel masks every load and store -- the odd
class counts and position counts below exercise those edges.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import clear_traces, xla_branch_only
from oracles import check_each, labelled_logits

import jaxloss
from jaxloss import _kernels, _losses
from jaxloss._kernels.cross_entropy import cross_entropy_pallas

IGN = 255


def _data(shape, axis, dtype, seed=0):
    x, t, rng = labelled_logits(shape, axis, dtype, seed, 0.15, IGN)
    where = jnp.asarray(rng.random(t.shape) < 0.9)
    return x, t, where, jnp.linspace(0.5, 2.0, shape[axis], dtype=jnp.float32)


def _kernel_and_xla_calls(x, t, where, w, scale, variants, kw):
    """The kernel in interpret mode once per entry of ``variants`` (keyword
    arguments over ``kw``) and the XLA path's ``_fused_pass(**kw)``:
    ``([kernel results], xla result)``, to be traced under one ``jit``."""
    got = [
        cross_entropy_pallas(x, t, where, w, scale, interpret=True, **{**kw, **v})
        for v in variants
    ]
    return got, _losses._fused_pass(x, t, where, w, scale, **kw)


def _kernel_and_xla(x, t, where, w, scale, variants=({},), **kw):
    """``_kernel_and_xla_calls`` under one ``jit``: eagerly, every call
    compiles a program of its own (0.3-1 s each on a 2-core CPU)."""
    return jax.jit(lambda *a: _kernel_and_xla_calls(*a, variants, kw))(x, t, where, w, scale)


def _variant(name, axis, where, w):
    """``(where, w, kw)`` of a named variant of the pass's arguments:
    "weighted" (weights and ``where``), "weighted-where-smooth" (and label
    smoothing), "nll" (weighted NLL), "plain" (neither weights nor ``where``)."""
    kw = dict(ignore_index=IGN, eps=0.0, normalize=True, axis=axis, with_grad=True)
    if name == "plain":
        where, w = None, None
    elif name == "weighted-where-smooth":
        kw["eps"] = 0.1
    elif name == "nll":
        kw["normalize"] = False
    return where, w, kw


def _variants_kernel_and_xla(x, t, where, w, scale, names, axis, variants=({},)):
    """``_kernel_and_xla_calls`` for each variant in ``names`` (``_variant``),
    all under one ``jit``: ``{name: ([kernel results], xla result)}``."""

    def run(x, t, where, w, scale):
        out = {}
        for name in names:
            wh, ww, kw = _variant(name, axis, where, w)
            out[name] = _kernel_and_xla_calls(x, t, wh, ww, scale, variants, kw)
        return out

    return jax.jit(run)(x, t, where, w, scale)


CASES = [
    ((5, 1), -1, jnp.float32),
    ((37, 19), -1, jnp.float32),
    ((2, 3, 5, 19), -1, jnp.float32),
    ((2, 19, 3, 5), 1, jnp.float32),
    ((3, 150), -1, jnp.float32),
    ((2, 150, 7), 1, jnp.float32),
    ((3, 1000), -1, jnp.bfloat16),
    ((2, 32003), -1, jnp.float32),
    ((1, 32003), -1, jnp.bfloat16),
    ((3, 19, 6), 1, jnp.float16),
]


@pytest.mark.parametrize(
    "shape,axis,dtype", CASES, ids=[f"{s}-ax{a}-{d.__name__}" for s, a, d in CASES]
)
def test_kernel_matches_xla(shape, axis, dtype):
    """Unweighted, weighted with ``where`` and smoothing, and NLL: the
    kernel's fwd+bwd, forward only and per-position losses against the XLA
    path, the three variants under one ``jit``."""
    x, t, where, w = _data(shape, axis, dtype)
    scale = jnp.float32(0.37)
    # fwd+bwd, forward only, and per-position losses ("none").
    variants = ({}, {"with_grad": False}, {"with_grad": False, "per_position": True})
    names = ["plain", "weighted-where-smooth", "nll"]
    results = _variants_kernel_and_xla(x, t, where, w, scale, names, axis % len(shape), variants)

    def check(got):
        ((lk, gk), (lf, none), (lp, _)), (lx, gx) = got
        assert gk.dtype == x.dtype and gk.shape == x.shape
        np.testing.assert_allclose(lk, lx, rtol=2e-5, atol=1e-6)
        if dtype == jnp.float32:
            np.testing.assert_allclose(gk, gx, rtol=2e-5, atol=1e-7)
        else:  # within one rounding of the 16-bit dtype
            np.testing.assert_allclose(
                np.asarray(gk, np.float32), np.asarray(gx, np.float32), rtol=2.0**-7, atol=1e-6
            )
        assert none is None
        np.testing.assert_allclose(lf, lx, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(scale * jnp.sum(lp), lx, rtol=2e-5, atol=1e-6)

    check_each({name: (results[name],) for name in names}, check)


# Launch configurations other than the default: channels-last "flat"
# addressing (gather 1: computed load offsets, natural store; gather 2: both
# computed), and a two-read loop where the row would fit (block_c < C).
CONFIGS = [
    ((37, 19), (32, 16, 4, 1, 1)),
    ((2, 3, 5, 19), (32, 8, 4, 1, 2)),
    ((53, 150), (256, 16, 4, 1, 1)),
    ((53, 150), (64, 16, 4, 1, 2)),
    ((53, 150), (64, 8, 4, 1, 0)),
    ((5, 1000), (256, 2, 4, 1, 0)),
    ((3, 5), (8, 4, 1, 1, 1)),
    # Split tiles: block_c from C up as a sum of powers of two (16 + 4, ...).
    ((37, 19), (20, 16, 4, 1, 1)),
    ((2, 3, 5, 19), (20, 8, 4, 1, 2)),
    ((53, 150), (160, 16, 4, 1, 1)),
    ((53, 150), (152, 8, 4, 1, 0)),
    ((3, 5), (5, 4, 1, 1, 1)),
]


@pytest.mark.parametrize("shape,config", CONFIGS, ids=[f"{s}-{c}" for s, c in CONFIGS])
def test_kernel_configs_match_xla(shape, config):
    """Weighted, weighted with smoothing, NLL and unweighted, each fwd+bwd and
    forward only, at a launch configuration other than the default, against
    the XLA path; the four variants under one ``jit``."""
    x, t, where, w = _data(shape, -1, jnp.float32, seed=3)
    scale = jnp.float32(0.37)
    variants = ({"config": config}, {"config": config, "with_grad": False})
    names = ["weighted", "weighted-where-smooth", "nll", "plain"]
    results = _variants_kernel_and_xla(x, t, where, w, scale, names, len(shape) - 1, variants)

    def check(got):
        ((lk, gk), (lf, _)), (lx, gx) = got
        np.testing.assert_allclose(lk, lx, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(gk, gx, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(lf, lx, rtol=2e-5, atol=1e-6)

    check_each({name: (results[name],) for name in names}, check)


def test_default_launch_configs():
    from jaxloss._kernels import cross_entropy as ce

    # The defaults at the benchmark shapes are the configurations timed on the
    # H200 (benchmarks/PERFORMANCE.md, "GPU timings"): a change of the rule
    # must be re-measured.
    assert ce.launch_config("last", 19, 1 << 23, True) == (32, 128, 4, 1, 1)
    assert ce.launch_config("last", 19, 1 << 23, False) == (20, 128, 2, 1, 1)
    assert ce.launch_config("mid", 19, 1 << 19, True) == (20, 64, 1, 1, 0)
    assert ce.launch_config("mid", 19, 1 << 19, False) == (20, 128, 1, 1, 0)
    assert ce.launch_config("last", 150, 1 << 21, True) == (160, 4, 1, 1, 1)
    assert ce.launch_config("last", 150, 1 << 21, False) == (160, 8, 1, 1, 1)
    assert ce.launch_config("mid", 150, 1 << 18, True) == (160, 32, 4, 1, 0)
    assert ce.launch_config("last", 128256, 8192, True) == (2048, 1, 4, 1, 0)
    assert ce.launch_config("last", 128256, 8192, False) == (2048, 1, 2, 1, 0)
    # Wide rows get warps enough for at most 32 logits a thread.
    assert ce.launch_config("last", 4000, 1 << 20, True) == (4096, 1, 4, 1, 1)
    # Few positions: the tile shrinks to them.
    assert ce.launch_config("last", 19, 3, True) == (32, 4, 4, 1, 1)


def test_flat_layout_only_below_int32_offsets():
    from jaxloss._kernels import cross_entropy as ce

    assert ce._layout(True, 1, ce.FLAT_MAX_ELEMENTS - 1) == "flat"
    assert ce._layout(True, 1, ce.FLAT_MAX_ELEMENTS) == "last"
    assert ce._layout(True, 0, 100) == "last"
    assert ce._layout(False, 1, 100) == "mid"


def test_tuned_table_is_used(monkeypatch):
    from jaxloss._kernels import cross_entropy as ce

    monkeypatch.setitem(ce._TUNED, ("last", 19, True), (32, 8, 2, 1, 1))
    assert ce.launch_config("last", 19, 1000, True) == (32, 8, 2, 1, 1)
    assert ce.launch_config("last", 19, 3, True) == (32, 4, 2, 1, 1)  # clipped to the positions
    assert ce.launch_config("last", 19, 1000, False) == (20, 128, 2, 1, 1)  # not tuned


def test_split_tiles():
    from jaxloss._kernels.cross_entropy import split_tiles

    assert split_tiles(32) == [(0, 32)]
    assert split_tiles(20) == [(0, 16), (16, 4)]
    assert split_tiles(152) == [(0, 128), (128, 16), (144, 8)]
    assert split_tiles(1) == [(0, 1)]


def test_split_block():
    from jaxloss._kernels.cross_entropy import split_block, split_tiles

    assert [split_block(c) for c in (1, 2, 3, 19, 32, 33, 150, 1000, 4000)] == [
        1, 2, 3, 20, 32, 33, 160, 1024, 4096
    ]
    for c in range(1, 600):  # at most two tiles, covering c, under 2c lanes
        assert c <= split_block(c) < 2 * c or c == split_block(c) == 1
        assert len(split_tiles(split_block(c))) <= 2


@pytest.mark.parametrize("with_grad", [True, False])
def test_split_tiles_axis1_matches_xla(with_grad):
    x, t, where, w = _data((2, 19, 7), 1, jnp.float32, seed=5)
    kw = dict(ignore_index=IGN, eps=0.1, normalize=True, axis=1, with_grad=with_grad)
    scale = jnp.float32(0.37)
    cfg = (20, 8, 1, 1, 0)
    lk, gk = cross_entropy_pallas(x, t, where, w, scale, interpret=True, config=cfg, **kw)
    lx, gx = _losses._fused_pass(x, t, where, w, scale, **kw)
    np.testing.assert_allclose(lk, lx, rtol=2e-5, atol=1e-6)
    if with_grad:
        np.testing.assert_allclose(gk, gx, rtol=2e-5, atol=1e-7)
    stats, _ = cross_entropy_pallas(
        x, t, where, w, scale, interpret=True, config=(20, 8, 1, 1, 0),
        **{**kw, "with_grad": False}, per_position=True, stats=True,
    )
    np.testing.assert_allclose(scale * jnp.sum(stats[0]), lx, rtol=2e-5, atol=1e-6)


def test_two_read_block_must_be_a_power_of_two():
    x, t, _, w = _data((3, 150), -1, jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        cross_entropy_pallas(x, t, None, w, jnp.float32(1.0), ignore_index=IGN, eps=0.0,
                             normalize=True, axis=1, with_grad=True, interpret=True,
                             config=(96, 4, 1, 1, 0))


@pytest.mark.parametrize("normalize", [True, False], ids=["ce", "nll"])
def test_kernel_bad_label_and_zero_scale(normalize):
    """A label out of range: a NaN loss and a NaN gradient row, the other rows
    finite, under five launch configurations (under one ``jit``, each
    checked); every label ignored with a zero scale: loss 0, gradient 0."""
    x, t, _, w = _data((4, 19), -1, jnp.float32)
    t = t.at[1].set(40).at[2].set(1)
    kw = dict(ignore_index=IGN, eps=0.0, normalize=normalize, axis=1, with_grad=True)
    configs = [None, (32, 4, 1, 1, 0), (32, 4, 1, 1, 2), (8, 4, 1, 1, 0), (20, 4, 1, 1, 1)]
    got, _ = _kernel_and_xla(
        x, t, None, w, jnp.float32(0.5), variants=[{"config": c} for c in configs], **kw
    )

    def check(lk, gk):
        assert np.isnan(lk) and np.isnan(gk[1]).all() and np.isfinite(np.delete(gk, 1, 0)).all()

    check_each({f"config={c}": r for c, r in zip(configs, got, strict=True)}, check)
    kw["normalize"] = True
    ((lk, gk),), _ = _kernel_and_xla(x, jnp.full_like(t, IGN), None, w, jnp.float32(0.0), **kw)
    assert lk == 0.0 and not np.asarray(gk).any()


@pytest.mark.traces_kernel
def test_escape_hatch(monkeypatch):
    assert _kernels.pallas_enabled()
    with jaxloss.disable_pallas():
        assert not _kernels.pallas_enabled()
    assert _kernels.pallas_enabled()
    monkeypatch.setenv("JAXLOSS_DISABLE_PALLAS", "1")
    assert not _kernels.pallas_enabled()


def _cpu_program(text: str) -> str:
    """A compiled CPU program's HLO without its source locations (metadata and
    the stack-frame tables name the lines that traced each operation), its
    instructions and computations renamed in order of appearance (numbering
    follows the trace: which of two equal constants CSE keeps, for one)."""
    kept, tables = [], False
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            tables = True
        elif tables and line.startswith(("%", "ENTRY", "HloModule")):
            tables = False
        if not tables:
            kept.append(re.sub(r", metadata=\{[^}]*\}", "", line))
    names: dict[str, str] = {}

    def rename(m: re.Match) -> str:
        return names.setdefault(m.group(1), f"n{len(names)}")

    return re.sub(r"%?\b([A-Za-z_][\w\-]*\.\d+|(?<=%)[A-Za-z_][\w\-]*)", rename, "\n".join(kept))


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((37, 19), -1, jnp.float32), ((2, 19, 3, 5), 1, jnp.float32), ((3, 1000), -1, jnp.bfloat16)],
)
@pytest.mark.traces_kernel
def test_cpu_program_is_the_same_without_the_kernel_traced(monkeypatch, shape, axis, dtype):
    """On CPU the public losses trace the kernel as well (``platform_dependent``
    traces every branch), and the CPU lowering drops it: the compiled program
    equals the one traced with ``dispatch`` taking the XLA branch alone, as
    the rest of the suite does on a host without a GPU (conftest.py)."""
    x, t, where, w = _data(shape, axis, dtype)

    def make_step():  # a new function each time: jit caches traces by function
        def step(x):  # fwd+bwd of every reduction, and the forward alone
            out = []
            for reduction in ("mean", "sum", "none"):
                for fn, kw in [
                    (jaxloss.cross_entropy, dict(weight=w, label_smoothing=0.1, where=where)),
                    (jaxloss.cross_entropy, {}),
                    (jaxloss.nll_loss, dict(weight=w)),
                ]:
                    def loss(x, fn=fn, kw=kw, reduction=reduction):
                        return jnp.sum(
                            fn(x, t, ignore_index=IGN, axis=axis, reduction=reduction, **kw)
                        )

                    out += [jax.value_and_grad(loss)(x), loss(x)]
            return out

        return step

    traced = jax.jit(make_step()).trace(x)
    assert "pallas_call" in str(traced.jaxpr)
    with_kernel = _cpu_program(traced.lower().compile().as_text())
    monkeypatch.setattr(_kernels, "dispatch", xla_branch_only)
    clear_traces()  # the traces above had the kernel
    traced = jax.jit(make_step()).trace(x)
    assert "pallas_call" not in str(traced.jaxpr)
    assert _cpu_program(traced.lower().compile().as_text()) == with_kernel


def _cuda_lowering(fn, *args):
    try:
        traced = jax.jit(fn).trace(*args)
        return traced.lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # only a missing CUDA/Triton lowering may skip
        msg = str(e)
        if "Unknown backend" in msg or "not registered" in msg or "No module named" in msg:
            pytest.skip(f"this jax cannot lower for cuda on CPU: {msg[:200]}")
        raise


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [
        ((64, 19), -1, jnp.float32),
        ((2, 19, 16, 16), 1, jnp.float32),
        ((8, 32003), -1, jnp.bfloat16),
        # split tiles by default: 128 + 32 lanes, 32 + 1
        ((64, 150), -1, jnp.float32),
        ((2, 150, 8, 8), 1, jnp.float32),
        ((2, 33, 4, 4), 1, jnp.bfloat16),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.traces_kernel
def test_cuda_lowering_uses_the_kernel(shape, axis, dtype, reduction):
    """The whole public loss (fwd+bwd) lowers for CUDA with the Triton kernel in it."""
    s = jax.ShapeDtypeStruct
    c = shape[axis]
    pos = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]

    def make_step():  # a fresh function: the switch is read when it is traced
        def step(x, t, w):
            return jax.value_and_grad(
                lambda x: jnp.sum(
                    jaxloss.cross_entropy(
                        x, t, weight=w, ignore_index=IGN, axis=axis, label_smoothing=0.1,
                        reduction=reduction,
                    )
                )
            )(x)

        return step

    args = (s(shape, dtype), s(pos, jnp.int32), s((c,), jnp.float32))
    assert "triton" in _cuda_lowering(make_step(), *args)
    with jaxloss.disable_pallas():
        assert "triton" not in _cuda_lowering(make_step(), *args)
