"""Test configuration shared by every test file.

Four host-platform CPU devices are forced before JAX is imported so the
sharding tests can run in the same session; single-device tests are
unaffected (arrays default to device 0). Rank promotion raises, so an
accidental broadcast in the library fails loudly. No input counts as
small on XLA:CPU (``_losses._CPU_SMALL_ELEMENTS``, see below).
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLVM_LEVEL_FLAG = "--xla_backend_optimization_level"
_flags = ["--xla_force_host_platform_device_count=4"]
# XLA compiles the suite's programs with LLVM's optimisation level 0: the same
# HLO programs (fusion, buffers, temporaries), compiled about 40% faster,
# which is most of the suite's time. Keep LLVM's default level with
#   JAXLOSS_TEST_FULL_OPT=1 python -m pytest -n 2 -q
# (benchmarks/gpu_session.sh does, on a GPU: level 0 is measured on XLA:CPU only).
if os.environ.get("JAXLOSS_TEST_FULL_OPT", "").strip() in ("", "0"):
    _flags.append(f"{LLVM_LEVEL_FLAG}=0")
for _flag in _flags:
    _name = _flag.split("=")[0]
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def default_level_env() -> dict:
    """This process's environment for a fresh Python process that compiles
    at XLA's default LLVM level (the suite's level flag taken out of
    ``XLA_FLAGS``) and imports this tree's ``jaxloss``."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(LLVM_LEVEL_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")



import functools  # noqa: E402

import pytest  # noqa: E402

from jaxloss import _kernels, _losses  # noqa: E402
from jaxloss._kernels import cross_entropy as _ce  # noqa: E402

# XLA:CPU takes its plain formulations for inputs of fewer logits than
# _losses._CPU_SMALL_ELEMENTS (see _losses._cpu_small), which most of the
# suite's inputs are. The suite runs with no input small, so that the
# tests of the grouped rows, the class slices and the general sweeps still
# reach those paths at their sizes; tests/test_small_inputs.py checks the
# small inputs' path at the library's own threshold (the fixture
# ``small_inputs`` below). Keep the threshold for every test with
#   JAXLOSS_TEST_SMALL_INPUTS=1 python -m pytest -n 2 -q
CPU_SMALL_ELEMENTS = _losses._CPU_SMALL_ELEMENTS
if os.environ.get("JAXLOSS_TEST_SMALL_INPUTS", "").strip() in ("", "0"):
    _losses._CPU_SMALL_ELEMENTS = 0

# Register the Pallas Triton (CUDA) lowering once, before any test runs. JAX
# imports it lazily at the first CUDA lowering; in one CI replica of
# 2026-11-28 (xdist, an order that did not recur in two further full runs)
# that lazy path failed in one worker, "Cannot lower pallas_call on platform:
# gpu", for two test_cuda_lowering_uses_the_kernel cases. Root cause not found.
try:
    from jax._src.pallas.triton import pallas_call_registration  # noqa: E402, F401
except ImportError:  # a JAX without the Triton backend: the kernel tests say so
    pass


@pytest.fixture
def kernel_everywhere(monkeypatch):
    """Route the public API through the Pallas kernel in interpret mode, as on
    a GPU (``platform_dependent`` picks it on CUDA only); yields the keyword
    arguments of every kernel call, with the shape of its logits and the
    dtype of its labels added as ``logits_shape`` and ``label_dtype``."""
    calls = []
    interpreted = functools.partial(_ce.cross_entropy_pallas, interpret=True)

    def counting(*args, **kwargs):
        calls.append(dict(kwargs, logits_shape=tuple(args[0].shape), label_dtype=args[1].dtype))
        return interpreted(*args, **kwargs)

    def dispatch(use_pallas, kernel, xla, *args):
        return (kernel if use_pallas else xla)(*args)

    monkeypatch.setattr(_ce, "cross_entropy_pallas", counting)
    monkeypatch.setattr(_kernels, "dispatch", dispatch)
    clear_traces()  # traces made without the kernel must not be reused
    yield calls
    clear_traces()


if os.environ.get("JAXLOSS_TEST_THROUGH_KERNEL", "").strip() not in ("", "0"):
    # Every test through the kernel:
    #   JAXLOSS_TEST_THROUGH_KERNEL=1 python -m pytest tests/test_functional.py

    @pytest.fixture(autouse=True)
    def _through_kernel(kernel_everywhere):
        yield


# The traces JAX and the core's jit cache hold were made under the module
# constants that ``core_constants`` sets and under ``_kernels.dispatch``. A
# trace keeps them, so a test must not reuse a trace made under other values;
# but every clear costs the next test all its compilations again (its eager
# conversions included: ~45 ms each here). So the traces are cleared when a
# test's values differ from those they were made under (``sync_traces``),
# not around every test that sets a constant.
_SET_NAMES: set[str] = set()  # every name core_constants has set in this process


def _traced_state() -> tuple:
    return (_kernels.dispatch, _ce.cross_entropy_pallas,
            tuple((name, getattr(_losses, name)) for name in sorted(_SET_NAMES)))


def _same(a, b) -> bool:
    """Equal states: numbers, ranges and strings by value, the rest (functions,
    closures) by identity."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if type(a) is type(b) and isinstance(a, (int, float, range, str)):
        return a == b
    return a is b


_traced_under = _traced_state()


def clear_traces() -> None:
    """Drop the core's jit traces and JAX's: a trace keeps the module
    constants and the dispatch it was made with."""
    global _traced_under
    _losses._index_impl.clear_cache()
    jax.clear_caches()
    _traced_under = _traced_state()


def sync_traces() -> None:
    """Clear the traces if they were made under other constants or another
    dispatch than those in effect now."""
    if not _same(_traced_state(), _traced_under):
        clear_traces()


def set_core_constant(monkeypatch, name: str, value) -> None:
    """``_losses.<name> = value`` until ``monkeypatch`` undoes it, and the
    traces synced to it."""
    monkeypatch.setattr(_losses, name, value)
    _SET_NAMES.add(name)
    sync_traces()


@pytest.fixture
def core_constants(monkeypatch):
    """``set(name, value)``: a module constant of ``jaxloss._losses`` for one
    test. The core's jit cache misses module constants, so the traces are
    synced (``sync_traces``) on setting; the next test syncs them to the
    restored value before it traces."""

    return functools.partial(set_core_constant, monkeypatch)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Before an item that this file's autouse fixture does not reach (the
    library's doctests), the traces are synced here instead, once the test's
    constants are restored."""
    yield
    if nextitem is not None and "_no_kernel_trace_on_cpu" not in getattr(
        nextitem, "fixturenames", ()
    ):
        sync_traces()


@pytest.fixture
def constants_at_setup(core_constants):
    """``core_constants`` for a fixture that sets its constants as it is set
    up: the test's traces are synced then, not before (as for every other
    test), which would clear them for the restored values in between."""
    return core_constants


@pytest.fixture
def small_inputs(constants_at_setup):
    """The library's own threshold for small inputs on XLA:CPU
    (``_losses._CPU_SMALL_ELEMENTS``), which this file sets to 0 for the
    rest of the suite."""
    constants_at_setup("_CPU_SMALL_ELEMENTS", CPU_SMALL_ELEMENTS)
    return CPU_SMALL_ELEMENTS


@pytest.fixture
def target_shift_everywhere(constants_at_setup):
    """XLA:CPU's target-shifted fwd+bwd (``_losses._target_shift_applies``) at
    every size: below ``_TARGET_SHIFT_MIN_ELEMENTS`` logits it is not taken
    (the suite's inputs are mostly that small)."""
    constants_at_setup("_TARGET_SHIFT_MIN_ELEMENTS", 0)


if os.environ.get("JAXLOSS_TEST_TARGET_SHIFT", "").strip() not in ("", "0"):
    # Every test through the target shift, whatever its size:
    #   JAXLOSS_TEST_TARGET_SHIFT=1 python -m pytest -n 2 -q

    @pytest.fixture(autouse=True)
    def _target_shift(target_shift_everywhere):
        yield


# The public losses trace the Pallas kernel too where it may apply (index
# targets): ``jax.lax.platform_dependent`` traces every branch,
# and the CPU lowering drops the CUDA one. That trace costs ~0.06-0.1 s per loss
# traced (of ~0.15 s tracing the loss takes), and the compiled CPU program
# is the same without it (test_kernels.py::
# test_cpu_program_is_the_same_without_the_kernel_traced). So on a host
# without a GPU, ``_kernels.dispatch`` takes the XLA branch alone -- the
# path, the switches and everything else unchanged -- except:
#   * in tests marked ``traces_kernel`` (they lower for CUDA, or check the
#     switch); the traces cached without the kernel are dropped first;
#   * in tests that route the losses through the kernel (``kernel_everywhere``
#     sets its own dispatch);
#   * in every test, with
#       JAXLOSS_TEST_TRACE_KERNEL=1 python -m pytest -n 2 -q
TRACE_KERNEL = os.environ.get("JAXLOSS_TEST_TRACE_KERNEL", "").strip() not in ("", "0")


def xla_branch_only(use_pallas, kernel, xla, *args):
    """``_kernels.dispatch`` without the CUDA branch: what XLA:CPU runs."""
    return xla(*args)


@pytest.fixture(autouse=True)
def _no_kernel_trace_on_cpu(request, monkeypatch):
    """The dispatch above, then the traces synced to it and to the module
    constants (after the fixtures that set constants, for their tests)."""
    cpu_only = not TRACE_KERNEL and jax.default_backend() == "cpu"
    if cpu_only and request.node.get_closest_marker("traces_kernel") is None:
        monkeypatch.setattr(_kernels, "dispatch", xla_branch_only)
    if "constants_at_setup" not in request.fixturenames:
        sync_traces()
    yield
