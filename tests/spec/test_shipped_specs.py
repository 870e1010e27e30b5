"""The spec files in derivations/ declare exactly the registry's symmetries.

Each file stays a readable declaration (its .tex is exported from it); this test keeps it and
symmech.spec.library from drifting apart: same name, action images, identity, blocks (with shapes),
constants (with structure) and description, and one file per registry entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from symmech.spec.declare import Symmetry, load_spec
from symmech.spec.library import BUILTIN

DERIVATIONS = Path(__file__).resolve().parents[2] / "derivations"
FILES = sorted(DERIVATIONS.glob("*.py"))


def _shipped() -> dict[str, tuple[Path, Symmetry]]:
    found: dict[str, tuple[Path, Symmetry]] = {}
    for path in FILES:
        for sym in load_spec(path):
            assert sym.name not in found, (
                f"{sym.name} is declared by {found[sym.name][0]} and {path}"
            )
            found[sym.name] = (path, sym)
    return found


def _facts(sym: Symmetry) -> dict:
    return {
        "name": sym.name,
        "identity": sym.identity,
        "blocks": [(b.name, b.shape) for b in sym.blocks],
        "action": {b.name: image for b, image in sym.action.items()},
        "constants": [(c.name, c.shape, c.structure) for c in sym.constants],
        "description": sym.description,
    }


def test_every_registry_entry_has_a_file_and_every_file_is_in_the_registry() -> None:
    assert FILES, DERIVATIONS
    assert set(_shipped()) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_file_declares_the_library_symmetry(name: str) -> None:
    path, from_file = _shipped()[name]
    from_library = BUILTIN[name]()
    assert _facts(from_file) == _facts(from_library), path.name
    # structured constants are distinct SymPy symbols: equal images mean equal structure too
    assert repr(from_file) == repr(from_library)
