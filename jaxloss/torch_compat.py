"""``torch.nn.functional``-signature losses over the jaxloss core.

Code ported from PyTorch behaves identically: the class dimension is 1 (0 for
a 1-D input), the legacy ``size_average``/``reduce`` arguments map to
``reduction`` exactly as PyTorch maps them (with a deprecation warning), and
a mean over nothing (all targets ignored or of class weight 0, empty batch)
is NaN as in PyTorch. Gradients are PyTorch's except where PyTorch's are NaN
for rows that add nothing to the loss (an ignored row whose log-softmax is
NaN, the rows of such a mean whose log-softmax is finite): 0 there (see the
README's Semantics).
This module holds no loss maths: it only translates arguments.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxloss import torch_compat as F
  >>> log_probs = jnp.array([[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]])
  >>> print(f"{F.nll_loss(log_probs, jnp.array([0, 1])):.2f}")
  -0.90
  >>> F.nll_loss(log_probs, jnp.array([-100, -100]))   # PyTorch's NaN
  Array(nan, dtype=float32)
"""

from __future__ import annotations

import warnings
from typing import Any

import jax

from jaxloss import _checks
from jaxloss._losses import _loss
from jaxloss._losses import log_softmax as _log_softmax


def _legacy_reduction(size_average: Any, reduce: Any, reduction: str) -> str:
    """PyTorch's ``_Reduction.legacy_get_string``."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        ret = "mean"
    elif reduce:
        ret = "sum"
    else:
        ret = "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{ret}' instead.",
        DeprecationWarning,
        stacklevel=3,
    )
    return ret


def _class_dim(input: Any) -> int:
    ndim = getattr(input, "ndim", None)
    if ndim is None:
        ndim = jax.numpy.asarray(input).ndim
    return 0 if ndim == 1 else 1


def nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """``torch.nn.functional.nll_loss``: class dim 1 (0 for 1-D input).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxloss import torch_compat as F
      >>> log_probs = jnp.array([[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]])
      >>> print(f"{F.nll_loss(log_probs, jnp.array([0, 1]), reduction='sum'):.2f}")
      -1.80
    """
    return _loss(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=_legacy_reduction(size_average, reduce, reduction),
        label_smoothing=0.0,
        axis=_class_dim(input),
        where=None,
        axis_name=None,
        normalize=False,
        nan_if_empty=True,
    )


def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """``torch.nn.functional.cross_entropy``: class dim 1 (0 for 1-D input).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxloss import torch_compat as F
      >>> logits = jnp.zeros((2, 3, 4, 4))            # NCHW
      >>> print(f"{F.cross_entropy(logits, jnp.zeros((2, 4, 4), jnp.int32)):.4f}")
      1.0986
    """
    # As in PyTorch: probability targets take no ignore_index (rather than
    # silently disregarding one).
    if ignore_index != -100 and jax.numpy.issubdtype(
        jax.numpy.asarray(target).dtype, jax.numpy.floating
    ):
        raise ValueError(
            f"ignore_index is not supported for floating point target (probability "
            f"targets); got ignore_index={ignore_index!r}. Leave it at -100."
        )
    return _loss(
        input,
        target,
        weight=weight,
        ignore_index=ignore_index,
        reduction=_legacy_reduction(size_average, reduce, reduction),
        label_smoothing=label_smoothing,
        axis=_class_dim(input),
        where=None,
        axis_name=None,
        normalize=True,
        nan_if_empty=True,
    )


def log_softmax(input: Any, dim: int | None = None) -> jax.Array:
    """``torch.nn.functional.log_softmax`` (``dim=None``: PyTorch's legacy choice)."""
    if dim is None:
        ndim = jax.numpy.asarray(input).ndim
        dim = 0 if ndim in (0, 1, 3) else 1
        warnings.warn(
            "Implicit dimension choice for log_softmax has been deprecated. "
            "Change the call to include dim=X as an argument.",
            UserWarning,
            stacklevel=2,
        )
    return _log_softmax(input, axis=dim)


class NLLLoss:
    """``torch.nn.NLLLoss``: same constructor, called as ``loss(input, target)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxloss import torch_compat
      >>> loss = torch_compat.NLLLoss(weight=jnp.array([0.6, 0.2, 0.2]))
      >>> log_probs = jnp.array([[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]])
      >>> print(f"{loss(log_probs, jnp.array([0, 1])):.2f}")
      -0.75
    """

    def __init__(
        self,
        weight: Any = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        self.weight = weight
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.reduction = _checks.check_reduction(_legacy_reduction(size_average, reduce, reduction))

    def __call__(self, input: Any, target: Any) -> jax.Array:
        return nll_loss(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )

    forward = __call__


class CrossEntropyLoss:
    """``torch.nn.CrossEntropyLoss``: same constructor, called as ``loss(input, target)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxloss import torch_compat
      >>> loss = torch_compat.CrossEntropyLoss(label_smoothing=0.1)
      >>> print(f"{loss(jnp.zeros((2, 3)), jnp.array([0, 2])):.4f}")
      1.0986
    """

    def __init__(
        self,
        weight: Any = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        self.weight = weight
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.reduction = _checks.check_reduction(_legacy_reduction(size_average, reduce, reduction))
        self.label_smoothing = _checks.check_label_smoothing(label_smoothing)

    def __call__(self, input: Any, target: Any) -> jax.Array:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )

    forward = __call__


class LogSoftmax:
    """``torch.nn.LogSoftmax(dim)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxloss import torch_compat
      >>> torch_compat.LogSoftmax(dim=1)(jnp.zeros((1, 2)))
      Array([[-0.6931472, -0.6931472]], dtype=float32)
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def __call__(self, input: Any) -> jax.Array:
        return log_softmax(input, self.dim)

    forward = __call__


__all__ = [
    "CrossEntropyLoss",
    "LogSoftmax",
    "NLLLoss",
    "cross_entropy",
    "log_softmax",
    "nll_loss",
]
