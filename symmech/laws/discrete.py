"""The exact step-by-step law of ``torch.optim.SGD`` projected onto an affine generator.

No modelling error: for ξ = Jθ + c with J symmetric and ⟨ξ, θ⟩ = κQ,

* Q(θ − ηu) = Q(θ) − η⟨ξ(θ), u⟩ + ½η² uᵀJu                       (exact, Q quadratic),
* pₖ = ⟨ξₖ, dₖ⟩ = rₖ + κλQₖ,  rₖ = ⟨ξₖ, gₖ⟩                       (G1 gives rₖ = 0),
* mₖ = ⟨ξₖ, bₖ⟩ = β(mₖ₋₁ − ηₖ₋₁ uₖ₋₁ᵀJbₖ₋₁) + (1−τ)pₖ,  m₀ = p₀    (ξ moves by J(θₖ − θₖ₋₁)),
* ⟨ξₖ, uₖ⟩ = mₖ, or pₖ + βmₖ with Nesterov, or pₖ without momentum,
* Qₖ₊₁ = Qₖ − ηₖ⟨ξₖ, uₖ⟩ + ½ηₖ² uₖᵀJuₖ.

The learning rate ηₖ may change every step (any scheduler).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy as sp

from symmech.derive.closure import Closure
from symmech.derive.data_terms import DataTerms, beta, lam, tau

from .continuous import Law, TeX

if TYPE_CHECKING:
    from symmech.derivation import Derivation

k = sp.Symbol("k", integer=True, nonnegative=True)
Qk = sp.IndexedBase("Q")
pk = sp.IndexedBase("p")
mk = sp.IndexedBase("m")
rk = sp.IndexedBase("r")
Ak = sp.IndexedBase("A")
Bk = sp.IndexedBase("B")
etak = sp.IndexedBase("eta")
vk = sp.IndexedBase("v")  # ⟨ξₖ, uₖ⟩


def discrete_law(derivation: Derivation, closure: Closure, dt: DataTerms) -> Law:
    """Build the recurrences with their data terms and derivation steps."""
    kappa = closure.kappa
    recurrences = [
        sp.Eq(pk[k], rk[k] + kappa * lam * Qk[k]),
        sp.Eq(mk[0], pk[0]),
        sp.Eq(mk[k], beta * (mk[k - 1] - etak[k - 1] * Bk[k - 1]) + (1 - tau) * pk[k]),
        sp.Eq(vk[k], mk[k]),
        sp.Eq(Qk[k + 1], Qk[k] - etak[k] * vk[k] + sp.Rational(1, 2) * etak[k] ** 2 * Ak[k]),
    ]
    variants = {
        "momentum": sp.Eq(vk[k], mk[k]),
        "nesterov": sp.Eq(vk[k], pk[k] + beta * mk[k]),
        "no momentum": sp.Eq(vk[k], pk[k]),
    }
    data = {
        "r_k (symmetry residual ⟨ξ, g⟩)": dt.residual,
        "A_k = u_kᵀJu_k": dt.uJu["sgd"],
        "A_0 = u_0ᵀJu_0 (first step, b_0 = d_0)": dt.uJu["first"],
        "A_k with Nesterov": dt.uJu["nesterov"],
        "A_k without momentum": dt.uJu["plain"],
        "B_k = u_kᵀJb_k": dt.uJb["sgd"],
        "B_k with Nesterov": dt.uJb["nesterov"],
    }
    q = derivation.conserved
    steps = [
        (
            "Q is quadratic, so a step θ → θ − ηu changes it exactly by",
            TeX(
                r"Q(\theta - \eta u) = Q(\theta) - \eta\langle\xi(\theta), u\rangle + \tfrac{1}{2}\eta^{2} u^{\top}J u"
            ),
        ),
        ("The charge", sp.Eq(sp.Symbol("Q"), q)),
        (
            "With dₖ = gₖ + λθₖ, G1 and closure give pₖ = ⟨ξₖ, dₖ⟩",
            sp.Eq(pk[k], rk[k] + kappa * lam * Qk[k]),
        ),
        (
            "ξ is affine, so ξₖ = ξₖ₋₁ − ηₖ₋₁Juₖ₋₁ and mₖ = ⟨ξₖ, bₖ⟩ obeys",
            recurrences[2],
        ),
    ]
    return Law(
        "discrete",
        "Exact discrete law of torch.optim.SGD",
        recurrences,
        recurrences[-1],
        data,
        [TeX(r"Q_0 = Q(\theta_0)"), sp.Eq(mk[0], pk[0])],
        steps,
        {"variants": variants},
    )
