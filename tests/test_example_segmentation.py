"""The segmentation example: dataset, metrics and a 4-device smoke run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import LLVM_LEVEL_FLAG

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "segmentation"
sys.path.insert(0, str(EXAMPLE))

import seg_data  # noqa: E402
import seg_metrics  # noqa: E402


def test_dataset_is_deterministic_and_splits_differ():
    x1, y1 = seg_data.make_split(3, "train", 4, 32)
    x2, y2 = seg_data.make_split(3, "train", 4, 32)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.dtype == y1.dtype == np.uint8 and x1.shape == (4, 32, 32, 3)
    xv, _ = seg_data.make_split(3, "val", 4, 32)
    assert not np.array_equal(x1, xv)
    xs, _ = seg_data.make_split(4, "train", 4, 32)
    assert not np.array_equal(x1, xs)


def test_dataset_void_borders_and_imbalance():
    _, labels = seg_data.make_split(0, "train", 200, 32)
    void = labels == seg_data.VOID
    assert 0.005 < void.mean() < 0.1
    assert set(np.unique(labels)) == {*range(seg_data.NUM_CLASSES), seg_data.VOID}
    fracs = seg_data.class_pixel_fractions(labels)
    names = seg_data.CLASSES
    assert fracs[0] > 0.7  # background dominates
    common = min(fracs[names.index("circle")], fracs[names.index("rectangle")])
    for rare in seg_data.RARE_CLASSES:
        assert 0 < fracs[names.index(rare)] < common / 3


def test_void_border_is_the_inner_object_border():
    label = np.zeros((6, 6), np.uint8)
    label[1:5, 1:5] = 2
    border = seg_data._void_border(label)
    expected = np.zeros((6, 6), bool)
    expected[1:5, 1:5] = True
    expected[2:4, 2:4] = False
    np.testing.assert_array_equal(border, expected)


def test_confusion_matrix_metrics_hand_computed():
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 0]], np.uint8)
    preds = np.array([[0, 1, 1, 1], [2, 0, 2, 0]], np.uint8)
    cm = np.asarray(seg_metrics.confusion_matrix(labels, preds, 4, 255))
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1] = 2, 1
    expected[1, 1] = 2
    expected[2, 2], expected[2, 0] = 1, 1
    np.testing.assert_array_equal(cm, expected)  # the void pixel is skipped
    m = seg_metrics.metrics_from_confusion(cm)
    # IoU_0 = 2 / (3 + 3 - 2), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 1 / (2 + 1 - 1);
    # class 3 neither present nor predicted: NaN, left out of the mean.
    iou = [2 / 4, 2 / 3, 1 / 2]
    np.testing.assert_allclose(m["per_class_iou"][:3], iou)
    assert np.isnan(m["per_class_iou"][3])
    np.testing.assert_allclose(m["miou"], np.mean(iou))
    np.testing.assert_allclose(m["pixel_accuracy"], 5 / 7)


def test_smoke_run_on_four_devices(tmp_path):
    env = dict(os.environ)
    # Four devices, and the suite's LLVM level (tests/conftest.py: the same
    # programs, compiled faster: 19-22 s -> 13.5-14.5 s alone here, the
    # same metrics).
    level = [f for f in env.get("XLA_FLAGS", "").split() if f.startswith(LLVM_LEVEL_FLAG)]
    env["XLA_FLAGS"] = " ".join(["--xla_force_host_platform_device_count=4", *level])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "run"
    cmd = [
        sys.executable, str(EXAMPLE / "train.py"),
        "--steps", "20", "--batch-size", "4", "--image-size", "32",
        "--train-images", "200", "--val-images", "32", "--out", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy", "steps", "train_seconds", "devices"):
        assert key in metrics
    assert metrics["devices"]["count"] == 4
    assert metrics["steps"] == 20
    assert set(metrics["per_class_iou"]) == set(seg_data.CLASSES)
    assert np.isfinite(metrics["final_train_loss"])
    for name in ("predictions.png", "loss_curve.png"):
        assert (out / name).stat().st_size > 1000


def test_help_explains_every_option():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--help"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for opt in ("--steps", "--batch-size", "--image-size", "--out", "--seed",
                "--class-weights", "--label-smoothing"):
        assert opt in proc.stdout
