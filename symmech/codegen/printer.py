"""SymPy → PyTorch printing of data terms, with a typed layer in between.

Each inner product ⟨X, Y⟩ becomes a call of a per-group reduction from
:mod:`symmech.runtime.kernels` (``sq`` for ⟨X, X⟩, ``dot`` otherwise, ``total`` for ⟨𝟙, X⟩;
``mm``/``tr`` for products with constants). The calls are built as SymPy function
applications, so ``sympy.cse`` shares every repeated reduction or matrix product between the
outputs of one function, and the coefficients of each output are collected per reduction and
factored before printing.

>>> from symmech import derive, library
>>> d = derive(library.scale())
>>> program = compile_terms({"Q": d.conserved}, companion_table(d))
>>> program.outputs
[('Q', '0.5*sq(th["theta"])')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.matrices.expressions import Identity, MatMul, MatrixSymbol, OneMatrix, Transpose
from sympy.printing.pycode import PythonCodePrinter

from symmech.core.matrix_ops import Inner
from symmech.errors import SymmechError
from symmech.spec.declare import Constant

#: The helpers generated code calls, all from one module.
KERNELS = "symmech.runtime.kernels"
sq, dot, total, mm, tr, zeros = (
    sp.Function(n) for n in ("sq", "dot", "total", "mm", "tr", "zeros")
)


class CodegenError(SymmechError):
    """An expression cannot be printed (unbound symbol, unsupported node)."""


@dataclass
class Program:
    """Shared assignments (name, code) to run first, then the outputs (name, code) using them."""

    assignments: list[tuple[str, str]]
    outputs: list[tuple[str, str]]
    kernels: set[str] = field(default_factory=set)  # the helpers the code calls
    defined: dict[sp.Expr, sp.Symbol] = field(default_factory=dict)  # tree -> assigned name


def companion_table(derivation, theta: str = "th", grad: str = "gr", buf: str = "bf") -> dict:
    """Map symbol names to the Python expression holding their per-block slices.

    ``theta``, ``grad`` and ``buf`` name the arguments that hold θₖ, gₖ and bₖ₋₁ (the same name
    twice binds both companions to one argument, e.g. ``x`` for a quadratic form in any of them).
    """
    table: dict[str, str] = {}
    g = derivation.geometry
    for b in derivation.blocks:
        table[b.name] = f'{theta}["{b.name}"]'
        table[g.grad[b].name] = f'{grad}["{b.name}"]'
        table[f"buf_{b.name}"] = f'{buf}["{b.name}"]'
    for c in derivation.symmetry.constants:
        table[c.name] = f'const["{c.name}"]'
    return table


def _slices(name: str, table: Mapping[str, str]) -> sp.Symbol:
    if name not in table:
        raise CodegenError(
            f"codegen: {name} is missing from the argument sequences (bound: {sorted(table)})"
        )
    return sp.Symbol(table[name])


def matrix_tree(expr, table: Mapping[str, str]) -> sp.Expr:
    """A matrix monomial as kernel calls: slice lists, ``mm`` by constants, ``tr``."""
    if isinstance(expr, MatrixSymbol):
        return _slices(expr.name, table)
    if isinstance(expr, Transpose):
        return tr(matrix_tree(expr.arg, table))
    if isinstance(expr, MatMul):
        if any(not getattr(a, "is_Matrix", False) for a in expr.args):
            raise CodegenError(
                f"codegen: scalar factor inside a matrix monomial {expr}; expand first"
            )
        mats = [a for a in expr.args if not isinstance(a, Identity)]
        head = matrix_tree(mats[0], table)
        for m in mats[1:]:
            if isinstance(m, Constant):
                head = mm(head, _slices(m.name, table))
            elif isinstance(m, Transpose) and isinstance(m.arg, Constant):
                head = mm(head, sp.Symbol(f"{table.get(m.arg.name, m.arg.name)}.mT"))
                _slices(m.arg.name, table)
            else:
                raise CodegenError(
                    f"codegen: only products of a block with constants are supported, got {expr}"
                )
        return head
    raise CodegenError(
        f"codegen: cannot print the matrix expression {expr} ({type(expr).__name__})"
    )


def reduction_tree(inner: Inner, table: Mapping[str, str]) -> sp.Expr:
    """One per-group reduction for ⟨A, B⟩."""
    a, b = inner.args
    if isinstance(a, OneMatrix) and isinstance(b, OneMatrix):
        raise CodegenError("codegen: ⟨𝟙, 𝟙⟩ is a constant; it should not reach generated code")
    if isinstance(a, OneMatrix):
        return total(matrix_tree(b, table))
    if isinstance(b, OneMatrix):
        return total(matrix_tree(a, table))
    if a == b:
        return sq(matrix_tree(a, table))
    return dot(matrix_tree(a, table), matrix_tree(b, table))


class _Printer(PythonCodePrinter):
    """Python code for scalar trees; symbols print as the code they stand for."""

    def __init__(self) -> None:
        super().__init__({"standard": "python3", "allow_unknown_functions": True})

    def _print_Symbol(self, expr):  # noqa: N802 - SymPy's printer protocol
        return expr.name

    def _print_Float(self, expr):  # noqa: N802
        return repr(float(expr))

    def _print_Integer(self, expr):  # noqa: N802
        return f"{int(expr)}"


def _scalar_tree(key: str, expr, table: Mapping[str, str], zero: sp.Expr) -> sp.Expr:
    """Reductions as kernel calls, coefficients collected per reduction and factored."""
    expr = sp.expand(sp.sympify(expr))
    inners = sorted(expr.atoms(Inner), key=sp.default_sort_key)
    placeholders = {inner: sp.Dummy(f"f{i}") for i, inner in enumerate(inners)}
    scalar = expr.xreplace(placeholders)
    stray = scalar.free_symbols - set(placeholders.values())
    if stray:
        raise CodegenError(
            f"codegen: {', '.join(sorted(map(str, stray)))} is missing from the argument "
            f"sequences of {key}"
        )
    calls = {placeholders[inner]: reduction_tree(inner, table) for inner in inners}
    if scalar == 0:
        return zero
    collected = sp.collect(scalar, list(placeholders.values()), func=sp.factor)
    collected = collected.xreplace(
        {r: sp.Float(r, 17) for r in collected.atoms(sp.Rational) if not r.is_Integer}
    )
    return collected.xreplace(calls)


def _kernels(trees: Sequence[sp.Expr]) -> set[str]:
    names = {"sq", "dot", "total", "mm", "tr", "zeros"}
    return {
        f.func.__name__ for t in trees for f in t.atoms(AppliedUndef) if f.func.__name__ in names
    }


def compile_terms(
    terms: Mapping[str, sp.Expr],
    table: Mapping[str, str],
    zero: str | None = None,
    shared: Program | None = None,
    prefix: str = "s",
) -> Program:
    """Compile named scalar data terms into shared assignments (``sympy.cse``) plus outputs.

    ``zero`` is the slice list whose per-group zeros stand for a term that vanishes (default:
    the first entry of the table). ``shared`` is an earlier program of the same function: its
    assignments are reused, and new ones are numbered after them.
    """
    first = zero if zero is not None else next(iter(table.values()))
    trees = [_scalar_tree(k, v, table, zeros(sp.Symbol(first))) for k, v in terms.items()]
    known = dict(shared.defined) if shared is not None else {}
    start = len(shared.assignments) if shared is not None else 0
    trees = [t.xreplace(known) for t in trees]
    replacements, reduced = sp.cse(
        trees, symbols=sp.numbered_symbols(prefix, start=start), optimizations=None
    )
    printer = _Printer()
    defined = dict(known)
    inverse = {name: tree for tree, name in known.items()}
    for name, value in replacements:
        inverse[name] = value.xreplace(inverse)
        defined[inverse[name]] = name
    return Program(
        [(s.name, printer.doprint(e)) for s, e in replacements],
        [(k, printer.doprint(t)) for k, t in zip(terms, reduced)],
        _kernels(trees) | _kernels([e for _, e in replacements]),
        defined,
    )
