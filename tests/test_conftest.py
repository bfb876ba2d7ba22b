"""The suite's own machinery (``conftest.py``): traces follow the module
constants that tests set, and are kept while those do not change."""

import jax
import jax.numpy as jnp
import pytest
from conftest import set_core_constant, sync_traces

from jaxloss import _losses


def test_traces_are_cleared_exactly_when_the_constants_differ():
    traced = []

    @jax.jit
    def f(v):
        traced.append(_losses._CPU_SMALL_ELEMENTS)  # at trace time only
        return v + 1

    x = jnp.zeros(3)
    default = _losses._CPU_SMALL_ELEMENTS
    sync_traces()
    f(x)
    assert traced == [default]
    with pytest.MonkeyPatch.context() as mp:
        set_core_constant(mp, "_CPU_SMALL_ELEMENTS", default + 7)
        f(x)
        assert traced[1:] == [default + 7]  # retraced under the new value
        set_core_constant(mp, "_CPU_SMALL_ELEMENTS", default + 7)
        f(x)
        assert traced[2:] == []  # the same value: the trace is kept
    # Restored, and the trace made under default + 7 still cached: this is
    # what conftest's autouse fixture syncs away before every test.
    f(x)
    assert traced[2:] == []
    sync_traces()
    f(x)
    assert traced[2:] == [default]
    sync_traces()  # nothing changed since
    f(x)
    assert traced[3:] == []
