"""Render generated PyTorch tracker modules from derivations (Jinja2, ``StrictUndefined``).

One module per symmetry, written to ``generated/<name>.py``. :func:`check_generated` reports
the files that differ from what the current engine would write (the staleness check).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2
import sympy as sp

from symmech.derivation import Derivation, derive
from symmech.spec.declare import Symmetry

from .printer import compile_terms

TEMPLATES = Path(__file__).parent / "templates"
UPDATE_CASES = ("sgd", "first", "nesterov", "nesterov_first", "plain")


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

    def zero_of(code: str, arg: str, block: str) -> str:
        return f'_zeros({arg}["{block}"])' if code == "_zero" else code

    env.filters["zero_of"] = zero_of
    return env


def module_context(d: Derivation) -> dict[str, Any]:
    """Everything the template needs, printed; laws only when the projection closes."""
    from symmech._version import __version__

    sym = d.symmetry
    dyn = d.dynamics
    ctx: dict[str, Any] = {
        "version": __version__,
        "name": sym.name,
        "kind": "multiplicative" if sym.is_multiplicative else "additive",
        "identity": int(sym.identity),
        "action": [(b.name, sp.sstr(im)) for b, im in sym.action.items()],
        "generator": [(b.name, sp.sstr(x)) for b, x in d.generator.items()],
        "blocks": tuple(b.name for b in d.blocks),
        "first_block": d.blocks[0].name,
        "constants": tuple(c.name for c in sym.constants),
        "closes": dyn.closes,
        "why_not": dyn.why_not_closed,
    }
    if not dyn.closes:
        return ctx
    dt = dyn.data_terms
    ctx.update(
        kappa=str(dyn.kappa),
        kappa_float=repr(float(dyn.kappa)),
        charge=sp.sstr(d.conserved),
        data_terms=[(k, sp.sstr(v)) for k, v in dt.as_dict().items()],
        charge_prog=compile_terms({"Q": dt.charge}, d, hyper=False),
        residual_prog=compile_terms({"r": dt.residual}, d, hyper=False),
        grad_prog=compile_terms({"gJg": dt.gJg}, d, hyper=False),
        buffer_prog=compile_terms({"bJb": dt.bilinear_forms[("buf", "buf")]}, d, hyper=False),
        update_progs=[
            (case, compile_terms({"uJu": dt.uJu[case], "uJb": dt.uJb[case]}, d))
            for case in UPDATE_CASES
        ],
    )
    return ctx


def render_module(d: Derivation) -> str:
    return _environment().get_template("tracker_module.py.j2").render(**module_context(d))


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
