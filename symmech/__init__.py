"""symmech: symmetries of a network's loss -> exact laws of its training dynamics -> live trackers.

Declare a symmetry, derive, read the results:

>>> import symmech
>>> d = symmech.derive(symmech.library.scale())
>>> d.generator
{theta: theta}
"""

from . import library
from .derivation import Derivation, derive
from .errors import (
    BindingError,
    ClosureError,
    NotASymmetryError,
    NotDerivableError,
    SpecError,
    SymmechError,
)
from .matrix_ops import Inner, expm
from .runtime.attach import track
from .runtime.binding import Binding, bind
from .runtime.tracker import Tracker, TrackerWarning
from .spec import Block, Constant, Symmetry, alpha, load_spec, ones


def detect(model, example_input, loss_fn=None, confirm_batch=None, **kwargs):
    """Find the symmetry families of a PyTorch model (see :func:`symmech.runtime.detect.detect`)."""
    from .runtime.detect import detect as _detect

    return _detect(model, example_input, loss_fn=loss_fn, confirm_batch=confirm_batch, **kwargs)


def check(model, batch, loss_fn=None, **kwargs):
    """G1/G2 residuals of every detected group (see :func:`symmech.runtime.check.check`)."""
    from .runtime.check import check as _check

    return _check(model, batch, loss_fn, **kwargs)


__all__ = [
    "Binding",
    "Block",
    "Tracker",
    "TrackerWarning",
    "bind",
    "check",
    "detect",
    "track",
    "BindingError",
    "ClosureError",
    "Constant",
    "Derivation",
    "Inner",
    "NotASymmetryError",
    "NotDerivableError",
    "SpecError",
    "SymmechError",
    "Symmetry",
    "alpha",
    "derive",
    "expm",
    "library",
    "load_spec",
    "ones",
]
__version__ = "0.1.0"
