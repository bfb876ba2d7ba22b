"""A/B: jaxloss at another commit against the working tree, in one process.

Timings on shared machines drift between processes, so a change is measured
against its base in the same process: the base commit is checked out into a
temporary ``git worktree``, both packages are imported side by side, and the
two versions and optax + masking run interleaved (round-robin), as in
``bench.py`` (same cases: weighted mean, ~10% of positions ignored).

Run:  PYTHONPATH=. python benchmarks/ab.py --base f557e31 --cases seg19,seg150
      [--small] [--reps N] [--shape 16x256x256x19,2000x10 --axis -1 --dtype float32]
      [--block 50]
      [--reduction none]  (jaxloss's per-position losses, summed and divided
      as bench.py does; optax stays the mean)
      [--label-smoothing 0.1]  (every loss; optax smooths a one-hot)
      [--unweighted]  (no class weights; index targets)
      [--soft]  (probability targets; the mean over positions, or with
      --reduction none jaxloss's per-position losses averaged by the step)
      [--vmap B]  (a batch of B examples of each shape, the step jax.vmap of
      each example's loss, or of its value_and_grad, as vmap_bench.py)
Prints one line per case and mode: p50 ms of optax, base and new, and the
ratios optax/base, optax/new and base/new (above 1: the new code is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _own(name: str) -> bool:
    return name == "jaxloss" or name.startswith("jaxloss.")


def load_jaxloss(path: str):
    """``(jaxloss imported from path, its modules by name)``."""
    for name in [m for m in sys.modules if _own(m)]:
        del sys.modules[name]
    sys.path.insert(0, path)
    try:
        module = importlib.import_module("jaxloss")
    finally:
        sys.path.remove(path)
    return module, {m: v for m, v in sys.modules.items() if _own(m)}


@contextlib.contextmanager
def modules(mods: dict):
    """``mods`` as the ``jaxloss`` package while tracing: the functions import
    the kernel module lazily, by name."""
    saved = {m: v for m, v in sys.modules.items() if _own(m)}
    for m in saved:
        del sys.modules[m]
    sys.modules.update(mods)
    try:
        yield
    finally:
        for m in [m for m in sys.modules if _own(m)]:
            del sys.modules[m]
        sys.modules.update(saved)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the commit to compare against")
    p.add_argument("--cases", default="", help="comma-separated names of bench.py's cases")
    p.add_argument("--small", action="store_true", help="bench.py's CPU-sized cases")
    p.add_argument(
        "--shape", default="", help="more cases, comma-separated, e.g. 16x256x256x19,2000x10"
    )
    p.add_argument("--axis", type=int, default=-1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--reduction", choices=("mean", "none"), default="mean")
    p.add_argument(
        "--soft",
        action="store_true",
        help="probability targets (bench.soft_targets) instead of class indices",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="for every loss (optax: optax.smooth_labels of a one-hot)",
    )
    p.add_argument(
        "--unweighted",
        action="store_true",
        help="no class weights (index targets): jaxloss gets weight=None",
    )
    p.add_argument(
        "--vmap",
        type=int,
        default=0,
        help="a batch of this many examples of each case's shape, the step vmapped over it",
    )
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="calls in a row per function and round, their median recorded "
        "(bench.interleaved; e.g. 50 for steps of tens of microseconds)",
    )
    return p.parse_args(argv)


def cases(args) -> dict[str, tuple[tuple[int, ...], str, int]]:
    table = bench.SMALL if args.small else bench.FULL
    out = {name: table[name] for name in filter(None, args.cases.split(","))}
    for shape in filter(None, args.shape.split(",")):
        out[shape] = (tuple(map(int, shape.split("x"))), args.dtype, args.axis)
    return out


def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    before = {m: v for m, v in sys.modules.items() if _own(m)}
    with tempfile.TemporaryDirectory() as tmp, modules(before):
        tree = os.path.join(tmp, "base")
        subprocess.run(
            ["git", "-C", ROOT, "worktree", "add", "--detach", tree, args.base],
            check=True,
            capture_output=True,
        )
        try:
            base, base_mods = load_jaxloss(tree)
            new, new_mods = load_jaxloss(ROOT)
            mods = {"optax": new_mods, "base": base_mods, "new": new_mods}
            rows = []
            for name, (shape, dtype, axis) in cases(args).items():
                if args.vmap:  # one example's class axis; the data batched
                    ex_axis = axis % len(shape)
                    x, y, w, ax = bench.make_case(
                        (args.vmap,) + shape, jnp.dtype(dtype), ex_axis + 1
                    )
                    kw = {"axis": ex_axis, "label_smoothing": args.label_smoothing}
                else:
                    x, y, w, ax = bench.make_case(shape, jnp.dtype(dtype), axis)
                    kw = {"axis": ax, "label_smoothing": args.label_smoothing}
                if args.soft:
                    y = bench.soft_targets(x, ax)
                    kw["reduction"] = args.reduction
                    impls_of = functools.partial(bench.soft_impls, jnp, jax, optax, **kw)
                else:
                    kw["reduction"] = args.reduction
                    kw["weighted"] = not args.unweighted
                    impls_of = functools.partial(bench.jax_impls, jnp, jax, optax, **kw)

                impls = {
                    "optax": impls_of(new)["optax"],
                    "base": impls_of(base)["jaxloss"],
                    "new": impls_of(new)["jaxloss"],
                }
                for mode in ("fwd", "fwdbwd"):
                    steps = {
                        k: f if mode == "fwd" else jax.value_and_grad(f) for k, f in impls.items()
                    }
                    if args.vmap:
                        steps = {k: jax.vmap(f, in_axes=(0, 0, None)) for k, f in steps.items()}
                    fns = {k: jax.jit(f) for k, f in steps.items()}
                    for k, f in fns.items():  # traced (and compiled) here
                        with modules(mods[k]):
                            jax.block_until_ready(f(x, y, w))
                    calls = {k: functools.partial(f, x, y, w) for k, f in fns.items()}
                    times = bench.interleaved(calls, args.reps, jax.block_until_ready, args.block)
                    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
                    row = {"case": name, "mode": mode, **{f"{k}_ms": v for k, v in p50.items()}}
                    row["optax/base"] = p50["optax"] / p50["base"]
                    row["optax/new"] = p50["optax"] / p50["new"]
                    row["base/new"] = p50["base"] / p50["new"]
                    rows.append(row)
                    print(
                        f"{name:18s} {mode:6s} optax {p50['optax']:.3f}  base {p50['base']:.3f}"
                        f"  new {p50['new']:.3f} ms | optax/base {row['optax/base']:.3f}"
                        f"  optax/new {row['optax/new']:.3f}  base/new {row['base/new']:.3f}",
                        flush=True,
                    )
            return rows
        finally:
            subprocess.run(
                ["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True
            )


if __name__ == "__main__":
    run(parse_args())
