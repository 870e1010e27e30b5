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
from .spec import Block, Constant, Symmetry, alpha, load_spec, ones

__all__ = [
    "Block",
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
