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
