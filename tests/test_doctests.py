"""The runnable examples in the docstrings stay true."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import symmech

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(symmech.__path__, "symmech.")
    if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
