"""The LaTeX printer: short exact strings for the notation the exports rely on, and the shown
forms of the laws proved equal to the laws themselves (SymPy, on the built-in symmetries)."""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import symmech
from symmech import library
from symmech.derive.data_terms import beta, eta, lam, tau
from symmech.export.latex import derivation_context
from symmech.export.printer import prose, terms, tex
from symmech.laws.continuous import Cases, Chain, TeX, m_sym, one_minus, t
from symmech.laws.discrete import Bk, block_forms, etak, k, mk, pk

Q = sp.Function("Q")
CLOSING = ["translation", "scale", "rescale", "quadratic_rescale", "linear_pair"]


def test_indexed_sequences_have_plain_subscripts():
    assert tex(etak[k - 1]) == r"\eta_{k-1}"
    assert tex(mk[k + 1]) == "m_{k+1}"
    assert tex(sp.Mul(etak[k - 1], Bk[k - 1], evaluate=False)) == r"\eta_{k-1} B_{k-1}"


def test_time_derivatives_are_dots_and_functions_plain():
    assert tex(Q(t).diff(t)) == r"\dot{Q}(t)"
    assert tex(Q(t).diff(t, 2)) == r"\ddot{Q}(t)"
    assert tex(sp.Function("G")(t - sp.Symbol("s"))) == "G(t - s)"


def test_precedence_of_kept_factors():
    assert tex(sp.Mul(2, lam, one_minus(tau), evaluate=False)) == r"2 \lambda \left(1 - \tau\right)"
    assert tex(-one_minus(beta)) == r"- \left(1 - \beta\right)"  # sympy alone drops the brackets
    assert tex(beta * (mk[k - 1] - etak[k - 1])) == r"\beta \left(m_{k-1} - \eta_{k-1}\right)"
    assert tex(sp.Symbol("b") - sp.Symbol("a")) == "b - a"  # a positive term leads


def test_ordered_sums_and_chains():
    assert terms((pk[k], sp.Mul(-1, beta, mk[k], evaluate=False))) == r"p_{k} - \beta m_{k}"
    assert terms(()) == "0"
    assert tex(Chain((TeX("A_k"), TeX(r"\langle u_k, J u_k\rangle"), beta))) == (
        r"A_k = \langle u_k, J u_k\rangle = \beta"
    )
    shown = Cases(mk[k], ((pk[k], "plain"), ((pk[k], beta * mk[k]), "Nesterov")))
    assert tex(shown) == (
        r"m_{k} = \begin{cases} p_{k} & \text{plain} \\ p_{k} + \beta m_{k} & \text{Nesterov}"
        r" \end{cases}"
    )


def test_prose_escapes_and_sets_symbols_in_math():
    assert prose("50% of f(x) = V U^T x") == r"50\% of f(x) = V U\^{}T x"
    assert prose("Dξᵀ = −Dξ") == r"D$\xi^{\top}$ = $-$D$\xi$"
    with pytest.raises(ValueError, match="no LaTeX for the character '☃'"):
        prose("snow ☃")


def test_a_bare_string_is_not_a_formula():
    with pytest.raises(TypeError, match=r"tex\('x'\): a formula is a SymPy expression"):
        tex("x")


def _numbers(*symbols: sp.Symbol, seed: int) -> dict[sp.Symbol, float]:
    rng = np.random.default_rng(seed)
    return {s: float(rng.uniform(0.1, 0.9)) for s in symbols}


@pytest.mark.parametrize("spec", CLOSING)
def test_shown_odes_are_the_laws(spec):
    dyn = symmech.derive(library.BUILTIN[spec]()).dynamics
    first = dyn.first_order
    shown = first.extra["display"].as_eq()  # shown with F(t) for the forcing ⟨g, Jg⟩
    assert sp.expand(shown.lhs - first.ode.lhs) == 0
    assert sp.expand(shown.rhs.subs(sp.Function("F")(t), first.data["F"]) - first.ode.rhs) == 0
    second = dyn.second_order
    assert sp.expand(second.extra["display"].as_eq().lhs - second.ode.lhs) == 0


@pytest.mark.parametrize("spec", CLOSING)
def test_shown_roots_are_the_roots(spec):
    dyn = symmech.derive(library.BUILTIN[spec]()).dynamics
    for seed in range(3):
        values = _numbers(beta, lam, tau, m_sym, seed=seed)
        for parts in dyn.second_order.extra["kernels"].values():
            for root, value in parts["roots"].items():
                shown = parts["shown_roots"][root]
                shown = sp.Add(*shown) if isinstance(shown, tuple) else shown
                a = complex(sp.N(value.subs(values)))
                b = complex(sp.N(shown.doit().subs(values)))
                assert abs(a - b) < 1e-12 * max(1.0, abs(a))


@pytest.mark.parametrize("spec", CLOSING)
def test_shown_data_terms_are_the_data_terms(spec):
    dyn = symmech.derive(library.BUILTIN[spec]()).dynamics
    forms = block_forms(dyn.data_terms)
    lines = dyn.discrete.extra["data_lines"]
    assert [str(line.label) for line in lines][:2] == ["A_k", "A_0"]
    for line in lines:
        written = sp.Add(*line.shown).doit().xreplace(forms)
        assert sp.expand(written - line.value) == 0


def test_a_wrong_shown_data_term_is_refused():
    dyn = symmech.derive(library.scale()).dynamics
    line = dyn.discrete.extra["data_lines"][0]
    bad = type(line)(line.label, line.definition, (*line.shown, eta), line.value)
    with pytest.raises(AssertionError, match="shown form differs by eta"):
        bad.check(block_forms(dyn.data_terms))


def _all_lines(spec: str) -> list[str]:
    ctx = derivation_context(symmech.derive(library.BUILTIN[spec]()))
    return [line for law in ctx["laws"] for _, lines in law["steps"] for line in lines]


@pytest.mark.parametrize("spec", CLOSING)
def test_every_law_line_is_printed_once(spec):
    lines = _all_lines(spec)
    law_lines = [ln for ln in lines if ln.split("&=")[0].strip() in ("m_{k}", "p_{k}", "Q_{k+1}")]
    assert len(law_lines) == 3, law_lines  # the momentum recurrence is not doubled
    assert sum("m_{0} &= p_{0}" in ln for ln in lines) == 1


def test_the_rescale_law_reads_as_written():
    lines = _all_lines("rescale")
    assert (
        r"m_{k} &= \beta \left(m_{k-1} - \eta_{k-1} B_{k-1}\right) + \left(1 - \tau\right) p_{k}"
        in lines
    )
    assert r"Q_{k+1} &= Q_{k} - \eta_{k} v_{k} + \frac{\eta_{k}^{2}}{2} A_{k}" in lines
    ode = (
        r"m \ddot{Q}(t) + \left(1 - \beta\right) \dot{Q}(t) + 2 \lambda \left(1 - \tau\right) Q(t)"
        r" &= m F(t)"
    )
    assert ode in lines
    omega = [ln for ln in lines if ln.startswith(r"\omega &=")]
    assert omega == [
        r"\omega &= \frac{\sqrt{8 \lambda m \left(1 - \tau\right) - \left(1 - \beta\right)^{2}}}"
        r"{2 m}"
    ]
