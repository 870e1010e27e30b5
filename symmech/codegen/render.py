"""Render generated PyTorch tracker modules from derivations (Jinja2, ``StrictUndefined``).

One module per symmetry, written to ``generated/<name>.py`` and formatted with ``ruff format``.
A module holds only what depends on the spec (Q, r and the forms ⟨x, J y⟩); the laws are
advanced by the hand-written :mod:`symmech.runtime.stepper`. Each module carries the
:func:`spec_fingerprint` it was rendered for, so the runtime imports a committed module only
when it matches the spec. :func:`check_generated` reports the files that differ from what the
current engine would write (the staleness check).
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import sympy as sp

from symmech.derivation import Derivation, derive
from symmech.errors import SymmechError
from symmech.spec.declare import Symmetry

from .printer import KERNELS, companion_table, compile_terms

TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "tracker_module.py.j2"
#: Raise when the generated module's interface changes (the runtime then ignores old files).
FORMAT = 2
#: ``ruff format`` settings for generated code, independent of any configuration file.
RUFF_ARGS = (
    "format",
    "--isolated",
    "--line-length",
    "100",
    "--stdin-filename",
    "generated.py",
    "-",
)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = repr
    return env


@functools.cache
def _template_text() -> str:
    return (TEMPLATES / TEMPLATE).read_text(encoding="utf-8")


def spec_fingerprint(symmetry: Symmetry) -> str:
    """A hash of the spec (action, blocks, constants), the template and the module format.

    >>> from symmech import library
    >>> spec_fingerprint(library.scale()) == spec_fingerprint(library.scale())
    True
    """
    from symmech._version import __version__

    parts = [
        f"format {FORMAT}",
        f"symmech {__version__}",
        repr(symmetry),
        f"multiplicative {symmetry.is_multiplicative}",
        *(f"block {b.name} {b.shape}" for b in symmetry.action),
        *(f"constant {c.name} {c.shape} {c.structure}" for c in symmetry.constants),
        _template_text(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def module_context(d: Derivation) -> dict[str, Any]:
    """Everything the template needs, printed; the forms only when the projection closes."""
    from symmech._version import __version__

    sym = d.symmetry
    dyn = d.dynamics
    ctx: dict[str, Any] = {
        "version": __version__,
        "name": sym.name,
        "fingerprint": spec_fingerprint(sym),
        "kind": "multiplicative" if sym.is_multiplicative else "additive",
        "identity": int(sym.identity),
        "action": [(b.name, sp.sstr(im)) for b, im in sym.action.items()],
        "generator": [(b.name, sp.sstr(x)) for b, x in d.generator.items()],
        "blocks": tuple(b.name for b in d.blocks),
        "constants": tuple(c.name for c in sym.constants),
        "closes": dyn.closes,
        "why_not": dyn.why_not_closed,
    }
    if not dyn.closes:
        return ctx
    dt = dyn.data_terms
    bf = dt.bilinear_forms
    table = companion_table(d)
    first = d.blocks[0].name
    forms = compile_terms(
        {"tt": bf["theta", "theta"], "tg": bf["theta", "grad"], "gg": bf["grad", "grad"]},
        table,
        zero=f'th["{first}"]',
    )
    buffer = compile_terms(
        {"tb": bf["theta", "buf"], "gb": bf["grad", "buf"], "bb": bf["buf", "buf"]},
        table,
        zero=f'th["{first}"]',
        shared=forms,
    )
    programs = {
        "charge_prog": compile_terms({"Q": dt.charge}, table),
        "residual_prog": compile_terms({"r": dt.residual}, table, zero=f'gr["{first}"]'),
        "quadratic_prog": compile_terms(
            {"xx": bf["theta", "theta"]}, companion_table(d, "x", "x", "x")
        ),
        "forms_prog": forms,
        "buffer_prog": buffer,
    }
    kernels = {"Forms"}.union(*(p.kernels for p in programs.values()))
    ctx.update(
        kappa=str(dyn.kappa),
        kappa_float=repr(float(dyn.kappa)),
        charge=sp.sstr(d.conserved),
        residual=sp.sstr(dt.residual),
        bilinear=sp.sstr(bf["theta", "grad"]),
        kernels_module=KERNELS,
        kernels=sorted(kernels, key=lambda k: (k != "Forms", k)),
        **programs,
    )
    return ctx


def format_code(text: str) -> str:
    """``ruff format`` the text (ruff is a dev dependency: generation needs it)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *RUFF_ARGS],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as err:  # pragma: no cover - no interpreter to run
        raise SymmechError(f"symmech generate: cannot run ruff ({err})") from None
    if proc.returncode != 0:
        missing = "No module named ruff" in proc.stderr
        raise SymmechError(
            "symmech generate: "
            + (
                "formatting generated code needs ruff: pip install 'symmech[dev]' (or ruff)"
                if missing
                else f"ruff format failed on the rendered module: {proc.stderr.strip()}"
            )
        )
    return proc.stdout


def render_module(d: Derivation, formatted: bool = True) -> str:
    """The module's text; ``formatted=False`` skips ``ruff format`` (same code, for exec)."""
    text = _environment().get_template(TEMPLATE).render(**module_context(d))
    return format_code(text) if formatted else text


def module_path(symmetry: Symmetry, directory: Path) -> Path:
    return directory / f"{symmetry.name}.py"


def write_generated(symmetries: Iterable[Symmetry], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for s in symmetries:
        path = module_path(s, directory)
        path.write_text(render_module(derive(s)))
        written.append(path)
    return written


def check_generated(symmetries: Iterable[Symmetry], directory: Path) -> list[str]:
    """The generated files that are missing or differ from a fresh rendering."""
    stale = []
    for s in symmetries:
        path = module_path(s, directory)
        if not path.is_file() or path.read_text() != render_module(derive(s)):
            stale.append(str(path))
    return stale


__all__ = [
    "FORMAT",
    "check_generated",
    "format_code",
    "module_context",
    "render_module",
    "spec_fingerprint",
    "write_generated",
]
