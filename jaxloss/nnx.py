"""Flax NNX modules: stateless shells over :mod:`jaxloss`'s functions.

The NNX counterparts of :mod:`jaxloss.linen`'s modules, with the same
configuration and the same call: ``loss(inputs, targets, where=None)``.
Configuration is checked when the module is built. A ``weight`` given as an
array is kept as an array attribute, which NNX treats as state but not as an
:class:`flax.nnx.Param`, so optimizers and ``nnx.grad`` (``wrt=nnx.Param``)
leave it alone (PyTorch keeps it as a buffer); a tuple is kept as static
configuration. Tested with flax 0.12.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxloss import _checks
from jaxloss._losses import log_softmax
from jaxloss._shells import call_cross_entropy, call_nll_loss

# Marks an attribute as pytree data (flax >= 0.11, tested with 0.12); an older
# flax applies its own rule for array attributes (untested here).
_as_data = getattr(nnx, "data", lambda value: value)


def _weight(weight: Any) -> Any:
    """``None``, a tuple (static), or an array (NNX state; lists and NumPy
    arrays become JAX arrays). Its shape and values are checked at call time,
    against the inputs' classes."""
    if weight is None or isinstance(weight, tuple):
        return weight
    return _as_data(jnp.asarray(weight))


class NLLLoss(nnx.Module):
    """Negative log-likelihood loss module; see :func:`jaxloss.nll_loss`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from jaxloss import nnx as jnnx
      >>> loss_fn = jnnx.NLLLoss(reduction="sum")
      >>> log_probs = jnp.array([[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]])
      >>> print(f"{loss_fn(log_probs, jnp.array([0, 1])):.2f}")
      -1.80

    Attributes:
      weight: optional per-class weights, shape ``(C,)`` (a tuple or an array).
      ignore_index: target value that contributes nothing; ``None`` for none.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      axis: the class axis of the inputs (-1: channels-last).
      axis_name: named axis for a global mean under ``shard_map``/``pmap``.
    """

    def __init__(
        self,
        weight: Any = None,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        axis: int = -1,
        axis_name: Any = None,
    ) -> None:
        self.weight = _weight(weight)
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.reduction = _checks.check_reduction(reduction)
        self.axis = _checks.check_int(axis, "axis")
        self.axis_name = axis_name

    def __call__(self, inputs: Any, targets: Any, *, where: Any = None) -> jax.Array:
        return call_nll_loss(self, inputs, targets, where)


class CrossEntropyLoss(nnx.Module):
    """Softmax cross-entropy module; see :func:`jaxloss.cross_entropy`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from jaxloss import nnx as jnnx
      >>> loss_fn = jnnx.CrossEntropyLoss(ignore_index=255, label_smoothing=0.1)
      >>> logits = jnp.zeros((2, 4, 4, 3))          # channels-last (N, H, W, C)
      >>> labels = jnp.zeros((2, 4, 4), jnp.uint8)
      >>> print(f"{loss_fn(logits, labels):.4f}")   # log(3)
      1.0986

    Attributes:
      weight: optional per-class weights, shape ``(C,)`` (a tuple or an array).
      ignore_index: target value that contributes nothing; ``None`` for none.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: PyTorch's label smoothing, in ``[0, 1]``.
      axis: the class axis of the logits (-1: channels-last).
      axis_name: named axis for a global mean under ``shard_map``/``pmap``.
    """

    def __init__(
        self,
        weight: Any = None,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        axis: int = -1,
        axis_name: Any = None,
    ) -> None:
        self.weight = _weight(weight)
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.reduction = _checks.check_reduction(reduction)
        self.label_smoothing = _checks.check_label_smoothing(label_smoothing)
        self.axis = _checks.check_int(axis, "axis")
        self.axis_name = axis_name

    def __call__(self, inputs: Any, targets: Any, *, where: Any = None) -> jax.Array:
        return call_cross_entropy(self, inputs, targets, where)


class LogSoftmax(nnx.Module):
    """Log-softmax over ``axis``; see :func:`jaxloss.log_softmax`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> from jaxloss import nnx as jnnx
      >>> jnnx.LogSoftmax()(jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)

    Attributes:
      axis: the axis to normalise over (-1: channels-last).
    """

    def __init__(self, axis: int = -1) -> None:
        self.axis = _checks.check_int(axis, "axis")

    def __call__(self, x: Any) -> jax.Array:
        return log_softmax(x, axis=self.axis)


__all__ = ["CrossEntropyLoss", "LogSoftmax", "NLLLoss"]
