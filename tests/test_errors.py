"""Every bad input raises ValueError/TypeError naming the argument, what was
expected and what was received (checked with ``pytest.raises(match=...)``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxloss
from jaxloss import torch_compat

X = jnp.zeros((2, 3))  # (N, C), channels-last
T = jnp.array([0, 2])
FUNCS = [jaxloss.nll_loss, jaxloss.cross_entropy]
FUNC_IDS = ["nll", "ce"]


@pytest.fixture(params=list(zip(FUNCS, FUNC_IDS, strict=True)), ids=FUNC_IDS)
def fn(request):
    return request.param[0]


# ---------------------------------------------------------------------------
# reduction / label_smoothing / ignore_index
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["avg", "MEAN", "", None, 1])
def test_bad_reduction(fn, bad):
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'mean' or 'sum'; "
                                         rf"got {re.escape(repr(bad))}"):
        fn(X, T, reduction=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_label_smoothing_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0.0, 1.0\]; got {bad}"):
        jaxloss.cross_entropy(X, T, label_smoothing=bad)


def test_label_smoothing_wrong_type_or_traced():
    with pytest.raises(TypeError, match=r"label_smoothing must be a float in \[0.0, 1.0\]; "
                                        r"got str 'a lot'"):
        jaxloss.cross_entropy(X, T, label_smoothing="a lot")
    with pytest.raises(TypeError, match="label_smoothing must be a Python float.*traced"):
        jax.jit(lambda eps: jaxloss.cross_entropy(X, T, label_smoothing=eps))(0.1)


@pytest.mark.parametrize("bad", [1.0, "255", True, jnp.array(255)], ids=repr)
def test_bad_ignore_index(fn, bad):
    with pytest.raises(TypeError, match="ignore_index must be a Python int or None; got"):
        fn(X, T, ignore_index=bad)


# ---------------------------------------------------------------------------
# axis
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2, -3, 10])
def test_axis_out_of_range(fn, bad):
    with pytest.raises(ValueError, match=rf"axis={bad} is out of range for an input with 2 "
                                         r"dimension\(s\); expected axis in \[-2, 1\]"):
        fn(X, T, axis=bad)


@pytest.mark.parametrize("bad", [1.0, None, (1,), True], ids=repr)
def test_axis_wrong_type(fn, bad):
    with pytest.raises(TypeError, match="axis must be an int; got"):
        fn(X, T, axis=bad)


# ---------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_non_float_input(dtype):
    x = jnp.zeros((2, 3), dtype)
    with pytest.raises(TypeError, match=rf"logits must be a floating-point array .*got dtype "
                                        rf"{jnp.dtype(dtype).name}"):
        jaxloss.cross_entropy(x, T)
    with pytest.raises(TypeError, match="log_probs must be a floating-point array"):
        jaxloss.nll_loss(x, T)


def test_scalar_input(fn):
    with pytest.raises(ValueError, match="must have at least one dimension .*got a scalar"):
        fn(jnp.float32(1.0), jnp.int32(0))


def test_zero_classes(fn):
    with pytest.raises(ValueError, match=r"must have at least one class; got .*shape=\(2, 0\)"):
        fn(jnp.zeros((2, 0)), jnp.zeros((2,), jnp.int32))


# ---------------------------------------------------------------------------
# weight
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2,), (4,), (1, 3), (3, 1), ()], ids=str)
def test_weight_wrong_shape(fn, shape):
    with pytest.raises(ValueError, match=rf"weight must have shape \(C,\) = \(3,\), one entry "
                                         rf"per class; got shape {re.escape(str(shape))}"):
        fn(X, T, weight=jnp.ones(shape))


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.complex64])
def test_weight_wrong_dtype(fn, dtype):
    with pytest.raises(TypeError, match=rf"weight must be a real-valued array; got dtype "
                                        rf"{jnp.dtype(dtype).name}"):
        fn(X, T, weight=jnp.ones((3,), dtype))


def test_integer_weight_is_accepted(fn):
    np.testing.assert_allclose(fn(X + 0.5, T, weight=jnp.array([1, 2, 3])),
                               fn(X + 0.5, T, weight=jnp.array([1.0, 2.0, 3.0])))


# ---------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------


def test_float_targets_to_nll_loss():
    with pytest.raises(TypeError, match="nll_loss takes integer class-index targets; got dtype "
                                        "float32. Probability targets are supported by "
                                        "cross_entropy"):
        jaxloss.nll_loss(X, jnp.zeros((2, 3)))


def test_bool_or_complex_targets():
    with pytest.raises(TypeError, match="targets must hold integer class indices .*got dtype bool"):
        jaxloss.cross_entropy(X, jnp.array([True, False]))


@pytest.mark.parametrize("shape", [(3,), (2, 1), (), (1, 2)], ids=str)
def test_wrong_index_target_shape(fn, shape):
    with pytest.raises(ValueError, match=r"targets must have the shape of .* without its class "
                                         r"axis \(axis=1, .*\), i\.e\. \(2,\); got targets\.shape="
                                         + re.escape(str(shape))):
        fn(X, jnp.zeros(shape, jnp.int32))


def test_wrong_probability_target_shape():
    with pytest.raises(ValueError, match=r"probability targets .* must have the same shape as "
                                         r"logits, \(2, 3\); got targets\.shape=\(2, 4\)"):
        jaxloss.cross_entropy(X, jnp.zeros((2, 4)))


@pytest.mark.parametrize("fn_name", ["nll", "ce"])
def test_channels_first_input_suggests_axis_1(fn_name):
    fn = jaxloss.nll_loss if fn_name == "nll" else jaxloss.cross_entropy
    x = jnp.zeros((2, 5, 4, 4))  # NCHW
    t = jnp.zeros((2, 4, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"got targets\.shape=\(2, 4, 4\)\. It looks like a "
                                         r"channels-first \(PyTorch layout\) input: pass axis=1"):
        fn(x, t)
    fn(x, t, axis=1)  # and the suggestion works


def test_other_class_axis_is_suggested():
    x = jnp.zeros((2, 4, 5, 3))
    t = jnp.zeros((2, 4, 3), jnp.int32)  # class axis is 2 (= -2)
    with pytest.raises(ValueError, match="The class axis looks like axis=-2: pass axis=-2"):
        jaxloss.cross_entropy(x, t)


@pytest.mark.parametrize("bad", [3, 7, -1, -100], ids=lambda v: f"label{v}")
def test_out_of_range_concrete_label(fn, bad):
    t = jnp.array([0, bad])
    with pytest.raises(ValueError, match=rf"targets holds class index {bad} at position \(1,\), "
                                         rf"outside \[0, 3\) for C=3 classes and not equal to "
                                         rf"ignore_index=255 \(1 such position\(s\)\)"):
        fn(X, t, ignore_index=255)


def test_out_of_range_label_is_counted_and_the_first_is_named():
    t = jnp.array([[5, 0, 9], [1, 7, 2]])
    with pytest.raises(ValueError, match=r"class index 5 at position \(0, 0\).*\(3 such "):
        jaxloss.cross_entropy(jnp.zeros((2, 3, 3)), t)


def test_uint8_void_without_ignore_index_names_255():
    t = jnp.array([0, 255], jnp.uint8)
    with pytest.raises(ValueError, match="class index 255 .*ignore_index=-100"):
        jaxloss.cross_entropy(X, t)


# ---------------------------------------------------------------------------
# where
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 2), (2, 1, 1)], ids=str)
def test_where_wrong_shape(fn, shape):
    with pytest.raises(ValueError, match=r"where must be broadcastable to the targets' shape "
                                         r"\(2,\); got where\.shape=" + re.escape(str(shape))):
        fn(X, T, where=jnp.ones(shape, bool))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32])
def test_where_wrong_dtype(fn, dtype):
    with pytest.raises(TypeError, match=rf"where must be a boolean mask; got dtype "
                                        rf"{jnp.dtype(dtype).name}"):
        fn(X, T, where=jnp.ones((2,), dtype))


# ---------------------------------------------------------------------------
# the other surfaces validate through the same core
# ---------------------------------------------------------------------------


def test_linen_modules_validate():
    with pytest.raises(ValueError, match="reduction must be one of"):
        jaxloss.CrossEntropyLoss(reduction="avg").apply({}, X, T)
    with pytest.raises(ValueError, match="pass axis=1"):
        jaxloss.NLLLoss().apply({}, jnp.zeros((2, 5, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"axis=2 is out of range"):
        jaxloss.LogSoftmax(axis=2).apply({}, X)


def test_torch_compat_validates():
    with pytest.raises(ValueError, match="reduction must be one of"):
        torch_compat.NLLLoss(reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0.0, 1.0\]"):
        torch_compat.CrossEntropyLoss(label_smoothing=2.0)
    with pytest.raises(ValueError, match="class index 3"):
        torch_compat.cross_entropy(X, jnp.array([0, 3]))
    with pytest.raises(TypeError, match="input must be a floating-point array|logits must be"):
        torch_compat.cross_entropy(jnp.zeros((2, 3), jnp.int32), T)
