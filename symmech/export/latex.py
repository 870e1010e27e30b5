"""LaTeX export: a derivation printed step by step as a document that compiles with pdflatex.

The template is a real file (``templates/derivation.tex.j2``) rendered by Jinja2 with
``StrictUndefined`` and LaTeX-friendly delimiters (``\\VAR{...}``, ``\\BLOCK{...}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import sympy as sp

from symmech.derive.data_terms import readable
from symmech.errors import ClosureError

if TYPE_CHECKING:
    from symmech.derivation import Derivation

TEMPLATES = Path(__file__).parent / "templates"

_UNICODE_MATH = {
    "ξ": r"\xi",
    "θ": r"\theta",
    "η": r"\eta",
    "λ": r"\lambda",
    "β": r"\beta",
    "τ": r"\tau",
    "κ": r"\kappa",
    "ψ": r"\psi",
    "α": r"\alpha",
    "δ": r"\delta",
    "Σ": r"\Sigma",
    "ω": r"\omega",
    "⟨": r"\langle ",
    "⟩": r"\rangle ",
    "∇": r"\nabla ",
    "∂": r"\partial ",
    "√": r"\sqrt{}",
    "≠": r"\neq ",
    "→": r"\to ",
    "∘": r"\circ ",
    "·": r"\cdot ",
    "−": "-",
    "ᵀ": r"^{\top}",
    "ₖ": "_k",
    "₀": "_0",
    "₁": "_1",
    "₂": "_2",
    "₊": "_+",
    "₋": "_-",
    "²": "^2",
    "𝟙": r"\mathbb{1}",
    "ε": r"\varepsilon",
    "v̂": r"\hat v",
}
_COMBINING = {"\u0307": r"\dot", "\u0308": r"\ddot", "\u0302": r"\hat"}


_MATH_MARKERS = set(_UNICODE_MATH) | set(_COMBINING) | set("^=+<>|")


def _math_word(word: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(word):
        ch = word[i]
        nxt = word[i + 1] if i + 1 < len(word) else ""
        if nxt in _COMBINING:
            out.append(f"{_COMBINING[nxt]}{{{_UNICODE_MATH.get(ch, ch)}}}")
            i += 2
            continue
        if ch in _UNICODE_MATH:
            out.append("{" + _UNICODE_MATH[ch].strip() + "}")
        elif ch in "&%#":
            out.append("\\" + ch)
        elif ch in "{}":
            out.append("\\" + ch)
        else:
            out.append(ch)
        i += 1
    return "$" + "".join(out) + "$"


def tex_text(text: str) -> str:
    """Turn a plain-text explanation with Unicode math into LaTeX text (ASCII only).

    Words that carry math (Greek letters, ⟨⟩, ᵀ, ^, =, ...) are set in math mode.
    """
    text = text.replace("ₖ₋₁", "_{k-1}").replace("ₖ₊₁", "_{k+1}")
    words = []
    for word in text.split(" "):
        if any(c in _MATH_MARKERS for c in word) or "_" in word:
            words.append(_math_word(word))
        else:
            words.append("".join("\\" + c if c in "&%#_{}" else c for c in word))
    result = " ".join(words)
    bad = sorted({c for c in result if ord(c) > 127})
    if bad:
        raise ValueError(f"tex_text: no LaTeX for the characters {bad} in {text!r}")
    return result


def _tex(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, sp.Eq):
        return f"{sp.latex(obj.lhs)} = {sp.latex(obj.rhs)}"
    return sp.latex(obj)


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


def _law_context(law) -> dict[str, Any]:
    is_list = isinstance(law.ode, list)
    extra: list[tuple[str, str]] = []
    if law.name == "first_order":
        extra.append(("with the forcing", _tex(law.extra["forcing"])))
    if law.name == "second_order":
        extra.append(("with the forcing", f"F = {sp.latex(readable(law.data['F']))}"))
    if law.name == "second_order":
        extra.append(("with mass", _tex(law.extra["m"])))
        for regime, parts in law.extra["kernels"].items():
            roots = ", ".join(f"{sp.latex(k)} = {sp.latex(v)}" for k, v in parts["roots"].items())
            extra.append(
                (f"{regime.capitalize()} case, ${_tex(parts['condition'])}$; roots", roots)
            )
            extra.append(("Green's kernel", f"G(t) = {sp.latex(parts['G'])}"))
            extra.append(("homogeneous part", f"Q_h(t) = {sp.latex(parts['Q_h'])}"))
    if law.name == "discrete":
        for text, value in law.data.items():
            extra.append((f"Data term {tex_text(text)}", sp.latex(readable(value))))
        for text, value in law.extra["variants"].items():
            extra.append((f"Update projection ({text})", _tex(value)))
    return {
        "title": tex_text(law.title),
        "steps": [(tex_text(text), _tex(f)) for text, f in law.steps],
        "is_list": is_list,
        "ode": [_tex(e) for e in law.ode] if is_list else _tex(law.ode),
        "solution": _tex(law.solution),
        "ics": ",\\quad ".join(_tex(e) for e in law.initial_conditions),
        "extra": [(tex_text(t) if "$" not in t else t, f) for t, f in extra],
    }


def derivation_context(d: Derivation) -> dict[str, Any]:
    """Everything the template needs, already printed to LaTeX."""
    from symmech._version import __version__

    sym = d.symmetry
    fixed = [b for b in sym.blocks if b not in sym.action]
    ctx: dict[str, Any] = {
        "version": __version__,
        "title": tex_text(sym.name.replace("_", " ")),
        "description": tex_text(sym.description or ""),
        "identity": int(sym.identity),
        "kind": "multiplicative" if sym.is_multiplicative else "additive",
        "action": [(sp.latex(b), sp.latex(im)) for b, im in sym.action.items()],
        "fixed": ", ".join(sp.latex(b) for b in fixed),
        "generator": [(sp.latex(b), sp.latex(x)) for b, x in d.generator.items()],
        "affine": d.affine.is_affine,
        "symmetric": d.affine.is_symmetric,
        "g1": sp.latex(d.gradient_constraint),
        "g2": [(sp.latex(b), sp.latex(v)) for b, v in d.hessian_constraint.items()],
        "g3": sp.latex(d.hessian_quadratic_form),
        "e1": [(sp.latex(b), sp.latex(v)) for b, v in d.equivariance.items()],
        "e2": [(sp.latex(b), sp.latex(v)) for b, v in d.action_linear_part.items()]
        if d.affine.is_affine
        else [],
        "charge": sp.latex(d.conserved) if d.conserved is not None else "",
        "why_no_charge": tex_text(d.why_no_conserved),
        "conserved_matrices": [(sp.latex(c), sp.latex(m)) for c, m in d.conserved_matrices.items()],
    }
    dyn = d.dynamics
    ctx["closes"] = dyn.closes
    ctx["why_not_closed"] = tex_text(dyn.why_not_closed)
    ctx["kappa"] = sp.latex(dyn.kappa) if dyn.closes else ""
    try:
        ctx["laws"] = [_law_context(law) for law in dyn.laws.values()] if dyn.closes else []
    except ClosureError:  # pragma: no cover - closes implies laws exist
        ctx["laws"] = []
    return ctx


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
        title=tex_text(title), version=__version__, bodies=bodies
    )
