"""The per-step data the laws need, as quadratic forms in (θₖ, gₖ, bₖ₋₁).

For ξ = Jθ + c the laws need, per group and step, only

* ``Q``   = ½⟨θ, Jθ⟩ + ⟨c, θ⟩        the observed charge,
* ``r``   = ⟨ξ(θ), g⟩                 the symmetry residual (0 for an exact symmetry),
* ``gJg`` = ⟨g, Jg⟩                   forcing of the first-order modified flow,
* ``uJu`` = ⟨u, Ju⟩                   forcing of the momentum flow and of the discrete law,
* ``uJb`` = ⟨u, Jb⟩                   the momentum cross-term of the discrete law,

with u and b written through torch.optim.SGD's update: d = g + λθ,
b = βb₋ + (1−τ)d (b = d at the first step), u = b, or d + βb with Nesterov.
Expanding gives the bilinear forms ⟨x, Jy⟩ for x, y ∈ {θ, g, b₋} that generated code
reduces in one pass per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions import MatAdd, MatrixExpr, ZeroMatrix

from symmech.core.matrix_ops import Inner, clean, expand_inner
from symmech.spec.declare import Block

from .geometry import Companion, Geometry, companion

# Hyperparameter symbols of torch.optim.SGD.
eta = sp.Symbol("eta", positive=True)
beta = sp.Symbol("beta", nonnegative=True)
lam = sp.Symbol("lambda", nonnegative=True)
tau = sp.Symbol("tau", nonnegative=True)

HYPER_SYMBOLS = {"lr": eta, "momentum": beta, "weight_decay": lam, "dampening": tau}


def buffer_symbol(block: Block) -> Companion:
    """bₖ₋₁ restricted to a block: torch's ``momentum_buffer`` before the step."""
    return companion(block, "buf", "b_{#}")


def apply_J(geometry: Geometry, x: dict[Block, MatrixExpr]) -> dict[Block, MatrixExpr]:
    """(Jx)_B for the linear part of the generator, with x substituted for the blocks."""
    rules = {b: x[b] for b in geometry.blocks}
    return {b: clean(geometry.affine.J_apply[b].xreplace(rules)) for b in geometry.blocks}


def bilinear(geometry: Geometry, x: dict[Block, MatrixExpr], y: dict[Block, MatrixExpr]) -> sp.Expr:
    """⟨x, Jy⟩ = Σ_B ⟨x_B, (Jy)_B⟩, expanded into inner products of companions."""
    jy = apply_J(geometry, y)
    return sp.expand(expand_inner(sp.Add(*[Inner(x[b], jy[b]) for b in geometry.blocks])))


def linear(geometry: Geometry, x: dict[Block, MatrixExpr]) -> sp.Expr:
    """⟨c, x⟩ = Σ_B ⟨c_B, x_B⟩."""
    c = geometry.affine.offset
    return sp.expand(expand_inner(sp.Add(*[Inner(c[b], x[b]) for b in geometry.blocks])))


def _combine(*pairs: tuple[sp.Expr, dict[Block, MatrixExpr]]) -> dict[Block, MatrixExpr]:
    blocks = pairs[0][1].keys()
    out = {}
    for b in blocks:
        terms = [coeff * vec[b] for coeff, vec in pairs if coeff != 0]
        out[b] = (
            clean(MatAdd(*terms))
            if len(terms) > 1
            else (terms[0] if terms else ZeroMatrix(*b.shape))
        )
    return out


@dataclass
class DataTerms:
    """Symbolic data terms of one symmetry, for the general and the first step."""

    theta: dict[Block, MatrixExpr]
    grad: dict[Block, MatrixExpr]
    buf: dict[Block, MatrixExpr]
    charge: sp.Expr
    residual: sp.Expr
    gJg: sp.Expr
    uJu: dict[str, sp.Expr]  # keys: "sgd", "first", "nesterov", "nesterov_first", "plain"
    uJb: dict[str, sp.Expr]
    bilinear_forms: dict[tuple[str, str], sp.Expr]
    linear_forms: dict[str, sp.Expr]

    def as_dict(self) -> dict[str, sp.Expr]:
        out = {"Q": self.charge, "r": self.residual, "gJg": self.gJg}
        out.update({f"uJu[{k}]": v for k, v in self.uJu.items()})
        out.update({f"uJb[{k}]": v for k, v in self.uJb.items()})
        return out


def derive_data_terms(geometry: Geometry, charge: sp.Expr) -> DataTerms:
    """Build every data term from the affine structure."""
    theta = {b: b for b in geometry.blocks}
    grad = dict(geometry.grad)
    buf = {b: buffer_symbol(b) for b in geometry.blocks}
    d = _combine((sp.S.One, grad), (lam, theta))
    b_new = _combine((beta, buf), (1 - tau, d))
    u = {
        "sgd": b_new,
        "first": d,
        "nesterov": _combine((sp.S.One, d), (beta, b_new)),
        "nesterov_first": _combine((1 + beta, d)),
        "plain": d,
    }
    b_of = {"sgd": b_new, "first": d, "nesterov": b_new, "nesterov_first": d, "plain": d}
    vectors = {"theta": theta, "grad": grad, "buf": buf}
    names = list(vectors)
    forms = {
        (x, y): bilinear(geometry, vectors[x], vectors[y])
        for i, x in enumerate(names)
        for y in names[i:]
    }
    lin = {x: linear(geometry, vectors[x]) for x in names}
    residual = geometry.gradient_constraint
    return DataTerms(
        theta=theta,
        grad=grad,
        buf=buf,
        charge=charge,
        residual=residual,
        gJg=forms[("grad", "grad")],
        uJu={k: bilinear(geometry, v, v) for k, v in u.items()},
        uJb={k: bilinear(geometry, v, b_of[k]) for k, v in u.items()},
        bilinear_forms=forms,
        linear_forms=lin,
    )


def sgd_case(momentum: float, nesterov: bool, first_step: bool) -> str:
    """Which update form torch.optim.SGD uses at a step."""
    if momentum == 0:
        return "plain"
    if nesterov:
        return "nesterov_first" if first_step else "nesterov"
    return "first" if first_step else "sgd"


def readable(expr: sp.Expr) -> sp.Expr:
    """Group a data term by its inner products with factored coefficients (for display)."""
    inners = sorted(expr.atoms(Inner), key=sp.default_sort_key)
    if not inners:
        return expr
    return sp.collect(sp.expand(expr), inners, func=sp.factor)
