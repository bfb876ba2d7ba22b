"""README.md's code must run: the Quickstart blocks (and the numbers their
comments promise), and the checkify recipe of the 'Invalid labels' section."""

from __future__ import annotations

import ast
import pathlib
import re

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks under the heading ``section`` (up to the next heading of
    the same or a higher level)."""
    text = README.read_text()
    match = re.search(rf"^(#+) {re.escape(section)}\s*$", text, flags=re.MULTILINE)
    assert match, f"README.md has no '{section}' section"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, flags=re.MULTILINE)
    body = rest[: end.start()] if end else rest
    blocks = re.findall(r"^```python\n(.*?)^```", body, flags=re.MULTILINE | re.DOTALL)
    assert blocks, f"no python blocks under '{section}'"
    return blocks


def promised_values(block: str) -> list[tuple[str, float]]:
    """``expr  # -1.8 ...`` lines: the expression and the number its comment promises."""
    out = []
    for line in block.splitlines():
        m = re.match(r"^(?P<expr>[^#]+?)\s+#\s*(?P<num>-?\d+(?:\.\d+)?)\b", line)
        if not m:
            continue
        try:
            ast.parse(m.group("expr"), mode="eval")  # an expression, not a statement
        except SyntaxError:
            continue
        out.append((m.group("expr"), float(m.group("num"))))
    return out


def test_quickstart_runs_and_its_numbers_hold():
    namespace: dict = {}
    blocks = python_blocks("Quickstart")
    assert len(blocks) >= 3  # the worked example, Flax, torch_compat
    checked = 0
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
        for expr, number in promised_values(block):
            value = eval(expr, namespace)
            np.testing.assert_allclose(np.asarray(value), number, rtol=1e-6, err_msg=expr)
            checked += 1
    assert checked >= 4  # sum, mean, weighted mean, torch_compat mean
    # The Flax and torch_compat examples produced finite losses and gradients
    # with the advertised shapes.
    assert np.isfinite(namespace["loss"])
    grads = namespace["grads"]
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert namespace["y"].shape == (5, 4, 8, 8)
    assert namespace["target"].shape == (5, 8, 8)


def test_invalid_labels_checkify_recipe():
    import jax.numpy as jnp

    import jaxloss

    (block,) = python_blocks("Invalid labels")
    logits = jax.random.normal(jax.random.key(0), (4, 3))
    namespace = {"jax": jax, "jnp": jnp, "jaxloss": jaxloss, "logits": logits,
                 "labels": jnp.array([0, 255, 2, 1])}
    exec(compile(block, str(README), "exec"), namespace)  # valid: err.throw() passes
    assert np.isfinite(namespace["loss"])
    namespace["labels"] = jnp.array([0, 255, 3, 1])
    from jax.experimental import checkify

    with pytest.raises(checkify.JaxRuntimeError, match="not ignore_index"):
        exec(compile(block, str(README), "exec"), namespace)
