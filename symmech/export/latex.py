"""LaTeX export: a derivation printed step by step as a document that compiles with pdflatex.

Every formula is printed from a SymPy expression (:mod:`symmech.export.printer`) or is LaTeX
that a law wrote; prose is text. The template is a real file (``templates/derivation.tex.j2``)
rendered by Jinja2 with ``StrictUndefined`` and LaTeX-friendly delimiters (``\\VAR{...}``,
``\\BLOCK{...}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from symmech.laws.continuous import Cases, Chain, Law

from .printer import prose, tex

if TYPE_CHECKING:
    from symmech.derivation import Derivation

TEMPLATES = Path(__file__).parent / "templates"

TERMS_PER_LINE = 2  # a long sum (a data term) is broken after this many terms


def _formula_lines(formula: Any) -> list[str]:
    """One formula as the lines of an ``align*`` (``&=`` at the first relation)."""
    if isinstance(formula, Cases):
        lhs, rhs = tex(formula).split(" = ", 1)
        return [f"{lhs} &= {rhs}"]
    if isinstance(formula, Chain):
        *named, value = formula.parts
        first, *rest = (tex(p) for p in named)
        if not isinstance(value, tuple) or len(value) <= TERMS_PER_LINE:
            return [f"{first} &= " + " = ".join([*rest, tex(value)])]
        chunks = [tex(value[i : i + TERMS_PER_LINE]) for i in range(0, len(value), TERMS_PER_LINE)]
        lines = [f"{first} &= " + " = ".join(rest)] if rest else []
        for chunk in chunks:
            if not lines:
                lines.append(f"{first} &= {chunk}")
            elif len(lines) == 1 and rest:
                lines.append(f"&= {chunk}")
            elif chunk.startswith("- "):
                lines.append(rf"&\quad - {chunk[2:]}")
            else:
                lines.append(rf"&\quad + {chunk}")
        return lines
    text = tex(formula)
    if " = " in text:
        lhs, rhs = text.split(" = ", 1)
        return [f"{lhs} &= {rhs}"]
    return [f"&{text}"]


def _law_context(law: Law) -> dict[str, Any]:
    return {
        "title": prose(law.title),
        "steps": [
            (text, [line for f in formulas for line in _formula_lines(f)])
            for text, formulas in law.steps
        ],
    }


def derivation_context(d: Derivation) -> dict[str, Any]:
    """Everything the template needs, already printed to LaTeX."""
    from symmech._version import __version__

    sym = d.symmetry
    fixed = [b for b in sym.blocks if b not in sym.action]
    ctx: dict[str, Any] = {
        "version": __version__,
        "title": prose(sym.name.replace("_", " ")),
        "description": prose(sym.description or ""),
        "identity": int(sym.identity),
        "kind": "multiplicative" if sym.is_multiplicative else "additive",
        "action": [(tex(b), tex(im)) for b, im in sym.action.items()],
        "fixed": ", ".join(tex(b) for b in fixed),
        "generator": [(tex(b), tex(x)) for b, x in d.generator.items()],
        "affine": d.affine.is_affine,
        "symmetric": d.affine.is_symmetric,
        "linear_part": [(tex(b), tex(v)) for b, v in d.affine.J_apply.items()]
        if d.affine.is_affine
        else [],
        "g1": tex(d.gradient_constraint),
        "g2": [(tex(b), tex(v)) for b, v in d.hessian_constraint.items()],
        "g3": tex(d.hessian_quadratic_form),
        "e1": [(tex(b), tex(v)) for b, v in d.equivariance.items()],
        "e2": [(tex(b), tex(v)) for b, v in d.action_linear_part.items()]
        if d.affine.is_affine
        else [],
        "charge": tex(d.conserved) if d.conserved is not None else "",
        "why_no_charge": prose(d.why_no_conserved),
        "conserved_matrices": [(tex(c), tex(m)) for c, m in d.conserved_matrices.items()],
    }
    dyn = d.dynamics
    ctx["closes"] = dyn.closes
    ctx["why_not_closed"] = prose(dyn.why_not_closed)
    ctx["kappa"] = tex(dyn.kappa) if dyn.closes else ""
    ctx["laws"] = [_law_context(law) for law in dyn.laws.values()] if dyn.closes else []
    return ctx


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        block_start_string=r"\BLOCK{",
        block_end_string="}",
        variable_start_string=r"\VAR{",
        variable_end_string="}",
        comment_start_string=r"\#{",
        comment_end_string="}",
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        keep_trailing_newline=True,
    )


def derivation_to_latex(d: Derivation, standalone: bool = True) -> str:
    """Render one derivation; ``standalone=False`` gives the body only (for \\input)."""
    body = _environment().get_template("derivation.tex.j2").render(**derivation_context(d))
    if not standalone:
        return body
    return document_to_latex([d])


def document_to_latex(derivations: list[Derivation], title: str | None = None) -> str:
    """A complete document with one section per derivation."""
    from symmech._version import __version__

    env = _environment()
    bodies = [
        env.get_template("derivation.tex.j2").render(**derivation_context(d)) for d in derivations
    ]
    if title is None:
        names = ", ".join(d.name.replace("_", " ") for d in derivations)
        title = f"Symmetry {names}: geometry, conservation law and learning dynamics"
    return env.get_template("document.tex.j2").render(
        title=prose(title), version=__version__, bodies=bodies
    )
