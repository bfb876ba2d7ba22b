"""jaxloss: PyTorch-exact NLL and cross-entropy losses for JAX and Flax."""

from importlib.metadata import PackageNotFoundError, version

from jaxloss._kernels import disable_pallas
from jaxloss._losses import cross_entropy, log_softmax, nll_loss
from jaxloss._weights import class_weights
from jaxloss.linen import CrossEntropyLoss, LogSoftmax, NLLLoss

try:
    __version__ = version("jaxloss")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

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
