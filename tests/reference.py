"""An independent NumPy float64 reference for ``nll_loss`` / ``cross_entropy``.

Written from the maths (PyTorch's documented semantics), not from jaxloss: it
moves the class axis last, flattens the positions, builds explicit one-hots
and loops over nothing clever. It returns the loss *and* its analytic gradient
with respect to the input, for a given cotangent.

Notation: ``x`` the input (logits or log-probabilities), ``t`` the class index
at a position, ``w`` the class weights (ones when absent), ``eps`` the label
smoothing, ``C`` the number of classes, ``p = softmax(x)``.

Index targets, per valid position (not ``ignore_index``, not masked out)::

    l = (1 - eps) w_t (-log p_t) + eps / C * sum_c w_c (-log p_c)
    dl/dx_c = (1 - eps) w_t (p_c - [c == t]) + eps / C * (W p_c - w_c),  W = sum_c w_c

(for NLL, ``-log p_c`` is ``-x_c`` and ``dl/dx_c = -w_t [c == t]``). A valid
position whose label lies outside ``[0, C)`` has a NaN loss and gradient.
``mean = sum_i l_i / sum_i w_{t_i}`` over valid positions.

Probability targets ``q``, with ``q' = (1 - eps) q + eps / C``::

    l = -sum_c w_c q'_c log p_c
    dl/dx_c = (sum_k w_k q'_k) p_c - w_c q'_c

and ``mean`` divides by the number of (unmasked) positions.

``mean`` over nothing is 0 with a zero gradient (jaxloss) or NaN
(``nan_if_empty=True``, PyTorch).
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    if x.size:
        m = np.where(np.isfinite(m), m, 0.0)
    return (x - m) - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def loss_and_grad(
    x,
    target,
    *,
    weight=None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int = -1,
    where=None,
    normalize: bool = True,
    cotangent=None,
    nan_if_empty: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and ``d(<cotangent, loss>)/dx`` in float64.

    ``normalize=True`` is cross-entropy (``x`` are logits), ``False`` is NLL
    (``x`` are log-probabilities). ``cotangent`` defaults to 1 (a scalar for
    ``"mean"``/``"sum"``, ones shaped like the loss for ``"none"``).
    """
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    num_classes = x.shape[axis]
    xl = np.moveaxis(x, axis, -1)  # (..., C)
    pos_shape = xl.shape[:-1]
    xf = xl.reshape(-1, num_classes)  # (P, C)
    n_pos = xf.shape[0]
    w = np.ones(num_classes) if weight is None else np.asarray(weight, np.float64)
    eps = float(label_smoothing)
    mask = (
        np.ones(n_pos, bool)
        if where is None
        else np.broadcast_to(np.asarray(where, bool), pos_shape).reshape(-1)
    )

    if normalize:
        logp = log_softmax(xf, axis=-1)
        p = np.exp(logp)
    else:
        logp = xf
        p = None

    target = np.asarray(target)
    soft = np.issubdtype(target.dtype, np.floating)
    if soft:
        assert normalize, "probability targets are for cross_entropy only"
        q = np.moveaxis(target.astype(np.float64), axis, -1).reshape(-1, num_classes)
        q = (1.0 - eps) * q + eps / num_classes
        wq = w * q  # (P, C)
        loss = -np.sum(wq * logp, axis=-1)
        grad = np.sum(wq, axis=-1, keepdims=True) * p - wq
        valid = mask
        denom_terms = valid.astype(np.float64)
    else:
        t = target.astype(np.int64).reshape(-1)
        valid = mask.copy()
        if ignore_index is not None:
            valid &= t != ignore_index
        in_range = (t >= 0) & (t < num_classes)
        t_safe = np.where(in_range, t, 0)
        onehot = (np.arange(num_classes) == t_safe[:, None]).astype(np.float64)  # (P, C)
        w_t = w[t_safe]
        nll_t = -logp[np.arange(n_pos), t_safe]
        loss = (1.0 - eps) * w_t * nll_t
        if normalize:
            grad = (1.0 - eps) * w_t[:, None] * (p - onehot)
        else:
            grad = -w_t[:, None] * onehot
        if eps > 0.0:
            loss = loss + eps / num_classes * np.sum(w * -logp, axis=-1)
            grad = grad + eps / num_classes * (np.sum(w) * p - w)
        bad = valid & ~in_range
        loss = np.where(bad, np.nan, loss)
        grad = np.where(bad[:, None], np.nan, grad)
        denom_terms = np.where(valid, w_t, 0.0)

    loss = np.where(valid, loss, 0.0)
    grad = np.where(valid[:, None], grad, 0.0)

    if reduction == "none":
        out = loss.reshape(pos_shape)
        g = np.ones(pos_shape) if cotangent is None else np.asarray(cotangent, np.float64)
        g = np.broadcast_to(g, pos_shape).reshape(-1)
    elif reduction in ("sum", "mean"):
        ct = 1.0 if cotangent is None else float(cotangent)
        total = np.sum(loss)
        if reduction == "sum":
            out = np.asarray(total)
            g = np.full(n_pos, ct)
        else:
            denom = np.sum(denom_terms)
            if denom == 0:
                # Nothing to average: jaxloss gives 0 with a zero gradient; with
                # nan_if_empty (PyTorch) the loss is NaN and the gradient is
                # not compared.
                out = np.asarray(np.nan if nan_if_empty else 0.0)
                g = np.zeros(n_pos)
            else:
                out = np.asarray(total / denom)
                g = np.full(n_pos, ct / denom)
    else:
        raise ValueError(reduction)

    dx = (g[:, None] * grad).reshape(*pos_shape, num_classes)
    return out, np.moveaxis(dx, -1, axis)
