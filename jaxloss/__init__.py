"""jaxloss: PyTorch-exact NLL and cross-entropy losses for JAX and Flax."""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from jaxloss._kernels import disable_pallas
from jaxloss._losses import cross_entropy, log_softmax, nll_loss
from jaxloss._weights import class_weights
from jaxloss.linen import CrossEntropyLoss, LogSoftmax, NLLLoss

try:
    __version__ = version("jaxloss")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

# Submodules that ``import jaxloss`` does not load, reachable as attributes
# (``jaxloss.nnx.CrossEntropyLoss``) as well as by ``from jaxloss import nnx``.
_LAZY_SUBMODULES = ("nnx", "torch_compat")


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"jaxloss.{name}")
    raise AttributeError(f"module 'jaxloss' has no attribute {name!r}")


__all__ = [
    "CrossEntropyLoss",
    "LogSoftmax",
    "NLLLoss",
    "__version__",
    "class_weights",
    "cross_entropy",
    "disable_pallas",
    "log_softmax",
    "nll_loss",
]
