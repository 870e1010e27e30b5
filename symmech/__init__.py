"""symmech: symmetries of a network's loss -> exact laws of its training dynamics -> live trackers.

Declare a symmetry, derive, read the results:

>>> import symmech
>>> d = symmech.derive(symmech.library.scale())
>>> d.generator
{theta: theta}

The symbolic side (declare, derive, LaTeX, code generation) needs no torch; the names that touch
tensors (``track``, ``bind``, ``detect``, ``check``, ``Tracker``) import torch when first used.
The pipeline and which folder owns what: ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core.matrix_ops import Inner, expm
from .derivation import Derivation, derive
from .errors import (
    BindingError,
    ClosureError,
    NotASymmetryError,
    NotDerivableError,
    SpecError,
    SymmechError,
)
from .spec import Block, Constant, Symmetry, alpha, library, load_spec, ones

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from .model.actions import SymmetryWarning
    from .model.check import check
    from .model.detect import detect
    from .runtime.attach import track
    from .runtime.binding import Binding, bind
    from .runtime.tracker import Tracker, TrackerWarning

# Names whose modules import torch: loaded on first access, so `import symmech` works without it.
_TORCH_NAMES = {
    "track": "symmech.runtime.attach",
    "bind": "symmech.runtime.binding",
    "Binding": "symmech.runtime.binding",
    "Tracker": "symmech.runtime.tracker",
    "TrackerWarning": "symmech.runtime.tracker",
    "detect": "symmech.model.detect",
    "SymmetryWarning": "symmech.model.actions",
    "check": "symmech.model.check",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'symmech' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TORCH_NAMES))


__all__ = [
    "Binding",
    "BindingError",
    "Block",
    "ClosureError",
    "Constant",
    "Derivation",
    "Inner",
    "NotASymmetryError",
    "NotDerivableError",
    "SpecError",
    "SymmechError",
    "Symmetry",
    "SymmetryWarning",
    "Tracker",
    "TrackerWarning",
    "__version__",
    "alpha",
    "bind",
    "check",
    "derive",
    "detect",
    "expm",
    "library",
    "load_spec",
    "ones",
    "track",
]
