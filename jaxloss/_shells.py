"""The calls of the loss modules, shared by :mod:`jaxloss.linen` and
:mod:`jaxloss.nnx`: each reads its configuration from the module's attributes
of the same names, so the two layers cannot drift apart."""

from __future__ import annotations

from typing import Any

import jax

from jaxloss._losses import cross_entropy, nll_loss


def call_nll_loss(module: Any, inputs: Any, targets: Any, where: Any) -> jax.Array:
    return nll_loss(
        inputs,
        targets,
        weight=module.weight,
        ignore_index=module.ignore_index,
        reduction=module.reduction,
        axis=module.axis,
        where=where,
        axis_name=module.axis_name,
    )


def call_cross_entropy(module: Any, inputs: Any, targets: Any, where: Any) -> jax.Array:
    return cross_entropy(
        inputs,
        targets,
        weight=module.weight,
        ignore_index=module.ignore_index,
        reduction=module.reduction,
        label_smoothing=module.label_smoothing,
        axis=module.axis,
        where=where,
        axis_name=module.axis_name,
    )
