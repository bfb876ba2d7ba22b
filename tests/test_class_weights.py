"""jaxloss.class_weights against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss

# 10 counted labels: class 0 x5, class 1 x3, class 2 x2, class 3 absent; two void.
LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 255, 255], np.uint8).reshape(3, 4)
N = 10.0

INVERSE = [N / (4 * 5), N / (4 * 3), N / (4 * 2)]
INVERSE += [max(INVERSE)]  # absent class 3: the largest present weight
# f = (0.5, 0.3, 0.2) -> median 0.3
MEDIAN = [0.3 / 0.5, 0.3 / 0.3, 0.3 / 0.2]
MEDIAN += [max(MEDIAN)]
ENET = [1 / math.log(1.02 + f) for f in (0.5, 0.3, 0.2, 0.0)]

EXPECTED = {"inverse": INVERSE, "median": MEDIAN, "enet": ENET}


@pytest.mark.parametrize("method", ["inverse", "median", "enet"])
def test_hand_computed(method):
    w = jaxloss.class_weights(LABELS, 4, method=method, ignore_index=255)
    assert w.dtype == jnp.float32 and w.shape == (4,)
    np.testing.assert_allclose(np.asarray(w), EXPECTED[method], rtol=1e-6)


@pytest.mark.parametrize("method", ["inverse", "median", "enet"])
def test_jit_static_num_classes_and_dtypes(method):
    f = jax.jit(
        jaxloss.class_weights, static_argnames=("num_classes", "method", "ignore_index")
    )
    for dtype in (np.uint8, np.int32, np.int64):
        ignore = 255 if dtype == np.uint8 else -100
        labels = np.where(LABELS == 255, ignore, LABELS.astype(dtype)).astype(dtype)
        w = f(labels, num_classes=4, method=method, ignore_index=ignore)
        np.testing.assert_allclose(np.asarray(w), EXPECTED[method], rtol=1e-6)


def test_uniform_inverse_is_ones_and_median_even_count():
    labels = jnp.arange(12) % 3
    np.testing.assert_allclose(jaxloss.class_weights(labels, 3), np.ones(3), rtol=1e-6)
    # Even number of present classes: median = mean of the two middle ones.
    labels = jnp.array([0] * 4 + [1] * 2 + [2] * 1 + [3] * 1)
    f = np.array([4, 2, 1, 1]) / 8
    expected = np.median(f) / f
    got = jaxloss.class_weights(labels, 4, method="median")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


def test_ignore_none_counts_everything():
    labels = jnp.array([0, 0, 1, 1])
    np.testing.assert_allclose(jaxloss.class_weights(labels, 2), [1.0, 1.0], rtol=1e-6)
    w = jaxloss.class_weights(labels, 2, ignore_index=1)
    # Only class 0 counted: N=2, w_0 = 2/(2*2); class 1 absent -> w_0.
    np.testing.assert_allclose(np.asarray(w), [0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("method", ["inverse", "median", "enet"])
def test_nothing_counted_gives_ones(method):
    labels = jnp.full((3, 3), 255, jnp.uint8)
    w = jaxloss.class_weights(labels, 5, method=method, ignore_index=255)
    np.testing.assert_array_equal(np.asarray(w), np.ones(5, np.float32))
    w = jaxloss.class_weights(jnp.zeros((0,), jnp.int32), 2, method=method)
    np.testing.assert_array_equal(np.asarray(w), np.ones(2, np.float32))


def test_weights_feed_the_loss():
    w = jaxloss.class_weights(LABELS, 4, ignore_index=255)
    logits = jax.random.normal(jax.random.key(0), (3, 4, 4))
    loss = jaxloss.cross_entropy(logits, LABELS, weight=w, ignore_index=255)
    assert np.isfinite(float(loss))


def test_errors():
    with pytest.raises(TypeError, match=r"labels must be an integer array.*float32"):
        jaxloss.class_weights(jnp.zeros(3), 2)
    with pytest.raises(TypeError, match=r"num_classes must be a Python int.*float"):
        jaxloss.class_weights(LABELS, 4.0)
    with pytest.raises(ValueError, match=r"num_classes must be a positive int; got 0"):
        jaxloss.class_weights(LABELS, 0)
    with pytest.raises(ValueError, match=r"method must be one of .*got 'balanced'"):
        jaxloss.class_weights(LABELS, 4, method="balanced")
    with pytest.raises(TypeError, match=r"ignore_index must be a Python int or None"):
        jaxloss.class_weights(LABELS, 4, ignore_index=2.5)
    with pytest.raises(ValueError, match=r"class index 255 at position \(2, 2\).*\[0, 4\)"):
        jaxloss.class_weights(LABELS, 4)
    with pytest.raises(ValueError, match=r"class index -1 .*\(1 such position"):
        jaxloss.class_weights(jnp.array([0, -1, 1]), 2)


def test_out_of_range_under_jit_is_nan():
    f = jax.jit(jaxloss.class_weights, static_argnames=("num_classes",))
    w = f(jnp.array([0, 1, 7]), num_classes=2)
    assert np.isnan(np.asarray(w)).all()
