"""Test configuration shared by every test file.

Four host-platform CPU devices are forced before JAX is imported so the
sharding tests can run in the same session; single-device tests are
unaffected (arrays default to device 0). Rank promotion raises, so an
accidental broadcast in the library fails loudly.
"""

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


if os.environ.get("JAXLOSS_TEST_THROUGH_KERNEL", "").strip() not in ("", "0"):
    # Every test through the Pallas kernel in interpret mode, as on a GPU:
    #   JAXLOSS_TEST_THROUGH_KERNEL=1 python -m pytest tests/test_functional.py
    import functools

    import pytest

    from jaxloss import _kernels
    from jaxloss._kernels import cross_entropy as _ce

    @pytest.fixture(autouse=True)
    def _through_kernel(monkeypatch):
        interpreted = functools.partial(_ce.cross_entropy_pallas, interpret=True)
        monkeypatch.setattr(_ce, "cross_entropy_pallas", interpreted)
        monkeypatch.setattr(
            _kernels, "dispatch", lambda use, kernel, xla, *args: (kernel if use else xla)(*args)
        )
        jax.clear_caches()
        yield
        jax.clear_caches()
