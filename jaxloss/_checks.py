"""Argument validation shared by every public surface.

Everything here runs at trace time on shapes and dtypes, except
:func:`check_target_values`, which looks at label values only when they are
concrete (not traced) and is a no-op under ``jit``/``vmap``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def _describe(x: Any) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return f"an array of shape {tuple(shape)} and dtype {dtype}"
    return f"{type(x).__name__} {x!r}"


def check_reduction(reduction: Any) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean' or 'sum'; got {reduction!r}.")
    return reduction


def check_label_smoothing(label_smoothing: Any) -> float:
    if isinstance(label_smoothing, jax.core.Tracer):
        raise TypeError(
            "label_smoothing must be a Python float (it is a compile-time constant); "
            "got a traced value. Pass it as a static argument."
        )
    try:
        value = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(
            f"label_smoothing must be a float in [0.0, 1.0]; got {_describe(label_smoothing)}."
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0.0, 1.0]; got {value!r}.")
    return value


def check_ignore_index(ignore_index: Any) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, (int, np.integer)
    ):
        raise TypeError(
            f"ignore_index must be a Python int or None; got {_describe(ignore_index)}."
        )
    return int(ignore_index)


def as_float_input(x: Any, name: str) -> jax.Array:
    """``jnp.asarray`` at the boundary; the input must be a floating array."""
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array (float16, bfloat16, float32 or "
            f"float64); got dtype {arr.dtype}."
        )
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis); got a scalar.")
    return arr


def check_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {_describe(value)}.")
    return int(value)


def canonical_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    axis = check_int(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name}={axis} is out of range for an input with {ndim} dimension(s); "
            f"expected {name} in [{-ndim}, {ndim - 1}]."
        )
    return int(axis) % ndim


def position_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def check_index_targets(
    targets: jax.Array, input_shape: tuple[int, ...], axis: int, input_name: str
) -> None:
    """Index targets must have the input's shape without the class axis."""
    expected = position_shape(input_shape, axis)
    if tuple(targets.shape) == expected:
        return
    msg = (
        f"targets must have the shape of {input_name} without its class axis "
        f"(axis={axis}, {input_name}.shape={tuple(input_shape)}), i.e. {expected}; "
        f"got targets.shape={tuple(targets.shape)}."
    )
    hints = [
        other
        for other in range(len(input_shape))
        if other != axis and position_shape(input_shape, other) == tuple(targets.shape)
    ]
    if hints:
        other = hints[0]
        if other == 1:
            msg += " It looks like a channels-first (PyTorch layout) input: pass axis=1."
        else:
            neg = other - len(input_shape)
            msg += f" The class axis looks like axis={neg}: pass axis={neg}."
    raise ValueError(msg)


def as_index_targets(targets: Any) -> jax.Array:
    arr = jnp.asarray(targets)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"targets must hold integer class indices (any integer dtype, uint8 masks "
            f"included); got dtype {arr.dtype}."
        )
    # 8- and 16-bit labels stay as they are: the core widens them where they
    # are used (jaxloss._losses._wide_labels), since a converted copy made
    # here would be a full-size int32 temporary. Wider ones become int32, or
    # int64 for 64-bit and uint32 labels under x64 (int32 labels stay int32).
    if arr.dtype.itemsize < 4 or arr.dtype == jnp.int32:
        return arr
    return arr.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)


def check_weight(weight: Any, num_classes: int, compute_dtype: Any) -> jax.Array | None:
    if weight is None:
        return None
    arr = jnp.asarray(weight)
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"weight must be a real-valued array; got dtype {arr.dtype}.")
    if arr.shape != (num_classes,):
        raise ValueError(
            f"weight must have shape (C,) = ({num_classes},), one entry per class; "
            f"got shape {tuple(arr.shape)}."
        )
    # Class weights are constants, as in PyTorch: no gradient flows into them.
    return jax.lax.stop_gradient(arr.astype(compute_dtype))


def check_where(where: Any, positions: tuple[int, ...]) -> jax.Array | None:
    if where is None:
        return None
    arr = jnp.asarray(where)
    if arr.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask; got dtype {arr.dtype}.")
    try:
        out_shape = np.broadcast_shapes(tuple(arr.shape), positions)
    except ValueError:
        out_shape = None
    if out_shape != positions:
        raise ValueError(
            f"where must be broadcastable to the targets' shape {positions}; "
            f"got where.shape={tuple(arr.shape)}."
        )
    return jnp.broadcast_to(arr, positions)


def check_soft_targets(targets: jax.Array, input_shape: tuple[int, ...], input_name: str) -> None:
    if tuple(targets.shape) != tuple(input_shape):
        raise ValueError(
            f"probability targets (a floating-point targets array) must have the same "
            f"shape as {input_name}, {tuple(input_shape)}; got targets.shape="
            f"{tuple(targets.shape)}. For class-index targets pass an integer array."
        )


def check_target_values(
    targets: jax.Array,
    num_classes: int,
    ignore_index: int | None,
    where: jax.Array | None,
) -> None:
    """Raise on out-of-range labels when they are concrete.

    Under ``jit``/``vmap`` the values are unknown; there the loss marks a bad
    label with NaN instead (see the ``Invalid labels`` section of the docs).
    """
    if isinstance(targets, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
        return
    t = np.asarray(targets).astype(np.int64)  # uint8 compared with 300 must not wrap
    bad = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        bad &= t != ignore_index
    if where is not None:
        bad &= np.asarray(where)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        value = int(t[index])
        raise ValueError(
            f"targets holds class index {value} at position {index}, outside [0, "
            f"{num_classes}) for C={num_classes} classes and not equal to "
            f"ignore_index={ignore_index!r} ({int(bad.sum())} such position(s))."
        )
