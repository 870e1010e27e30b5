"""SymPy → PyTorch printing of data terms, with a typed layer in between.

Every inner product ⟨X, Y⟩ in a data term becomes one fused per-group reduction
(``_sq`` for ⟨X, X⟩, ``_dot`` otherwise, ``_sum`` for ⟨𝟙, X⟩), computed once and shared
by all the expressions that need it (common-subexpression elimination over reductions).
Scalar arithmetic around them is printed with SymPy's Python printer.

>>> import sympy as sp
>>> from symmech import derive, library
>>> d = derive(library.scale())
>>> program = compile_terms({"Q": d.conserved}, d)
>>> program.reductions
[('f0', '_sq(th["theta"])')]
>>> program.outputs
[('Q', '0.5*f0')]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions import (
    Identity,
    MatMul,
    MatrixSymbol,
    OneMatrix,
    Transpose,
)
from sympy.printing.pycode import PythonCodePrinter

from symmech.core.matrix_ops import Inner
from symmech.derive.data_terms import HYPER_SYMBOLS
from symmech.errors import SymmechError
from symmech.spec.declare import Constant

# Python names of the hyperparameter arguments of generated functions.
HYPER_NAMES = {sym: name for name, sym in HYPER_SYMBOLS.items()}


class CodegenError(SymmechError):
    """An expression cannot be printed (unbound symbol, unsupported node)."""


@dataclass
class Program:
    """Reductions (name, code) to compute first, then outputs (name, code) using them."""

    reductions: list[tuple[str, str]]
    outputs: list[tuple[str, str]]


def _companion_table(derivation) -> dict[str, str]:
    """Map symbol names to the Python expression holding their per-block slices."""
    table: dict[str, str] = {}
    g = derivation.geometry
    for b in derivation.blocks:
        table[b.name] = f'th["{b.name}"]'
        table[g.grad[b].name] = f'gr["{b.name}"]'
        table[f"buf_{b.name}"] = f'bf["{b.name}"]'
    for c in derivation.symmetry.constants:
        table[c.name] = f'const["{c.name}"]'
    return table


def print_matrix(expr, table: Mapping[str, str]) -> str:
    """Print a matrix monomial: per-block slice lists, ``_mm``/``_tr`` for products."""
    if isinstance(expr, MatrixSymbol):
        if expr.name not in table:
            raise CodegenError(
                f"codegen: {expr.name} is missing from the argument sequences "
                f"(bound: {sorted(table)})"
            )
        return table[expr.name]
    if isinstance(expr, Transpose):
        return f"_tr({print_matrix(expr.arg, table)})"
    if isinstance(expr, MatMul):
        scalars = [a for a in expr.args if not getattr(a, "is_Matrix", False)]
        if scalars:
            raise CodegenError(
                f"codegen: scalar factor inside a matrix monomial {expr}; expand first"
            )
        mats = [a for a in expr.args if not isinstance(a, Identity)]
        head = print_matrix(mats[0], table)
        for m in mats[1:]:
            if isinstance(m, Constant) or (
                isinstance(m, Transpose) and isinstance(m.arg, Constant)
            ):
                const = (
                    print_matrix(m.arg, table)
                    if isinstance(m, Transpose)
                    else print_matrix(m, table)
                )
                head = f"_mm({head}, {const}{'.mT' if isinstance(m, Transpose) else ''})"
            else:
                raise CodegenError(
                    f"codegen: only products of a block with constants are supported, got {expr}"
                )
        return head
    raise CodegenError(
        f"codegen: cannot print the matrix expression {expr} ({type(expr).__name__})"
    )


def print_reduction(inner: Inner, table: Mapping[str, str]) -> str:
    """One fused per-group reduction for ⟨A, B⟩."""
    a, b = inner.args
    if isinstance(a, OneMatrix) and isinstance(b, OneMatrix):
        raise CodegenError("codegen: ⟨𝟙, 𝟙⟩ is a constant; it should not reach generated code")
    if isinstance(a, OneMatrix):
        return f"_sum({print_matrix(b, table)})"
    if isinstance(b, OneMatrix):
        return f"_sum({print_matrix(a, table)})"
    if a == b:
        return f"_sq({print_matrix(a, table)})"
    return f"_dot({print_matrix(a, table)}, {print_matrix(b, table)})"


class _ScalarPrinter(PythonCodePrinter):
    def __init__(self, names: Mapping[sp.Basic, str]) -> None:
        super().__init__({"standard": "python3", "fully_qualified_modules": False})
        self._names = dict(names)

    def _print_Symbol(self, expr):  # noqa: N802 - SymPy's printer protocol
        if expr in self._names:
            return self._names[expr]
        raise CodegenError(f"codegen: {expr} is missing from the argument sequences")

    def _print_Float(self, expr):  # noqa: N802
        return repr(float(expr))

    def _print_Integer(self, expr):  # noqa: N802
        return f"{int(expr)}"


def compile_terms(terms: Mapping[str, sp.Expr], derivation, hyper: bool = True) -> Program:
    """Compile named scalar data terms into shared reductions plus scalar outputs."""
    table = _companion_table(derivation)
    inners: dict[Inner, str] = {}
    for expr in terms.values():
        for inner in sorted(sp.sympify(expr).atoms(Inner), key=sp.default_sort_key):
            if inner not in inners:
                inners[inner] = f"f{len(inners)}"
    reductions = [(name, print_reduction(inner, table)) for inner, name in inners.items()]
    placeholders = {inner: sp.Symbol(name) for inner, name in inners.items()}
    names: dict[sp.Basic, str] = {sym: sym.name for sym in placeholders.values()}
    if hyper:
        names.update(HYPER_NAMES)
    printer = _ScalarPrinter(names)
    outputs = []
    for key, expr in terms.items():
        scalar = sp.sympify(expr).xreplace(placeholders)
        leftover = [s for s in scalar.free_symbols if s not in names]
        if leftover:
            raise CodegenError(
                f"codegen: {', '.join(sorted(map(str, leftover)))} is missing from the argument "
                f"sequences of {key}"
            )
        collected = sp.collect(sp.expand(scalar), list(placeholders.values()))
        collected = collected.xreplace(
            {r: sp.Float(r, 17) for r in collected.atoms(sp.Rational) if not r.is_Integer}
        )
        code = printer.doprint(collected)
        if scalar == 0:
            code = "_zero"
        outputs.append((key, code))
    return Program(reductions, outputs)
