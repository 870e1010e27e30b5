"""Learning dynamics projected onto the generator: gradient flow, the first-order modified
flow (M1) and the momentum flow (M2) as closed ODEs in Q with their integral solutions.

Time is t = Σ ηₖ. For ``torch.optim.SGD(lr=η, momentum=β, weight_decay=λ)``:

* gradient flow θ̇ = −g:                 Q̇ = −⟨ξ, g⟩ = 0 (G1);
* M1 (β = 0) θ̇ + λθ = −g − (η/2)Hg:     Q̇ + κλQ = (η/2) gᵀJg;
* M2 m θ̈ + (1−β)θ̇ + (1−τ)(λθ + g) = 0, m = η(1+β)/2:  m Q̈ + (1−β)Q̇ + (1−τ)κλQ = m θ̇ᵀJθ̇
  (dampening τ = 0 gives the equation of the paper).

>>> import symmech
>>> dyn = symmech.derive(symmech.library.scale()).dynamics
>>> dyn.kappa
2
>>> dyn.first_order.ode
Eq(2*lambda*Q(t) + Derivative(Q(t), t), eta*<grad_theta, grad_theta>/2)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sympy as sp

from symmech.derive.closure import Closure, optimizer_closure, structural_closure
from symmech.derive.data_terms import (
    HYPER_SYMBOLS,
    DataTerms,
    beta,
    derive_data_terms,
    eta,
    lam,
    tau,
)
from symmech.errors import ClosureError, explain

if TYPE_CHECKING:
    from symmech.derivation import Derivation

t, s = sp.symbols("t s", nonnegative=True)
Q = sp.Function("Q")
F = sp.Function("F")
Q0, Qdot0 = sp.symbols("Q_0 Qdot_0", real=True)
m_sym = sp.Symbol("m", positive=True)


class TeX(str):
    """A formula already written in LaTeX (a derivation step that SymPy cannot express)."""


@dataclass(frozen=True)
class Display:
    """An equation shown term by term in the order given (each term a SymPy expression).

    ``as_eq()`` is the same equation evaluated, so a test can compare it with the law.
    """

    lhs: tuple
    rhs: tuple
    relation: str = "="

    def as_eq(self) -> sp.Eq:
        return sp.Eq(sp.Add(*self.lhs).doit(), sp.Add(*self.rhs).doit())


@dataclass(frozen=True)
class Chain:
    """``a = b = c ...``: one quantity named, defined and written out (SymPy or TeX parts; a
    tuple part is a sum shown term by term)."""

    parts: tuple


@dataclass(frozen=True)
class Cases:
    """``lhs = value`` with one value per case (``text`` is plain prose)."""

    lhs: Any
    cases: tuple  # ((value, text), ...); a tuple value is a sum shown term by term


# A step of a derivation: LaTeX prose (inline math in $...$) and its formulas (SymPy, TeX,
# Display, Chain or Cases), shown one per line; an empty tuple shows the prose alone.
Step = tuple[str, tuple]


@dataclass
class Law:
    """One law: its ODE or recurrence, its solution, the data it needs and how it was derived.

    ``ode``, ``solution``, ``data`` and ``initial_conditions`` are the mathematics (read by
    code generation and the JSON export); ``steps`` is the presentation: the derivation in
    order, every formula once.
    """

    name: str
    title: str
    ode: Any
    solution: Any
    data: dict[str, sp.Expr]
    initial_conditions: list[Any] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def one_minus(x: sp.Expr) -> sp.Expr:
    """``1 - x`` kept as a factor when printed (``2λ(1 - τ)`` rather than ``λ(2 - 2τ)``)."""
    return sp.UnevaluatedExpr(1 - x)


def _closure(closure: Closure) -> Chain:
    """⟨ξ, θ⟩ written out and equal to κQ."""
    return Chain((TeX(r"\langle\xi, \theta\rangle"), closure.xi_dot_theta, TeX(r"\kappa Q")))


def _projected(flow: str, projection: TeX, derivation: Derivation, closure: Closure) -> list[Step]:
    """A flow projected onto ξ, then its gradient term removed by G1 and its decay term closed."""
    return [
        (flow, (projection,)),
        (r"The gradient term vanishes by G1,", (sp.Eq(derivation.gradient_constraint, 0),)),
        (r"and the decay term closes on $Q$:", (_closure(closure),)),
    ]


def _first_order(derivation: Derivation, closure: Closure, dt: DataTerms) -> Law:
    kappa = closure.kappa
    ode = sp.Eq(Q(t).diff(t) + kappa * lam * Q(t), eta / 2 * dt.gJg)
    solution = sp.Eq(
        Q(t),
        sp.exp(-kappa * lam * t) * Q0
        + eta / 2 * sp.Integral(sp.exp(-kappa * lam * (t - s)) * F(s), (s, 0, t)),
    )
    shown = Display(
        (Q(t).diff(t), sp.Mul(kappa * lam, Q(t), evaluate=False)),
        (sp.Mul(eta / 2, F(t), evaluate=False),),
    )
    shown_solution = Display(
        (Q(t),),
        (
            sp.Mul(Q0, sp.exp(-kappa * lam * t), evaluate=False),
            sp.Mul(
                eta / 2,
                sp.Integral(sp.exp(-kappa * lam * (t - s)) * F(s), (s, 0, t)),
                evaluate=False,
            ),
        ),
    )
    steps: list[Step] = [
        *_projected(
            r"SGD without momentum follows, to first order in $\eta$, the modified flow "
            r"$\dot\theta + \lambda\theta = -g - \tfrac{\eta}{2} H g$. "
            r"With $J$ symmetric, $\dot Q = \langle \xi, \dot\theta\rangle$, so",
            TeX(
                r"\dot{Q} = -\langle\xi, g\rangle - \lambda\langle\xi,\theta\rangle"
                r" - \tfrac{\eta}{2}\langle\xi, Hg\rangle."
            ),
            derivation,
            closure,
        ),
        (
            r"Finally G2 gives $\langle\xi, Hg\rangle = \langle H\xi, g\rangle"
            r" = -\langle D\xi^{\top} g, g\rangle = -g^{\top} J g$, so the projection obeys",
            (shown, sp.Eq(F(t), dt.gJg)),
        ),
        (r"From $Q(0) = Q_0$, its solution is", (shown_solution,)),
    ]
    return Law(
        "first_order",
        "First-order modified flow (SGD without momentum)",
        ode,
        solution,
        {"F": dt.gJg},
        [sp.Eq(Q(0), Q0)],
        steps,
        {"forcing": sp.Eq(F(s), dt.gJg), "display": shown},
    )


def green_kernels(kappa: sp.Expr) -> dict[str, dict[str, sp.Expr]]:
    """Roots, Green's kernel G (m G'' + (1−β)G' + κλG = δ) and homogeneous solution per regime.

    Each regime also carries ``shown_roots``: the same roots with the stiffness ``(1 − τ)κλ``
    kept factored, for display (a tuple is a sum shown term by term).
    """
    gamma = (1 - beta) / m_sym
    k = (1 - tau) * kappa * lam / m_sym
    disc = sp.sqrt(gamma**2 - 4 * k)
    r_plus, r_minus = (-gamma + disc) / 2, (-gamma - disc) / 2
    a = -gamma / 2
    omega = sp.Symbol("omega", positive=True)
    r = sp.Symbol("r", negative=True)
    rp, rm = sp.symbols("r_+ r_-", real=True)
    over_h = ((Qdot0 - rm * Q0) * sp.exp(rp * t) - (Qdot0 - rp * Q0) * sp.exp(rm * t)) / (rp - rm)
    stiff = sp.Mul(4 * kappa * lam * m_sym, one_minus(tau), evaluate=False)
    damping = one_minus(beta)
    shown_disc = sp.sqrt(sp.Add(damping**2, -stiff, evaluate=False))
    shown_a = -damping / (2 * m_sym)
    return {
        "overdamped": {
            "condition": sp.Gt((1 - beta) ** 2, 4 * m_sym * (1 - tau) * kappa * lam),
            "roots": {rp: r_plus, rm: r_minus},
            "shown_roots": {
                rp: (shown_a, shown_disc / (2 * m_sym)),
                rm: (shown_a, -shown_disc / (2 * m_sym)),
            },
            "G": (sp.exp(rp * t) - sp.exp(rm * t)) / (m_sym * (rp - rm)),
            "Q_h": over_h,
        },
        "critical": {
            "condition": sp.Eq((1 - beta) ** 2, 4 * m_sym * (1 - tau) * kappa * lam),
            "roots": {r: a},
            "shown_roots": {r: shown_a},
            "G": t * sp.exp(r * t) / m_sym,
            "Q_h": (Q0 + (Qdot0 - r * Q0) * t) * sp.exp(r * t),
        },
        "underdamped": {
            "condition": sp.Lt((1 - beta) ** 2, 4 * m_sym * (1 - tau) * kappa * lam),
            "roots": {sp.Symbol("a"): a, omega: sp.sqrt(4 * k - gamma**2) / 2},
            "shown_roots": {
                sp.Symbol("a"): shown_a,
                omega: sp.sqrt(sp.Add(stiff, -(damping**2), evaluate=False)) / (2 * m_sym),
            },
            "G": sp.exp(sp.Symbol("a") * t) * sp.sin(omega * t) / (m_sym * omega),
            "Q_h": sp.exp(sp.Symbol("a") * t)
            * (Q0 * sp.cos(omega * t) + (Qdot0 - sp.Symbol("a") * Q0) / omega * sp.sin(omega * t)),
        },
    }


_REGIMES = {"overdamped": (">", "two real roots"), "critical": ("=", "a double root")}


def _kernel_steps(kappa: sp.Expr) -> list[Step]:
    kernels = green_kernels(kappa)
    stiff = sp.Mul(4 * kappa * lam * m_sym, one_minus(tau), evaluate=False)
    steps: list[Step] = []
    for regime, parts in kernels.items():
        sign, what = _REGIMES.get(regime, ("<", "complex roots $a \\pm i\\omega$"))
        condition = TeX(
            rf"\left(1 - \beta\right)^{{2}} {sign} {sp.latex(stiff)}"
        )  # the printed form of parts["condition"], with (1 - τ) factored
        roots = tuple(Chain((root, value)) for root, value in parts["shown_roots"].items())
        steps.append(
            (
                rf"{regime.capitalize()} case, ${condition}$ ({what}):",
                (
                    *roots,
                    sp.Eq(sp.Function("G")(t), parts["G"]),
                    sp.Eq(sp.Function("Q_h")(t), parts["Q_h"]),
                ),
            )
        )
    return steps


def _second_order(derivation: Derivation, closure: Closure, dt: DataTerms) -> Law:
    kappa = closure.kappa
    m_value = eta * (1 + beta) / 2
    ode = sp.Eq(
        m_sym * Q(t).diff(t, 2) + (1 - beta) * Q(t).diff(t) + (1 - tau) * kappa * lam * Q(t),
        m_sym * F(t),
    )
    kernel = sp.Function("G")
    solution = sp.Eq(
        Q(t), sp.Function("Q_h")(t) + sp.Integral(kernel(t - s) * m_sym * F(s), (s, 0, t))
    )
    shown = Display(
        (
            sp.Mul(m_sym, Q(t).diff(t, 2), evaluate=False),
            sp.Mul(one_minus(beta), Q(t).diff(t), evaluate=False),
            sp.Mul(kappa * lam, one_minus(tau), Q(t), evaluate=False),
        ),
        (sp.Mul(m_sym, F(t), evaluate=False),),
    )
    ics = [sp.Eq(Q(0), Q0), TeX(r"\dot{Q}(0) = \dot{Q}_0 = -\langle\xi_0, u_0\rangle")]
    steps: list[Step] = [
        *_projected(
            r"SGD with momentum $\beta$ and dampening $\tau$ follows, to first order in $\eta$, "
            r"the momentum flow $m\ddot\theta + (1-\beta)\dot\theta + (1-\tau)(\lambda\theta + g)"
            r" = 0$ with mass $m = \eta(1+\beta)/2$. With $J$ symmetric, "
            r"$\dot Q = \langle\xi, \dot\theta\rangle$ and "
            r"$\ddot Q = \langle\xi, \ddot\theta\rangle + \dot\theta^{\top} J \dot\theta$, so",
            TeX(
                r"m\ddot{Q} = -(1-\beta)\dot{Q} - (1-\tau)\left(\lambda\langle\xi,\theta\rangle"
                r" + \langle\xi, g\rangle\right) + m\,\dot\theta^{\top}J\dot\theta."
            ),
            derivation,
            closure,
        ),
        (
            r"The velocity $\dot\theta$ at step $k$ is measured as $-u_k$, so the forcing is "
            r"$F = u_k^{\top} J u_k = A_k$ (data terms below). The projection obeys",
            (shown, sp.Eq(m_sym, m_value)),
        ),
        (
            r"with the initial conditions",
            tuple(ics),
        ),
        (
            r"Its solution is the homogeneous part plus the forcing through the Green's kernel "
            r"$G$ ($mG'' + (1-\beta)G' + (1-\tau)\kappa\lambda G = \delta$), both read from the "
            r"roots of $m r^{2} + (1-\beta) r + (1-\tau)\kappa\lambda = 0$:",
            (solution,),
        ),
        *_kernel_steps(kappa),
    ]
    return Law(
        "second_order",
        "Second-order modified flow (SGD with momentum)",
        ode,
        solution,
        {"F": dt.uJu["sgd"]},
        ics,
        steps,
        {"m": sp.Eq(m_sym, m_value), "kernels": green_kernels(kappa), "display": shown},
    )


def _gradient_flow(derivation: Derivation, dt: DataTerms) -> Law:
    ode = sp.Eq(Q(t).diff(t), -derivation.gradient_constraint)
    steps: list[Step] = [
        (
            r"Under gradient flow $\dot\theta = -g$, the charge changes at the rate "
            r"$\dot Q = \langle\nabla Q, \dot\theta\rangle = -\langle\xi, g\rangle$:",
            (ode,),
        ),
        (r"which vanishes by G1, so $Q$ keeps its initial value:", (sp.Eq(Q(t), Q0),)),
    ]
    return Law(
        "gradient_flow",
        "Gradient flow",
        ode,
        sp.Eq(Q(t), Q0),
        {},
        [sp.Eq(Q(0), Q0)],
        steps,
    )


class Dynamics:
    """All laws of one derivation (needs an affine generator with a closing projection)."""

    def __init__(self, derivation: Derivation) -> None:
        self.derivation = derivation
        g = derivation.geometry
        self.structural = structural_closure(g, derivation.conserved, derivation.why_no_conserved)
        self._data: DataTerms | None = None
        if derivation.conserved is not None and g.affine.is_affine:
            self._data = derive_data_terms(g, derivation.conserved)
        self._laws: dict[str, Law] = {}

    # -- closure ---------------------------------------------------------------------
    @property
    def closes(self) -> bool:
        return self.structural.closes

    @property
    def why_not_closed(self) -> str:
        return self.structural.why

    @property
    def kappa(self) -> sp.Expr:
        self.structural.require(f"{self.derivation.name}.dynamics.kappa")
        return self.structural.kappa  # type: ignore[return-value]

    def closure_for(self, optimizer: str = "SGD", weight_decay=None, lr=None) -> Closure:
        """The verdict for an optimizer name and per-block hyperparameters ({block: value})."""
        return optimizer_closure(
            self.structural, self.derivation.geometry, optimizer, weight_decay, lr
        )

    # -- data ------------------------------------------------------------------------
    @property
    def data_terms(self) -> DataTerms:
        if self._data is None:
            raise ClosureError(
                explain(f"{self.derivation.name}.dynamics.data_terms", self.structural.why)
            )
        return self._data

    def _law(self, name: str) -> Law:
        self.structural.require(f"{self.derivation.name}.dynamics.{name}")
        if name not in self._laws:
            dt = self.data_terms
            if name == "gradient_flow":
                self._laws[name] = _gradient_flow(self.derivation, dt)
            elif name == "first_order":
                self._laws[name] = _first_order(self.derivation, self.structural, dt)
            elif name == "second_order":
                self._laws[name] = _second_order(self.derivation, self.structural, dt)
            else:
                from .discrete import discrete_law

                self._laws[name] = discrete_law(self.derivation, self.structural, dt)
        return self._laws[name]

    @property
    def gradient_flow(self) -> Law:
        return self._law("gradient_flow")

    @property
    def first_order(self) -> Law:
        return self._law("first_order")

    @property
    def second_order(self) -> Law:
        return self._law("second_order")

    @property
    def discrete(self) -> Law:
        """The exact step-by-step law of torch.optim.SGD (see :mod:`symmech.laws.discrete`)."""
        return self._law("discrete")

    @property
    def laws(self) -> dict[str, Law]:
        return {
            n: self._law(n) for n in ("gradient_flow", "first_order", "second_order", "discrete")
        }

    # -- evaluation helpers for Derivation.evaluate ------------------------------------
    def evaluable(self) -> dict[str, sp.Expr]:
        if self._data is None:
            return {}
        return {f"data:{k}": v for k, v in self._data.as_dict().items()}

    def symbols_by_name(self) -> dict[str, sp.Basic]:
        out: dict[str, sp.Basic] = dict(HYPER_SYMBOLS)
        if self._data is not None:
            out.update({s.name: s for s in self._data.buf.values()})
        return out

    # -- export ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """Everything for other tools: κ, J, c, laws, data terms, closure verdict."""
        d = self.derivation
        aff = d.affine
        out: dict[str, Any] = {
            "symmetry": d.name,
            "blocks": [b.name for b in d.blocks],
            "generator": {b.name: sp.sstr(x) for b, x in d.generator.items()},
            "conserved": sp.sstr(d.conserved) if d.conserved is not None else None,
            "why_no_conserved": d.why_no_conserved or None,
            "affine": aff.is_affine,
            "J_symmetric": aff.is_symmetric,
            "J": {b.name: sp.sstr(v) for b, v in aff.J_apply.items()},
            "c": {b.name: sp.sstr(v) for b, v in aff.offset.items()},
            "closure": {"closes": self.closes, "kappa": None, "why": self.why_not_closed or None},
        }
        if not self.closes:
            return out
        out["closure"]["kappa"] = str(self.kappa)
        out["data_terms"] = {k: sp.sstr(v) for k, v in self.data_terms.as_dict().items()}
        laws = {}
        for name, law in self.laws.items():
            laws[name] = {
                "title": law.title,
                "ode": sp.sstr(law.ode)
                if not isinstance(law.ode, list)
                else [sp.sstr(e) for e in law.ode],
                "solution": sp.sstr(law.solution)
                if not isinstance(law.solution, list)
                else [sp.sstr(e) for e in law.solution],
                "latex": sp.latex(law.ode)
                if not isinstance(law.ode, list)
                else [sp.latex(e) for e in law.ode],
                "data": {k: sp.sstr(v) for k, v in law.data.items()},
                "initial_conditions": [sp.sstr(e) for e in law.initial_conditions],
            }
        out["laws"] = laws
        return out


def derive_dynamics(derivation: Derivation) -> Dynamics:
    return Dynamics(derivation)
