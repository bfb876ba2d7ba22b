"""Mosaic GPU port of the kernel: a prototype for axis=1 (NCHW) logits, and
what the Mosaic GPU lowering accepts (a script, not part of the library).

JAX deprecates the Pallas Triton backend from 0.11, which the library's kernel
(``jaxloss/_kernels/cross_entropy.py``) uses. This script is the first step of
a port to Mosaic GPU, the default Pallas GPU backend there:

* ``prototype_nchw``: the kernel's design for ``(A, C, B)`` logits (threads
  along positions, no cross-lane reduction) in Mosaic GPU. Each program holds
  a ``(C, block_p)`` tile; a rolled loop over the classes keeps the online
  max and exponential sum of every position, a second loop writes
  d(logits) = softmax - one_hot. Prototype scope: unweighted, no
  ignore_index, per-position losses (the gradient is that of their sum).
* ``lowering_table``: which tiles of channels-last ``(P, C)`` logits (a
  WGMMA-layout tile with cross-lane row reductions) and of the prototype
  lower for CUDA with this JAX. Lowering needs no GPU.

On a CPU machine (``--cpu``, the default there): the lowering table, and the
prototype in Pallas' generic interpret mode against NumPy. Two findings with
jax 0.10.2: a channels-last row of 19 float32 classes (76 bytes) cannot be a
TMA tile (every GMEM stride but the last must be a multiple of 16 bytes), and
the flat view the Triton kernel uses for it needs strided SMEM slices, which
the lowering does not implement; the NCHW prototype lowers for 1 to 150+
classes.

On a GPU: the prototype on the device against jaxloss (values and
gradients), then timed against jaxloss's fwd+bwd of the summed loss and a
same-size copy (the floor), interleaved in one process; JSON to ``$OUT``.

  PYTHONPATH=. python benchmarks/mosaic_probe.py [--small]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

import jaxloss  # noqa: E402

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # a JAX without Mosaic GPU
    plgpu = None

f32 = jnp.float32


def _nchw_kernel(x_ref, t_ref, loss_ref, g_ref, *, c: int):
    """One ``(C, block_p)`` tile: the loss of each position and d(logits)."""
    t = t_ref[...]
    v0 = x_ref[0, :].astype(f32)
    # The loop's carry starts from class 0's values, not from a constant: the
    # lowering wants the carry's layout (strided, as loaded) to stay fixed.
    init = (v0, jnp.exp(v0 - v0), jnp.where(t == 0, v0, 0.0))

    def stats(k, carry):
        m, s, xt = carry
        v = x_ref[k, :].astype(f32)
        m_new = jnp.maximum(m, v)
        s = s * jnp.exp(m - m_new) + jnp.exp(v - m_new)
        return m_new, s, jnp.where(t == k, v, xt)

    m, s, xt = jax.lax.fori_loop(1, c, stats, init)
    loss_ref[...] = jnp.log(s) + m - xt
    r = 1.0 / s

    def grad(k, carry):
        v = x_ref[k, :].astype(f32)
        g = jnp.exp(v - m) * r - jnp.where(t == k, 1.0, 0.0)
        g_ref[k, :] = g.astype(g_ref.dtype)
        return carry

    jax.lax.fori_loop(0, c, grad, 0)


def prototype_nchw(x, t, *, block_p: int = 128, interpret: bool = False):
    """Per-position losses ``(A, B)`` and d(sum of them)/d(logits) ``(A, C, B)``
    for logits ``(A, C, B)`` and labels ``(A, B)``, ``B % block_p == 0``."""
    a, c, b = x.shape
    if b % block_p:
        raise ValueError(f"positions per image must be a multiple of block_p={block_p}, got {b}")
    tile = pl.BlockSpec((None, c, block_p), lambda i, j: (i, 0, j))
    row = pl.BlockSpec((None, block_p), lambda i, j: (i, j))
    return pl.pallas_call(
        functools.partial(_nchw_kernel, c=c),
        out_shape=(jax.ShapeDtypeStruct((a, b), f32), jax.ShapeDtypeStruct(x.shape, x.dtype)),
        grid=(a, b // block_p),
        in_specs=[tile, row],
        out_specs=[row, tile],
        compiler_params=None if interpret else plgpu.CompilerParams(),
        interpret=interpret,
        name="ce_nchw_mgpu",
    )(x, t.astype(jnp.int32))


def _last_kernel(x_ref, t_ref, loss_ref, *, c: int):
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


def _last_call(x, t, *, block_c: int, block_p: int = 64):
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
        functools.partial(_last_kernel, c=c),
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
            x = jax.ShapeDtypeStruct((2, c, 1024), dtype)
            t = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
            rows.append(
                {
                    "design": "nchw_prototype",
                    "dtype": dtype,
                    "c": c,
                    "lowering": _lowers(prototype_nchw, x, t),
                }
            )
            x = jax.ShapeDtypeStruct((1024, c), dtype)
            t = jax.ShapeDtypeStruct((1024,), jnp.int32)
            block_c = -(-c // 64) * 64
            rows.append(
                {
                    "design": "last_wgmma",
                    "dtype": dtype,
                    "c": c,
                    "block_c": block_c,
                    "lowering": _lowers(functools.partial(_last_call, block_c=block_c), x, t),
                }
            )
    return rows


def reference(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy float64: per-position losses and d(their sum)/d(logits)."""
    z = np.moveaxis(x.astype(np.float64), 1, -1)
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
    loss = lse - np.take_along_axis(z, t[..., None], -1)[..., 0]
    g = np.exp(z - lse[..., None])
    np.put_along_axis(g, t[..., None], np.take_along_axis(g, t[..., None], -1) - 1.0, -1)
    return loss, np.moveaxis(g, -1, 1)


def interpret_check(cases=((1, 128), (19, 256), (150, 128)), dtypes=("float32", "bfloat16")):
    """The prototype in generic interpret mode against NumPy float64."""
    out = []
    for c, b in cases:
        for dtype in dtypes:
            kx, kt = jax.random.split(jax.random.key(c))
            x = jax.random.normal(kx, (2, c, b), f32).astype(dtype) * 3
            t = jax.random.randint(kt, (2, b), 0, c)
            loss, g = prototype_nchw(x, t, interpret=True)
            rl, rg = reference(np.asarray(x.astype(f32)), np.asarray(t))
            out.append(
                {
                    "c": c,
                    "dtype": dtype,
                    "loss_maxabs": float(np.max(np.abs(np.asarray(loss) - rl))),
                    "grad_maxabs": float(np.max(np.abs(np.asarray(g.astype(f32)) - rg))),
                    # bfloat16 gradients: half an ulp at the largest |g| (1).
                    "grad_tol": 2e-6 if dtype == "float32" else 2.0**-8,
                }
            )
    return out


def device_run(small: bool, reps: int, interpret: bool = False) -> dict:
    """On the GPU: values against jaxloss, then timings against its fwd+bwd
    (``interpret``: the prototype in interpret mode, to test this on CPU)."""
    shapes = {"seg19_nchw": (16, 19, 512 * 1024), "seg150_nchw": (8, 150, 512 * 512)}
    if small:
        shapes = {"seg19_nchw": (2, 19, 64 * 64), "seg150_nchw": (2, 150, 32 * 32)}
    result = {}
    for name, (a, c, b) in shapes.items():
        kx, kt = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (a, c, b), f32)
        t = jax.random.randint(kt, (a, b), 0, c)

        def lib_loss(x, t):
            return jaxloss.cross_entropy(x, t, axis=1, reduction="sum")

        lib = jax.jit(jax.value_and_grad(lib_loss))
        proto = jax.jit(functools.partial(prototype_nchw, interpret=interpret))
        copy = jax.jit(lambda x: x * 2)
        entry: dict = {"shape": [a, c, b]}
        try:
            loss, g = proto(x, t)
            ref_l, ref_g = lib(x, t)
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
