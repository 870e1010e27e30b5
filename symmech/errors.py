"""The errors symmech raises, and the one helper that words them alike.

Every message says what was called, what value was wrong, and what to do instead
(in the manner of equinox/diffrax: quote the call and the offending value).
"""

from __future__ import annotations


class SymmechError(Exception):
    """Base class of every error symmech raises on purpose."""


class SpecError(SymmechError, ValueError):
    """The declared symmetry is malformed (unknown block, not a group action, ...)."""


class NotASymmetryError(SymmechError, ValueError):
    """The action does not leave the given loss unchanged."""


class NotDerivableError(SymmechError):
    """A result was read that the derivation cannot provide; the message says why."""


class ClosureError(NotDerivableError):
    """The projection of the learning dynamics onto the generator does not close."""


class BindingError(SymmechError, ValueError):
    """Parameters were bound to the blocks of a spec in a way that cannot work."""


def explain(call: str, problem: str, fix: str | None = None) -> str:
    """Return a message of the form ``call: problem. fix.`` used by every error.

    >>> explain("Symmetry('s', identity=2)", "identity must be 0 or 1, got 2")
    "Symmetry('s', identity=2): identity must be 0 or 1, got 2."
    """
    text = f"{call}: {problem.rstrip('.')}."
    if fix:
        text += f" {fix.rstrip('.')}."
    return text
