"""The engine's geometry (G1–G3, E1, E2) checked on real float64 PyTorch networks.

For each library symmetry a small network that has it (see ``nets.py``) is bound to the spec's
blocks, and each derived statement is evaluated with ``Derivation.evaluate`` on values taken
from the network, then compared with an independent computation:

* gradients by autograd, Hessian-vector products by ``torch.func`` (jvp of grad) over the FULL
  parameter vector, so cross terms between the symmetry's blocks and the rest of the network
  are included: every row of Hξ must match −Dξᵀg, which is zero outside the blocks;
* ψ(θ, α) is the spec's own action; the generator ξ is checked against d/dα of it by
  forward-mode autograd, not against the engine's symbolic derivative.

Tolerances are relative to the natural scale of float64 round-off in each quantity
(|g||ξ| for ⟨g, ξ⟩, ‖H‖|ξ| + |g| for Hξ); measured residuals are ~1e-15 and below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import nets
from support.nets import DTYPE, Problem

ROUND_OFF = 1e-12  # relative; float64 residuals measured here are 0 … 1e-14

SEEDS = st.integers(0, 2**16)


@st.composite
def problems(draw, case: str) -> Problem:
    """A random network of the given kind: random widths, seed and bound unit."""
    seed = draw(SEEDS)
    if case in ("translation_column", "translation_bias"):
        hidden = draw(st.integers(2, 12))
        unit = draw(st.integers(0, hidden - 1))
        bind = "column" if case == "translation_column" else "bias"
        return nets.softmax_classifier(hidden, seed, unit, bind)
    if case == "scale":
        channels = draw(st.integers(1, 3))
        return nets.conv_batchnorm(channels, seed, draw(st.integers(0, channels - 1)))
    if case in ("rescale", "quadratic_rescale"):
        hidden = draw(st.integers(1, 12))
        unit = draw(st.integers(0, hidden - 1))
        build = nets.relu_mlp if case == "rescale" else nets.quadratic_mlp
        return build(hidden, seed, unit)
    structure = "symmetric" if case == "linear_pair" else "antisymmetric"
    r = draw(st.integers(1 if structure == "symmetric" else 2, 4))  # antisymmetric 1×1 E is 0
    d, k = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    return nets.linear_net(d, r, k, seed, structure)


CASES = [
    "translation_column",
    "translation_bias",
    "scale",
    "rescale",
    "quadratic_rescale",
    "linear_pair",
    "linear_pair_antisymmetric",
]


def alphas(prob: Problem):
    """Group elements at least 0.1 away from the identity (E1/E2 are trivial at the identity)."""
    if nets.derivation(prob.name).symmetry.is_multiplicative:
        return st.one_of(st.floats(0.3, 0.9), st.floats(1.1, 3.0))
    return st.one_of(st.floats(-1.5, -0.1), st.floats(0.1, 1.5))


def point(prob: Problem, seed: int) -> torch.Tensor:
    """A random point near the initialisation (not only the initialisation itself)."""
    gen = torch.Generator().manual_seed(seed)
    return prob.theta0 + 0.3 * torch.randn(prob.theta0.shape, generator=gen, dtype=DTYPE)


def rel(err: torch.Tensor | float, scale: torch.Tensor | float) -> float:
    return float(err) / max(float(scale), 1e-300)


def at(prob: Problem, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block values, gradients and constants at θ, bound by the engine's names."""
    g = prob.grad(theta)
    return {**prob.block_values(theta), **prob.block_values(g, "grad_"), **prob.constants}


def psi(prob: Problem, theta: torch.Tensor, a, autograd: bool = False) -> torch.Tensor:
    """ψ(θ, a) on the full vector, from the spec's action (parameters outside the blocks fixed).

    ``autograd=True`` keeps the evaluation in torch (so α can carry a forward-mode tangent)."""
    d = nets.derivation(prob.name)
    values = {**prob.block_values(theta), **prob.constants}
    if autograd:
        moved = d.evaluate("action", **values, alpha=a)
    else:
        moved = nets.evaluate(d, "action", **values, alpha=a)
    return prob.scatter(moved, base=theta)


# -- the networks really have the symmetry (guards the fixtures, independent of the engine) ---
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_networks_are_invariant_under_the_spec_action(case: str, data) -> None:
    prob = data.draw(problems(case))
    theta = point(prob, data.draw(SEEDS))
    a = data.draw(alphas(prob))
    before, after = prob.loss(theta), prob.loss(psi(prob, theta, a))
    assert rel(abs(after - before), abs(before)) < ROUND_OFF
    # and the action really moves the parameters
    assert float((psi(prob, theta, a) - theta).norm()) > 1e-3 * float(theta.norm())


# -- the generator is d/dα ψ at the identity (forward-mode autograd through the action) --------
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_generator_is_the_derivative_of_the_action_at_identity(case: str, data) -> None:
    prob = data.draw(problems(case))
    theta = point(prob, data.draw(SEEDS))
    d = nets.derivation(prob.name)
    e = torch.tensor(float(d.symmetry.identity), dtype=DTYPE)
    _, dpsi = torch.func.jvp(
        lambda a: psi(prob, theta, a, autograd=True), (e,), (torch.ones((), dtype=DTYPE),)
    )
    xi = prob.scatter(nets.evaluate(d, "generator", **prob.block_values(theta), **prob.constants))
    assert rel((dpsi - xi).norm(), dpsi.norm()) < ROUND_OFF


# -- G1, G2, G3 ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_g1_g2_g3_against_autograd_and_hessian_vector_products(case: str, data) -> None:
    prob = data.draw(problems(case))
    theta = point(prob, data.draw(SEEDS))
    d = nets.derivation(prob.name)
    env = at(prob, theta)
    g = prob.grad(theta)
    xi = prob.scatter(nets.evaluate(d, "generator", **env))
    assert float(xi.norm()) > 0

    # G1: ⟨g, ξ⟩ = 0, the engine's expression evaluated on autograd gradients
    g1 = nets.evaluate(d, "gradient_constraint", **env)
    assert rel(abs(g1), g.norm() * xi.norm()) < ROUND_OFF
    # ... and it is the plain inner product of the two full vectors
    assert rel(abs(g1 - g @ xi), g.norm() * xi.norm()) < ROUND_OFF

    # G2: every row of the true H ξ equals the engine's −Dξᵀg (zero outside the blocks)
    h_xi = prob.hvp(theta, xi)
    predicted = prob.scatter(nets.evaluate(d, "hessian_constraint", **env))
    scale = prob.hessian_norm(theta) * xi.norm() + g.norm()
    assert rel((h_xi - predicted).norm(), scale) < ROUND_OFF
    outside = ~prob.in_blocks()
    assert rel(h_xi[outside].norm(), scale) < ROUND_OFF  # cross terms vanish

    # G3: ξᵀHξ
    g3 = nets.evaluate(d, "hessian_quadratic_form", **env)
    assert rel(abs(xi @ h_xi - g3), scale * xi.norm()) < ROUND_OFF


def test_g2_is_not_trivial_hessian_times_generator_is_large_for_scale() -> None:
    """Hξ = −g_A for scale: a test at round-off level is meaningful only if Hξ is not ~0."""
    prob = nets.conv_batchnorm(3, seed=1, unit=2)
    theta = point(prob, 1)
    xi = prob.scatter(
        nets.evaluate(nets.derivation("scale"), "generator", **prob.block_values(theta))
    )
    h_xi = prob.hvp(theta, xi)
    assert rel(h_xi.norm(), prob.hessian_norm(theta) * xi.norm()) > 1e-3


# -- E1, E2 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_e1_gradient_equivariance(case: str, data) -> None:
    prob = data.draw(problems(case))
    theta = point(prob, data.draw(SEEDS))
    a = data.draw(alphas(prob))
    d = nets.derivation(prob.name)
    g, g_moved = prob.grad(theta), prob.grad(psi(prob, theta, a))
    pulled = nets.evaluate(
        d,
        "equivariance",
        **prob.block_values(theta),
        **prob.block_values(g_moved, "gradimage_"),
        **prob.constants,
        alpha=a,
    )
    predicted = prob.scatter(pulled, base=g_moved)  # parameters outside the blocks: ∂ψ/∂θ = I
    assert rel((g - predicted).norm(), g.norm()) < ROUND_OFF
    if not case.startswith("translation"):
        # a draw whose block gets no gradient at all (a ReLU after the norm closed for every
        # input: seen for a one-channel conv) moves nothing; E1 held, but it says nothing
        assume(float(g[prob.in_blocks()].norm()) > 1e-6 * float(g.norm()))
        # away from the identity the gradient really changes, so E1 is not trivially g = g̃
        assert float((g - g_moved).norm()) > 1e-6 * float(g.norm())


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_e2_hessian_equivariance_for_linear_actions(case: str, data) -> None:
    """H(θ)δ = Aᵀ H(ψ(θ, α)) A δ for a random full-length direction δ."""
    prob = data.draw(problems(case))
    theta = point(prob, data.draw(SEEDS))
    a = data.draw(alphas(prob))
    d = nets.derivation(prob.name)
    gen = torch.Generator().manual_seed(data.draw(SEEDS))
    delta = torch.randn(theta.shape, generator=gen, dtype=DTYPE)

    a_delta = nets.evaluate(
        d, "action_linear_part", **prob.block_values(delta), **prob.constants, alpha=a
    )
    a_delta = prob.scatter(a_delta, base=delta)
    w = prob.hvp(psi(prob, theta, a), a_delta)
    at_w = nets.evaluate(
        d,
        "equivariance",
        **prob.block_values(theta),
        **prob.block_values(w, "gradimage_"),
        **prob.constants,
        alpha=a,
    )
    predicted = prob.scatter(at_w, base=w)
    h_delta = prob.hvp(theta, delta)
    scale = prob.hessian_norm(theta) * delta.norm()
    assert rel((h_delta - predicted).norm(), scale) < ROUND_OFF


# -- negative controls: the same checks fail when the symmetry is broken --------------------------
def test_batchnorm_eps_breaks_scale_and_the_checks_see_it() -> None:
    """With a large BatchNorm eps the scale symmetry is only approximate: G1 and G2 residuals
    rise far above round-off (so the round-off level measured above is a real confirmation)."""
    d = nets.derivation("scale")
    residuals = {}
    for eps in (1e-30, 1e-1):
        prob = nets.conv_batchnorm(2, seed=3, unit=0, eps=eps)
        theta = point(prob, 3)
        env = at(prob, theta)
        g = prob.grad(theta)
        xi = prob.scatter(nets.evaluate(d, "generator", **env))
        g1 = rel(abs(nets.evaluate(d, "gradient_constraint", **env)), g.norm() * xi.norm())
        h_xi = prob.hvp(theta, xi)
        predicted = prob.scatter(nets.evaluate(d, "hessian_constraint", **env))
        scale = prob.hessian_norm(theta) * xi.norm() + g.norm()
        residuals[eps] = (g1, rel((h_xi - predicted).norm(), scale))
    assert max(residuals[1e-30]) < ROUND_OFF
    assert min(residuals[1e-1]) > 1e-6


def test_wrong_binding_breaks_rescale_and_the_checks_see_it() -> None:
    """θ₂ bound to the outgoing column of a different hidden unit: not a symmetry, G1 fails."""
    prob = nets.relu_mlp(6, seed=4, unit=1)
    wrong = prob.blocks["theta_2"] + 10  # the next unit's column in the (10 × 6) weight
    bad = Problem(
        prob.name,
        prob.model,
        prob.loss_of_outputs,
        prob.inputs,
        prob.theta0,
        {"theta_1": prob.blocks["theta_1"], "theta_2": wrong},
        {},
        prob._slices,
    )
    d = nets.derivation("rescale")
    theta = point(bad, 4)
    env = at(bad, theta)
    g = bad.grad(theta)
    xi = bad.scatter(nets.evaluate(d, "generator", **env))
    assert rel(abs(nets.evaluate(d, "gradient_constraint", **env)), g.norm() * xi.norm()) > 1e-4


# -- results come back per block, in the input's library and shape ---------------------------
@pytest.mark.parametrize("as_numpy", [False, True])
def test_evaluate_accepts_numpy_and_torch_and_one_dimensional_vectors(as_numpy: bool) -> None:
    prob = nets.relu_mlp(4, seed=5, unit=0)
    d = nets.derivation("rescale")
    env = {k: v.reshape(-1) for k, v in at(prob, prob.theta0).items()}
    if as_numpy:
        env = {k: v.numpy() for k, v in env.items()}
    out = d.evaluate("hessian_constraint", **env)
    assert set(out) == {"theta_1", "theta_2"}
    for k in out:
        assert tuple(out[k].shape) == (len(env[k]),)
        assert isinstance(out[k], np.ndarray if as_numpy else torch.Tensor)
    # rescale: −Dξᵀg = (−g₁, +g₂) (docs/theory.md table), independent of the evaluation library
    np.testing.assert_allclose(np.asarray(out["theta_1"]), -np.asarray(env["grad_theta_1"]))
    np.testing.assert_allclose(np.asarray(out["theta_2"]), np.asarray(env["grad_theta_2"]))


# -- the matrix exponential behind linear_pair, against the closed-form rotation ---------------------
def _rotation_action(as_numpy: bool) -> float:
    d = nets.derivation("linear_pair_antisymmetric")
    (const,) = d.symmetry.constants
    t = 0.04
    E = torch.tensor([[0.0, t], [-t, 0.0]], dtype=DTYPE)
    U, V = torch.eye(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE)
    values = {"U": U, "V": V, const.name: E}
    if as_numpy:
        values = {k: v.numpy() for k, v in values.items()}
    out = d.evaluate("action", **values, alpha=1.0)
    exact = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # e^{E} for this E
    return max(float(np.abs(np.asarray(out[k]) - exact).max()) for k in ("U", "V"))


def test_numpy_backend_matrix_exponential_is_accurate() -> None:
    assert _rotation_action(as_numpy=True) < 1e-15


def test_torch_backend_matrix_exponential_is_float64_accurate() -> None:
    assert _rotation_action(as_numpy=False) < 1e-14
