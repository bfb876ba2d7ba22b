"""The suite's own machinery (``conftest.py``): traces follow the module
constants that tests set, and are kept while those do not change; LLVM's
level 0, which the suite compiles at, leaves XLA's programs as they are."""

import jax
import jax.numpy as jnp
import pytest
from conftest import default_level_env, set_core_constant, sync_traces

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


# Compiled programs, their optimised HLO (metadata left out) and temporaries:
# run in this process and, as a script, in a fresh one.
_PROGRAMS = r"""
import hashlib, json, re
import jax, jax.numpy as jnp
import jaxloss
from jaxloss import _losses

_losses._CPU_SMALL_ELEMENTS = 0  # as conftest.py


def programs():
    s = jax.ShapeDtypeStruct
    out = {}
    for shape, axis, dtype, smoothing, soft in [
        ((8, 64, 64, 19), -1, jnp.float32, 0.0, False),
        ((8, 19, 64, 64), 1, jnp.float32, 0.1, False),
        ((512, 3000), -1, jnp.bfloat16, 0.0, False),
        ((4, 150, 32, 32), 1, jnp.float32, 0.0, True),
    ]:
        ax = axis % len(shape)
        targets = s(shape, dtype) if soft else s(shape[:ax] + shape[ax + 1 :], jnp.int32)

        def loss(x, t, w):
            return jaxloss.cross_entropy(
                x, t, weight=w, axis=axis, ignore_index=255, label_smoothing=smoothing
            )

        for name, f in (("fwd", loss), ("fwd+bwd", jax.value_and_grad(loss))):
            args = (s(shape, dtype), targets, s((shape[ax],), jnp.float32))
            compiled = jax.jit(f).lower(*args).compile()
            # The instructions, without the source locations (the tables
            # before the first computation, and each instruction's metadata).
            text = compiled.as_text()
            text = text[text.index("\n%"):]
            text = re.sub(r"metadata=[{][^}]*[}]", "", text)
            temp = compiled.memory_analysis().temp_size_in_bytes
            out[f"{shape} {name}"] = [hashlib.sha256(text.encode()).hexdigest(), temp]
    return out


if __name__ == "__main__":
    print(json.dumps(programs()))
"""


def test_llvm_level_0_compiles_the_same_programs():
    """The suite compiles with LLVM's optimisation level 0 (conftest.py), a
    code generation setting: XLA's HLO programs (fusion, scheduling,
    buffers, so the temporaries) are those of its default level, checked
    on index and probability targets, float32 and bfloat16, both layouts."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAMS],
        env=default_level_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    at_default = json.loads(proc.stdout.strip().splitlines()[-1])
    namespace: dict = {}
    exec(_PROGRAMS.replace('__name__ == "__main__"', "False"), namespace)
    here = namespace["programs"]()
    assert here == at_default
