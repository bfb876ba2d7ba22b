"""Segmentation metrics from a confusion matrix that skips void pixels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels, preds, num_classes: int, ignore_index: int = 255) -> jax.Array:
    """``cm[t, p]``: number of pixels of true class ``t`` predicted as ``p``.

    Pixels whose label is ``ignore_index`` are skipped; int32, shape ``(C, C)``.
    Works under ``jit`` (and on sharded arrays: the scatter-add is summed
    across devices by the compiler).
    """
    t = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
    p = jnp.asarray(preds).reshape(-1).astype(jnp.int32)
    valid = (t != ignore_index) & (t >= 0) & (t < num_classes)
    # Skipped pixels scatter out of range and are dropped.
    idx = jnp.where(valid, t * num_classes + p, num_classes * num_classes)
    flat = jnp.zeros(num_classes * num_classes, jnp.int32).at[idx].add(1, mode="drop")
    return flat.reshape(num_classes, num_classes)


def metrics_from_confusion(cm) -> dict:
    """Per-class IoU, mIoU and pixel accuracy from ``cm[true, pred]``.

    ``IoU_c = TP / (TP + FP + FN)``. A class that is neither present nor
    predicted has an undefined IoU (NaN) and is left out of the mean.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = cm.sum()
    return {
        "per_class_iou": iou,
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
    }
