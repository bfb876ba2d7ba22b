"""Differential fuzzing of jaxloss: random configurations against PyTorch in
float64 (a developer's tool, not a test file; ``tests/test_fuzz_tool.py``
runs a few seeds of each mode to keep it working).

The library picks among many code paths by shape, dtype, class count, class
axis and options; the suite checks each path at chosen shapes. This draws
configurations across all of them (1-32003 classes around the paths'
thresholds, every class axis, float32/bfloat16/float16, index targets of
several integer dtypes, probability targets, NLL, class weights with zeros,
``ignore_index`` (also a class index), ``where``, label smoothing, every
reduction, logits with holes of -inf/+inf/NaN, up to 8M logits) and checks:

- ``oracle``: loss (under ``jit``, with and without the gradient) and the
  logits' gradient for a random cotangent, against PyTorch in float64, by
  PyTorch's NaN/inf pattern and within the dtype's tolerance, allowing only
  the README's deliberate differences (a mean over nothing is 0; an ignored
  or masked-out position has gradient 0 whatever its logits);
- ``invalid``: labels outside ``[0, C)`` under ``jit`` give NaN at exactly
  their positions (``"none"``), a NaN mean and sum, NaN gradient rows;
- ``transforms``: ``jvp``, forward-over-reverse and reverse-over-reverse
  Hessian-vector products and ``vmap`` against a plain ``jnp`` formulation.

``--kernel-interpret`` routes every call through the Pallas kernel in
interpret mode, as on a GPU (keep to small inputs: ``--max-logits 40000``);
on a GPU the kernel runs for real without it. Every failing seed is printed
with its configuration; ``--seed S --cases 1`` reruns one.

    PYTHONPATH=. python tests/fuzz.py --mode oracle --seconds 600
    PYTHONPATH=. python tests/fuzz.py --mode oracle --holes nan --seconds 300
    PYTHONPATH=. python tests/fuzz.py --mode invalid --small-threshold 0
    PYTHONPATH=. python tests/fuzz.py --mode oracle --kernel-interpret --max-logits 40000
"""

from __future__ import annotations

import argparse
import functools
import time
import traceback
from typing import Any

import ml_dtypes
import numpy as np

CLASSES = (1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 16, 17, 19, 20, 23, 24, 25, 32, 33, 34, 47,
           48, 49, 64, 100, 128, 150, 200, 201, 256, 257, 300, 512, 513, 600, 1000,
           1024, 4096, 20000, 32003)
DIMS = (1, 2, 3, 5, 7, 8, 16, 17, 32, 64, 128)
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
INT_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767),
             "int32": (-2**31, 2**31 - 1)}
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 1e-3, "float16": 1e-3}
GRAD_RTOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}
# Absolute, as the suite's (tests/oracles.py GRAD_TOL): an entry p - 1 with
# p close to 1 carries a few float32 ulps of 1 in any implementation.
GRAD_ATOL = {"float32": 5e-7, "bfloat16": 1e-5, "float16": 1e-6}


def draw(rng: np.random.Generator, max_logits: int, holes: float) -> dict:
    """One random configuration (plain values: printable, rerunnable)."""
    c = int(rng.choice(CLASSES))
    ndim = int(rng.choice([1, 2, 2, 3, 4, 4]))
    limit = max_logits if rng.random() < 0.15 else min(max_logits, 1 << 17)
    for _ in range(1000):
        other = [int(rng.choice(DIMS)) for _ in range(ndim - 1)]
        if ndim > 1 and rng.random() < 0.1:
            other[0] = int(rng.integers(1, 600))
        if c * int(np.prod(other)) <= limit:
            break
    else:
        c, other = 3, [1] * (ndim - 1)
    place = int(rng.integers(0, ndim))
    shape = tuple(other[:place] + [c] + other[place:])
    kind = str(rng.choice(["ce", "ce", "soft", "nll"]))
    return dict(
        shape=shape, axis=place - ndim if rng.random() < 0.3 else place,
        dtype=str(rng.choice(["float32", "float32", "bfloat16", "float16"])), kind=kind,
        reduction=str(rng.choice(["mean", "sum", "none"])), weighted=bool(rng.random() < 0.6),
        smoothing=0.0 if kind == "nll" else float(rng.choice([0.0, 0.0, 0.1, 0.5, 1.0])),
        ignore=str(rng.choice(["-100", "255", "none", "class"])),
        label_dtype=str(rng.choice(["int32", "int32", "uint8", "int16", "int8"])),
        far=bool(rng.random() < 0.3), where=bool(rng.random() < 0.2),
        holes=holes if rng.random() < 0.5 else 0.0,
    )


def make_case(cfg: dict, rng: np.random.Generator) -> dict:
    """Arrays of one configuration: logits (and their float64 values), index
    or probability targets, weights, ignore_index and the ``where`` mask."""
    shape, ndim = cfg["shape"], len(cfg["shape"])
    ax = cfg["axis"] % ndim
    c = shape[ax]
    pos = shape[:ax] + shape[ax + 1:]
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    if cfg["far"]:
        x.reshape(-1)[: max(1, x.size // 7)] += 60.0
    if cfg["holes"] and c > 1:
        rows = np.moveaxis(x, ax, -1)
        rows[rng.random(rows.shape) < 0.05] = cfg["hole_value"]
    x = x.astype(DTYPES[cfg["dtype"]])
    case = dict(x=x, x64=x.astype(np.float64), c=c, ax=ax, pos=pos, where=None, ignore=None)
    w = rng.uniform(0.5, 2.0, c).astype(np.float32) if cfg["weighted"] else None
    if w is not None and c > 2 and rng.random() < 0.3:
        w[rng.integers(0, c)] = 0.0
    case["w"] = w
    if cfg["kind"] == "soft":
        q = rng.random(shape).astype(np.float32) ** 3
        q = q / q.sum(axis=ax, keepdims=True) * (1.0 if rng.random() < 0.7 else 1.3)
        case["t"] = q.astype(DTYPES[cfg["dtype"]]) if rng.random() < 0.5 else q
        return case
    label_dtype = cfg["label_dtype"] if c <= INT_RANGE[cfg["label_dtype"]][1] else "int32"
    lo, hi = INT_RANGE[label_dtype]
    ignores = {"-100": -100, "255": 255, "none": None, "class": int(rng.integers(0, c))}
    ignore = ignores[cfg["ignore"]]
    if ignore is not None and not lo <= ignore <= hi:
        ignore = None
    t = rng.integers(0, c, size=pos)
    if ignore is not None:
        t = np.where(rng.random(pos) < 0.1, ignore, t)
    case["t"], case["ignore"] = t.astype(label_dtype), ignore
    if cfg["where"] and ndim > 1:
        case["where"] = rng.random(pos) < 0.8
    return case


def call_kwargs(cfg: dict, case: dict) -> dict:
    kw: dict[str, Any] = dict(axis=cfg["axis"], weight=case["w"], where=case["where"])
    if cfg["kind"] != "soft":
        kw["ignore_index"] = case["ignore"]
    if cfg["kind"] != "nll":
        kw["label_smoothing"] = cfg["smoothing"]
    return kw


def loss_fn(cfg: dict):
    import jaxloss

    return jaxloss.nll_loss if cfg["kind"] == "nll" else jaxloss.cross_entropy


def nothing_averaged_grad(cfg: dict, case: dict, t: np.ndarray, ignore: int) -> np.ndarray:
    """jaxloss's gradient of a mean over nothing (the README): 0, but NaN on
    the rows of counted targets (class weight 0) whose log-softmax is NaN (a
    NaN or +inf logit, or every logit -inf), as PyTorch's there (0 * NaN)."""
    ax, x64 = case["ax"], case["x64"]
    if cfg["kind"] == "nll":  # NLL's gradient does not read the logits
        return np.zeros_like(x64)
    rows = np.moveaxis(x64, ax, -1)
    bad = np.isnan(rows).any(-1) | np.isposinf(rows).any(-1) | np.isneginf(rows).all(-1)
    bad &= np.asarray(t).astype(np.int64) != ignore
    grad = np.where(bad[..., None], np.nan, np.zeros(rows.shape))
    return np.moveaxis(grad, -1, ax)


def readme_grad(cfg: dict, case: dict, t: np.ndarray, ignore: int, reduction: str,
                tg: np.ndarray) -> np.ndarray:
    """PyTorch's gradient ``tg`` of index targets ``t`` (the class axis
    ``case["ax"]``) with the README's deliberate differences: 0 on ignored
    rows (PyTorch: NaN on an ignored row of -inf), and a mean over nothing's
    gradient (:func:`nothing_averaged_grad`)."""
    from oracles import nothing_to_average

    ax, t = case["ax"], np.asarray(t).astype(np.int64)
    rows = np.moveaxis(tg, ax, -1).copy()
    rows[t == ignore] = 0.0
    tg = np.moveaxis(rows, -1, ax)
    if reduction == "mean" and nothing_to_average(t, case["w"], ignore, case["c"]):
        tg = nothing_averaged_grad(cfg, case, t, ignore)
    return tg


def pytorch(cfg: dict, case: dict, cot: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """PyTorch's float64 loss and gradient in jaxloss's layout (the suite's
    ``oracles.torch_loss_and_grad``), with the README's deliberate
    differences applied (None: PyTorch refuses)."""
    from oracles import nothing_to_average, to_torch_layout, torch_loss_and_grad

    ax, x64, c = case["ax"], case["x64"], case["c"]
    t, ignore = case["t"], case["ignore"]
    if cfg["kind"] == "soft":
        t = to_torch_layout(t, ax)
    else:
        # where=False is ignore_index; an ignore_index no label takes stands for None.
        ignore = -7777 if ignore is None else ignore
        t = t.astype(np.int64)
        if case["where"] is not None:
            t = np.where(case["where"], t, ignore)
    try:
        tl, tg = torch_loss_and_grad(
            to_torch_layout(x64, ax), t, cot, nll=cfg["kind"] == "nll", weight=case["w"],
            ignore_index=-100 if cfg["kind"] == "soft" else ignore,
            reduction=cfg["reduction"], label_smoothing=cfg["smoothing"],
        )
    except (RuntimeError, ValueError):
        return None
    tg = tg if x64.ndim == 1 else np.moveaxis(tg, 1, ax)
    if cfg["kind"] != "soft":
        tg = readme_grad(cfg, case, t, ignore, cfg["reduction"], tg)
        if cfg["reduction"] == "mean" and nothing_to_average(t, case["w"], ignore, c):
            tl = np.zeros_like(tl)  # a mean over nothing is 0
    return tl, tg


def compare(name: str, got: np.ndarray, want: np.ndarray, rtol: float, floor: float,
            atol: float = 1e-7) -> list:
    """Problems of ``got`` against ``want``: the same shape, the same NaN and
    +-inf pattern, and the finite values within ``rtol`` of the largest
    (at least ``floor``) plus ``atol``."""
    if np.shape(got) != np.shape(want):
        return [f"{name}: shape {np.shape(got)} != {np.shape(want)}"]
    signs = [np.where(np.isinf(a), np.sign(a), 0) for a in (got, want)]
    if not np.array_equal(*signs) or not np.array_equal(np.isnan(got), np.isnan(want)):
        return [f"{name}: NaN/inf pattern differs (jax {np.sum(~np.isfinite(got))}, "
                f"torch {np.sum(~np.isfinite(want))} non-finite)"]
    fin = np.isfinite(want)
    if not fin.any():
        return []
    scale = max(floor, float(np.max(np.abs(want[fin]))))
    err = float(np.max(np.abs(got[fin] - want[fin])))
    return [f"{name}: error {err:.3g} (scale {scale:.3g})"] if err > rtol * scale + atol else []


def check_oracle(cfg: dict, rng: np.random.Generator) -> list:
    import jax
    import jax.numpy as jnp

    case = make_case(cfg, rng)
    loss_shape = case["pos"] if cfg["reduction"] == "none" else ()
    cot = rng.uniform(0.5, 1.5, loss_shape).astype(np.float32)
    want = pytorch(cfg, case, cot)
    if want is None:
        return []
    fn, kw = loss_fn(cfg), call_kwargs(cfg, case)

    def f(x, t):
        return fn(x, t, reduction=cfg["reduction"], **kw)

    @jax.jit
    def with_grad(x, t):
        loss, vjp = jax.vjp(lambda x: f(x, t), x)
        return loss, vjp(jnp.asarray(cot))[0]

    loss, grad = with_grad(case["x"], case["t"])
    alone = jax.jit(f)(case["x"], case["t"])
    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    d = cfg["dtype"]
    return (compare("loss", as64(loss), want[0], LOSS_RTOL[d], 1.0)
            + compare("loss without gradient", as64(alone), want[0], LOSS_RTOL[d], 1.0)
            + compare("gradient", as64(grad), want[1], GRAD_RTOL[d], 1e-30, GRAD_ATOL[d]))


def check_invalid(cfg: dict, rng: np.random.Generator) -> list:
    import jax
    import jax.numpy as jnp

    if cfg["kind"] == "soft":
        cfg = dict(cfg, kind="ce")
    case = make_case(dict(cfg, holes=0.0, where=False), rng)
    t, c = case["t"], case["c"]
    lo, hi = INT_RANGE[str(t.dtype)]
    bad = [v for v in (c, c + 5, -1, -100, 255, 2**20, lo, hi)
           if lo <= v <= hi and v != case["ignore"] and not 0 <= v < c]
    if t.size < 2 or not bad:
        return []
    flat = t.reshape(-1)
    at = rng.choice(flat.size, int(rng.integers(1, min(4, flat.size))), replace=False)
    flat[at] = rng.choice(bad, at.size)
    is_bad = np.zeros(flat.size, bool)
    is_bad[at] = True
    is_bad = is_bad.reshape(t.shape)
    fn, kw = loss_fn(cfg), call_kwargs(cfg, case)
    problems = []
    none = np.asarray(jax.jit(lambda x, t: fn(x, t, reduction="none", **kw))(case["x"], t))
    if not np.all(np.isnan(none[is_bad])) or not np.all(np.isfinite(none[~is_bad])):
        problems.append("reduction='none': NaN not exactly at the invalid labels")
    for reduction in ("mean", "sum"):
        loss = jax.jit(lambda x, t: fn(x, t, reduction=reduction, **kw))(case["x"], t)  # noqa: B023
        if not np.isnan(float(loss)):
            problems.append(f"reduction={reduction!r}: {float(loss)}, not NaN")
        g = jax.jit(jax.grad(lambda x, t: jnp.sum(fn(x, t, reduction=reduction, **kw))))(  # noqa: B023
            case["x"], t)
        rows = np.moveaxis(np.asarray(g, np.float32), case["ax"], -1)
        if not np.isnan(rows[is_bad]).any(-1).all():
            problems.append(f"reduction={reduction!r}: an invalid label's gradient row without NaN")
        if reduction == "sum" and not np.isfinite(rows[~is_bad]).all():
            problems.append("reduction='sum': non-finite gradient at a valid label")
    return problems


def plain(cfg: dict, case: dict, x):
    """The loss by ``jax.nn.log_softmax`` and ``jnp`` sums (float32)."""
    import jax
    import jax.numpy as jnp

    c, eps = case["c"], cfg["smoothing"]
    rows = jnp.moveaxis(x.astype(jnp.float32), case["ax"], -1)
    w = jnp.ones(c) if case["w"] is None else jnp.asarray(case["w"])
    w_rows = w.reshape((1,) * (rows.ndim - 1) + (c,))
    logp = rows if cfg["kind"] == "nll" else jax.nn.log_softmax(rows, -1)
    if cfg["kind"] == "soft":
        q = (1 - eps) * jnp.moveaxis(jnp.asarray(case["t"], jnp.float32), case["ax"], -1) + eps / c
        loss = -jnp.sum(w_rows * q * logp, -1)
        count = jnp.asarray(loss.size, jnp.float32)
    else:
        t = jnp.asarray(case["t"], jnp.int32)
        valid = jnp.ones(t.shape, bool) if case["ignore"] is None else t != case["ignore"]
        if case["where"] is not None:
            valid = valid & jnp.asarray(case["where"])
        ts = jnp.where(valid, t, 0)
        w_t = jnp.where(valid, w[ts], 0.0)
        loss = (1 - eps) * w_t * -jnp.take_along_axis(logp, ts[..., None], -1)[..., 0]
        if eps:
            loss = loss + jnp.where(valid, eps / c * -jnp.sum(w_rows * logp, -1), 0.0)
        count = jnp.sum(w_t)
    if cfg["reduction"] == "none":
        return loss
    total = jnp.sum(loss)
    if cfg["reduction"] == "sum":
        return total
    return jnp.where(count != 0, total / jnp.where(count != 0, count, 1), 0.0)


def check_transforms(cfg: dict, rng: np.random.Generator) -> list:
    import jax
    import jax.numpy as jnp

    if np.prod(cfg["shape"]) > 20000:
        return []
    case = make_case(dict(cfg, dtype="float32", holes=0.0, far=False), rng)
    fn, kw = loss_fn(cfg), call_kwargs(cfg, case)
    pos_or_scalar = case["pos"] if cfg["reduction"] == "none" else ()
    cot = jnp.asarray(rng.uniform(0.5, 1.5, pos_or_scalar).astype(np.float32))
    v = jnp.asarray(rng.standard_normal(cfg["shape"]).astype(np.float32))
    t = case["t"]

    def f(x):
        return jnp.sum(fn(x, t, reduction=cfg["reduction"], **kw) * cot)

    def g(x):
        return jnp.sum(plain(cfg, case, x) * cot)

    x = jnp.asarray(case["x"])
    problems = []
    for name, transform, rtol in (
        ("jvp", lambda h: jax.jvp(h, (x,), (v,)), 2e-4),
        ("forward-over-reverse", lambda h: jax.jvp(jax.grad(h), (x,), (v,))[1], 1e-3),
        ("reverse-over-reverse",
         lambda h: jax.grad(lambda y: jnp.vdot(jax.grad(h)(y), v))(x), 1e-3),
    ):
        got, want = jax.jit(lambda: transform(f))(), jax.jit(lambda: transform(g))()  # noqa: B023
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            problems += compare(name, np.asarray(a, np.float64), np.asarray(b, np.float64),
                                rtol, 1e-6, GRAD_ATOL["float32"])
    xs = jnp.stack([x, x + 0.5 * v])
    batched = jax.jit(jax.vmap(jax.value_and_grad(
        lambda x, t: jnp.sum(fn(x, t, reduction=cfg["reduction"], **kw) * cot))))(
        xs, jnp.stack([jnp.asarray(t)] * 2))
    for i in range(2):
        for a, b in zip(batched, jax.value_and_grad(f)(xs[i]), strict=True):
            problems += compare(f"vmap {i}", np.asarray(a[i], np.float64),
                                np.asarray(b, np.float64), 2e-4, 1e-6, GRAD_ATOL["float32"])
    return problems


def compat_arguments(cfg: dict, case: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """Keyword arguments of a ``torch.nn.functional`` call (``reduction`` or
    the legacy ``size_average``/``reduce``, sometimes both; ``ignore_index``
    and ``label_smoothing`` when not the defaults, else half the time) and
    the reduction that PyTorch makes of them."""
    from torch.nn import _reduction

    kw: dict[str, Any] = {}
    if rng.random() < 0.5:
        kw["reduction"] = cfg["reduction"]
    else:
        kw["size_average"], kw["reduce"] = (
            [None, True, False][int(i)] for i in rng.integers(0, 3, 2))
        if rng.random() < 0.3:
            kw["reduction"] = cfg["reduction"]  # disregarded unless both are None
    legacy = kw.get("size_average") is not None or kw.get("reduce") is not None
    reduction = (_reduction.legacy_get_string(kw["size_average"], kw["reduce"], False)
                 if legacy else kw.get("reduction", "mean"))
    ignore = -100 if cfg["kind"] == "soft" or case["ignore"] is None else case["ignore"]
    if ignore != -100 or rng.random() < 0.5:
        kw["ignore_index"] = ignore
    if cfg["kind"] != "nll" and (cfg["smoothing"] or rng.random() < 0.5):
        kw["label_smoothing"] = cfg["smoothing"]
    return kw, reduction


def check_compat(cfg: dict, rng: np.random.Generator) -> list:
    """``jaxloss.torch_compat`` (a function or a loss class, eager and under
    ``jit``) against ``torch.nn.functional`` called with the same arguments,
    in PyTorch's layout (class dim 1, or 0 for 1-D): PyTorch's behaviour
    exactly, a mean over nothing NaN as in PyTorch."""
    import warnings

    import jax
    import jax.numpy as jnp
    from oracles import torch_loss_and_grad

    from jaxloss import torch_compat

    shape = list(cfg["shape"])
    c = shape.pop(cfg["axis"] % len(shape))
    shape.insert(min(1, len(shape)), c)
    dim = 0 if len(shape) == 1 else 1
    case = make_case(dict(cfg, shape=tuple(shape), axis=dim, where=False), rng)
    nll = cfg["kind"] == "nll"
    kw, reduction = compat_arguments(cfg, case, rng)
    if cfg["kind"] != "soft" and rng.random() < 0.2:
        # A mean over nothing: the counted targets' weights 0, or all ignored.
        t = case["t"]
        if case["w"] is not None and rng.random() < 0.5:
            case["w"] = case["w"].copy()
            case["w"][np.unique(t[(t >= 0) & (t < c)].astype(np.int64))] = 0.0
        elif case["ignore"] is not None:
            t[...] = case["ignore"]
    cot = rng.uniform(0.5, 1.5, case["pos"] if reduction == "none" else ()).astype(np.float32)
    legacy = {k: kw[k] for k in ("size_average", "reduce") if k in kw}
    ignore = kw.get("ignore_index", -100)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PyTorch's on size_average/reduce
            tl, tg = torch_loss_and_grad(
                case["x64"], case["t"], cot, nll=nll, weight=case["w"], ignore_index=ignore,
                reduction=kw.get("reduction", "mean"),
                label_smoothing=kw.get("label_smoothing", 0.0), legacy=legacy)
    except (RuntimeError, ValueError):
        return []
    if cfg["kind"] != "soft":  # case["ax"] is dim
        tg = readme_grad(cfg, case, case["t"], ignore, reduction, tg)
    want = tl, tg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if rng.random() < 0.3:
            fn = (torch_compat.NLLLoss if nll else torch_compat.CrossEntropyLoss)(
                weight=case["w"], **kw)
        else:
            fn = functools.partial(torch_compat.nll_loss if nll else torch_compat.cross_entropy,
                                   weight=case["w"], **kw)

        @jax.jit
        def with_grad(x, t):
            loss, vjp = jax.vjp(lambda x: fn(x, t), x)
            return loss, vjp(jnp.asarray(cot))[0]

        loss, grad = with_grad(case["x"], case["t"])
        alone, eager = jax.jit(fn)(case["x"], case["t"]), fn(case["x"], case["t"])
    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    d = cfg["dtype"]
    return (compare("loss", as64(loss), want[0], LOSS_RTOL[d], 1.0)
            + compare("loss without gradient", as64(alone), want[0], LOSS_RTOL[d], 1.0)
            + compare("loss, eager", as64(eager), want[0], LOSS_RTOL[d], 1.0)
            + compare("gradient", as64(grad), want[1], GRAD_RTOL[d], 1e-30, GRAD_ATOL[d]))


CHECKS = {"oracle": check_oracle, "invalid": check_invalid, "transforms": check_transforms,
          "compat": check_compat}


def route_through_kernel_interpreted() -> None:
    """Every call through the Pallas kernel in interpret mode, as on a GPU
    (the suite's ``kernel_everywhere`` fixture, for the whole process)."""
    from jaxloss import _kernels
    from jaxloss._kernels import cross_entropy as _ce

    _ce.cross_entropy_pallas = functools.partial(_ce.cross_entropy_pallas, interpret=True)
    _kernels.dispatch = lambda use, kernel, xla, *args: (kernel if use else xla)(*args)


def run(mode: str, seed: int, cases: int | None, seconds: float, max_logits: int,
        hole_value: float, out=print) -> tuple[int, list]:
    """Check configurations from ``seed`` on; returns (cases run, failing seeds)."""
    import jax

    check, start, failing, n = CHECKS[mode], time.time(), [], 0
    while (cases is None or n < cases) and time.time() - start < seconds:
        cfg = draw(np.random.default_rng(seed), max_logits, 0.05)
        cfg["hole_value"] = hole_value
        try:
            problems = check(cfg, np.random.default_rng([seed, 1]))
        except Exception:  # noqa: BLE001 - report and go on
            problems = [traceback.format_exc(limit=-4)]
        if problems:
            failing.append(seed)
            out(f"seed {seed} FAILED {cfg}\n  " + "\n  ".join(problems))
        n, seed = n + 1, seed + 1
        if n % 40 == 0:
            jax.clear_caches()  # bounded memory over long runs
    return n, failing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(CHECKS), default="oracle")
    p.add_argument("--seed", type=int, default=0, help="the first configuration's seed")
    p.add_argument("--cases", type=int, default=None, help="stop after this many")
    p.add_argument("--seconds", type=float, default=300.0, help="stop after this long")
    p.add_argument("--max-logits", type=int, default=1 << 23)
    p.add_argument("--holes", choices=["-inf", "inf", "nan"], default="-inf",
                   help="the value of the logits' holes (half the configurations have 5%%)")
    p.add_argument("--kernel-interpret", action="store_true",
                   help="through the Pallas kernel in interpret mode (CPU)")
    p.add_argument("--small-threshold", type=int, default=None,
                   help="set jaxloss._losses._CPU_SMALL_ELEMENTS (0: no input is small)")
    args = p.parse_args()
    if args.kernel_interpret:
        route_through_kernel_interpreted()
    if args.small_threshold is not None:
        from jaxloss import _losses

        _losses._CPU_SMALL_ELEMENTS = args.small_threshold
    n, failing = run(args.mode, args.seed, args.cases, args.seconds, args.max_logits,
                     float(args.holes))
    print(f"{n} configurations from seed {args.seed}, {len(failing)} failed: {failing}")
    raise SystemExit(1 if failing else 0)


if __name__ == "__main__":
    main()
