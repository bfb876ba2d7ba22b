"""GSPMD partitioning of the kernel call: ``jit`` with sharded logits.

A ``pallas_call`` is an opaque custom call to XLA's SPMD partitioner, which
replicates its operands: under ``jax.jit`` with batch-sharded logits every
device would all-gather the whole batch and compute the whole loss. The
kernel's work is independent per position, so :func:`by_position` wraps it
in ``custom_partitioning``: each device runs the kernel on its own positions
and a summed output is reduced across the position axes with ``psum``.
Logits sharded along the classes are resharded to whole rows of fewer
positions per device (see :func:`_plan`).

Where there is nothing to partition (one device, or inside a ``shard_map``
that made every mesh axis manual) JAX inlines the call unchanged. Under
``vmap`` the call falls back to the kernel's own batching (no partitioning):
``custom_partitioning`` has no batching rule.
"""

from __future__ import annotations

import math
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Array = Any
# "x": the logits (class axis at ``axis``); "pos": shaped like the logits
# without the class axis; "rep": replicated (class weights, scalars);
# "sum" (outputs only): a scalar summed over every position.
Kind = Literal["x", "pos", "rep", "sum"]

try:
    from jax.custom_batching import custom_vmap
    from jax.experimental.custom_partitioning import custom_partitioning
except ImportError:  # pragma: no cover - a JAX without them: no partitioning
    custom_partitioning = None  # type: ignore[assignment]


def _axis_names(entry: Any) -> tuple[Any, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _replicated(sharding: Any) -> Any:
    """A replicated sharding over ``sharding``'s devices (a ``GSPMDSharding``,
    which JAX passes when no mesh is known)."""
    from jax._src.sharding_impls import GSPMDSharding

    return GSPMDSharding.get_replicated(sharding._device_assignment)


def _plan(sharding: Any, shape: tuple[int, ...], axis: int) -> tuple[P, P, tuple[Any, ...]] | None:
    """``(x spec, position spec, mesh axes of the positions)`` for logits of
    ``shape`` sharded by ``sharding``, the class axis replicated; None when the
    sharding names no mesh axes (a ``GSPMDSharding``: then replicate).

    The kernel needs whole rows. Logits sharded along the classes (a
    vocabulary-parallel LM head) are not gathered whole onto every device:
    the class axis's mesh axes move to the first position dimension whose
    size their product divides, so each device gets whole rows of a share of
    the positions (an all-to-all; memory and work stay split). If none
    divides, the classes are gathered. A dimension its mesh axes do not
    divide evenly is gathered too (XLA pads uneven shards).
    """
    if not isinstance(sharding, NamedSharding):
        return None
    ndim = len(shape)
    sizes = dict(sharding.mesh.shape)
    spec = [_axis_names(e) for e in sharding.spec] + [()] * (ndim - len(sharding.spec))
    for d in range(ndim):
        # An uneven split (XLA pads the last shard) would feed the padding to
        # the kernel as positions: such a dimension is gathered instead.
        if shape[d] % math.prod(sizes[n] for n in spec[d]):
            spec[d] = ()
    moved, spec[axis] = spec[axis], ()
    if moved:
        for d in range(ndim):
            if d == axis:
                continue
            ways = math.prod(sizes[n] for n in spec[d] + moved)
            if shape[d] % ways == 0:
                spec[d] = spec[d] + moved
                break
    pos = spec[:axis] + spec[axis + 1 :]
    names = tuple(n for e in pos for n in e)

    def entry(e: tuple[Any, ...]) -> Any:
        return None if not e else (e[0] if len(e) == 1 else e)

    return P(*map(entry, spec)), P(*map(entry, pos)), names


def _rule(ranks: Sequence[int], in_kinds: Sequence[Kind], out_kinds: Sequence[Kind], axis: int):
    """The Shardy rule: positions are passthrough factors, the class axis must
    be replicated, summed outputs are scalars."""
    ndim = ranks[0]
    letters = [f"p{string.ascii_lowercase[i]}" for i in range(ndim - 1)]
    x_f = letters[:axis] + ["k"] + letters[axis:]

    def factors(kind: Kind, rank: int) -> str:
        if kind == "x":
            return " ".join(x_f)
        if kind == "pos":
            return " ".join(letters)
        if kind == "rep" and rank == 1:
            return "k"
        return ""

    ins = ", ".join(factors(k, r) for k, r in zip(in_kinds, ranks, strict=True))
    outs = ", ".join(factors(k, 0) for k in out_kinds)
    return f"{ins} -> {outs}", {"need_replication_factors": ("k",)}


def by_position(
    fn: Callable[..., tuple[Array, ...]],
    args: Sequence[Array | None],
    in_kinds: Sequence[Kind],
    out_kinds: Sequence[Kind],
    axis: int,
) -> tuple[Array, ...]:
    """``fn(*args)``, partitioned over positions under GSPMD ``jit``.

    ``args[0]`` is the logits (kind "x"); a None argument is passed on as
    None; every "rep" argument is a scalar or a vector along the classes.
    ``fn`` returns a tuple whose entries have ``out_kinds``; a "sum" output
    is reduced across the devices that hold different positions.
    """
    if custom_partitioning is None:
        return tuple(fn(*args))
    present = [i for i, a in enumerate(args) if a is not None]
    arrays = [args[i] for i in present]
    in_kinds = tuple(in_kinds[i] for i in present)
    out_kinds = tuple(out_kinds)
    shape = tuple(arrays[0].shape)
    axis = axis % len(shape)

    def run(*a: Array) -> tuple[Array, ...]:
        full: list[Array | None] = [None] * len(args)
        for i, v in zip(present, a, strict=True):
            full[i] = v
        return tuple(fn(*full))

    def shardings(mesh: Any, x_sharding: Any) -> tuple[list[Any], list[Any], tuple[Any, ...]]:
        plan = _plan(x_sharding, shape, axis)
        if plan is None:  # no mesh to name axes by: replicate, XLA's default
            rep = _replicated(x_sharding)
            return [rep] * len(in_kinds), [rep] * len(out_kinds), ()
        x_spec, pos_spec, names = plan
        by_kind = {"x": x_spec, "pos": pos_spec, "rep": P(), "sum": P()}
        ins = [NamedSharding(mesh, by_kind[k]) for k in in_kinds]
        outs = [NamedSharding(mesh, by_kind[k]) for k in out_kinds]
        return ins, outs, names

    def infer(mesh, arg_shapes, result_shape):
        return tuple(shardings(mesh, arg_shapes[0].sharding)[1])

    def partition(mesh, arg_shapes, result_shape):
        ins, outs, names = shardings(mesh, arg_shapes[0].sharding)

        def lower(*local: Array) -> tuple[Array, ...]:
            res = run(*local)
            if not names:
                return res
            return tuple(
                jax.lax.psum(r, names) if k == "sum" else r
                for r, k in zip(res, out_kinds, strict=True)
            )

        return mesh, lower, tuple(outs), tuple(ins)

    rule, rule_kw = _rule(tuple(a.ndim for a in arrays), in_kinds, out_kinds, axis)

    @custom_partitioning
    def call(*a: Array) -> tuple[Array, ...]:
        return run(*a)

    try:
        call.def_partition(
            partition=partition,
            infer_sharding_from_operands=infer,
            propagate_user_sharding=None,
            sharding_rule=rule,
            **rule_kw,
        )
    except (TypeError, ValueError) as err:  # a JAX whose API moved
        # The kernel still runs, as XLA partitions any custom call (replicated).
        warnings.warn(
            f"jaxloss: cannot partition the GPU kernel with this JAX ({err}); under a "
            "sharded jit it runs on gathered inputs. shard_map with axis_name= avoids that.",
            RuntimeWarning,
            stacklevel=2,
        )
        return tuple(run(*arrays))

    @custom_vmap
    def unbatched(*a: Array) -> tuple[Array, ...]:
        return call(*a)

    @unbatched.def_vmap
    def _vmap_rule(axis_size, in_batched, *a):
        # custom_partitioning has no batching rule: the kernel's own, unpartitioned.
        in_axes = tuple(0 if b else None for b in in_batched)
        out = jax.vmap(run, in_axes=in_axes)(*a)
        return out, (True,) * len(out)

    return tuple(unbatched(*arrays))
