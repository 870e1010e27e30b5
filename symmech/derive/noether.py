"""Noether's theorem for gradient flow: the conserved quantity Q with ∇Q = ξ.

Under θ̇ = −g, dQ/dt = ⟨∇Q, θ̇⟩ = −⟨ξ, g⟩ = 0 by G1, provided ξ is a gradient field,
i.e. Dξ is symmetric. For an affine generator ξ = Jθ + c with J symmetric the charge is
Q = ½θᵀJθ + cᵀθ = Σ_B ½⟨θ_B, ξ_B⟩ + ½⟨c_B, θ_B⟩.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy.matrices.expressions import MatrixExpr

from symmech.core.linear_maps import grad_of_inner_form, symmetric_part
from symmech.core.matrix_ops import Inner, expand_inner
from symmech.spec.declare import Constant, impose_structure

from .geometry import Geometry, flat, instantiate, sample_sizes


@dataclass
class NoetherResult:
    """The conserved quantity, or why there is none."""

    charge: sp.Expr | None
    why_none: str = ""
    conserved_matrices: dict[Constant, MatrixExpr] = field(default_factory=dict)


def noether_charge(geometry: Geometry) -> NoetherResult:
    """Integrate the generator: Q with ∇Q = ξ, checked exactly at small sizes."""
    affine = geometry.affine
    if not affine.is_affine:
        return NoetherResult(
            None,
            f"{affine.why}; symmech integrates affine generators ξ = Jθ + c only, "
            "so no closed-form charge is derived",
        )
    if not affine.is_symmetric:
        return NoetherResult(None, affine.why)
    terms = []
    for b, xi in geometry.generator.items():
        terms.append(sp.Rational(1, 2) * Inner(b, xi))
        terms.append(sp.Rational(1, 2) * Inner(affine.offset[b], b))
    charge = impose_structure(expand_inner(sp.Add(*terms)))
    charge = sp.expand(charge)
    _verify_gradient(geometry, charge)
    matrices = {}
    for const in geometry.symmetry.constants:
        if const.structure == "symmetric" and charge.has(const):
            matrices[const] = symmetric_part(grad_of_inner_form(charge, const))
    return NoetherResult(charge, "", matrices)


def _verify_gradient(geometry: Geometry, charge: sp.Expr) -> None:
    """Exact check that ∇Q = ξ on explicit matrices (guards the integration rule)."""
    sym = geometry.symmetry
    sizes = sample_sizes(sym, 2)
    q_inst, env = instantiate(charge, sym, sizes)
    thetas = [env[b] for b in geometry.blocks]
    theta_vec = flat(thetas)
    grad = sp.Matrix([q_inst]).jacobian(theta_vec).T
    xi_vec = flat([instantiate(geometry.generator[b], sym, sizes)[0] for b in geometry.blocks])
    if (
        not (grad - xi_vec).applyfunc(sp.expand).is_zero_matrix
    ):  # pragma: no cover - engine bug guard
        raise AssertionError(f"internal error: ∇Q ≠ ξ for {sym.name}; Q = {charge}")
