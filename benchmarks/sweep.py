"""Sweep: jaxloss against optax + masking over class counts, dtypes and layouts.

``bench.py`` measures the issue's fixed cases; this script looks for weak
spots between them. For each class count, dtype and class axis, it builds
one case of about ``--elements`` logits (``bench.make_case``: weighted mean,
~10% of positions ignored), times fwd+bwd and forward-only of jaxloss and
optax interleaved in one process (``bench.interleaved``), and prints
optax / jaxloss for both (above 1: jaxloss is faster), flagging a case where
either is below 1.

Channels-last cases are ``(P // 128, 128, C)`` (``(P, C)`` below 4096
positions); ``axis=1`` cases ``(P // S², C, S, S)`` with ``S = --spatial``.

``--soft`` sweeps probability targets instead (``bench.soft_targets``,
``bench.soft_impls``: the mean; with ``--reduction none`` jaxloss's
per-position losses averaged by the step), ``--label-smoothing`` smooths
every loss.

Run:  PYTHONPATH=. python benchmarks/sweep.py [--elements 2.5e6]
      [--classes 1,2,5,10,19,150,1000] [--dtypes float32,bfloat16]
      [--axes=-1,1] [--spatial 16] [--reps 15] [--reduction none]
      [--soft] [--label-smoothing 0.1]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

CLASSES = "1,2,3,5,10,19,33,64,100,150,256,1000,4096,32000"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--elements", type=float, default=2.5e6, help="logits per case")
    p.add_argument("--classes", default=CLASSES, help="comma-separated class counts")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--axes", default="-1,1", help="class axes: -1 (last) and/or 1")
    p.add_argument("--spatial", type=int, default=16, help="S of the axis=1 cases' S x S")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument(
        "--reduction",
        default="mean",
        choices=["mean", "none"],
        help="none: jaxloss's per-position losses, reduced by the step (as bench.py)",
    )
    p.add_argument(
        "--soft",
        action="store_true",
        help="probability targets (bench.soft_targets) instead of class indices; the mean "
        "(with --reduction none: jaxloss's per-position losses, averaged by the step)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0, help="for every loss")
    args = p.parse_args(argv)
    return args


def shape_of(elements: int, c: int, axis: int, spatial: int) -> tuple[int, ...] | None:
    p = max(1, elements // c)
    if axis == -1:
        return (p, c) if p < 4096 else (p // 128, 128, c)
    if p < spatial * spatial:
        return None
    return (p // (spatial * spatial), c, spatial, spatial)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import optax

    import jaxloss

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform})", flush=True)
    rows = []
    for dt in args.dtypes.split(","):
        for axis in (int(a) for a in args.axes.split(",")):
            for c in (int(v) for v in args.classes.split(",")):
                shape = shape_of(int(args.elements), c, axis, args.spatial)
                if shape is None:
                    continue
                x, y, w, _ = bench.make_case(shape, getattr(jnp, dt), axis)
                ls = args.label_smoothing
                if args.soft:
                    y = bench.soft_targets(x, axis)
                    impls = bench.soft_impls(
                        jnp, jax, optax, jaxloss, axis, label_smoothing=ls, reduction=args.reduction
                    )
                else:
                    impls = bench.jax_impls(
                        jnp, jax, optax, jaxloss, axis, args.reduction, label_smoothing=ls
                    )
                fns = {}
                for name in ("jaxloss", "optax"):
                    vg = jax.jit(jax.value_and_grad(impls[name]))
                    fo = jax.jit(impls[name])
                    jax.block_until_ready(vg(x, y, w))
                    jax.block_until_ready(fo(x, y, w))
                    fns[(name, "fwdbwd")] = lambda vg=vg, d=(x, y, w): vg(*d)
                    fns[(name, "fwd")] = lambda fo=fo, d=(x, y, w): fo(*d)
                times = bench.interleaved(fns, args.reps, jax.block_until_ready)
                med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
                ratio = {m: med[("optax", m)] / med[("jaxloss", m)] for m in ("fwd", "fwdbwd")}
                flag = "  <- slower than optax" if min(ratio.values()) < 1.0 else ""
                print(
                    f"{dt:8s} axis {axis:2d} {'x'.join(map(str, shape)):18s} "
                    f"fwd {ratio['fwd']:5.2f}  fwdbwd {ratio['fwdbwd']:5.2f}  "
                    f"(jaxloss fwd+bwd {med[('jaxloss', 'fwdbwd')]:.2f} ms){flag}",
                    flush=True,
                )
                rows.append(dict(dtype=dt, axis=axis, shape=shape, ms=med, ratio=ratio))
    return rows


if __name__ == "__main__":
    main()
