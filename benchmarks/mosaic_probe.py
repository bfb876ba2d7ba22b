"""Mosaic GPU port of the kernel: prototypes for both class-axis layouts, and
what the Mosaic GPU lowering accepts (a script, not part of the library).

JAX deprecates the Pallas Triton backend from 0.11, which the library's kernel
(``jaxloss/_kernels/cross_entropy.py``) uses. This script is the first step of
a port to Mosaic GPU, the default Pallas GPU backend there. Both prototypes
keep the Triton kernel's design: threads along positions, each thread owns
whole rows, so no row statistic needs a cross-lane reduction. A program holds
the logits of 128 positions (one warpgroup, one position per thread); a
rolled loop over the classes keeps each position's online max and
exponential sum, a second loop writes d(logits) = softmax - one_hot.
Prototype scope: unweighted, no ignore_index, per-position losses (the
gradient is that of their sum).

* ``prototype_nchw``: ``(A, C, B)`` logits (``axis=1``); a ``(C, 128)`` tile,
  class ``k`` is row ``k`` of it.
* ``prototype_last``: channels-last ``(P, C)`` logits. A row of 19 float32
  classes is 76 bytes, and TMA wants every GMEM stride but the last to be a
  multiple of 16 bytes, so the tile is 128 positions of the flat logits seen
  as ``(P*C/128, 128)``; the kernel reshapes that shared-memory tile to
  ``(128, C)`` and reads class ``k`` as column ``k`` (a stride-C load, one
  element per thread: a wider vector per thread fails MLIR verification,
  whose unit-stride rule spares only one-element vectors).
* ``lowering_table``: which tiles lower for CUDA with this JAX, including a
  WGMMA-layout ``(block_p, C)`` tile with cross-lane row reductions, the
  obvious design, which TMA's stride rule limits to rows of a multiple of
  16 bytes. Lowering needs no GPU.

On a CPU machine (``--cpu``, the default there): the lowering table, and the
prototypes in Pallas' generic interpret mode against NumPy float64. On a
GPU: the prototypes on the device against jaxloss (values and gradients),
then timed against jaxloss's fwd+bwd of the summed loss and a same-size copy
(the floor), interleaved in one process; JSON to ``$OUT``.

  PYTHONPATH=. python benchmarks/mosaic_probe.py [--cpu] [--small]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
# The test suite's NumPy float64 reference (tests/reference.py), the oracle.
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bench  # noqa: E402
import reference  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

import jaxloss  # noqa: E402

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a JAX without Mosaic GPU
    plgpu = None

f32 = jnp.float32


# One warpgroup: one position per thread.
BLOCK_P = 128


def _row_loops(read, write, t, loss_ref, c: int) -> None:
    """Loss and d(logits) of ``BLOCK_P`` positions; ``read(k)`` is class
    ``k``'s ``(BLOCK_P,)`` logits, ``write(k, g)`` stores its gradient."""
    v0 = read(0)
    # The loop's carry starts from class 0's values, not from a constant: the
    # lowering wants the carry's layout (strided, as loaded) to stay fixed.
    init = (v0, jnp.exp(v0 - v0), jnp.where(t == 0, v0, 0.0))

    def stats(k, carry):
        m, s, xt = carry
        v = read(k)
        m_new = jnp.maximum(m, v)
        s = s * jnp.exp(m - m_new) + jnp.exp(v - m_new)
        return m_new, s, jnp.where(t == k, v, xt)

    m, s, xt = jax.lax.fori_loop(1, c, stats, init)
    loss_ref[...] = jnp.log(s) + m - xt
    r = 1.0 / s

    def grad(k, carry):
        write(k, jnp.exp(read(k) - m) * r - jnp.where(t == k, 1.0, 0.0))
        return carry

    jax.lax.fori_loop(0, c, grad, 0)


def _nchw_kernel(x_ref, t_ref, loss_ref, g_ref, *, c: int):
    def write(k, g):
        g_ref[k, :] = g.astype(g_ref.dtype)

    _row_loops(lambda k: x_ref[k, :].astype(f32), write, t_ref[...], loss_ref, c)


def _last_kernel_columns(x_ref, t_ref, loss_ref, g_ref, *, c: int, flat: bool):
    # On the device the tiles arrive as (BLOCK_P*C/128, 128) slices of the flat
    # logits. Interpret mode gets (BLOCK_P, C) tiles instead: its discharge of
    # a store into a reshaped ref fails (jax 0.10.2), and the reshape is
    # row-major either way.
    xr = x_ref.reshape(BLOCK_P, c) if flat else x_ref
    gr = g_ref.reshape(BLOCK_P, c) if flat else g_ref

    def write(k, g):
        gr[:, k] = g.astype(gr.dtype)

    _row_loops(lambda k: xr[:, k].astype(f32), write, t_ref[...], loss_ref, c)


def _check_positions(n: int, what: str) -> None:
    if n % BLOCK_P:
        raise ValueError(f"{what} must be a multiple of {BLOCK_P}, got {n}")


def prototype_nchw(x, t, *, interpret: bool = False):
    """Per-position losses ``(A, B)`` and d(sum of them)/d(logits) ``(A, C, B)``
    for logits ``(A, C, B)`` and labels ``(A, B)``, ``B % 128 == 0``."""
    a, c, b = x.shape
    _check_positions(b, "positions per image")
    tile = pl.BlockSpec((None, c, BLOCK_P), lambda i, j: (i, 0, j))
    row = pl.BlockSpec((None, BLOCK_P), lambda i, j: (i, j))
    return pl.pallas_call(
        functools.partial(_nchw_kernel, c=c),
        out_shape=(jax.ShapeDtypeStruct((a, b), f32), jax.ShapeDtypeStruct(x.shape, x.dtype)),
        grid=(a, b // BLOCK_P),
        in_specs=[tile, row],
        out_specs=[row, tile],
        compiler_params=None if interpret else plgpu.CompilerParams(),
        interpret=interpret,
        name="ce_nchw_mgpu",
    )(x, t.astype(jnp.int32))


def prototype_last(x, t, *, interpret: bool = False):
    """Per-position losses ``(P,)`` and d(sum of them)/d(logits) ``(P, C)``
    for channels-last logits ``(P, C)`` and labels ``(P,)``, ``P % 128 == 0``."""
    p, c = x.shape
    _check_positions(p, "positions")
    flat = not interpret
    view = (p * c // 128, 128) if flat else (p, c)
    tile = pl.BlockSpec((BLOCK_P * c // 128, 128) if flat else (BLOCK_P, c), lambda i: (i, 0))
    row = pl.BlockSpec((BLOCK_P,), lambda i: (i,))
    loss, g = pl.pallas_call(
        functools.partial(_last_kernel_columns, c=c, flat=flat),
        out_shape=(jax.ShapeDtypeStruct((p,), f32), jax.ShapeDtypeStruct(view, x.dtype)),
        grid=(p // BLOCK_P,),
        in_specs=[tile, row],
        out_specs=[row, tile],
        compiler_params=None if interpret else plgpu.CompilerParams(),
        interpret=interpret,
        name="ce_last_mgpu",
    )(x.reshape(view), t.astype(jnp.int32))
    return loss, g.reshape(p, c)


def _wgmma_kernel(x_ref, t_ref, loss_ref, *, c: int):
    """A ``(block_p, C_pad)`` channels-last tile in the WGMMA layout, row
    statistics by cross-lane reductions (the lowering table only)."""
    lay = plgpu.Layout.WGMMA
    x = plgpu.layout_cast(x_ref[...], lay).astype(f32)
    cls = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=lay)
    x = jnp.where(cls < c, x, -jnp.inf)
    m = jnp.max(x, axis=1)
    e = jnp.exp(x - jax.lax.broadcast_in_dim(m, x.shape, (0,)))
    t = plgpu.layout_cast(t_ref[...], lay.reduce(1))
    hit = cls == jax.lax.broadcast_in_dim(t, x.shape, (0,))
    xt = jnp.sum(jnp.where(hit, x, 0.0), axis=1)
    loss_ref[...] = jnp.log(jnp.sum(e, axis=1)) + m - xt


def _wgmma_call(x, t, *, block_c: int, block_p: int = 64):
    p, c = x.shape
    swizzle = 128
    tiling = plgpu.TilingTransform((8, swizzle // x.dtype.itemsize))
    tile = plgpu.BlockSpec(
        (block_p, block_c),
        lambda i: (i, 0),
        transforms=(tiling, plgpu.SwizzleTransform(swizzle)),
    )
    row = pl.BlockSpec((block_p,), lambda i: (i,))
    return pl.pallas_call(
        functools.partial(_wgmma_kernel, c=c),
        out_shape=jax.ShapeDtypeStruct((p,), f32),
        grid=(p // block_p,),
        in_specs=[tile, row],
        out_specs=row,
        compiler_params=plgpu.CompilerParams(),
    )(x, t)


def _lowers(fn, *avals) -> str:
    try:
        jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
        return "ok"
    except Exception as e:  # the table records why, whatever it is
        first = (str(e).strip().splitlines() or ["?"])[0]
        return f"{type(e).__name__}: {first[:160]}"


def lowering_table(classes=(1, 19, 20, 64, 150, 192, 1000)) -> list[dict]:
    """Which tiles lower for CUDA (no GPU needed)."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        for c in classes:
            nchw = jax.ShapeDtypeStruct((2, c, 1024), dtype)
            last = jax.ShapeDtypeStruct((1024, c), dtype)
            block_c = -(-c // 64) * 64
            for design, fn, x in (
                ("nchw_prototype", prototype_nchw, nchw),
                ("last_prototype", prototype_last, last),
                ("last_wgmma", functools.partial(_wgmma_call, block_c=block_c), last),
            ):
                t = jax.ShapeDtypeStruct(x.shape[:1] + x.shape[2:], jnp.int32)
                rows.append(
                    {"design": design, "dtype": dtype, "c": c, "lowering": _lowers(fn, x, t)}
                )
    return rows


PROTOTYPES = {"nchw": (prototype_nchw, 1), "last": (prototype_last, -1)}


def _case(layout: str, c: int, positions: int, dtype, seed: int = 0):
    """Logits (scale 3) and labels: ``(2, C, positions)`` or ``(positions, C)``."""
    kx, kt = jax.random.split(jax.random.key(seed))
    shape = (2, c, positions) if layout == "nchw" else (positions, c)
    x = (jax.random.normal(kx, shape, f32) * 3).astype(dtype)
    pos = (2, positions) if layout == "nchw" else (positions,)
    return x, jax.random.randint(kt, pos, 0, c)


def interpret_check(cases=((1, 128), (19, 256), (150, 128)), dtypes=("float32", "bfloat16")):
    """The prototypes in generic interpret mode against NumPy float64."""
    out = []
    for layout, (fn, axis) in PROTOTYPES.items():
        for c, positions in cases:
            for dtype in dtypes:
                x, t = _case(layout, c, positions, dtype, seed=c)
                loss, g = fn(x, t, interpret=True)
                # Per-position losses and d(their sum)/d(logits): the cotangent
                # of reduction="none" defaults to ones.
                rl, rg = reference.loss_and_grad(
                    np.asarray(x.astype(f32)), np.asarray(t), axis=axis, reduction="none"
                )
                out.append(
                    {
                        "layout": layout,
                        "c": c,
                        "dtype": dtype,
                        "loss_maxabs": float(np.max(np.abs(np.asarray(loss) - rl))),
                        "grad_maxabs": float(np.max(np.abs(np.asarray(g.astype(f32)) - rg))),
                        # bfloat16 gradients: half an ulp at the largest |g| (1).
                        "grad_tol": 2e-6 if dtype == "float32" else 2.0**-8,
                    }
                )
    return out


# (layout, classes, positions): the benchmark's seg19 and seg150 cases.
DEVICE_CASES = {
    "seg19": ("last", 19, 16 * 512 * 1024),
    "seg19_nchw": ("nchw", 19, 8 * 512 * 1024),  # x 2 images: 16 x 19 x 512 x 1024
    "seg150": ("last", 150, 8 * 512 * 512),
    "seg150_nchw": ("nchw", 150, 4 * 512 * 512),  # x 2 images: 8 x 150 x 512 x 512
}


def device_run(small: bool, reps: int, interpret: bool = False) -> dict:
    """On the GPU: values against jaxloss, then timings against its fwd+bwd
    (``interpret``: the prototypes in interpret mode, to test this on CPU)."""
    result = {}
    for name, (layout, c, positions) in DEVICE_CASES.items():
        if small:
            positions = 128 * 8
        fn, axis = PROTOTYPES[layout]
        x, t = _case(layout, c, positions, f32)

        def lib_loss(x, t, axis=axis):
            return jaxloss.cross_entropy(x, t, axis=axis, reduction="sum")

        lib = jax.jit(jax.value_and_grad(lib_loss))
        proto = jax.jit(functools.partial(fn, interpret=interpret))
        copy = jax.jit(lambda x: x * 2)
        entry: dict = {"shape": list(x.shape)}
        try:
            loss, g = proto(x, t)
            ref_l, ref_g = lib(x, t)
            jax.block_until_ready(copy(x))  # compiled before the timing
            entry["loss_rel"] = float(abs(jnp.sum(loss) - ref_l) / abs(ref_l))
            entry["grad_maxabs"] = float(jnp.max(jnp.abs(g - ref_g)))
            times = bench.interleaved(
                {
                    "prototype": functools.partial(proto, x, t),
                    "jaxloss": functools.partial(lib, x, t),
                    "copy": functools.partial(copy, x),
                },
                reps,
                jax.block_until_ready,
            )
            p50 = {k: bench.pct(v)["p50"] for k, v in times.items()}
            entry["ms_p50"] = p50
            entry["floor_prototype"] = p50["copy"] / p50["prototype"]
            entry["floor_jaxloss"] = p50["copy"] / p50["jaxloss"]
        except Exception as e:  # record it and go on to the next case
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        result[name] = entry
        print(name, json.dumps(entry), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized device shapes")
    p.add_argument("--cpu", action="store_true", help="lowering + interpret only")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--interpret-device-run",
        action="store_true",
        help="the device part with the prototype in interpret mode (tests it on CPU)",
    )
    args = p.parse_args(argv)
    if plgpu is None:
        print("this JAX has no Pallas Mosaic GPU backend")
        return 0
    report: dict = {"env": bench.environment(), "started": time.strftime("%Y%m%d-%H%M%S")}
    report["lowering"] = lowering_table()
    for row in report["lowering"]:
        print(row["design"], row["dtype"], row["c"], row["lowering"], flush=True)
    report["interpret"] = interpret_check()
    ok = all(
        r["loss_maxabs"] < 1e-5 and r["grad_maxabs"] < r["grad_tol"] for r in report["interpret"]
    )
    print("interpret", "ok" if ok else "MISMATCH", json.dumps(report["interpret"]))
    if args.interpret_device_run:
        report["device"] = device_run(args.small, args.reps, interpret=True)
    elif not args.cpu and jax.default_backend() == "gpu":
        report["device"] = device_run(args.small, args.reps)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"mosaic_probe-{report['started']}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", path)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
