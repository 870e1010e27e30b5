"""Plain-text rendering of a derivation (what ``symmech derive SPEC`` prints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy as sp

from symmech.derive.data_terms import readable

if TYPE_CHECKING:
    from symmech.derivation import Derivation


def _s(x) -> str:
    return sp.sstr(x)


def derivation_summary(d: Derivation) -> str:
    """A readable, line-oriented summary of every derived result."""
    sym = d.symmetry
    kind = "multiplicative" if sym.is_multiplicative else "additive"
    lines = [f"symmetry {sym.name}  ({kind}, identity α = {sym.identity})"]
    if sym.description:
        lines.append(f"  {sym.description}")
    lines.append("action ψ(θ, α):")
    lines += [f"  {b.name} -> {_s(im)}" for b, im in sym.action.items()]
    lines.append("generator ξ:")
    lines += [f"  ξ_{b.name} = {_s(x)}" for b, x in d.generator.items()]
    lines.append(f"G1  <g, ξ> = {_s(d.gradient_constraint)} = 0")
    lines.append("G2  Hξ = -Dξᵀg:")
    lines += [f"  (Hξ)_{b.name} = {_s(v)}" for b, v in d.hessian_constraint.items()]
    lines.append(f"G3  ξᵀHξ = {_s(d.hessian_quadratic_form)}")
    lines.append("E1  g(θ) = (∂ψ/∂θ)ᵀ g(ψ(θ, α)):")
    lines += [f"  g_{b.name}(θ) = {_s(v)}" for b, v in d.equivariance.items()]
    if d.loss_confirmed:
        lines.append(f"loss invariance confirmed {d.loss_confirmed}ally")
    if d.conserved is not None:
        lines.append(f"conserved under gradient flow: Q = {_s(d.conserved)}")
        for c, m in d.conserved_matrices.items():
            lines.append(
                f"  conserved matrix (Q = <M, {c.name}> for every symmetric {c.name}): M = {_s(m)}"
            )
    else:
        lines.append(f"no conserved quantity: {d.why_no_conserved}")
    dyn = d.dynamics
    if not dyn.closes:
        lines.append(f"learning dynamics: the projection does not close: {dyn.why_not_closed}")
        return "\n".join(lines)
    lines.append(f"learning dynamics (t = Σ η_k): <ξ, θ> = κQ with κ = {dyn.kappa}")
    for law in dyn.laws.values():
        lines.append(f"  {law.title}:")
        if isinstance(law.ode, list):
            lines += [f"    {_s(e)}" for e in law.ode]
        else:
            lines.append(f"    {_s(law.ode)}")
            lines.append(f"    solution: {_s(law.solution)}")
        for name, value in law.data.items():
            lines.append(f"    data {name}: {_s(readable(value))}")
    return "\n".join(lines)
