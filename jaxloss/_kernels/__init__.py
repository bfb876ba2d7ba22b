"""Pallas GPU kernels and the switch that picks them or the XLA path.

On NVIDIA GPUs the reduced ("mean"/"sum") index-target path runs the Triton
kernel of :mod:`jaxloss._kernels.cross_entropy`; every other platform keeps the
XLA formulation. The choice is made inside ``jit`` by
``jax.lax.platform_dependent``, so one traced function serves CPU and GPU.

Escape hatches, both read when a loss is traced (part of the core's jit
cache key):

* the environment variable ``JAXLOSS_DISABLE_PALLAS=1`` (a function of yours
  that ``jax.jit`` has already traced keeps the choice it was traced with);
* the context manager :func:`disable_pallas` (``jaxloss.disable_pallas``),
  which also enters a ``jax.make_user_context`` context: every ``jax.jit``
  cache key differs inside it, so a function traced before the block is
  traced again there, without the kernel (JAX versions without
  ``make_user_context``: as the environment variable).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax

_state = threading.local()

# Part of every jax.jit cache key (see disable_pallas); made once, at import:
# JAX asks that user contexts not be made concurrently with its other APIs.
_make_user_context = getattr(jax, "make_user_context", None)
_JIT_KEY = _make_user_context(False) if _make_user_context is not None else None

# From jax 0.11 every lowering of the Triton kernel warns that the Pallas
# Triton backend is deprecated. It is this library's implementation detail
# (a Mosaic GPU port is the way out), not something its users can act on.
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)


@functools.cache
def _triton_available() -> bool:
    """Whether this JAX still ships the Pallas Triton lowering the kernel uses.

    It is deprecated from jax 0.11 (Mosaic GPU is the default there); should a
    release drop it, the losses fall back to the XLA path instead of failing.
    """
    try:
        from jax.experimental.pallas import triton as plgpu

        return hasattr(plgpu, "CompilerParams")
    except ImportError:
        return False


def pallas_enabled() -> bool:
    """Whether the GPU kernel may be used (it still runs on CUDA only)."""
    if os.environ.get("JAXLOSS_DISABLE_PALLAS", "").strip() not in ("", "0"):
        return False
    return not getattr(_state, "disabled", False) and _triton_available()


@contextlib.contextmanager
def disable_pallas() -> Iterator[None]:
    """Force the XLA path (also on GPU) for losses traced inside the block.

    Inside the block every ``jax.jit`` cache key differs (a
    ``jax.make_user_context`` context), so a jitted function that was traced
    outside it, with the kernel, is traced again inside it, without; back
    outside, its first trace is used again.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxloss
      >>> with jaxloss.disable_pallas():
      ...     loss = jaxloss.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 2]))
      >>> print(f"{loss:.4f}")
      1.0986
    """
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        with contextlib.nullcontext() if _JIT_KEY is None else _JIT_KEY(True):
            yield
    finally:
        _state.disabled = previous


def dispatch(use_pallas: bool, kernel: Callable[..., Any], xla: Callable[..., Any], *args: Any):
    """``kernel(*args)`` on CUDA when ``use_pallas``, else ``xla(*args)``."""
    if not use_pallas:
        return xla(*args)
    return jax.lax.platform_dependent(*args, cuda=kernel, default=xla)
