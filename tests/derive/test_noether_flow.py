"""Noether's theorem checked by integrating gradient flow θ̇ = −∇L of real float64 networks.

The engine's charge Q (``evaluate("conserved")``) must be constant along the exact flow, so
along a numerical integration its drift must be pure integrator error and fall with the step
size at the integrator's order:

* explicit Euler: for a quadratic Q = ½θᵀJθ + cᵀθ one step changes Q by exactly
  −h⟨ξ, g⟩ + ½h²gᵀJg = ½h²gᵀJg (G1), so after T/h steps the drift is ½h∫gᵀJg dt = O(h):
  log-log slope 1;
* classical RK4 on a smooth network: O(h⁴), slope 4 (ReLU and BatchNorm+ReLU networks have
  kinks, which cost RK4 its order; Euler's first-order drift is unaffected);
* translation (J = 0, Q linear): each Euler step changes Q by exactly −h⟨g, 𝟙⟩ = 0, so the
  drift is float64 round-off at every step size, not O(h).

Each test also shows the flow really moves the blocks (the constancy is not trivial).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import nets
from support.nets import DTYPE, Problem

import symmech

EPS = float(np.finfo(np.float64).eps)


def euler(prob: Problem, theta: torch.Tensor, h: float, steps: int) -> torch.Tensor:
    for _ in range(steps):
        theta = theta - h * prob.grad(theta)
    return theta


def rk4(prob: Problem, theta: torch.Tensor, h: float, steps: int) -> torch.Tensor:
    for _ in range(steps):
        k1 = -prob.grad(theta)
        k2 = -prob.grad(theta + h / 2 * k1)
        k3 = -prob.grad(theta + h / 2 * k2)
        k4 = -prob.grad(theta + h * k3)
        theta = theta + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return theta


Integrator = Callable[[Problem, torch.Tensor, float, int], torch.Tensor]


def charge(prob: Problem, theta: torch.Tensor) -> float:
    d = nets.derivation(prob.name)
    return float(d.evaluate("conserved", **prob.block_values(theta), **prob.constants))


def drifts(
    prob: Problem,
    observe: Callable[[torch.Tensor], float | torch.Tensor],
    integrate: Integrator,
    h0: float,
    T: float,
    halvings: int = 3,
) -> tuple[list[float], list[float], torch.Tensor]:
    """|observe(θ(T)) − observe(θ(0))| for step sizes h0, h0/2, h0/4, ... (norm for tensors)."""
    hs, out, end = [], [], prob.theta0
    q0 = observe(prob.theta0)
    for i in range(halvings):
        h = h0 / 2**i
        end = integrate(prob, prob.theta0, h, round(T / h))
        diff = torch.as_tensor(observe(end), dtype=DTYPE) - torch.as_tensor(q0, dtype=DTYPE)
        hs.append(h)
        out.append(float(diff.norm()))
    return hs, out, end


def slope(hs: list[float], ds: list[float]) -> float:
    """Least-squares slope of log drift against log h."""
    return float(np.polyfit(np.log(hs), np.log(ds), 1)[0])


def block_displacement(prob: Problem, end: torch.Tensor) -> float:
    mask = prob.in_blocks()
    return float((end[mask] - prob.theta0[mask]).norm())


def generator_norm(prob: Problem, theta: torch.Tensor) -> float:
    d = nets.derivation(prob.name)
    xi = d.evaluate("generator", **prob.block_values(theta), **prob.constants)
    return float(prob.scatter(xi).norm())


# name -> (problem, Euler h0, T): the flow runs long enough to lower the loss visibly
FLOWS: dict[str, tuple[Callable[[], Problem], float, float]] = {
    "scale": (lambda: nets.conv_batchnorm(2, seed=0, unit=1), 0.2, 2.0),
    "rescale": (lambda: nets.relu_mlp(8, seed=0, unit=2), 0.4, 4.0),
    "quadratic_rescale": (lambda: nets.quadratic_mlp(8, seed=0, unit=2), 0.4, 4.0),
    "linear_pair": (lambda: nets.linear_net(5, 3, 4, seed=0), 0.2, 4.0),
}
RK4_T = 2.4  # RK4 runs from h = 0.8: its drift at h/4 is still ~1e3 × round-off


@pytest.mark.parametrize("name", list(FLOWS))
def test_euler_drift_of_the_charge_is_first_order_in_the_step(name: str) -> None:
    build, h0, T = FLOWS[name]
    prob = build()
    hs, ds, end = drifts(prob, lambda th: charge(prob, th), euler, h0, T)
    assert all(d > 0 for d in ds)
    assert abs(slope(hs, ds) - 1.0) < 0.3, (hs, ds)
    assert 1.6 < ds[-2] / ds[-1] < 2.4  # halving h halves the drift
    # not trivial: the loss fell and the blocks moved; a generic function of the blocks would
    # change by about |ξ|·|Δθ|, the charge changes by a small fraction of that
    assert float(prob.loss(end)) < 0.99 * float(prob.loss(prob.theta0))
    moved = generator_norm(prob, prob.theta0) * block_displacement(prob, end)
    assert ds[-1] < 0.05 * moved, (ds, moved)


@pytest.mark.parametrize("name", ["quadratic_rescale", "linear_pair"])
def test_rk4_drift_of_the_charge_is_fourth_order_on_smooth_networks(name: str) -> None:
    prob = FLOWS[name][0]()
    hs, ds, _ = drifts(prob, lambda th: charge(prob, th), rk4, 0.8, RK4_T)
    assert ds[-1] > 100 * EPS  # still well above round-off, so the slope is meaningful
    assert abs(slope(hs, ds) - 4.0) < 0.5, (hs, ds)


@pytest.mark.parametrize("bind", ["column", "bias"])
def test_translation_charge_is_conserved_by_euler_to_round_off(bind: str) -> None:
    """Q = ⟨θ, 𝟙⟩ is linear, so Euler conserves it exactly (up to round-off) at any step."""
    prob = nets.softmax_classifier(8, seed=0, unit=3, bind=bind)
    idx = prob.blocks["theta"].reshape(-1)
    size = float(prob.theta0[idx].abs().sum()) + 1.0
    for h in (0.4, 0.1):
        steps = round(4.0 / h)
        end = euler(prob, prob.theta0, h, steps)
        drift = abs(charge(prob, end) - charge(prob, prob.theta0))
        assert drift <= 16 * EPS * steps * size, (h, drift)
        # the block moved by much more than round-off: each entry changes, only the sum is kept
        assert float((end[idx] - prob.theta0[idx]).abs().max()) > 1e-2


def test_linear_pair_balancedness_matrix_drift_is_first_order() -> None:
    """UᵀU − VᵀV (the engine's conserved matrix) along Euler flow of f(x) = V Uᵀ x, MSE."""
    prob = nets.linear_net(5, 3, 4, seed=0)
    dv = nets.derivation("linear_pair")

    def matrix(th: torch.Tensor) -> torch.Tensor:
        return dv.evaluate("conserved_matrix", **prob.block_values(th))

    m0 = matrix(prob.theta0)
    assert torch.allclose(m0, m0.T, rtol=0, atol=1e-14)
    hs, ds, end = drifts(prob, matrix, euler, 0.1, 2.0)
    assert abs(slope(hs, ds) - 1.0) < 0.3, (hs, ds)
    # UᵀU alone is not conserved: it moves far more than the balancedness matrix drifts
    u0, u1 = (prob.block_values(th)["U"] for th in (prob.theta0, end))
    assert ds[-1] < 0.1 * float((u1.T @ u1 - u0.T @ u0).norm())


@settings(max_examples=5, deadline=None)
@given(
    d=st.integers(1, 6),
    r=st.integers(1, 4),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    h=st.sampled_from([0.1, 0.05, 0.02]),
)
def test_euler_drift_of_the_balancedness_matrix_obeys_the_second_order_bound(
    d, r, k, seed, h
) -> None:
    """If M = ½(UᵀU − VᵀV) is conserved by the flow, one Euler step changes it only by
    ½h²(G_UᵀG_U − G_VᵀG_V) (the first-order term is zero), so over the run
    ‖M(T) − M(0)‖_F ≤ ½h² Σ_k |g_k|², with gradients from autograd. A wrong M would leave a
    first-order term ~h Σ_k |g_k| that breaks this bound (checked on random shapes)."""
    prob = nets.linear_net(d, r, k, seed)
    dv = nets.derivation("linear_pair")
    theta, budget = prob.theta0, 0.0
    for _ in range(round(1.0 / h)):
        g = prob.grad(theta)
        budget += 0.5 * h**2 * float(g @ g)
        theta = theta - h * g
    m0, m1 = (dv.evaluate("conserved_matrix", **prob.block_values(t)) for t in (prob.theta0, theta))
    size = float(prob.theta0.norm()) ** 2 + float(theta.norm()) ** 2
    assert float((m1 - m0).norm()) <= budget + 1e-13 * size


def test_scalar_charge_is_the_conserved_matrix_paired_with_e() -> None:
    """For symmetric E, Q = ⟨M, E⟩: one matrix M serves every E (checked at random E)."""
    prob = nets.linear_net(4, 3, 2, seed=7)
    dv = nets.derivation("linear_pair")
    theta = euler(prob, prob.theta0, 0.1, 5)
    m = dv.evaluate("conserved_matrix", **prob.block_values(theta))
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        E = nets.random_structured(3, "symmetric", gen)
        q = dv.evaluate("conserved", **prob.block_values(theta), E=E)
        assert abs(float(q) - float((m * E).sum())) < 1e-13 * (1 + abs(float(q)))


def test_antisymmetric_linear_pair_claims_no_charge() -> None:
    """A rotation E (Eᵀ = −E) is a symmetry of f(x) = V Uᵀ x, but ξ = (UE, VE) is not a
    gradient field, so gradient flow has no Noether charge for it and the engine says so."""
    da = nets.derivation("linear_pair_antisymmetric")
    assert da.conserved is None
    assert "antisymmetric" in da.why_no_conserved and "rotation" in da.why_no_conserved
    assert da.conserved_matrices == {}
    prob = nets.linear_net(4, 3, 3, seed=2, structure="antisymmetric")
    env = {**prob.block_values(prob.theta0), **prob.constants}
    with pytest.raises(symmech.NotDerivableError, match="antisymmetric"):
        da.evaluate("conserved", **env)
    with pytest.raises(symmech.NotDerivableError, match="no conserved_matrix"):
        da.evaluate("conserved_matrix", **env)

    # Independent proof that no Q with ∇Q = ξ exists: the circulation of ξ around a small
    # parallelogram θ₀ + s a + t b is not zero. ξ comes from differentiating the spec's action
    # (central differences in α), not from the engine's generator.
    gen = torch.Generator().manual_seed(3)
    theta0 = prob.theta0
    a, b = (torch.randn(theta0.shape, generator=gen, dtype=DTYPE) for _ in range(2))

    def xi(theta: torch.Tensor) -> torch.Tensor:
        step = 1e-4
        moved = [
            prob.scatter(
                nets.evaluate(da, "action", **prob.block_values(theta), **prob.constants, alpha=s),
                base=theta,
            )
            for s in (step, -step)
        ]
        return (moved[0] - moved[1]) / (2 * step)

    corners = [theta0, theta0 + a, theta0 + a + b, theta0 + b, theta0]
    # ξ is linear in θ, so the midpoint rule is exact on each straight edge
    circulation = sum(float(xi((p + q) / 2) @ (q - p)) for p, q in zip(corners[:-1], corners[1:]))
    assert abs(circulation) > 1e-3 * float(a.norm() * b.norm())

    # The one quadratic that a symmetric-J formula would give, ½⟨θ, ξ⟩, is identically 0
    # here (⟨UE, U⟩ = 0 for antisymmetric E): it is "conserved" only because it is constant
    # everywhere, its gradient 0 ≠ ξ, and the engine rightly does not report it.
    half = 0.5 * float(xi(theta0) @ theta0)
    assert abs(half) < 1e-8 * float(xi(theta0).norm() * theta0.norm())
    assert float(xi(theta0).norm()) > 1e-2

    # G1 still holds all along the flow: the geometry is valid, only the charge is missing.
    theta = theta0
    for _ in range(10):
        g = prob.grad(theta)
        assert abs(float(g @ xi(theta))) < 1e-8 * float(g.norm() * xi(theta).norm())
        theta = theta - 0.1 * g
