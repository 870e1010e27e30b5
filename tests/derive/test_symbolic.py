"""The engine's symbolic results checked with SymPy on concrete functions and explicit matrices.

Each case gives, independently of the engine:

* the action ψ(θ, α) written by hand on explicit matrices of scalar symbols,
* a concrete loss L with that symmetry, written by hand on the same symbols.

The engine's matrix expressions (generator, G1, G2, G3, E1, Q) are instantiated on the same
explicit matrices by SymPy's own substitution (not by symmech's evaluator) and compared with
``sympy.diff`` / ``sympy.hessian`` of L and ψ. Library specs and user-written specs (a matrix
translation, per-block scales with other exponents, an affine action with an offset, a left
multiplication by e^{αS}) are covered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy import OneMatrix, Trace
from sympy.matrices.expressions import Identity, MatrixSymbol, ZeroMatrix

import symmech
from symmech import Block, Constant, Inner, Symmetry, alpha, derive, expm, library, ones

a_ = sp.Symbol("alpha", real=True)
assert a_ == alpha  # the engine's α is a plain real symbol named alpha


# -- instantiating engine expressions on explicit matrices (SymPy's own machinery) -----------
def explicit(expr, values: dict[str, sp.Matrix], dims: dict[str, int]):
    """Substitute explicit matrices (by symbol name) and sizes into an engine expression."""
    expr = sp.sympify(expr)
    sizes = {s: sp.Integer(dims[s.name]) for s in expr.free_symbols if s.name in dims}
    expr = expr.subs(sizes)
    swap: dict = {}
    for m in expr.atoms(MatrixSymbol):
        if m.name in values:
            swap[m] = sp.ImmutableMatrix(values[m.name])
    for m in expr.atoms(OneMatrix):
        swap[m] = sp.ImmutableMatrix(sp.ones(*map(int, m.shape)))
    for m in expr.atoms(ZeroMatrix):
        swap[m] = sp.ImmutableMatrix(sp.zeros(*map(int, m.shape)))
    for m in expr.atoms(Identity):
        swap[m] = sp.ImmutableMatrix(sp.eye(int(m.shape[0])))
    expr = expr.xreplace(swap)

    def inner(x, y):
        x, y = (sp.Matrix(sp.sympify(v).doit().as_explicit()) for v in (x, y))
        return sum(p * q for p, q in zip(x, y))

    expr = expr.replace(lambda e: isinstance(e, Inner), lambda e: inner(*e.args))
    out = expr.doit()
    if getattr(out, "is_Matrix", False):
        return sp.Matrix(out.as_explicit())
    return out


def is_zero(expr) -> bool:
    if isinstance(expr, sp.MatrixBase):
        return all(is_zero(x) for x in expr)
    if expr == 0:
        return True
    rational = any(p.exp.is_negative for p in expr.atoms(sp.Pow))
    reduced = sp.cancel(expr) if rational else sp.expand(expr)  # exact for these two kinds
    return reduced == 0 or sp.simplify(reduced) == 0


def entries(name: str, rows: int, cols: int = 1) -> sp.Matrix:
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}{i}{j}", real=True))


def flat(mats) -> sp.Matrix:
    return sp.Matrix([x for m in mats for x in m])


@dataclass
class Case:
    """A spec with a hand-written action and a hand-written invariant loss on explicit matrices."""

    symmetry: Callable[[], Symmetry]
    shapes: dict[str, tuple[int, int]]  # block name -> explicit shape
    dims: dict[str, int]  # dimension symbol name -> size
    psi: Callable[[dict[str, sp.Matrix], sp.Expr], dict[str, sp.Matrix]]  # hand-written action
    loss: Callable[[dict[str, sp.Matrix]], sp.Expr]
    constants: dict[str, sp.Matrix] = field(default_factory=dict)
    expm: bool = False  # the action uses e^{αE}: E1 is not instantiated explicitly here

    def blocks(self) -> dict[str, sp.Matrix]:
        return {k: entries(k, *s) for k, s in self.shapes.items()}


def _dot(u, v) -> sp.Expr:
    return (sp.Matrix(u).T * v)[0, 0]


X3 = [sp.Matrix([1, 2, -1]), sp.Matrix([0, 1, 3])]
Y2 = [sp.Matrix([2, -1]), sp.Matrix([1, 1])]

E_SYM = sp.Matrix([[sp.Symbol("e0"), sp.Symbol("e1")], [sp.Symbol("e1"), sp.Symbol("e2")]])
E_ANTI = sp.Matrix([[0, sp.Symbol("e1")], [-sp.Symbol("e1"), 0]])
C_OFFSET = sp.Matrix([1, -2])
S_TRACELESS = sp.Matrix([[sp.Symbol("s0"), sp.Symbol("s1")], [sp.Symbol("s1"), -sp.Symbol("s0")]])


def _linear_pair_loss(b):
    X = sp.Matrix([[1, 0], [2, -1], [0, 1]])  # d = 3, two samples as columns
    Y = sp.Matrix([[1, 0], [0, 2]])  # k = 2
    R = b["V"] * b["U"].T * X - Y
    return sum(x**2 for x in R)


def _expm_series(M: sp.Matrix, order: int = 4) -> sp.Matrix:
    """Truncated e^{M}: enough for the derivative at α = 0 (only the linear term matters)."""
    out, term = sp.eye(M.shape[0]), sp.eye(M.shape[0])
    for i in range(1, order):
        term = term * M / i
        out = out + term
    return out


def _matrix_shift_spec() -> Symmetry:
    W = Block("W", shape=("m", "n"))
    return Symmetry("matrix_shift", action={W: W + alpha * ones(W)}, identity=0)


def _exponent_scale_spec(p: int = 2, q: int = -3) -> Symmetry:
    a, b = Block("a"), Block("b")
    return Symmetry("pq_scale", action={a: alpha**p * a, b: alpha**q * b}, identity=1)


def _affine_spec() -> Symmetry:
    theta = Block("theta")
    c = Constant("c", shape=("n_theta", 1))
    return Symmetry("affine", action={theta: sp.exp(alpha) * (theta + c) - c}, identity=0)


def _left_spec() -> Symmetry:
    W = Block("W", shape=("m", "n"))
    S = Constant("S", shape=("m", "m"), structure="symmetric")
    return Symmetry("left_exp", action={W: expm(alpha * S) * W}, identity=0)


CASES: dict[str, Case] = {
    "translation": Case(
        library.translation,
        {"theta": (3, 1)},
        {"n_theta": 3},
        lambda b, a: {"theta": b["theta"] + a * sp.ones(3, 1)},
        # softmax cross-entropy with the block as logits, plus a difference term
        lambda b: (
            sp.log(sum(sp.exp(t) for t in b["theta"]))
            - b["theta"][0]
            + (b["theta"][1] - b["theta"][2]) ** 2
        ),
    ),
    "scale": Case(
        library.scale,
        {"theta": (3, 1)},
        {"n_theta": 3},
        lambda b, a: {"theta": a * b["theta"]},
        lambda b: (
            (_dot(X3[0], b["theta"]) ** 2 + _dot(X3[0], b["theta"]) * _dot(X3[1], b["theta"]))
            / _dot(b["theta"], b["theta"])
        ),
    ),
    "rescale": Case(
        library.rescale,
        {"theta_1": (3, 1), "theta_2": (2, 1)},
        {"n_theta_1": 3, "n_theta_2": 2},
        lambda b, a: {"theta_1": a * b["theta_1"], "theta_2": b["theta_2"] / a},
        lambda b: (lambda p: p(0, 0) ** 2 + sp.sin(p(0, 1)) + p(1, 0) * p(1, 1))(
            lambda i, j: _dot(X3[i], b["theta_1"]) * _dot(Y2[j], b["theta_2"])
        ),
    ),
    "quadratic_rescale": Case(
        library.quadratic_rescale,
        {"theta_1": (3, 1), "theta_2": (2, 1)},
        {"n_theta_1": 3, "n_theta_2": 2},
        lambda b, a: {"theta_1": a * b["theta_1"], "theta_2": b["theta_2"] / a**2},
        lambda b: (lambda q: q(0) + q(0) * q(1) + sp.cos(q(1)))(
            lambda i: _dot(X3[i], b["theta_1"]) ** 2 * _dot(Y2[i], b["theta_2"])
        ),
    ),
    "linear_pair": Case(
        lambda: library.linear_pair("symmetric"),
        {"U": (3, 2), "V": (2, 2)},
        {"d": 3, "r": 2, "k": 2},
        lambda b, a: {
            "U": b["U"] * _expm_series(a * E_SYM),
            "V": b["V"] * _expm_series(-a * E_SYM.T),
        },
        _linear_pair_loss,
        {"E": E_SYM},
        expm=True,
    ),
    "linear_pair_antisymmetric": Case(
        lambda: library.linear_pair("antisymmetric"),
        {"U": (3, 2), "V": (2, 2)},
        {"d": 3, "r": 2, "k": 2},
        lambda b, a: {
            "U": b["U"] * _expm_series(a * E_ANTI),
            "V": b["V"] * _expm_series(-a * E_ANTI.T),
        },
        _linear_pair_loss,
        {"E": E_ANTI, "A": E_ANTI},  # the library names this constant "A"
        expm=True,
    ),
    # -- user-written specs, not from the library ------------------------------------------------
    "matrix_shift": Case(
        _matrix_shift_spec,
        {"W": (2, 3)},
        {"m": 2, "n": 3},
        lambda b, a: {"W": b["W"] + a * sp.ones(2, 3)},
        lambda b: (
            sum((w - b["W"][0, 0]) ** 2 for w in b["W"]) + sp.exp(b["W"][0, 1] - b["W"][1, 2])
        ),
    ),
    "pq_scale": Case(
        _exponent_scale_spec,
        {"a": (2, 1), "b": (2, 1)},
        {"n_a": 2, "n_b": 2},
        lambda b, a: {"a": a**2 * b["a"], "b": a**-3 * b["b"]},
        # (x·a)^3 (y·b)^2 is invariant: α^{2·3} α^{−3·2} = 1
        lambda b: (lambda m: m + m**2)(_dot(Y2[0], b["a"]) ** 3 * _dot(Y2[1], b["b"]) ** 2),
    ),
    "affine": Case(
        _affine_spec,
        {"theta": (2, 1)},
        {"n_theta": 2},
        lambda b, a: {"theta": sp.exp(a) * (b["theta"] + C_OFFSET) - C_OFFSET},
        # a function of the direction of θ + c only
        lambda b: (lambda z: _dot(Y2[0], z) ** 2 / _dot(z, z))(b["theta"] + C_OFFSET),
        {"c": C_OFFSET},
    ),
    "left_exp": Case(
        _left_spec,
        {"W": (2, 2)},
        {"m": 2, "n": 2},
        lambda b, a: {"W": _expm_series(a * S_TRACELESS) * b["W"]},
        # det(e^{αS} W) = e^{α tr S} det W = det W for the traceless S used here
        lambda b: (b["W"].det() - 1) ** 2 + sp.sin(b["W"].det()),
        {"S": S_TRACELESS},
        expm=True,
    ),
}


@pytest.fixture(scope="module")
def derived() -> dict[str, symmech.Derivation]:
    return {name: derive(case.symmetry()) for name, case in CASES.items()}


def setup(case: Case, d: symmech.Derivation):
    blocks = case.blocks()
    names = [b.name for b in d.blocks]
    assert sorted(names) == sorted(blocks)
    theta = flat([blocks[n] for n in names])
    L = case.loss(blocks)
    grad = {n: sp.Matrix(*blocks[n].shape, [sp.diff(L, x) for x in blocks[n]]) for n in names}
    values = {**blocks, **case.constants, **{f"grad_{n}": g for n, g in grad.items()}}
    return blocks, names, theta, L, grad, values


@pytest.mark.parametrize("name", list(CASES))
def test_loss_of_the_case_is_invariant_under_the_hand_written_action(name: str) -> None:
    """Guards the fixtures: L(ψ(θ, α)) = L(θ) exactly (truncated e^{αE} to first order)."""
    case = CASES[name]
    blocks = case.blocks()
    moved = case.psi(blocks, a_)
    diff = case.loss(moved) - case.loss(blocks)
    if case.expm:  # ψ is truncated: invariance holds to the truncation order (α¹ checked)
        assert is_zero(sp.diff(diff, a_).subs(a_, 0))
    else:
        assert is_zero(diff)


@pytest.mark.parametrize("name", list(CASES))
def test_generator_is_the_derivative_of_the_hand_written_action(name, derived) -> None:
    case, d = CASES[name], derived[name]
    blocks, names, *_ = setup(case, d)
    e = d.symmetry.identity
    by_hand = {k: sp.diff(v, a_).subs(a_, e) for k, v in case.psi(blocks, a_).items()}
    for block, xi in d.generator.items():
        engine = explicit(xi, {**blocks, **case.constants}, case.dims)
        hand = by_hand.get(block.name, sp.zeros(*blocks[block.name].shape))
        assert is_zero(engine - hand), (block, engine, hand)


@pytest.mark.parametrize("name", list(CASES))
def test_g1_g2_g3_against_sympy_derivatives_of_a_concrete_loss(name, derived) -> None:
    case, d = CASES[name], derived[name]
    blocks, names, theta, L, grad, values = setup(case, d)
    xi = flat([explicit(d.generator[d.symmetry.block(n)], values, case.dims) for n in names])
    g = sp.Matrix([sp.diff(L, x) for x in theta])
    # G1: ⟨∇L, ξ⟩ = 0 for this L, and the engine's expression for it is that inner product
    assert is_zero((g.T * xi)[0, 0])
    assert is_zero(explicit(d.gradient_constraint, values, case.dims) - (g.T * xi)[0, 0])
    # G2: H ξ from sympy.hessian equals the engine's −Dξᵀg, block by block
    H = sp.hessian(L, list(theta))
    h_xi = H * xi
    predicted = flat(
        [explicit(d.hessian_constraint[d.symmetry.block(n)], values, case.dims) for n in names]
    )
    assert is_zero(h_xi - predicted)
    # ... and −Dξᵀg itself, with Dξ the Jacobian of the explicit generator
    assert is_zero(predicted + xi.jacobian(theta).T * g)
    # G3
    assert is_zero((xi.T * h_xi)[0, 0] - explicit(d.hessian_quadratic_form, values, case.dims))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.expm])
def test_e1_gradient_equivariance_with_symbolic_alpha(name, derived) -> None:
    case, d = CASES[name], derived[name]
    blocks, names, theta, L, grad, values = setup(case, d)
    moved = {**blocks, **case.psi(blocks, a_)}
    # g̃ = ∇L evaluated at ψ(θ, α): substitute the moved entries into the gradient
    sub = {x: y for n in names for x, y in zip(blocks[n], moved[n])}
    gradimage = {f"gradimage_{n}": grad[n].xreplace(sub) for n in names}
    for n in names:
        engine = explicit(d.equivariance[d.symmetry.block(n)], {**values, **gradimage}, case.dims)
        assert is_zero(grad[n] - engine), n


@pytest.mark.parametrize("name", list(CASES))
def test_conserved_charge_has_gradient_xi_or_is_refused(name, derived) -> None:
    case, d = CASES[name], derived[name]
    blocks, names, theta, L, grad, values = setup(case, d)
    xi = flat([explicit(d.generator[d.symmetry.block(n)], values, case.dims) for n in names])
    jac = xi.jacobian(theta)
    symmetric = is_zero(jac - jac.T)
    if not symmetric:
        assert d.conserved is None
        assert "antisymmetric" in d.why_no_conserved or "not symmetric" in d.why_no_conserved
        return
    Q = explicit(d.conserved, values, case.dims)
    assert is_zero(sp.Matrix([sp.diff(Q, x) for x in theta]) - xi)
    # dQ/dt = ⟨∇Q, −∇L⟩ = 0 for this loss
    assert is_zero((xi.T * sp.Matrix([sp.diff(L, x) for x in theta]))[0, 0])
    for const, m in d.conserved_matrices.items():
        # Q = ⟨M, C⟩ on the explicit symmetric constant
        M = explicit(m, values, case.dims)
        C = case.constants[const.name]
        assert is_zero(sum(p * q for p, q in zip(M, C)) - Q)


def test_hand_computed_results_for_user_specs(derived) -> None:
    """Spot values written by hand for the user specs, as matrix expressions."""
    d = derived["pq_scale"]
    a, b = d.symmetry.block("a"), d.symmetry.block("b")
    hand = {"a": 2 * a, "b": -3 * b}  # d/dα (α² a, α⁻³ b) at α = 1
    for block, xi in d.generator.items():
        assert isinstance((xi - hand[block.name]).doit(), ZeroMatrix)
    assert d.why_no_conserved == ""
    left = derived["left_exp"]
    (S,) = left.symmetry.constants
    W = left.symmetry.block("W")
    assert isinstance((left.generator[W] - S * W).doit(), ZeroMatrix)  # d/dα e^{αS} W at 0
    assert list(left.conserved_matrices) == [S]  # Q = ⟨½WWᵀ, S⟩: one matrix for every S
    assert derived["affine"].affine.has_offset and derived["affine"].affine.has_linear_part


@settings(max_examples=6, deadline=None)
@given(p=st.integers(-3, 3).filter(bool), q=st.integers(-3, 3).filter(bool))
def test_per_block_scale_with_random_exponents(p: int, q: int) -> None:
    """ψ = (α^p a, α^q b): ξ = (p a, q b), Q = p|a|²/2 + q|b|²/2, checked by sympy.diff."""
    d = derive(_exponent_scale_spec(p, q))
    blocks = {"a": entries("a", 2), "b": entries("b", 3)}
    dims = {"n_a": 2, "n_b": 3}
    hand = {
        "a": sp.diff(a_**p * blocks["a"], a_).subs(a_, 1),
        "b": sp.diff(a_**q * blocks["b"], a_).subs(a_, 1),
    }
    for block, xi in d.generator.items():
        assert is_zero(explicit(xi, blocks, dims) - hand[block.name])
    theta = flat([blocks["a"], blocks["b"]])
    Q = explicit(d.conserved, blocks, dims)
    assert is_zero(sp.Matrix([sp.diff(Q, x) for x in theta]) - flat([hand["a"], hand["b"]]))
    # a loss with this symmetry: (x·a)^q (y·b)^(−p) is invariant, α^{pq} α^{−qp} = 1
    L = _dot(Y2[0], blocks["a"]) ** q * _dot(sp.Matrix([1, 2, 3]), blocks["b"]) ** (-p)
    g = sp.Matrix([sp.diff(L, x) for x in theta])
    grads = {"grad_a": g[:2, :], "grad_b": g[2:, :]}
    assert is_zero(explicit(d.gradient_constraint, {**blocks, **grads}, dims))


# -- derive(..., loss=...) confirms symmetric losses and refuses the others ------------------
def _sympy_losses():
    """(spec, symmetric loss, non-symmetric loss), all SymPy matrix expressions in the blocks."""
    tr = library.translation()
    th = tr.block("theta")
    n = th.shape[0]
    centred = th - OneMatrix(n, n) * th / n
    sc = library.scale()
    ths = sc.block("theta")
    ns = ths.shape[0]
    rs = library.rescale()
    t1, t2 = rs.block("theta_1"), rs.block("theta_2")
    s1 = Trace(OneMatrix(1, t1.shape[0]) * t1)
    s2 = Trace(OneMatrix(1, t2.shape[0]) * t2)
    return {
        "translation": (tr, Trace(centred.T * centred), Trace(th.T * th)),
        "scale": (
            sc,
            Trace(ths.T * OneMatrix(ns, ns) * ths) / Trace(ths.T * ths),
            Trace(ths.T * ths),
        ),
        "rescale": (rs, (s1 * s2) ** 2 + s1 * s2, s1**2 * s2),
    }


ALPHA_KEYERROR = (
    "engine bug: derive(spec, loss=<SymPy expr>) raises a bare KeyError('alpha') for every spec "
    "without expm: action_checks._symbolic_invariance -> geometry.instantiate -> "
    "expr_eval.evaluate_expr(backend='sympy') looks up the group parameter alpha in an env "
    "that only holds sizes, blocks and constants"
)


@pytest.mark.parametrize("name", ["translation", "scale", "rescale"])
def test_sympy_loss_with_the_symmetry_is_confirmed(name: str) -> None:
    spec, good, _ = _sympy_losses()[name]
    assert derive(spec, loss=good).loss_confirmed in ("symbolic", "numeric")


@pytest.mark.parametrize("name", ["translation", "scale", "rescale"])
def test_sympy_loss_without_the_symmetry_is_refused(name: str) -> None:
    spec, _, bad = _sympy_losses()[name]
    with pytest.raises(symmech.NotASymmetryError, match=r"\|L\(ψ\(θ, α\)\) − L\(θ\)\| = \d"):
        derive(spec, loss=bad)


def test_sympy_loss_on_a_matrix_exponential_action() -> None:
    """linear_pair (expm in ψ) takes the numeric route: f(x) = V Uᵀ X is invariant, UᵀU is not."""
    spec = library.linear_pair("symmetric")
    U, V = spec.block("U"), spec.block("V")
    X = MatrixSymbol("X", U.shape[0], 4)  # data: an extra matrix symbol, filled at random
    fit = V * U.T * X
    assert derive(spec, loss=Trace(fit.T * fit)).loss_confirmed == "numeric"
    with pytest.raises(symmech.NotASymmetryError, match=r"\|L\(ψ\(θ, α\)\) − L\(θ\)\| = \d") as err:
        derive(spec, loss=Trace(U.T * U))
    residual = float(str(err.value).split("| = ")[1].split()[0])
    assert residual > 1e-6


def test_callable_loss_is_confirmed_numerically() -> None:
    def loss(theta_1: torch.Tensor, theta_2: torch.Tensor) -> torch.Tensor:
        p = theta_1.sum() * theta_2.sum()
        return torch.sin(p) + p**2

    d = derive(library.rescale(), loss=loss, dims={"n_theta_1": 4, "n_theta_2": 3})
    assert d.loss_confirmed == "numeric"
    d = derive(library.rescale(), loss=loss)
    assert d.loss_confirmed in ("symbolic", "numeric")
    assert derive(library.rescale()).loss_confirmed is None


def test_action_linear_part_of_an_affine_action_is_right_numerically() -> None:
    """ψ = e^α(θ + c) − c: A(θ) = ψ(θ) − ψ(0) = e^α θ (by hand)."""
    d = derive(_affine_spec())
    theta, c = np.array([1.0, -2.0]), np.array([5.0, 7.0])
    out = d.evaluate("action_linear_part", theta=theta, c=c, alpha=0.3)["theta"]
    np.testing.assert_allclose(out, np.exp(0.3) * theta, rtol=1e-14)


def test_action_linear_part_of_an_affine_action_does_not_need_the_offset() -> None:
    d = derive(_affine_spec())
    theta = np.array([1.0, -2.0])
    out = d.evaluate("action_linear_part", theta=theta, alpha=0.3)["theta"]
    np.testing.assert_allclose(out, np.exp(0.3) * theta, rtol=1e-14)
