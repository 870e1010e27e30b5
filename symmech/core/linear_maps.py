"""Adjoints of maps that are affine in one matrix block, and gradients of inner products.

SymPy's matrix derivative (``diff(Trace(...), X)``) is fragile on mixed shapes, so the
engine uses these explicit rules instead:

* ⟨v, L X R⟩ = ⟨Lᵀ v Rᵀ, X⟩ and ⟨v, L Xᵀ R⟩ = ⟨R vᵀ L, X⟩, so the adjoint of the linear
  part of an expression affine in X, applied to v, is a sum of such terms;
* ∇_X ⟨A(X), B(X)⟩ = (DA)ᵀ B + (DB)ᵀ A for A and B affine in X.
"""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions import (
    HadamardProduct,
    MatAdd,
    MatMul,
    MatrixExpr,
    MatrixSymbol,
    Transpose,
    ZeroMatrix,
)

from .matrix_ops import Inner, _split_scalar, clean, expand_inner, expand_terms


class NotAffineError(ValueError):
    """An expression is not affine in the block it was differentiated by."""


def _push_transposes(expr):
    """Distribute transposes down to the symbols: (A B)ᵀ = Bᵀ Aᵀ, (A + B)ᵀ = Aᵀ + Bᵀ."""
    if not getattr(expr, "is_Matrix", False) or not isinstance(expr, sp.Basic):
        return expr
    if isinstance(expr, Transpose):
        arg = expr.arg
        if isinstance(arg, MatAdd):
            return MatAdd(*[_push_transposes(Transpose(a)) for a in arg.args])
        if isinstance(arg, MatMul):
            coeff, _ = _split_scalar(arg)
            mats = [a for a in arg.args if getattr(a, "is_Matrix", False)]
            product = MatMul(*[_push_transposes(Transpose(m)) for m in reversed(mats)])
            return product if coeff == 1 else MatMul(coeff, product)
        if isinstance(arg, Transpose):
            return _push_transposes(arg.arg)
        if isinstance(arg, HadamardProduct):
            return HadamardProduct(*[_push_transposes(Transpose(a)) for a in arg.args])
        return Transpose(_push_transposes(arg)).doit()
    if expr.args:
        return expr.func(*[_push_transposes(a) for a in expr.args])
    return expr


def _flatten_terms(expr) -> list[MatrixExpr]:
    """Expand products of sums into a flat list of product terms."""
    return [m if c == 1 else MatMul(c, m) for c, m in expand_terms(_push_transposes(clean(expr)))]


def adjoint_apply(expr: MatrixExpr, block: MatrixSymbol, v: MatrixExpr) -> MatrixExpr:
    """(∂expr/∂block)ᵀ v for an expression affine in ``block``.

    >>> import sympy as sp
    >>> U = sp.MatrixSymbol("U", 3, 2); E = sp.MatrixSymbol("E", 2, 2); v = sp.MatrixSymbol("v", 3, 2)
    >>> adjoint_apply(U * E, U, v)
    v*E.T
    """
    out: list[MatrixExpr] = []
    for term in _flatten_terms(expr):
        if isinstance(term, ZeroMatrix) or not term.has(block):
            continue
        coeff, mat = _split_scalar(term)
        if coeff.has(block):
            raise NotAffineError(f"{term} has {block} in a scalar coefficient")
        if isinstance(mat, HadamardProduct):
            others = [a for a in mat.args if not a.has(block)]
            hits = [a for a in mat.args if a.has(block)]
            if len(hits) != 1 or hits[0] != block:
                raise NotAffineError(f"{term} is not affine in {block}")
            out.append(coeff * HadamardProduct(*others, v) if others else coeff * v)
            continue
        factors = list(mat.args) if isinstance(mat, MatMul) else [mat]
        hits = [i for i, f in enumerate(factors) if f.has(block)]
        if len(hits) != 1:
            raise NotAffineError(f"{term} is not affine in {block}")
        i = hits[0]
        left, right = factors[:i], factors[i + 1 :]
        n_left = MatMul(*left) if left else None
        n_right = MatMul(*right) if right else None
        f = factors[i]
        if f == block:
            pieces = ([Transpose(n_left)] if n_left is not None else []) + [v]
            pieces += [Transpose(n_right)] if n_right is not None else []
        elif isinstance(f, Transpose) and f.arg == block:
            pieces = ([n_right] if n_right is not None else []) + [Transpose(v)]
            pieces += [n_left] if n_left is not None else []
        else:
            raise NotAffineError(f"{term}: {block} appears inside {f}")
        product = MatMul(*pieces) if len(pieces) > 1 else pieces[0]
        out.append(coeff * product if coeff != 1 else product)
    if not out:
        return ZeroMatrix(*block.shape)
    return clean(_push_transposes(MatAdd(*out) if len(out) > 1 else out[0]))


def linear_part(expr: MatrixExpr, blocks) -> MatrixExpr:
    """expr(θ) − expr(0): the part of an affine expression that is linear in the blocks.

    Both sides are expanded into monomials and matching monomials cancel exactly, so an
    offset such as e^α c in ψ = e^α(θ + c) − c drops out.
    """
    zero = {b: ZeroMatrix(*b.shape) for b in blocks}
    totals: dict = {}
    order: list = []
    for sign, side in ((1, expr), (-1, clean(expr.xreplace(zero)))):
        for coeff, mono in expand_terms(_push_transposes(clean(side))):
            if mono not in totals:
                totals[mono] = sp.S.Zero
                order.append(mono)
            totals[mono] += sign * coeff
    terms = []
    for mono in order:
        c = sp.simplify(totals[mono])
        if c != 0:
            terms.append(mono if c == 1 else MatMul(c, mono))
    if not terms:
        return ZeroMatrix(*expr.shape)
    return clean(MatAdd(*terms) if len(terms) > 1 else terms[0])


def grad_of_inner_form(q: sp.Expr, block: MatrixSymbol) -> MatrixExpr:
    """∇_block of a linear combination of inner products ⟨A_i, B_i⟩ (each factor affine)."""
    q = expand_inner(q)
    total: list[MatrixExpr] = []
    for term in sp.Add.make_args(sp.expand(q)):
        inners = [f for f in sp.Mul.make_args(term) if isinstance(f, Inner)]
        if not inners:
            continue
        if len(inners) != 1:
            raise NotAffineError(f"{term} is a product of inner products")
        coeff = sp.Mul(*[f for f in sp.Mul.make_args(term) if not isinstance(f, Inner)])
        a, b = inners[0].args
        for x, y in ((a, b), (b, a)):
            if x.has(block):
                g = adjoint_apply(x, block, y)
                if not isinstance(g, ZeroMatrix):
                    total.append(coeff * g if coeff != 1 else g)
    if not total:
        return ZeroMatrix(*block.shape)
    return clean(MatAdd(*total) if len(total) > 1 else total[0])


def symmetric_part(m: MatrixExpr) -> MatrixExpr:
    """(M + Mᵀ)/2, simplified."""
    s = clean(_push_transposes(sp.Rational(1, 2) * (m + Transpose(m))))
    return clean(sp.expand(s)) if isinstance(s, (MatAdd, MatMul)) else s
