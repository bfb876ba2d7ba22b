"""The example's figures: predictions.png and loss_curve.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# isort: split
import seg_data  # noqa: E402

# One colour per class (background dark grey), void drawn white.
PALETTE = np.array(
    [[40, 40, 40], [230, 159, 0], [86, 180, 233], [0, 158, 115], [213, 94, 0], [204, 121, 167]],
    np.uint8,
)
VOID_COLOUR = np.array([255, 255, 255], np.uint8)


def colourise(label: np.ndarray) -> np.ndarray:
    out = PALETTE[np.minimum(label, len(PALETTE) - 1)]
    out[label == seg_data.VOID] = VOID_COLOUR
    return out


def predictions_png(path: Path, images, labels, preds) -> None:
    """Rows: image / ground truth / prediction; one column per example."""
    n = len(images)
    fig, axes = plt.subplots(3, n, figsize=(1.25 * n, 4.3), squeeze=False)
    rows = [("image", images), ("ground truth", [colourise(y) for y in labels]),
            ("prediction", [colourise(p) for p in preds])]
    for r, (name, items) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(items[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=9)
    handles = [Patch(color=PALETTE[i] / 255, label=name)
               for i, name in enumerate(seg_data.CLASSES)]
    handles.append(Patch(facecolor="white", edgecolor="black", label="void (255)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1), pad=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def loss_curve_png(path: Path, losses, val_history) -> None:
    """Train loss (raw and smoothed) and validation mIoU against the step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8)
    k = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    if val_history:
        s, v = zip(*val_history, strict=True)
        ax2.plot(s, v, "o-", color="tab:red", label="val mIoU")
    ax2.set_ylabel("val mIoU", color="tab:red")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
