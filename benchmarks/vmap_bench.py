"""Benchmark: per-example losses under ``jax.vmap`` (a script, not a test).

Each case is a batch of examples; the loss of one example is the weighted
mean over its positions (10% ignored), as ``bench.py`` defines it, and the
step is ``jax.vmap`` of it: the per-example losses (forward) or their
values and gradients (``jax.vmap(jax.value_and_grad(loss))``, as for
per-example gradients). jaxloss against optax + masking, vmapped the same
way, and against jaxloss on the whole batch as one loss (no vmap: what a
folded batch should approach). Interleaved in one process; p50 ms, and
optax's / jaxloss's.

With ``--reduction none`` jaxloss computes the per-position losses
(``reduction="none"``) and the step averages them as ``bench.py`` does; the
gradient is then ``reduction="none"``'s.

  PYTHONPATH=. python benchmarks/vmap_bench.py [--soft] [--reduction none] [--reps 30]
      [--cases rows,seg150]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402

import jaxloss  # noqa: E402

# name: (batch, one example's shape, dtype, class axis of one example)
CASES = {
    "rows": (4096, (1000,), "float32", 0),  # one row an example (per-example gradients)
    "seqs": (512, (10, 1000), "float32", 1),
    "seg19": (8, (64, 64, 19), "float32", 2),  # an image an example
    "seg19_nchw": (8, (19, 64, 64), "float32", 0),
    "seg150": (4, (64, 64, 150), "float32", 2),
    "lm_bf16": (16, (32, 8000), "bfloat16", 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--soft", action="store_true", help="probability targets")
    p.add_argument("--reduction", choices=("mean", "none"), default="mean")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def run(args) -> list[dict]:
    rows = []
    for name in args.cases.split(","):
        b, shape, dtype, axis = CASES[name]
        x, y, w, _ = bench.make_case((b,) + shape, jnp.dtype(dtype), axis + 1)
        if args.soft:
            y = bench.soft_targets(x, axis + 1)
            impls = bench.soft_impls(jnp, jax, optax, jaxloss, axis, reduction=args.reduction)
        else:
            impls = bench.jax_impls(jnp, jax, optax, jaxloss, axis, args.reduction)
        steps = {}
        for impl in ("jaxloss", "optax"):
            loss = impls[impl]
            steps[(impl, "fwd")] = jax.jit(jax.vmap(loss, in_axes=(0, 0, None)))
            steps[(impl, "fwdbwd")] = jax.jit(
                jax.vmap(jax.value_and_grad(loss), in_axes=(0, 0, None))
            )
        # The whole batch as one loss (the batch axis leads the positions).
        if args.soft:
            whole = bench.soft_impls(jnp, jax, optax, jaxloss, axis + 1, reduction=args.reduction)[
                "jaxloss"
            ]
        else:
            whole = bench.jax_impls(jnp, jax, optax, jaxloss, axis + 1, args.reduction)["jaxloss"]
        steps[("jaxloss_whole_batch", "fwd")] = jax.jit(whole)
        steps[("jaxloss_whole_batch", "fwdbwd")] = jax.jit(jax.value_and_grad(whole))
        outs = {k: f(x, y, w) for k, f in steps.items()}
        ours, peer = outs[("jaxloss", "fwdbwd")], outs[("optax", "fwdbwd")]
        loss_diff = float(jnp.max(jnp.abs(ours[0] - peer[0])))
        grad_diff = float(
            jnp.max(jnp.abs(ours[1].astype(jnp.float32) - peer[1].astype(jnp.float32)))
        )
        calls = {k: (lambda f=f, a=(x, y, w): f(*a)) for k, f in steps.items()}
        times = bench.interleaved(calls, args.reps, jax.block_until_ready)
        p50 = {k: float(np.median(v) * 1e3) for k, v in times.items()}
        for (impl, mode), ms in p50.items():
            row = {
                "case": name,
                "batch": b,
                "example_shape": list(shape),
                "dtype": dtype,
                "targets": "probabilities" if args.soft else "indices",
                "reduction": args.reduction,
                "impl": impl,
                "mode": mode,
                "p50": ms,
                "speedup_vs_optax": p50[("optax", mode)] / ms,
            }
            if impl == "jaxloss" and mode == "fwdbwd":
                row.update(loss_diff_vs_optax=loss_diff, grad_maxdiff_vs_optax=grad_diff)
            rows.append(row)
        print(
            f"{name:11s} "
            + "  ".join(
                f"{mode} jaxloss {p50[('jaxloss', mode)]:.2f} optax {p50[('optax', mode)]:.2f} "
                f"({p50[('optax', mode)] / p50[('jaxloss', mode)]:.2f}x) "
                f"whole batch {p50[('jaxloss_whole_batch', mode)]:.2f}"
                for mode in ("fwd", "fwdbwd")
            ),
            flush=True,
        )
    return rows


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    rows = run(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bench.write(
        rows,
        bench.environment(),
        out,
        "vmap" + ("-soft" if args.soft else "") + ("-none" if args.reduction == "none" else ""),
        stamp,
    )
    return rows


if __name__ == "__main__":
    main()
