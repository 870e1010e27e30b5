"""Closure verdicts name the left-over term; the Green's kernels solve their ODE (checked by SymPy)."""

from __future__ import annotations

import pytest
import sympy as sp

import symmech
from symmech import Block, Symmetry, alpha, library, ones
from symmech.derive.data_terms import beta, lam, tau
from symmech.laws.continuous import Q0, Qdot0, m_sym, t


def test_generator_with_linear_part_and_offset_does_not_close():
    theta = Block("theta")
    # ψ = e^α(θ + 𝟙) − 𝟙 is a group action with ξ = θ + 𝟙: J = I and c = 𝟙 together
    sym = Symmetry(
        "shifted_scale", {theta: sp.exp(alpha) * (theta + ones(theta)) - ones(theta)}, identity=0
    )
    d = symmech.derive(sym)
    assert d.conserved is not None
    dyn = d.dynamics
    assert not dyn.closes
    assert "is not a constant multiple of Q" in dyn.why_not_closed
    assert "measure ⟨ξ(θₖ), θₖ⟩ every step" in dyn.why_not_closed
    with pytest.raises(symmech.ClosureError, match="not a constant multiple of Q"):
        dyn.discrete  # noqa: B018 - reading the property is the test


def test_antisymmetric_generator_has_no_law():
    d = symmech.derive(library.linear_pair("antisymmetric"))
    with pytest.raises(symmech.ClosureError, match="antisymmetric"):
        d.dynamics.kappa  # noqa: B018
    assert d.dynamics.to_json()["closure"]["closes"] is False


def test_mixed_weight_decay_names_the_leftover_term():
    dyn = symmech.derive(library.rescale()).dynamics
    verdict = dyn.closure_for("SGD", weight_decay={"theta_1": 5e-4, "theta_2": 0.0})
    assert not verdict.closes
    assert "different weight decay" in verdict.why
    assert verdict.leftover.has(sp.Symbol("λ_theta_1")) and verdict.leftover.has(
        sp.Symbol("λ_theta_2")
    )


def test_mixed_learning_rates_do_not_close():
    dyn = symmech.derive(library.scale()).dynamics
    verdict = dyn.closure_for("SGD", lr={"theta": 0.1, "bias": 0.01})
    assert not verdict.closes and "different learning rates" in verdict.why


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adagrad"])
def test_adaptive_optimizers_do_not_close(name):
    verdict = symmech.derive(library.scale()).dynamics.closure_for(name)
    assert not verdict.closes
    assert "preconditioned update breaks the projection" in verdict.why
    assert "⟨ξ(θₖ), uₖ⟩" in verdict.why


def test_unknown_optimizer_is_not_covered():
    verdict = symmech.derive(library.scale()).dynamics.closure_for("LBFGS")
    assert not verdict.closes and "torch.optim.SGD only" in verdict.why


@pytest.mark.parametrize(
    "spec", ["translation", "scale", "rescale", "quadratic_rescale", "linear_pair"]
)
def test_greens_kernels_solve_the_projected_ode(spec):
    dyn = symmech.derive(library.BUILTIN[spec]()).dynamics
    kernels = dyn.second_order.extra["kernels"]
    kappa = dyn.kappa
    k_eff = (1 - tau) * kappa * lam
    for regime, parts in kernels.items():
        roots = parts["roots"]
        G = parts["G"]
        Qh = parts["Q_h"]
        # the characteristic polynomial m r^2 + (1-β) r + (1-τ)κλ = 0 in the regime's parametrisation
        if regime == "overdamped":
            rp, rm = list(roots)
            values = {rp: roots[rp], rm: roots[rm]}
        elif regime == "critical":
            (r,) = list(roots)
            values = {r: roots[r]}
        else:
            a, w = list(roots)
            values = {a: roots[a], w: roots[w]}
        ode = lambda f: m_sym * sp.diff(f, t, 2) + (1 - beta) * sp.diff(f, t) + k_eff * f  # noqa: E731
        point = {m_sym: sp.Rational(3, 10), beta: sp.Rational(9, 10), tau: sp.Rational(1, 10)}
        if regime == "overdamped":
            point[lam] = sp.Rational(1, 1000)
        elif regime == "underdamped":
            point[lam] = sp.Rational(1, 2)
        else:
            point[lam] = sp.Rational(1, 100) / (
                4 * sp.Rational(3, 10) * (1 - sp.Rational(1, 10)) * kappa
            )
        subs = {k: v.subs(point) for k, v in values.items()}
        ic = {Q0: sp.Rational(2), Qdot0: sp.Rational(-1, 3)}
        for f in (G, Qh):
            residual = ode(f).subs(subs).subs(point).subs(ic)
            for tv in (sp.Rational(1, 3), sp.Rational(7, 5)):
                assert abs(sp.N(residual.subs(t, tv), 30)) < 1e-20, (spec, regime)
        assert sp.N(G.subs(subs).subs(point).subs(t, 0)) == 0
        dG0 = sp.diff(G, t).subs(subs).subs(point).subs(t, 0)
        assert abs(sp.N(dG0 - 1 / point[m_sym], 30)) < 1e-20
        assert abs(sp.N(Qh.subs(subs).subs(point).subs(ic).subs(t, 0) - 2, 30)) < 1e-20
        assert (
            abs(
                sp.N(
                    sp.diff(Qh, t).subs(subs).subs(point).subs(ic).subs(t, 0) + sp.Rational(1, 3),
                    30,
                )
            )
            < 1e-20
        )
