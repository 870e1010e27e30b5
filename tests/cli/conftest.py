"""Running ``symmech.cli.main`` in-process and reading what it printed."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from symmech.cli import main


@dataclass
class Outcome:
    """The exit status and the text printed on stdout and stderr by one command."""

    argv: list[str]
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[str]) -> Outcome:
    """``main(argv)`` with its output captured; argparse's SystemExit becomes the exit status.

    Any other exception is a failure of the test: the CLI must never let one escape.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    outcome = Outcome(list(argv), code, out.getvalue(), err.getvalue())
    assert "Traceback" not in outcome.err + outcome.out, outcome
    assert "internal error" not in outcome.err, outcome
    return outcome


@pytest.fixture(scope="session")
def cli() -> Callable[[Sequence[str]], Outcome]:
    """Session-scoped so that hypothesis tests may use it."""
    return run_cli
