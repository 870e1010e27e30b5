"""Does the projection of the learning dynamics onto the generator close?

The laws of :mod:`symmech.laws.continuous` and :mod:`symmech.laws.discrete` are exact consequences of
the geometry only when

* ξ = Jθ + c is affine with J symmetric (so Q = ½θᵀJθ + cᵀθ exists and ⟨ξ, θ̇⟩ = Q̇),
* ⟨ξ, θ⟩ = κQ for a constant κ (so weight decay acts on Q alone),
* every block of a group has the same learning rate and weight decay, and
* the optimizer's update is linear in (g, θ, b), as in ``torch.optim.SGD``.

Otherwise the verdict names the term that is left over and what would have to be measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sympy as sp

from symmech.core.matrix_ops import Inner, expand_inner
from symmech.errors import ClosureError, explain

from .geometry import Geometry, instantiate, sample_sizes

#: Optimizers whose update the laws describe exactly.
SUPPORTED_OPTIMIZERS = ("SGD",)

_ADAPTIVE = {
    "Adam": "divides each coordinate by √v̂ₖ + ε",
    "AdamW": "divides each coordinate by √v̂ₖ + ε (and decays weights outside the gradient)",
    "Adagrad": "divides each coordinate by the root of its summed squared gradients",
    "RMSprop": "divides each coordinate by a running root-mean-square of its gradient",
    "Adamax": "divides each coordinate by a running max of |g|",
    "NAdam": "divides each coordinate by √v̂ₖ + ε",
    "RAdam": "divides each coordinate by √v̂ₖ + ε",
    "Adadelta": "rescales each coordinate by running averages of squared updates and gradients",
}


@dataclass(frozen=True)
class Closure:
    """The closure verdict: ``closes`` with ``kappa``, or the left-over term and why."""

    closes: bool
    kappa: sp.Expr | None
    xi_dot_theta: sp.Expr | None
    why: str = ""
    leftover: sp.Expr | None = None

    def require(self, what: str) -> None:
        """Raise :class:`ClosureError` with the reason when the projection does not close."""
        if not self.closes:
            raise ClosureError(explain(what, self.why))


def structural_closure(geometry: Geometry, charge: sp.Expr | None, why_no_charge: str) -> Closure:
    """κ with ⟨ξ, θ⟩ = κQ, found exactly on explicit matrices at two sizes."""
    affine = geometry.affine
    xi_theta = expand_inner(sp.Add(*[Inner(xi, b) for b, xi in geometry.generator.items()]))
    if not affine.is_affine:
        return Closure(
            False,
            None,
            xi_theta,
            f"{affine.why}: Q̇ = ⟨∇Q, θ̇⟩ cannot be written with ξ, so the projected ODE does not close; "
            "the term ⟨ξ(θ), θ̇⟩ would have to be measured every step",
        )
    if charge is None:
        return Closure(
            False,
            None,
            xi_theta,
            f"there is no conserved quantity to project onto: {why_no_charge}",
        )
    kappa = None
    for base in (2, 3):
        sizes = sample_sizes(geometry.symmetry, base)
        lhs, _ = instantiate(xi_theta, geometry.symmetry, sizes)
        q, _ = instantiate(charge, geometry.symmetry, sizes)
        lhs, q = sp.expand(lhs), sp.expand(q)
        ratio = sp.simplify(lhs / q) if q != 0 else None
        if ratio is None or ratio.free_symbols:
            leftover = expand_inner(xi_theta - 2 * charge)
            return Closure(
                False,
                None,
                xi_theta,
                f"⟨ξ, θ⟩ = {sp.sstr(xi_theta)} is not a constant multiple of Q = {sp.sstr(charge)} "
                "(the generator mixes a linear part Jθ with an offset c); weight decay then drives "
                "Q through λ⟨ξ, θ⟩, which is not a function of Q: measure ⟨ξ(θₖ), θₖ⟩ every step",
                leftover,
            )
        if kappa is not None and ratio != kappa:  # pragma: no cover - guards sample-size artefacts
            return Closure(False, None, xi_theta, f"κ differs between sizes ({kappa} vs {ratio})")
        kappa = ratio
    return Closure(True, sp.nsimplify(kappa), xi_theta)


def optimizer_closure(
    base: Closure,
    geometry: Geometry,
    optimizer: str = "SGD",
    weight_decay: Mapping[str, float] | None = None,
    lr: Mapping[str, float] | None = None,
) -> Closure:
    """Refine a structural verdict for a concrete optimizer and per-block hyperparameters."""
    if not base.closes:
        return base
    if optimizer not in SUPPORTED_OPTIMIZERS:
        return Closure(False, None, base.xi_dot_theta, unsupported_optimizer_reason(optimizer))
    for label, values, symbol in (("weight decay", weight_decay, "λ"), ("learning rate", lr, "η")):
        if not values:
            continue
        distinct = sorted({float(v) for v in values.values()})
        if len(distinct) > 1:
            parts = ", ".join(f"{k}: {v:g}" for k, v in values.items())
            blocks = [b for b in geometry.blocks if b.name in values]
            if blocks:
                leftover = expand_inner(
                    sp.Add(
                        *[
                            (sp.Symbol(f"{symbol}_{b.name}") - sp.Symbol(symbol))
                            * Inner(geometry.generator[b], b)
                            for b in blocks
                        ]
                    )
                )
            else:  # keyed by tensor: the term runs over the slices of the group
                leftover = sp.Add(
                    *[
                        (sp.Symbol(f"{symbol}[{k}]") - sp.Symbol(symbol))
                        * sp.Symbol(f"<xi, theta>[{k}]")
                        for k in values
                    ]
                )
            if label == "weight decay":
                what = (
                    f"the group mixes parameters with different weight decay ({parts}): the decay term "
                    f"Σ_B λ_B⟨ξ_B, θ_B⟩ is not κλQ, leaving {sp.sstr(leftover)}; measure ⟨ξ_B, θ_B⟩ per "
                    "block every step, or give every parameter of the group the same weight decay"
                )
            else:
                what = (
                    f"the group mixes parameters with different learning rates ({parts}): the update "
                    "θ − Ση_B u_B moves Q by Σ_B η_B⟨ξ_B, u_B⟩, which G1 does not cancel; put the "
                    "group's parameters in one param_group"
                )
            return Closure(False, None, base.xi_dot_theta, what, leftover)
    return base


def unsupported_optimizer_reason(optimizer: str) -> str:
    """Why the laws do not cover an optimizer (by class name)."""
    how = _ADAPTIVE.get(optimizer)
    if how:
        return (
            f"the optimizer {optimizer} {how}, so ⟨ξₖ, uₖ⟩ is no longer fixed by G1 and the weight-decay "
            "term: the preconditioned update breaks the projection. The law would need ⟨ξ(θₖ), uₖ⟩ "
            "measured every step (symmech covers torch.optim.SGD with momentum, dampening, Nesterov, "
            "weight decay and any learning-rate schedule)"
        )
    return f"the optimizer {optimizer} is not covered: symmech derives exact laws for torch.optim.SGD only"
