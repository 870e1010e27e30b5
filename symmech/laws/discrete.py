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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy as sp

from symmech.core.matrix_ops import Inner
from symmech.derive.closure import Closure
from symmech.derive.data_terms import DataTerms, beta, lam, tau

from .continuous import Cases, Chain, Display, Law, Step, TeX, one_minus

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

# The three vectors a step measures and the symmetric J of ξ = Jθ + c, for the compact form
# of the data terms: ⟨x, Jy⟩ for x, y in (θₖ, gₖ, bₖ₋₁).
_n = sp.Symbol("n", integer=True, positive=True)
_J = sp.MatrixSymbol("J", _n, _n)
VECTORS = {
    "theta": sp.MatrixSymbol("theta_k", _n, 1),
    "grad": sp.MatrixSymbol("g_k", _n, 1),
    "buf": sp.MatrixSymbol("b_{k-1}", _n, 1),
}


def form(x: str, y: str) -> Inner:
    """⟨x, Jy⟩ in canonical order (J is symmetric, so ⟨x, Jy⟩ = ⟨y, Jx⟩)."""
    names = list(VECTORS)
    x, y = sorted((x, y), key=names.index)
    return Inner(VECTORS[x], _J * VECTORS[y])


def _updates() -> tuple[dict[str, dict[str, sp.Expr]], dict[str, dict[str, sp.Expr]]]:
    """torch.optim.SGD's update u and new buffer b as combinations of (θₖ, gₖ, bₖ₋₁)."""
    d = {"grad": sp.S.One, "theta": lam}
    b_new = {"buf": beta, "grad": one_minus(tau), "theta": one_minus(tau) * lam}
    nesterov = {x: d.get(x, 0) + beta * b_new.get(x, 0) for x in VECTORS}
    u = {"sgd": b_new, "first": d, "nesterov": nesterov, "plain": d}
    b_of = {"sgd": b_new, "first": d, "nesterov": b_new, "plain": d}
    return u, b_of


def compact(x: dict[str, sp.Expr], y: dict[str, sp.Expr]) -> tuple[sp.Expr, ...]:
    """⟨x, Jy⟩ for combinations x, y of the measured vectors: one term per form ⟨·, J·⟩, in
    the order (θθ, θg, θb, gg, gb, bb), each coefficient factored."""
    coeffs: dict[tuple[str, str], sp.Expr] = {}
    names = list(VECTORS)
    for a, ca in x.items():
        for b, cb in y.items():
            key = tuple(sorted((a, b), key=names.index))
            coeffs[key] = coeffs.get(key, sp.S.Zero) + ca * cb
    ordered = sorted(coeffs.items(), key=lambda kv: [names.index(n) for n in kv[0]])
    return tuple(_times(sp.factor(c), form(*key)) for key, c in ordered if sp.expand(c.doit()) != 0)


def _times(coeff: sp.Expr, term: sp.Expr) -> sp.Expr:
    """``coeff·term`` with the coefficient printed first (and no ``1·``)."""
    if coeff == 1:
        return term
    if coeff == -1:
        return sp.Mul(-1, term, evaluate=False)
    return sp.Mul(coeff, term, evaluate=False)


def block_forms(dt: DataTerms) -> dict[Inner, sp.Expr]:
    """Each ⟨x, Jy⟩ written in the blocks, Σ_B ⟨x_B, (Jy)_B⟩ (from the derived data terms)."""
    return {form(x, y): value for (x, y), value in dt.bilinear_forms.items()}


@dataclass(frozen=True)
class DataLine:
    """One data term as shown: its name, its definition, the compact form and the exact value."""

    label: TeX
    definition: TeX
    shown: tuple[sp.Expr, ...]  # a sum, term by term
    value: sp.Expr

    def check(self, forms: dict[Inner, sp.Expr]) -> None:
        """The shown form is the exact value once every ⟨x, Jy⟩ is written in the blocks."""
        gap = sp.expand(sp.Add(*self.shown).doit().xreplace(forms) - self.value)
        if gap != 0:
            raise AssertionError(f"data term {self.label}: shown form differs by {gap}")


def data_lines(dt: DataTerms) -> list[DataLine]:
    """The data terms of the exact law as shown in the LaTeX export."""
    u, b_of = _updates()
    lines = [
        DataLine(TeX("A_k"), TeX(r"\langle u_k, J u_k\rangle"), compact(u["sgd"], u["sgd"]),
                 dt.uJu["sgd"]),
        DataLine(TeX("A_0"), TeX(r"\langle d_0, J d_0\rangle"), compact(u["first"], u["first"]),
                 dt.uJu["first"]),
        DataLine(TeX(r"A^{\mathrm{N}}_k"), TeX(r"\langle u_k, J u_k\rangle"),
                 compact(u["nesterov"], u["nesterov"]), dt.uJu["nesterov"]),
        DataLine(TeX(r"A^{\mathrm{plain}}_k"), TeX(r"\langle d_k, J d_k\rangle"),
                 compact(u["plain"], u["plain"]), dt.uJu["plain"]),
        DataLine(TeX("B_k"), TeX(r"\langle u_k, J b_k\rangle"),
                 compact(u["sgd"], b_of["sgd"]), dt.uJb["sgd"]),
        DataLine(TeX(r"B^{\mathrm{N}}_k"), TeX(r"\langle u_k, J b_k\rangle"),
                 compact(u["nesterov"], b_of["nesterov"]), dt.uJb["nesterov"]),
    ]  # fmt: skip
    forms = block_forms(dt)
    for line in lines:
        line.check(forms)
    return lines


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
    lines = data_lines(dt)
    shown_law = (
        Display((pk[k],), (rk[k], sp.Mul(kappa * lam, Qk[k], evaluate=False))),
        recurrences[1],
        Display(
            (mk[k],),
            (
                sp.Mul(
                    beta,
                    sp.Add(mk[k - 1], sp.Mul(-1, etak[k - 1], Bk[k - 1], evaluate=False)),
                    evaluate=False,
                ),
                sp.Mul(one_minus(tau), pk[k], evaluate=False),
            ),
        ),
        Cases(
            vk[k],
            (
                (mk[k], "with momentum"),
                ((pk[k], beta * mk[k]), "with Nesterov momentum"),
                (pk[k], "without momentum"),
            ),
        ),
        Display(
            (Qk[k + 1],),
            (
                Qk[k],
                sp.Mul(-1, etak[k], vk[k], evaluate=False),
                sp.Mul(etak[k] ** 2 / 2, Ak[k], evaluate=False),
            ),
        ),
    )
    q = derivation.conserved
    steps: list[Step] = [
        (
            r"$Q$ is quadratic, so a step $\theta \to \theta - \eta u$ changes it exactly:",
            (
                TeX(
                    r"Q(\theta - \eta u) = Q(\theta) - \eta\langle\xi(\theta), u\rangle"
                    r" + \tfrac{1}{2}\eta^{2} u^{\top}J u,"
                ),
            ),
        ),
        (r"with the charge", (sp.Eq(sp.Symbol("Q"), q),)),
        (
            r"At step $k$ torch computes $d_k = g_k + \lambda\theta_k$, the buffer "
            r"$b_k = \beta b_{k-1} + (1-\tau) d_k$ ($b_0 = d_0$) and the update $u_k = b_k$ "
            r"($u_k = d_k + \beta b_k$ with Nesterov, $u_k = d_k$ without momentum), then "
            r"$\theta_{k+1} = \theta_k - \eta_k u_k$. Write $r_k = \langle\xi_k, g_k\rangle$ "
            r"(zero by G1), $p_k = \langle\xi_k, d_k\rangle$, $m_k = \langle\xi_k, b_k\rangle$, "
            r"$v_k = \langle\xi_k, u_k\rangle$, $A_k = \langle u_k, J u_k\rangle$ and "
            r"$B_k = \langle u_k, J b_k\rangle$. The closure gives $p_k$; since $\xi$ is affine, "
            r"$\xi_k = \xi_{k-1} - \eta_{k-1} J u_{k-1}$, so "
            r"$\langle\xi_k, b_{k-1}\rangle = m_{k-1} - \eta_{k-1} B_{k-1}$. "
            r"From $Q_0 = Q(\theta_0)$, for any learning-rate schedule $\eta_k$:",
            shown_law,
        ),
    ]
    residual = Chain((rk[k], TeX(r"\langle\xi_k, g_k\rangle"), dt.residual))
    forms = block_forms(dt)
    if all(v == 0 for v in forms.values()):
        steps.append(
            (
                r"The data terms are measured at each step from $\theta_k$ and $g_k$: the "
                r"residual",
                (residual,),
            )
        )
        steps.append((r"and, since $J = 0$ here, $A_k = B_k = 0$ in every case.", ()))
    else:
        steps.append(
            (
                r"The data terms are measured at each step from $\theta_k$, $g_k$ and the "
                r"buffer $b_{k-1}$ (N: with Nesterov; plain: without momentum):",
                (residual, *(Chain((ln.label, ln.definition, ln.shown)) for ln in lines)),
            )
        )
        steps.append(
            (
                r"where $\langle x, J y\rangle = \sum_B \langle x_B, (J y)_B\rangle$ reads, "
                r"in the blocks,",
                tuple(sp.Eq(f, v) for f, v in forms.items()),
            )
        )
    return Law(
        "discrete",
        "Exact discrete law of torch.optim.SGD",
        recurrences,
        recurrences[-1],
        data,
        [TeX(r"Q_0 = Q(\theta_0)"), sp.Eq(mk[0], pk[0])],
        steps,
        {"variants": variants, "data_lines": lines, "shown": shown_law},
    )
