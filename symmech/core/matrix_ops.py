"""Matrix-expression tools the engine needs and SymPy lacks.

* :class:`MatrixExp` -- ``e^{A}`` for a matrix expression, with the rule
  d/dα e^{αE} = E e^{αE} and e^{0} = I (SymPy's ``diff`` raises on ``exp(alpha*E)``).
* :class:`Inner` -- the Frobenius inner product ⟨A, B⟩ = tr(AᵀB) as a scalar,
  printed as in the paper and bilinear under :func:`expand_inner`.
* :func:`d_alpha` -- the derivative of a matrix expression in a scalar symbol.
* :func:`clean` -- removes the ``0*X`` and ``X + 0`` debris SymPy leaves behind.
"""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions import (
    HadamardProduct,
    Identity,
    MatAdd,
    MatMul,
    MatrixExpr,
    MatrixSymbol,
    Trace,
    Transpose,
    ZeroMatrix,
)


class MatrixExp(MatrixExpr):
    """The matrix exponential ``e^{A}`` of a square matrix expression ``A``.

    >>> import sympy as sp
    >>> E = sp.MatrixSymbol("E", 3, 3)
    >>> MatrixExp(0 * E)
    I
    """

    def __new__(cls, arg: MatrixExpr):
        arg = sp.sympify(arg)
        if not getattr(arg, "is_Matrix", False):
            raise TypeError(f"MatrixExp({arg!r}): the argument must be a matrix expression")
        if arg.shape[0] != arg.shape[1]:
            raise TypeError(f"MatrixExp({arg}): the argument must be square, got shape {arg.shape}")
        arg = clean(arg)
        if isinstance(arg, ZeroMatrix):
            return Identity(arg.shape[0])
        return super().__new__(cls, arg)

    @property
    def arg(self) -> MatrixExpr:
        return self.args[0]

    @property
    def shape(self):
        return self.arg.shape

    def _eval_transpose(self):
        return MatrixExp(Transpose(self.arg).doit())

    def _latex(self, printer) -> str:
        return r"e^{%s}" % printer._print(self.arg)

    def _sympystr(self, printer) -> str:
        return f"expm({printer._print(self.arg)})"


def expm(arg: MatrixExpr) -> MatrixExpr:
    """User-facing constructor of :class:`MatrixExp` (``symmech.expm(alpha * E)``)."""
    return MatrixExp(arg)


class Inner(sp.Function):
    """Frobenius inner product ⟨A, B⟩ = tr(AᵀB) of two same-shaped matrix expressions."""

    nargs = 2
    is_commutative = True

    @classmethod
    def eval(cls, a, b):
        if isinstance(a, ZeroMatrix) or isinstance(b, ZeroMatrix):
            return sp.S.Zero
        return None

    def _latex(self, printer) -> str:
        a, b = self.args
        if a == b:
            return r"\left\lVert %s \right\rVert^{2}" % printer._print(a)
        return r"\left\langle %s,\, %s \right\rangle" % (printer._print(a), printer._print(b))

    def _sympystr(self, printer) -> str:
        return f"<{printer._print(self.args[0])}, {printer._print(self.args[1])}>"

    def as_trace(self) -> sp.Expr:
        a, b = self.args
        return Trace(Transpose(a) * b)


def _split_scalar(term: MatrixExpr) -> tuple[sp.Expr, MatrixExpr]:
    """Split a product into (scalar coefficient, matrix part)."""
    if isinstance(term, MatMul):
        scalars = [x for x in term.args if not getattr(x, "is_Matrix", False)]
        mats = [x for x in term.args if getattr(x, "is_Matrix", False)]
        coeff = sp.Mul(*scalars) if scalars else sp.S.One
        if not mats:
            raise ValueError(f"{term} has no matrix factor")
        mat = mats[0] if len(mats) == 1 else MatMul(*mats)
        return coeff, mat
    return sp.S.One, term


def clean(expr):
    """Normalise a matrix expression: zero coefficients and zero terms are removed,
    scalar coefficients are simplified, and ``I`` factors dropped from products."""
    if not getattr(expr, "is_Matrix", False):
        if isinstance(expr, sp.Basic) and expr.args:
            return expr.func(*[clean(a) for a in expr.args])
        return expr
    if isinstance(expr, MatAdd):
        parts = [clean(t) for t in expr.args]
        parts = [p for p in parts if not isinstance(p, ZeroMatrix)]
        if not parts:
            return ZeroMatrix(*expr.shape)
        return parts[0] if len(parts) == 1 else MatAdd(*parts).doit()
    if isinstance(expr, MatMul):
        coeff, mats = sp.S.One, []
        for x in expr.args:
            if not getattr(x, "is_Matrix", False):
                coeff *= x
                continue
            x = clean(x)
            if isinstance(x, MatMul):
                c, m = _split_scalar(x)
                coeff *= c
                mats.extend(m.args if isinstance(m, MatMul) else [m])
            else:
                mats.append(x)
        coeff = sp.simplify(coeff)
        if coeff == 0 or any(isinstance(m, ZeroMatrix) for m in mats):
            return ZeroMatrix(*expr.shape)
        if len(mats) > 1:
            mats = [m for m in mats if not isinstance(m, Identity)] or mats[:1]
        inner = mats[0] if len(mats) == 1 else MatMul(*mats)
        return inner if coeff == 1 else MatMul(coeff, inner)
    if isinstance(expr, Transpose):
        arg = clean(expr.arg)
        if isinstance(arg, (ZeroMatrix, Identity)):
            return arg.T
        return Transpose(arg).doit()
    if isinstance(expr, MatrixExp):
        return MatrixExp(clean(expr.arg))
    if isinstance(expr, HadamardProduct):
        return HadamardProduct(*[clean(a) for a in expr.args]).doit()
    return expr


def d_alpha(expr, alpha: sp.Symbol):
    """Derivative of a (matrix or scalar) expression with respect to the scalar ``alpha``.

    Handles sums, products (product rule), transposes, Hadamard products and
    :class:`MatrixExp` of ``f(alpha) * C`` with ``C`` free of alpha.
    """
    if not isinstance(expr, sp.Basic) or not expr.has(alpha):
        if getattr(expr, "is_Matrix", False):
            return ZeroMatrix(*expr.shape)
        return sp.S.Zero
    if not getattr(expr, "is_Matrix", False):
        if expr.atoms(MatrixExp) or expr.atoms(MatrixSymbol):
            raise NotImplementedError(f"d/dalpha of the scalar matrix function {expr}")
        return sp.diff(expr, alpha)
    if isinstance(expr, MatAdd):
        return clean(MatAdd(*[d_alpha(t, alpha) for t in expr.args]))
    if isinstance(expr, MatMul):
        args = list(expr.args)
        terms = []
        for i, a in enumerate(args):
            da = d_alpha(a, alpha)
            if da == 0 or isinstance(da, ZeroMatrix):
                continue
            terms.append(MatMul(*(args[:i] + [da] + args[i + 1 :])))
        if not terms:
            return ZeroMatrix(*expr.shape)
        return clean(MatAdd(*terms) if len(terms) > 1 else terms[0])
    if isinstance(expr, Transpose):
        return clean(Transpose(d_alpha(expr.arg, alpha)))
    if isinstance(expr, HadamardProduct):
        args = list(expr.args)
        terms = [
            HadamardProduct(*(args[:i] + [d_alpha(a, alpha)] + args[i + 1 :]))
            for i, a in enumerate(args)
            if a.has(alpha)
        ]
        return clean(MatAdd(*terms) if len(terms) > 1 else terms[0])
    if isinstance(expr, MatrixExp):
        coeff, const = _split_scalar(expr.arg)
        if const.has(alpha) or isinstance(expr.arg, MatAdd):
            raise NotImplementedError(
                f"d/dalpha of {expr}: only exponentials of f(alpha) * C with C free of alpha"
                " are supported"
            )
        return clean(MatMul(sp.diff(coeff, alpha), const, expr))
    raise NotImplementedError(
        f"d/dalpha of {type(expr).__name__} ({expr}) is not supported; "
        "write the action with sums, products, transposes and symmech.expm"
    )


def scalar_coefficients(expr, alpha: sp.Symbol) -> list[sp.Expr]:
    """Every scalar subexpression of a matrix expression that depends on ``alpha``."""
    found: list[sp.Expr] = []

    def walk(node):
        if not getattr(node, "is_Matrix", False):
            if isinstance(node, sp.Basic) and node.has(alpha):
                found.append(node)
            return
        if isinstance(node, MatMul):
            coeff, _ = _split_scalar(node)
            if coeff.has(alpha):
                found.append(coeff)
            for a in node.args:
                if getattr(a, "is_Matrix", False):
                    walk(a)
            return
        for a in node.args:
            walk(a)

    walk(expr)
    return found


def expand_terms(expr) -> list[tuple[sp.Expr, MatrixExpr]]:
    """Fully distribute a matrix expression into (scalar coefficient, monomial) pairs.

    Products distribute over sums and transposes are pushed down to the leaves, so
    every monomial is a product of symbols, their transposes and opaque nodes.
    """
    if isinstance(expr, MatAdd):
        return [t for a in expr.args for t in expand_terms(a)]
    if isinstance(expr, MatMul):
        out: list[tuple[sp.Expr, list]] = [(sp.S.One, [])]
        for a in expr.args:
            if not getattr(a, "is_Matrix", False):
                out = [(c * a, fs) for c, fs in out]
                continue
            parts = expand_terms(a)
            out = [(c * pc, fs + [pm]) for c, fs in out for pc, pm in parts]
        result = []
        for c, fs in out:
            if c == 0 or any(isinstance(f, ZeroMatrix) for f in fs):
                continue
            fs = [f for f in fs if not isinstance(f, Identity)] or fs[:1]
            result.append((c, fs[0] if len(fs) == 1 else MatMul(*fs).doit()))
        return result
    if isinstance(expr, Transpose):
        return [(c, Transpose(m).doit()) for c, m in expand_terms(expr.arg)]
    if isinstance(expr, ZeroMatrix):
        return []
    return [(sp.S.One, expr)]


def _structured_tail(m: MatrixExpr):
    """(A, E) when m = A·E with E a symmetric or antisymmetric constant, else None."""
    if isinstance(m, MatMul):
        mats = [x for x in m.args if getattr(x, "is_Matrix", False)]
        scalars = [x for x in m.args if not getattr(x, "is_Matrix", False)]
        last = mats[-1]
        if not scalars and len(mats) == 2 and getattr(last, "structure", "general") != "general":
            return mats[0], last
    return None


def _canonical_pair(ma: MatrixExpr, mb: MatrixExpr) -> tuple[int, MatrixExpr, MatrixExpr]:
    """Order the arguments of ⟨ma, mb⟩; ⟨YE, X⟩ = ±⟨XE, Y⟩ for a (anti)symmetric E."""
    for first, other in ((ma, mb), (mb, ma)):
        tail = _structured_tail(first)
        if tail is not None and isinstance(other, MatrixSymbol):
            left, const = tail
            if isinstance(left, MatrixSymbol) and sp.default_sort_key(other) < sp.default_sort_key(
                left
            ):
                sign = 1 if const.structure == "symmetric" else -1
                return sign, MatMul(other, const), left
            return 1, first, other
    x, y = sorted([ma, mb], key=sp.default_sort_key)
    return 1, x, y


def expand_inner(expr: sp.Expr) -> sp.Expr:
    """Distribute every :class:`Inner` over sums and pull scalar factors out,
    putting the arguments of each inner product in a canonical order."""

    def expand_one(a: MatrixExpr, b: MatrixExpr) -> sp.Expr:
        total = sp.S.Zero
        for ca, ma in expand_terms(a):
            for cb, mb in expand_terms(b):
                sign, x, y = _canonical_pair(ma, mb)
                total += sign * ca * cb * Inner(x, y)
        return sp.expand(total)

    return expr.replace(lambda e: isinstance(e, Inner), lambda e: expand_one(*e.args))


def replace_exp_of_matrices(expr):
    """Turn ``sympy.exp(alpha*E)`` (a matrix argument) into :class:`MatrixExp`."""
    if not isinstance(expr, sp.Basic):
        return expr
    return expr.replace(
        lambda e: isinstance(e, sp.exp) and getattr(e.args[0], "is_Matrix", False),
        lambda e: MatrixExp(e.args[0]),
    )
