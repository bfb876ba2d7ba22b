"""The seed's worked numbers, derived by hand, on every public surface."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxloss
from jaxloss import torch_compat

INPUT = [[0.6, 0.2, 0.2], [0.4, 1.2, 0.4]]
TARGET = [0, 1]
WEIGHT = [0.6, 0.2, 0.2]

# NLL picks -input[i, target[i]]: -0.6 and -1.2.
#   sum  = -0.6 - 1.2                                  = -1.8
#   mean = -1.8 / 2                                    = -0.9
#   weighted mean = (-0.6 * 0.6 - 0.2 * 1.2) / (0.6 + 0.2)
#                 = (-0.36 - 0.24) / 0.8 = -0.6 / 0.8  = -0.75
SUM = -(0.6 + 1.2)
MEAN = SUM / 2
WEIGHTED_MEAN = -(0.6 * 0.6 + 0.2 * 1.2) / (0.6 + 0.2)


def test_hand_derivation():
    assert SUM == pytest.approx(-1.8)
    assert MEAN == pytest.approx(-0.9)
    assert WEIGHTED_MEAN == pytest.approx(-0.75)


def surfaces():
    x, t, w = jnp.array(INPUT), jnp.array(TARGET), jnp.array(WEIGHT)
    return {
        "jaxloss": (
            jaxloss.nll_loss(x, t, reduction="sum"),
            jaxloss.nll_loss(x, t),
            jaxloss.nll_loss(x, t, weight=w),
        ),
        "jaxloss-axis0": (  # the same data with the class axis first
            jaxloss.nll_loss(x.T, t, reduction="sum", axis=0),
            jaxloss.nll_loss(x.T, t, axis=0),
            jaxloss.nll_loss(x.T, t, weight=w, axis=0),
        ),
        "linen": (
            jaxloss.NLLLoss(reduction="sum").apply({}, x, t),
            jaxloss.NLLLoss().apply({}, x, t),
            jaxloss.NLLLoss(weight=tuple(WEIGHT)).apply({}, x, t),
        ),
        "torch_compat.functional": (
            torch_compat.nll_loss(x, t, reduction="sum"),
            torch_compat.nll_loss(x, t),
            torch_compat.nll_loss(x, t, w),
        ),
        "torch_compat.module": (
            torch_compat.NLLLoss(reduction="sum")(x, t),
            torch_compat.NLLLoss()(x, t),
            torch_compat.NLLLoss(weight=w)(x, t),
        ),
        "torch": tuple(
            F.nll_loss(torch.tensor(INPUT), torch.tensor(TARGET), **kw).numpy()
            for kw in ({"reduction": "sum"}, {}, {"weight": torch.tensor(WEIGHT)})
        ),
    }


SURFACES = ["jaxloss", "jaxloss-axis0", "linen", "torch_compat.functional",
            "torch_compat.module", "torch"]


def test_every_surface_is_listed():
    assert sorted(surfaces()) == sorted(SURFACES)


@pytest.mark.parametrize("surface", SURFACES)
def test_seed_numbers(surface):
    total, mean, weighted = surfaces()[surface]
    np.testing.assert_allclose(total, SUM, rtol=1e-6)
    np.testing.assert_allclose(mean, MEAN, rtol=1e-6)
    np.testing.assert_allclose(weighted, WEIGHTED_MEAN, rtol=1e-6)
