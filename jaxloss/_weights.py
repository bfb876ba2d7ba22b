"""Class-weight helpers: per-class weights from label frequencies.

The weights feed the ``weight=`` argument of :func:`jaxloss.cross_entropy`
(and the modules built on it) to counter class imbalance, e.g. in semantic
segmentation where the background dominates.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxloss import _checks

METHODS = ("inverse", "median", "enet")

# ENet's constant: 1 / ln(c + p) with c = 1.02 bounds every weight by
# 1 / ln(1.02) ~= 50.5 (Paszke et al., 2016).
_ENET_C = 1.02


def class_weights(
    labels: Any,
    num_classes: int,
    *,
    method: str = "inverse",
    ignore_index: int | None = None,
) -> jax.Array:
    r"""Per-class weights from the label frequencies of ``labels``.

    With ``n_c`` the number of positions labelled ``c`` (positions equal to
    ``ignore_index`` are not counted), ``N = \sum_c n_c`` and
    ``f_c = n_c / N``:

    .. math::

        \text{inverse:}\quad w_c = \frac{N}{C \, n_c} \qquad
        \text{median:}\quad w_c = \frac{\operatorname{median}_k f_k}{f_c} \qquad
        \text{enet:}\quad w_c = \frac{1}{\ln(1.02 + f_c)}

    ``"inverse"`` is the common "balanced" rule (scikit-learn's
    ``compute_class_weight("balanced")``): a uniform label distribution gets
    all-ones weights. ``"median"`` is median-frequency balancing, the median
    taken over the classes present in ``labels`` (for an even number of them,
    the mean of the two middle frequencies, as :func:`numpy.median`).
    ``"enet"`` is ENet's bounded rule, every weight in ``(1.0, 50.5]``.

    Classes absent from ``labels`` (``n_c = 0``) get a finite weight:

    - ``"inverse"`` and ``"median"``: the largest weight of a present class,
      i.e. an unseen class is weighted like the rarest seen one;
    - ``"enet"``: the rule's own value at ``f_c = 0``, ``1 / ln(1.02) ~= 50.50``.

    When nothing is counted at all (empty ``labels`` or every position
    ignored), every weight is 1.0.

    Args:
      labels: integer class indices of any shape and integer dtype (uint8
        segmentation masks with ``255`` as void work).
      num_classes: the number of classes ``C``, a positive Python int (static
        under ``jit``).
      method: ``"inverse"``, ``"median"`` or ``"enet"``.
      ignore_index: a label value that is not counted (e.g. ``255`` for void);
        ``None`` counts every position.

    Returns:
      float32 array of shape ``(C,)``.

    Raises:
      TypeError: ``labels`` is not an integer array, ``num_classes`` is not an
        int, or ``ignore_index`` is neither an int nor ``None``.
      ValueError: ``num_classes < 1``, an unknown ``method``, or a concrete
        label outside ``[0, C)`` that is not ``ignore_index``. Under ``jit``
        such a label makes every weight NaN instead (never silently dropped).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxloss
      >>> labels = jnp.array([0, 0, 0, 0, 0, 0, 1, 1, 255], dtype=jnp.uint8)
      >>> w = jaxloss.class_weights(labels, 3, ignore_index=255)
      >>> print(w)   # 8 / (3 * 6), 8 / (3 * 2); class 2 is absent
      [0.44444445 1.3333334  1.3333334 ]
      >>> print(jaxloss.class_weights(labels, 3, method="enet", ignore_index=255))
      [ 1.7513763  4.183805  50.498394 ]
      >>> f = jax.jit(jaxloss.class_weights,
      ...             static_argnames=("num_classes", "method", "ignore_index"))
      >>> print(f(labels, num_classes=3, method="median", ignore_index=255))
      [0.6666667 2.        2.       ]
    """
    arr = jnp.asarray(labels)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"labels must be an integer array of class indices (any integer dtype, "
            f"uint8 masks included); got dtype {arr.dtype}."
        )
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(
            f"num_classes must be a Python int (static under jit); got "
            f"{_checks._describe(num_classes)}."
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive int; got {num_classes}.")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of 'inverse', 'median' or 'enet'; got {method!r}.")
    ignore_index = _checks.check_ignore_index(ignore_index)
    num_classes = int(num_classes)
    if not isinstance(arr, jax.core.Tracer):
        _check_label_values(np.asarray(arr), num_classes, ignore_index)
    return _class_weights_impl(
        arr, num_classes=num_classes, method=method, ignore_index=ignore_index
    )


def _check_label_values(t: np.ndarray, num_classes: int, ignore_index: int | None) -> None:
    bad = (t < 0) | (t >= num_classes)
    if ignore_index is not None:
        bad &= t != ignore_index
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"labels holds class index {int(t[index])} at position {index}, outside "
            f"[0, {num_classes}) for num_classes={num_classes} and not equal to "
            f"ignore_index={ignore_index!r} ({int(bad.sum())} such position(s))."
        )


@functools.partial(jax.jit, static_argnames=("num_classes", "method", "ignore_index"))
def _class_weights_impl(
    labels: jax.Array, *, num_classes: int, method: str, ignore_index: int | None
) -> jax.Array:
    # A signed type wide enough for uint8's 255 and ignore_index=-100.
    t = labels.reshape(-1).astype(jnp.int32)
    counted = jnp.ones(t.shape, bool) if ignore_index is None else t != ignore_index
    in_range = (t >= 0) & (t < num_classes)
    any_bad = jnp.any(counted & ~in_range)
    # Uncounted positions scatter to index C, which mode="drop" discards.
    idx = jnp.where(counted & in_range, t, num_classes)
    counts = jnp.zeros(num_classes, jnp.int32).at[idx].add(1, mode="drop")

    n = counts.astype(jnp.float32)
    total = jnp.sum(n)
    present = counts > 0
    freq = n / jnp.where(total > 0, total, 1.0)
    safe_n = jnp.where(present, n, 1.0)
    if method == "inverse":
        w = total / (num_classes * safe_n)
    elif method == "median":
        median = jnp.nanmedian(jnp.where(present, freq, jnp.nan))
        w = median / jnp.where(present, freq, 1.0)
    else:  # "enet": finite at f = 0 by construction
        w = 1.0 / jnp.log(_ENET_C + freq)
    if method != "enet":
        # Absent classes: the largest weight of a present class.
        w_max = jnp.max(jnp.where(present, w, -jnp.inf))
        w = jnp.where(present, w, w_max)
    w = jnp.where(total > 0, w, jnp.ones_like(w))
    return jnp.where(any_bad, jnp.full_like(w, jnp.nan), w).astype(jnp.float32)
