"""Flax linen modules: stateless shells over :mod:`jaxloss`'s functions."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxloss._losses import log_softmax
from jaxloss._shells import call_cross_entropy, call_nll_loss


class NLLLoss(nn.Module):
    """Negative log-likelihood loss module; see :func:`jaxloss.nll_loss`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> import jaxloss
      >>> loss_fn = jaxloss.NLLLoss(reduction="sum")
      >>> log_probs = jnp.array([[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]])
      >>> print(f"{loss_fn.apply({}, log_probs, jnp.array([0, 1])):.2f}")
      -1.80

    Attributes:
      weight: optional per-class weights, shape ``(C,)`` (a tuple or an array).
      ignore_index: target value that contributes nothing; ``None`` for none.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      axis: the class axis of the inputs (-1: channels-last).
      axis_name: named axis for a global mean under ``shard_map``/``pmap``.
    """

    weight: Any = None
    ignore_index: int | None = -100
    reduction: str = "mean"
    axis: int = -1
    axis_name: Any = None

    def __call__(self, inputs: Any, targets: Any, *, where: Any = None) -> jax.Array:
        return call_nll_loss(self, inputs, targets, where)


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy module; see :func:`jaxloss.cross_entropy`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> import jaxloss
      >>> loss_fn = jaxloss.CrossEntropyLoss(ignore_index=255, label_smoothing=0.1)
      >>> logits = jnp.zeros((2, 4, 4, 3))          # channels-last (N, H, W, C)
      >>> labels = jnp.zeros((2, 4, 4), jnp.uint8)
      >>> print(f"{loss_fn.apply({}, logits, labels):.4f}")   # log(3)
      1.0986

    Attributes:
      weight: optional per-class weights, shape ``(C,)``.
      ignore_index: target value that contributes nothing; ``None`` for none.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: PyTorch's label smoothing, in ``[0, 1]``.
      axis: the class axis of the logits (-1: channels-last).
      axis_name: named axis for a global mean under ``shard_map``/``pmap``.
    """

    weight: Any = None
    ignore_index: int | None = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    axis: int = -1
    axis_name: Any = None

    def __call__(self, inputs: Any, targets: Any, *, where: Any = None) -> jax.Array:
        return call_cross_entropy(self, inputs, targets, where)


class LogSoftmax(nn.Module):
    """Log-softmax over ``axis``; see :func:`jaxloss.log_softmax`.

    Example usage::

      >>> import jax.numpy as jnp
      >>> import jaxloss
      >>> jaxloss.LogSoftmax().apply({}, jnp.array([0.0, 0.0]))
      Array([-0.6931472, -0.6931472], dtype=float32)

    Attributes:
      axis: the axis to normalise over (-1: channels-last).
    """

    axis: int = -1

    def __call__(self, x: Any) -> jax.Array:
        return log_softmax(x, axis=self.axis)


__all__ = ["CrossEntropyLoss", "LogSoftmax", "NLLLoss"]
