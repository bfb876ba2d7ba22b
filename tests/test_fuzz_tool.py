"""``tests/fuzz.py`` (differential fuzzing, a developer's tool) keeps working:
a few fixed seeds of each mode pass, through the XLA path and the kernel in
interpret mode, and a planted error is reported."""

import functools
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import jaxloss

sys.path.insert(0, str(Path(__file__).parent))
import fuzz  # noqa: E402

SMALL = 1 << 12  # logits per configuration: seconds, not minutes


@pytest.mark.parametrize("mode", sorted(fuzz.CHECKS))
def test_each_mode_passes_its_first_seeds(mode):
    lines = []
    n, failing = fuzz.run(mode, seed=0, cases=4, seconds=120, max_logits=SMALL,
                          hole_value=float("-inf"), out=lines.append)
    assert n == 4
    assert failing == [], "\n".join(lines)


@pytest.mark.parametrize("mode", ["oracle", "compat"])
def test_through_the_kernel_interpreted(kernel_everywhere, mode):
    lines = []
    n, failing = fuzz.run(mode, seed=100, cases=4, seconds=120, max_logits=SMALL,
                          hole_value=float("-inf"), out=lines.append)
    assert failing == [], "\n".join(lines)
    assert kernel_everywhere, "no configuration reached the kernel"


def test_a_planted_error_is_reported(monkeypatch):
    """Cross-entropy 0.5% too large: the oracle catches it among the first
    seeds."""
    real = jaxloss.cross_entropy

    @functools.wraps(real)
    def off(*args, **kwargs):
        return real(*args, **kwargs) * jnp.float32(1.005)

    monkeypatch.setattr(jaxloss, "cross_entropy", off)
    lines = []
    n, failing = fuzz.run("oracle", seed=0, cases=4, seconds=120, max_logits=SMALL,
                          hole_value=float("-inf"), out=lines.append)
    assert failing, f"{n} configurations, none reported"
    assert all("FAILED" in line for line in lines)
