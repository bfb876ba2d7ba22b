"""Benchmark: fwd+bwd and forward-only of jaxloss against the peers, one process.

Each case is the weighted mean cross-entropy with ~10% of positions ignored
(label 255) and class weights ``linspace(0.5, 2, C)`` -- the method of
``../shared/anchors/anchors_method.py``. Implementations:

* ``jaxloss``            -- ``jaxloss.cross_entropy`` (Pallas kernel on CUDA)
* ``jaxloss_xla``        -- the same under ``jaxloss.disable_pallas()``
* ``optax``              -- optax + masking, as a JAX user writes it today
* ``log_softmax``        -- a plain log_softmax + take_along_axis formulation
* ``torch_eager`` / ``torch_compile`` -- PyTorch when importable (compile on GPU)
* ``copy``               -- ``x * 2``: one read + one write, the floor

JAX repetitions are interleaved across implementations (round-robin);
PyTorch's are timed in a phase of their own after them. Every
row reports p20/p50/p80 ms, ``floor`` = copy_ms / ms (1.0 is the floor),
``speedup`` = best peer's p50 / p50, and XLA's compiled temp bytes.

With ``--reduction none`` every implementation computes the per-position
losses and the step reduces them itself (``sum(l) / sum(w_t)``, the same
value): jaxloss then runs ``reduction="none"`` (on CUDA: the kernel's row
statistics, the gradient formed by XLA in the backward).

With ``--soft``, probability targets (``soft_targets``; jaxloss, optax,
PyTorch: ``-sum_c w_c q_c log p_c`` averaged over the positions, no kernel);
with ``--label-smoothing``, every loss smooths (optax through
``optax.smooth_labels``, whose smoothing term is not weighted by class, so
the values are compared against ``log_softmax``'s, PyTorch's formulation).

Run:  PYTHONPATH=. python benchmarks/bench.py [--small] [--reps N] [--cases a,b]
                                              [--reduction none] [--soft]
                                              [--label-smoothing 0.1]
Writes benchmarks/results/bench-<size>[-none]-<device>-<time>.json and .csv
(or --out DIR).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

IGN = 255
FULL = {
    "seg19": ((16, 512, 1024, 19), "float32", -1),
    "seg19_nchw": ((16, 19, 512, 1024), "float32", 1),
    "seg150": ((8, 512, 512, 150), "float32", -1),
    "lm": ((8192, 128256), "bfloat16", -1),
}
SMALL = {
    "seg19": ((8, 128, 128, 19), "float32", -1),
    "seg19_nchw": ((8, 19, 128, 128), "float32", 1),
    "seg150": ((4, 64, 64, 150), "float32", -1),
    "lm": ((512, 32000), "bfloat16", -1),
}
PEERS = ("optax", "log_softmax", "torch_eager", "torch_compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized cases")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20/15)")
    p.add_argument("--cases", default=None, help="comma-separated subset of " + ",".join(FULL))
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--reduction", choices=("mean", "none"), default="mean")
    p.add_argument(
        "--soft",
        action="store_true",
        help="probability targets (soft_targets; the mean over positions, no kernel)",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="for every loss (optax: optax.smooth_labels; gradients compared to log_softmax's)",
    )
    p.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], cwd=here, stderr=subprocess.DEVNULL
            )
            .decode()
            .strip()
        )
    except Exception:
        return "unknown"


def along_classes(w, ndim, axis):
    """Class weights ``w`` shaped to broadcast along the class ``axis``."""
    return w.reshape([-1 if d == axis % ndim else 1 for d in range(ndim)])


def jax_impls(jnp, jax, optax, jaxloss, axis, reduction="mean", label_smoothing=0.0, weighted=True):
    """``{name: loss(x, y, w)}``. With ``label_smoothing`` every loss smooths
    its labels: optax through ``optax.smooth_labels`` of a one-hot (as a user
    writes it; its smoothing term is not weighted by class, PyTorch's and
    jaxloss's is), log_softmax with PyTorch's weighted term. Without
    ``weighted`` every loss ignores ``w`` (jaxloss gets ``weight=None``)."""
    ls = label_smoothing

    def weights_and_safe(y, w):
        valid = y != IGN
        safe = jnp.where(valid, y, 0)
        return valid, safe, (w[safe] if weighted else 1.0) * valid

    def optax_loss(x, y, w):
        _, safe, ww = weights_and_safe(y, w)
        ax = axis % x.ndim
        xf = x.astype(jnp.float32)
        if ls:
            labels = optax.smooth_labels(jax.nn.one_hot(safe, x.shape[ax], axis=ax), ls, axis=ax)
            per = optax.softmax_cross_entropy(xf, labels, axis=ax)
        else:
            per = optax.softmax_cross_entropy_with_integer_labels(xf, safe, axis=ax)
        return jnp.sum(per * ww) / jnp.sum(ww)

    def log_softmax_loss(x, y, w):
        valid, safe, ww = weights_and_safe(y, w)
        lp = jax.nn.log_softmax(x.astype(jnp.float32), axis=axis)
        picked = jnp.squeeze(jnp.take_along_axis(lp, jnp.expand_dims(safe, axis), axis=axis), axis)
        per = (1.0 - ls) * picked * ww
        if ls:
            wb = along_classes(w, x.ndim, axis) if weighted else 1.0
            per = per + (ls / x.shape[axis]) * jnp.sum(lp * wb, axis=axis) * valid
        return -jnp.sum(per) / jnp.sum(ww)

    def ours(x, y, w):
        w = w if weighted else None
        if reduction == "none":
            per = jaxloss.cross_entropy(
                x, y, weight=w, ignore_index=IGN, axis=axis, reduction="none", label_smoothing=ls
            )
            return jnp.sum(per) / jnp.sum(weights_and_safe(y, w)[2])
        return jaxloss.cross_entropy(
            x, y, weight=w, ignore_index=IGN, axis=axis, label_smoothing=ls
        )

    return {"jaxloss": ours, "optax": optax_loss, "log_softmax": log_softmax_loss}


def soft_impls(jnp, jax, optax, jaxloss, axis, label_smoothing=0.0, reduction="mean"):
    """``{name: loss(x, q, w)}`` for probability targets ``q``: PyTorch's
    weighted loss ``-sum_c w_c q'_c log p_c`` averaged over the positions.
    optax as a user writes it: ``softmax_cross_entropy`` of the weighted
    (and ``optax.smooth_labels``-smoothed) targets. ``reduction="none"``:
    jaxloss's per-position losses, averaged by the step (``jnp.mean``)."""
    ls = label_smoothing

    def optax_loss(x, q, w):
        ax = axis % x.ndim
        qf = q.astype(jnp.float32)
        if ls:
            qf = optax.smooth_labels(qf, ls, axis=ax)
        wb = along_classes(w, x.ndim, ax)
        return jnp.mean(optax.softmax_cross_entropy(x.astype(jnp.float32), qf * wb, axis=ax))

    def ours(x, q, w):
        if reduction == "none":
            return jnp.mean(
                jaxloss.cross_entropy(
                    x, q, weight=w, axis=axis, label_smoothing=ls, reduction="none"
                )
            )
        return jaxloss.cross_entropy(x, q, weight=w, axis=axis, label_smoothing=ls)

    return {"jaxloss": ours, "optax": optax_loss}


def soft_targets(x, axis, seed=1):
    """Probability targets for logits ``x``: a softmax of normal draws, in
    ``x``'s dtype."""
    import jax

    z = jax.random.normal(jax.random.key(seed), x.shape)
    return jax.nn.softmax(z, axis=axis).astype(x.dtype)


def make_case(shape, dtype, axis, seed=0):
    """Logits, labels (10% ignored), class weights ``linspace(0.5, 2, C)`` and
    the class axis of one benchmark case -- the anchors' method."""
    import jax
    import jax.numpy as jnp

    ax = axis % len(shape)
    c = shape[ax]
    pos = shape[:ax] + shape[ax + 1 :]
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, shape, jnp.float32).astype(dtype)
    y = jax.random.randint(k2, pos, 0, c)
    y = jnp.where(jax.random.uniform(k3, pos) < 0.1, IGN, y)
    w = jnp.linspace(0.5, 2.0, c).astype(jnp.float32)
    return x, y, w, ax


def temp_bytes(fn, *args):
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:
        return -1


def pct(ts):
    a = np.asarray(ts) * 1e3
    return {
        "p20": float(np.percentile(a, 20)),
        "p50": float(np.percentile(a, 50)),
        "p80": float(np.percentile(a, 80)),
    }


def interleaved(fns: dict, reps: int, sync, block: int = 1) -> dict:
    """``{key: [seconds, ...]}``: ``reps`` rounds, each calling every function
    once (round-robin), so drift on a shared machine hits all alike.

    ``block`` > 1: each round calls each function ``block`` times in a row
    and records the median of those calls. For steps of tens of
    microseconds: there a call's time depended on the function called just
    before (a step whose pass XLA:CPU split over both cores left the second
    core's thread awake, or not, for the next one).

    Each round takes its own order (a permutation seeded by the round), so
    that every function follows each of the others about as often: a call
    right after one that sweeps the cache (optax's float32 temporaries) runs
    slower. With a fixed order, two identical functions measured 2-7% apart
    on the 2-core dev machine (the later one slower; median of 11 processes
    of ``ab.py``); with the order reversed every other round, ``ab.py``'s
    base (which then followed optax in half the rounds, the new code never)
    measured identical code 1.1-1.5x slower at 512x32000 bfloat16."""
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(reps):
        order = list(keys)
        random.Random(r).shuffle(order)
        for key in order:
            fn = fns[key]
            calls = []
            for _ in range(block):
                t0 = time.perf_counter()
                sync(fn())
                calls.append(time.perf_counter() - t0)
            times[key].append(float(np.median(calls)))
    return times


def run(args, on_case=None) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxloss

    shapes = SMALL if args.small else FULL
    names = list(shapes) if not args.cases else args.cases.split(",")
    reps = args.reps or (15 if args.small else 20)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform})", flush=True)
    rows = []
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811
        except Exception:
            torch = None
    for name in names:
        shape, dtype, axis = shapes[name]
        x, y, w, ax = make_case(shape, dtype, axis)
        nbytes = x.size * x.dtype.itemsize
        ls = args.label_smoothing
        if args.soft:
            y = soft_targets(x, ax)
            impls = soft_impls(jnp, jax, optax, jaxloss, axis, label_smoothing=ls)
        else:
            impls = jax_impls(jnp, jax, optax, jaxloss, axis, args.reduction, label_smoothing=ls)
        # The values compared against: optax's smoothing term is not weighted
        # by class (PyTorch's, jaxloss's and log_softmax's are).
        ref = "log_softmax" if ls and not args.soft else "optax"
        data = (x, y, w)
        steps = {}  # (impl, mode) -> (callable, compiled temp bytes)

        def add(iname, f, data=data, steps=steps, within=contextlib.nullcontext):
            """Steps of ``f`` (fwd+bwd, forward), each call inside ``within()``:
            ``jaxloss.disable_pallas`` is part of every jit cache key, so a
            step traced inside it and called outside would be traced again,
            with the kernel."""
            vg = jax.jit(jax.value_and_grad(f))
            fo = jax.jit(f)

            def call(jitted):
                with within():
                    return jitted(*data)

            jax.block_until_ready(call(vg))  # trace now (the Pallas switch is read here)
            jax.block_until_ready(call(fo))
            with within():
                temp = temp_bytes(vg, *data)
            steps[(iname, "fwdbwd")] = (lambda: call(vg), temp)
            steps[(iname, "fwd")] = (lambda: call(fo), None)

        for iname, f in impls.items():
            add(iname, f)
        if dev.platform == "gpu" and not args.soft:  # probability targets: no kernel
            add("jaxloss_xla", impls["jaxloss"], within=jaxloss.disable_pallas)
        cp = jax.jit(lambda x: x * 2)
        steps[("copy", "copy")] = (lambda cp=cp, x=x: cp(x), None)
        sync = jax.block_until_ready
        tsteps = {}
        if torch is not None:
            tsteps = torch_steps(
                torch, x, y, w, ax, dtype, dev.platform == "gpu", args.reduction, ls, args.soft
            )
        # warm up (compile) everything, then interleave the timed repetitions
        results = {}
        for key, (fn, _) in steps.items():
            out = fn()
            sync(out)
            sync(fn())
            results[key] = out
        for fn, tsync in tsteps.values():
            fn()
            fn()
            tsync()
        times = interleaved({k: fn for k, (fn, _) in steps.items()}, reps, sync)
        times.update({k: [] for k in tsteps})
        # PyTorch in its own phase: on CPU its OpenMP workers keep spinning
        # after each call and would steal the cores from the XLA runs that
        # follow (measured: jaxloss/optax ratios moved by up to 2x).
        for _ in range(reps):
            for key, (fn, tsync) in tsteps.items():
                t0 = time.perf_counter()
                fn()
                tsync()
                times[key].append(time.perf_counter() - t0)
        copy_ms = pct(times[("copy", "copy")])["p50"]
        ref_v, ref_g = results[(ref, "fwdbwd")]
        case_rows = []
        for (iname, mode), ts in times.items():
            if mode == "copy":
                continue
            st = pct(ts)
            row = {
                "case": name,
                "shape": list(shape),
                "dtype": dtype,
                "axis": ax,
                "bytes": int(nbytes),
                "impl": iname,
                "mode": mode,
                "reduction": args.reduction,
                "targets": "probabilities" if args.soft else "indices",
                "label_smoothing": ls,
                **st,
                "copy_ms": copy_ms,
                "floor": copy_ms / st["p50"],
            }
            temp = steps.get((iname, mode), (None, None))[1]
            if temp is not None:
                row["temp_bytes"] = temp
                row["temp_pct_of_logits"] = 100.0 * temp / nbytes if temp >= 0 else None
            if (iname, mode) in results and mode == "fwdbwd":
                v, g = results[(iname, mode)]
                row["loss"] = float(v)
                row[f"loss_diff_vs_{ref}"] = float(abs(float(v) - float(ref_v)))
                row[f"grad_maxdiff_vs_{ref}"] = float(
                    jnp.max(jnp.abs(g.astype(jnp.float32) - ref_g.astype(jnp.float32)))
                )
            case_rows.append(row)
        for row in case_rows:
            if row["impl"].startswith("jaxloss"):
                same = [r for r in case_rows if r["mode"] == row["mode"]]
                peers = [r["p50"] for r in same if r["impl"] in PEERS]
                if peers:
                    row["speedup_vs_best_peer"] = min(peers) / row["p50"]
                opt = [r["p50"] for r in same if r["impl"] == "optax"]
                if opt:
                    row["speedup_vs_optax"] = opt[0] / row["p50"]
        for row in case_rows:
            print(json.dumps(row), flush=True)
        rows.extend(case_rows)
        if on_case is not None:
            on_case(rows)
        del data, results, steps, tsteps
    return rows


def torch_steps(torch, x, y, w, ax, dtype, gpu, reduction="mean", label_smoothing=0.0, soft=False):
    """PyTorch's steps; ``soft``: ``y`` are probability targets (the
    logits' layout, moved with them)."""
    import torch.nn.functional as F

    dev = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    xt = torch.from_numpy(np.array(x, np.float32)).to(tdt).to(dev)
    xc = xt.movedim(-1, 1) if ax == xt.dim() - 1 and xt.dim() > 2 else xt
    xc = xc.detach().requires_grad_(True)
    wt = torch.from_numpy(np.array(w)).to(dev).to(tdt if dtype != "float32" else torch.float32)
    ls = label_smoothing

    def tsync():
        if dev == "cuda":
            torch.cuda.synchronize()

    if soft:
        qt = torch.from_numpy(np.array(y, np.float32)).to(tdt).to(dev)
        qt = qt.movedim(-1, 1) if ax == qt.dim() - 1 and qt.dim() > 2 else qt

        def loss(a):
            return F.cross_entropy(a, qt, weight=wt, label_smoothing=ls)

    else:
        yt = torch.from_numpy(np.array(y).astype(np.int64)).to(dev)
        denom = wt[torch.where(yt == IGN, 0, yt)].masked_fill(yt == IGN, 0).sum()

        def loss(a):
            kw = dict(weight=wt, ignore_index=IGN, label_smoothing=ls)
            if reduction == "none":
                return F.cross_entropy(a, yt, reduction="none", **kw).sum() / denom
            return F.cross_entropy(a, yt, **kw)

    def eager_fwdbwd():
        xc.grad = None
        loss(xc).backward()

    def eager_fwd():
        with torch.no_grad():
            loss(xc)

    out = {
        ("torch_eager", "fwdbwd"): (eager_fwdbwd, tsync),
        ("torch_eager", "fwd"): (eager_fwd, tsync),
    }
    if dev == "cuda":
        cfn = torch.compile(loss)

        def compiled():
            xc.grad = None
            cfn(xc).backward()

        out[("torch_compile", "fwdbwd")] = (compiled, tsync)
    return out


def source_digest() -> str:
    """sha256 (first 12 hex) of the library and benchmark sources as they ran:
    traceable even where the checkout's git metadata is stale or absent."""
    import hashlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for sub in ("jaxloss", "benchmarks"):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, sub))):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as fh:
                        h.update(fh.read())
    return h.hexdigest()[:12]


def environment() -> dict:
    import jax

    env = {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "commit": _commit(),
        "source_sha256": source_digest(),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    try:
        from jaxloss._kernels import cross_entropy as ce

        env["kernel_tuned"] = {repr(k): v for k, v in ce._TUNED.items()}
    except Exception:
        pass
    for mod in ("jaxlib", "optax", "flax", "torch"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def write(rows, env, out_dir, tag, stamp=None):
    os.makedirs(out_dir, exist_ok=True)
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev = env["device"].replace(" ", "_").replace("/", "_")
    base = os.path.join(out_dir, f"bench-{tag}-{dev}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(base + ".csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["device", "jax", "commit", *keys])
        wr.writeheader()
        for r in rows:
            wr.writerow({"device": env["device"], "jax": env["jax"], "commit": env["commit"], **r})
    print("wrote", base + ".json", file=sys.stderr)
    return base


def main(argv=None):
    args = parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    tag = ("small" if args.small else "full") + ("-none" if args.reduction == "none" else "")
    tag += ("-soft" if args.soft else "") + (
        f"-ls{args.label_smoothing:g}" if args.label_smoothing else ""
    )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    # Rewritten after every case: a run cut short keeps the cases it finished.
    rows = run(args, on_case=lambda rows: write(rows, environment(), out, tag, stamp))
    write(rows, environment(), out, tag, stamp)
    return rows


if __name__ == "__main__":
    main()
