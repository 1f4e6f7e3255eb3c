"""The README's code blocks and the docstring examples run as written."""

import doctest
import pathlib
import re

import jax
import pytest

import jaxdeq

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_code_runs():
    namespace = {}
    blocks = _readme_blocks()
    assert len(blocks) >= 3
    with jax.enable_x64(False):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (1, 2)
    shapes = tuple(y.shape for y in namespace["ys"])
    assert shapes == ((12, 4), (12, 3), (12, 2), (12, 1))


def _public_objects():
    for name in sorted(jaxdeq.__all__ if hasattr(jaxdeq, "__all__") else dir(jaxdeq)):
        obj = getattr(jaxdeq, name)
        if getattr(obj, "__doc__", None) and ">>>" in obj.__doc__:
            yield pytest.param(obj, id=name)


@pytest.mark.parametrize("obj", list(_public_objects()))
def test_docstring_examples(obj):
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    with jax.enable_x64(False):
        for test in finder.find(obj, obj.__name__, globs={}):
            runner.run(test)
    assert runner.failures == 0
