"""Declaring a symmetry: blocks, constants, the group parameter α, spec files and the built-in library.

The built-in library is the one registry of symmetries: every other layer (laws, LaTeX, generated
code, the tensor actions used by detection, confirmation and checks) is built from these specs.
"""

from . import library
from .declare import Block, Constant, Symmetry, alpha, impose_structure, load_spec, ones

__all__ = [
    "Block",
    "Constant",
    "Symmetry",
    "alpha",
    "impose_structure",
    "library",
    "load_spec",
    "ones",
]
