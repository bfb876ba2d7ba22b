"""A procedural semantic-segmentation dataset, generated in code.

Each image has a textured, noisy background and two to four shapes drawn on
top of each other with a random size, rotation and colour; later shapes
occlude earlier ones, but at most ``MAX_OVERLAP`` of a shape overlaps others.
The shape classes are deliberately imbalanced: circles and rectangles are
common, triangles less so, rings and crosses rare. As in
PASCAL VOC, the one-pixel inner border of every visible object is labelled
``VOID`` (255): those pixels are ambiguous and are ignored by the loss and
the metrics.

Everything is a pure function of ``(seed, split, index)``, so the data are
reproducible and the train/validation split is fixed.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("background", "circle", "rectangle", "triangle", "ring", "cross")
NUM_CLASSES = len(CLASSES)
VOID = 255
# Relative frequency of each shape class when a shape is drawn (sums to 1).
SHAPE_PROBS = {"circle": 0.38, "rectangle": 0.34, "triangle": 0.17, "ring": 0.06, "cross": 0.05}
RARE_CLASSES = ("ring", "cross")
MAX_OVERLAP = 0.2
_SPLITS = {"train": 0, "val": 1}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled ``cells x cells x 3`` uniform noise, values in [-1, 1]."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1, 3))
    pos = np.linspace(0.0, cells, size)
    i0 = np.minimum(pos.astype(int), cells - 1)
    f = (pos - i0)[:, None]
    rows = coarse[i0] * (1 - f[..., None]) + coarse[i0 + 1] * f[..., None]  # (size, c+1, 3)
    cols = rows[:, i0] * (1 - f.T[..., None]) + rows[:, i0 + 1] * f.T[..., None]
    return cols


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray):
    base = rng.uniform(0.15, 0.85, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5
    img = base + rng.uniform(-0.3, 0.3, 3) * ramp[..., None]
    kind = rng.integers(3)
    if kind == 0:  # blotches
        img = img + rng.uniform(0.05, 0.15) * _smooth_noise(rng, size, int(rng.integers(3, 8)))
    elif kind == 1:  # stripes
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4.0, 12.0) * size / 64
        wave = np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
        img = img + rng.uniform(0.04, 0.12) * wave[..., None] * rng.uniform(0.3, 1.0, 3)
    # kind == 2: plain gradient
    return img, base


def _rotated(yy, xx, cy, cx, angle):
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _shape_mask(rng: np.random.Generator, name: str, size: int, yy, xx) -> np.ndarray:
    cy, cx = rng.uniform(0.1, 0.9, 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    u, v = _rotated(yy, xx, cy, cx, angle)
    if name == "circle":
        r = rng.uniform(0.09, 0.2) * size
        return u * u + v * v <= r * r
    if name == "ring":
        r = rng.uniform(0.13, 0.22) * size
        inner = r * rng.uniform(0.45, 0.62)
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= inner * inner)
    if name == "rectangle":
        a = rng.uniform(0.1, 0.21) * size
        b = a * rng.uniform(0.35, 0.7)  # elongated: never mistaken for a circle
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if name == "cross":
        arm = rng.uniform(0.13, 0.22) * size
        half = arm * rng.uniform(0.3, 0.42)
        au, av = np.abs(u), np.abs(v)
        return ((au <= arm) & (av <= half)) | ((au <= half) & (av <= arm))
    if name == "triangle":
        r = rng.uniform(0.12, 0.23) * size
        phis = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        py, px = r * np.sin(phis), r * np.cos(phis)
        inside = np.ones(u.shape, bool)
        for k in range(3):  # counter-clockwise vertices: inside = left of every edge
            ex, ey = px[(k + 1) % 3] - px[k], py[(k + 1) % 3] - py[k]
            inside &= ex * (v - py[k]) - ey * (u - px[k]) >= 0
        return inside
    raise ValueError(f"unknown shape {name!r}")


def _void_border(label: np.ndarray) -> np.ndarray:
    """Object pixels whose 4-neighbourhood holds a different label."""
    pad = np.pad(label, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    differs = (
        (pad[:-2, 1:-1] != centre)
        | (pad[2:, 1:-1] != centre)
        | (pad[1:-1, :-2] != centre)
        | (pad[1:-1, 2:] != centre)
    )
    return differs & (label != 0)


def make_example(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image uint8 (H, W, 3), label uint8 (H, W))`` pair, fixed by its arguments."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img, base = _background(rng, size, yy, xx)
    label = np.zeros((size, size), np.uint8)
    names = list(SHAPE_PROBS)
    probs = np.array(list(SHAPE_PROBS.values()))
    for _ in range(int(rng.integers(2, 5))):
        name = names[rng.choice(len(names), p=probs)]
        # Partial overlaps only: a shape may hide at most MAX_OVERLAP of itself
        # behind or in front of earlier ones (a few tries, else it is skipped).
        for _try in range(8):
            mask = _shape_mask(rng, name, size, yy, xx)
            if (mask & (label != 0)).sum() <= MAX_OVERLAP * mask.sum():
                break
        else:
            continue
        colour = rng.uniform(0.0, 1.0, 3)
        # Keep every object visible: push its colour away from the background's.
        gap = colour - base
        dist = np.linalg.norm(gap)
        if dist < 0.45:
            direction = gap / dist if dist > 1e-6 else np.ones(3) / np.sqrt(3)
            colour = np.clip(base + 0.45 * direction, 0.0, 1.0)
            if np.linalg.norm(colour - base) < 0.3:  # clipped into a corner: flip side
                colour = np.clip(base - 0.45 * direction, 0.0, 1.0)
        shade = 1.0 + rng.uniform(-0.15, 0.15) * _smooth_noise(rng, size, 2)[..., :1]
        img = np.where(mask[..., None], colour * shade, img)
        label[mask] = CLASSES.index(name)
    img = img + rng.normal(0.0, rng.uniform(0.02, 0.08), img.shape)
    label[_void_border(label)] = VOID
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8), label


def make_split(seed: int, split: str, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of ``split`` ("train" or "val"): uint8 ``(n, H, W, 3)``, ``(n, H, W)``."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}.")
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.uint8)
    for i in range(n):
        images[i], labels[i] = make_example(seed, split, i, size)
    return images, labels


def class_pixel_fractions(labels: np.ndarray) -> np.ndarray:
    """Fraction of non-void pixels of each class, shape ``(NUM_CLASSES,)``."""
    counts = np.bincount(labels[labels != VOID].ravel(), minlength=NUM_CLASSES)
    return counts / max(counts.sum(), 1)
