"""The LaTeX printer of the exports: SymPy's, with the notation of the derivations.

Applied functions of time print as ``Q(t)``, time derivatives with dots, indexed sequences with
plain subscripts (``\\eta_{k-1}``), and a :class:`~symmech.laws.continuous.Display` term by
term in the order the law gives.

>>> import sympy as sp
>>> from symmech.laws.discrete import etak, k
>>> tex(etak[k - 1])
'\\\\eta_{k-1}'
>>> Q, t = sp.Function("Q"), sp.Symbol("t")
>>> tex(sp.Eq(Q(t).diff(t, 2), -Q(t)))
'\\\\ddot{Q}(t) = - Q(t)'
"""

from __future__ import annotations

from typing import Any

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.printing.latex import LatexPrinter

from symmech.laws.continuous import Cases, Chain, Display, TeX

_DOTS = {1: r"\dot", 2: r"\ddot"}


class MechLatexPrinter(LatexPrinter):
    """sympy's LatexPrinter with dots for time derivatives and plain subscripts."""

    def _print_AppliedUndef(self, expr: AppliedUndef) -> str:
        name = self._deal_with_super_sub(expr.func.__name__)
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"

    def _print_Derivative(self, expr: sp.Derivative) -> str:
        fn = expr.expr
        (var, order), *rest = expr.variable_count
        if isinstance(fn, AppliedUndef) and not rest and order in _DOTS and fn.args == (var,):
            name = self._deal_with_super_sub(fn.func.__name__)
            return f"{_DOTS[order]}{{{name}}}({self._print(var)})"
        return super()._print_Derivative(expr)

    def _print_Add(self, expr: sp.Add, order: str | None = None) -> str:
        if _evaluated(expr):  # lead with a positive term when there is one
            terms = list(self._as_ordered_terms(expr, order="lex"))
            terms.sort(key=lambda term: term.could_extract_minus_sign())
        else:  # built with evaluate=False: the order given
            terms = list(expr.args)
        return super()._print_Add(sp.Add(*terms, evaluate=False), order="none")

    def _print_Mul(self, expr: sp.Mul) -> str:
        coeff, rest = expr.as_coeff_Mul()
        if coeff == -1 and isinstance(rest, sp.UnevaluatedExpr) and rest.args[0].is_Add:
            return r"- \left(%s\right)" % self._print(rest.args[0])  # sympy drops these
        if _evaluated(expr):
            return super()._print_Mul(expr)
        saved, self._settings["order"] = self._settings["order"], "none"
        try:  # built with evaluate=False: the factors in the order given
            return super()._print_Mul(expr)
        finally:
            self._settings["order"] = saved

    def _print_OneMatrix(self, expr) -> str:
        return r"\mathbf{1}"

    def _print_IndexedBase(self, expr: sp.IndexedBase) -> str:
        return self._print(expr.label)

    def _print_Indexed(self, expr: sp.Indexed) -> str:
        indices = ",".join(self._print(i).replace(" ", "") for i in expr.indices)
        return f"{self._print(expr.base)}_{{{indices}}}"


def _evaluated(expr: sp.Basic) -> bool:
    """False for an Add or Mul built with ``evaluate=False`` in an order SymPy would change."""
    return expr == expr.func(*expr.args)


def tex(obj: Any) -> str:
    """One formula in LaTeX: a TeX string as it is, a tuple as an ordered sum, else SymPy."""
    if isinstance(obj, TeX):
        return str(obj)
    if isinstance(obj, tuple):
        return terms(obj)
    if isinstance(obj, Chain):
        return " = ".join(tex(p) for p in obj.parts)
    if isinstance(obj, Cases):
        rows = r" \\ ".join(f"{tex(v)} & \\text{{{prose(text)}}}" for v, text in obj.cases)
        return f"{tex(obj.lhs)} = \\begin{{cases}} {rows} \\end{{cases}}"
    if isinstance(obj, Display):
        return f"{terms(obj.lhs)} {obj.relation} {terms(obj.rhs)}"
    if isinstance(obj, str):
        raise TypeError(f"tex({obj!r}): a formula is a SymPy expression or a TeX string")
    printer = MechLatexPrinter()
    if isinstance(obj, sp.Eq):
        return f"{printer.doprint(obj.lhs)} = {printer.doprint(obj.rhs)}"
    return printer.doprint(obj)


def terms(parts: tuple) -> str:
    """Terms joined in the given order: ``a - b`` rather than ``a + -b``."""
    out = ""
    for i, term in enumerate(parts):
        text = tex(term)
        if i == 0:
            out = text
        elif text.startswith("- "):
            out += " - " + text[2:]
        elif text.startswith("-"):
            out += " - " + text[1:]
        else:
            out += " + " + text
    return out or "0"


# Symbols that reasons and descriptions written for the terminal may contain, set in math.
_PROSE_SYMBOLS = {
    "ξ": r"\xi", "θ": r"\theta", "η": r"\eta", "λ": r"\lambda", "β": r"\beta", "τ": r"\tau",
    "κ": r"\kappa", "ψ": r"\psi", "α": r"\alpha", "δ": r"\delta", "ω": r"\omega",
    "Σ": r"\Sigma", "⟨": r"\langle", "⟩": r"\rangle", "∇": r"\nabla", "∂": r"\partial",
    "≠": r"\neq", "→": r"\to", "·": r"\cdot", "−": "-", "ᵀ": r"^{\top}", "ₖ": "_{k}",
    "₀": "_{0}", "₁": "_{1}", "₂": "_{2}", "²": "^{2}", "≤": r"\leq", "≥": r"\geq",
}  # fmt: skip
_SPECIAL = {c: "\\" + c for c in "&%#_{}$"} | {
    "^": r"\^{}",
    "~": r"\~{}",
    "\\": r"\textbackslash{}",
}


def prose(text: str) -> str:
    """Plain text for LaTeX: specials escaped, the few Unicode math symbols set in math.

    >>> prose("Dξᵀ = −Dξ, 50% of f(x) = V U^T x")
    'D$\\\\xi^{\\\\top}$ = $-$D$\\\\xi$, 50\\\\% of f(x) = V U\\\\^{}T x'
    """
    out: list[str] = []
    run: list[str] = []  # consecutive math symbols share one $...$
    for ch in text:
        if ch in _PROSE_SYMBOLS:
            run.append(_PROSE_SYMBOLS[ch])
            continue
        if run:
            out.append("$" + "".join(run) + "$")
            run = []
        if ord(ch) > 127:
            raise ValueError(f"prose({text!r}): no LaTeX for the character {ch!r}")
        out.append(_SPECIAL.get(ch, ch))
    if run:
        out.append("$" + "".join(run) + "$")
    return "".join(out)
