"""The NumPy law evaluator against independent references.

* the per-step oscillator kernel against mpmath's 30-digit matrix exponential;
* the second-order recurrence against the textbook Green's-kernel closed form and against
  scipy's ``solve_ivp`` (DOP853, rtol 1e-12, restarted at every step with the step's forcing),
  in every damping regime, including lam = 0 (a zero root) and beta = 0;
* the first-order law against ``solve_ivp`` and against a direct sum of decaying exponentials;
* 100,000 steps at beta = 0.99, lam = 1e-3 against references that do not accumulate
  round-off (closed forms evaluated at checkpoints, matrix powers by repeated squaring);
* error messages.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from symmech.reference.green import oscillator_step
from symmech.reference.numeric_laws import (
    SGDHyper,
    damping_regime,
    predict_laws,
    second_order_closed_form,
)

RTOL = 1e-8


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _ivp_second(
    q0: np.ndarray, v0: np.ndarray, lr: np.ndarray, beta: float, klam: float, F: np.ndarray
) -> np.ndarray:
    """m Q'' + (1-beta) Q' + klam Q = m F_k on [t_k, t_k + lr_k), integrated step by step."""
    G = q0.shape[0]
    y = np.concatenate([q0, v0])
    out = [q0.copy()]
    for k, h in enumerate(lr):
        m = h * (1.0 + beta) / 2.0

        def rhs(_t: float, y: np.ndarray, m: float = m, f: np.ndarray = F[k]) -> np.ndarray:
            q, v = y[:G], y[G:]
            return np.concatenate([v, f - ((1.0 - beta) * v + klam * q) / m])

        sol = solve_ivp(rhs, (0.0, h), y, method="DOP853", rtol=1e-12, atol=1e-14)
        y = sol.y[:, -1]
        out.append(y[:G].copy())
    return np.array(out)


def _ivp_first(q0: np.ndarray, lr: np.ndarray, klam: float, gjg: np.ndarray) -> np.ndarray:
    y = q0.copy()
    out = [y.copy()]
    for k, h in enumerate(lr):
        sol = solve_ivp(
            lambda _t, q, k=k, h=h: 0.5 * h * gjg[k] - klam * q,
            (0.0, h),
            y,
            method="DOP853",
            rtol=1e-12,
            atol=1e-14,
        )
        y = sol.y[:, -1]
        out.append(y.copy())
    return np.array(out)


# ---------------------------------------------------------------- kernel of one step


def _kernel_cases() -> list[tuple[float, float]]:
    rng = np.random.default_rng(7)
    cases = []
    for alpha in (0.0, 1e-3, 0.005, 0.3, 1.0, 1.4, 3.0, 10.0):
        zs = [-30.0, -4.0, -1.0 - 1e-15, -1.0, -1.0 + 1e-15, -1e-9, 0.0, 1e-12]
        zs += [0.5, 1.0 - 1e-15, 1.0, 1.0 + 1e-15, 5.0, 60.0] + list(rng.uniform(-20, 20, 3))
        cases += [(alpha, alpha * alpha - z) for z in zs if alpha * alpha - z >= 0]
    return cases


def test_oscillator_step_matches_mpmath_expm() -> None:
    """Each series/closed-form branch and each branch switch (z = +-1) agrees with expm."""
    mp.mp.dps = 30
    cases = _kernel_cases()
    ec, es, p = oscillator_step(np.array([c[0] for c in cases]), np.array([c[1] for c in cases]))
    h = 0.7
    worst = 0.0
    for i, (alpha, bt) in enumerate(cases):
        a, b = 2 * alpha / h, bt / h**2
        ref = mp.expm(mp.matrix([[0, 1, 0], [-b, -a, 1], [0, 0, 0]]) * h)
        mine = [
            [ec[i] + alpha * es[i], h * es[i], h * h * p[i]],
            [-b * h * es[i], ec[i] - alpha * es[i], h * es[i]],
        ]
        scale = max(1.0, *(abs(float(ref[r, c])) for r in range(2) for c in range(3)))
        err = max(abs(float(ref[r, c]) - mine[r][c]) for r in range(2) for c in range(3))
        worst = max(worst, err / scale)
    assert worst < 1e-14, worst


# ---------------------------------------------------------------- second order, three paths

REGIMES = {
    # name: (kappa, eta, beta, lam, regime)
    "over": (2.0, 0.1, 0.9, 1e-3, "overdamped"),
    "over_lam0": (2.0, 0.1, 0.9, 0.0, "overdamped"),
    "critical": (2.0, 0.1, 0.9, 0.01 / (4 * 0.095 * 2.0), "critical"),
    "under": (2.0, 0.1, 0.9, 0.5, "underdamped"),
    "under_strong": (2.0, 1.0, 0.99, 2.0, "underdamped"),  # z < -1: cos/sin branch
    "beta0_over": (2.0, 0.1, 0.0, 0.05, "overdamped"),
    "beta0_lam0": (2.0, 0.1, 0.0, 0.0, "overdamped"),
    "beta0_under": (2.0, 0.5, 0.0, 2.0, "underdamped"),
    "translation": (1.0, 0.1, 0.9, 1e-3, "overdamped"),
}


def _synthetic(n: int, G: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    q0 = rng.normal(size=G)
    F = 1.0 + rng.normal(size=(n, G))
    return q0, {"uJu": F, "uJb": F + 0.1 * rng.normal(size=(n, G)), "gJg": F}


@pytest.mark.parametrize("name", list(REGIMES))
def test_second_order_recurrence_closed_form_and_ivp_agree(name: str) -> None:
    kappa, eta, beta, lam, regime = REGIMES[name]
    assert damping_regime(kappa, eta, beta, lam) == regime
    q0, data = _synthetic(120, 3, seed=len(name))
    out = predict_laws(kappa, q0, SGDHyper(lr=eta, momentum=beta, weight_decay=lam), data)
    v0 = -kappa * lam * q0  # Q'(0) = -<xi_0, u_0> with r = 0
    t = eta * np.arange(121)
    closed = second_order_closed_form(kappa, q0, v0, eta, beta, lam, data["uJu"], t)
    ivp = _ivp_second(q0, v0, np.full(120, eta), beta, kappa * lam, data["uJu"])
    assert _rel(out["second_order"], ivp) <= RTOL
    assert _rel(closed, ivp) <= RTOL
    assert _rel(out["second_order"], closed) <= RTOL
    np.testing.assert_allclose(out["t"], t, rtol=1e-13, atol=1e-15)
    expect = "first_order" if beta == 0 else "second_order"
    np.testing.assert_array_equal(out["continuous"], out[expect])


def test_second_order_closed_form_between_steps() -> None:
    """Closed form at mid-step times vs solve_ivp started at the step before."""
    kappa, eta, beta, lam, _ = REGIMES["under"]
    q0, data = _synthetic(20, 2, seed=3)
    v0 = -kappa * lam * q0
    F = data["uJu"]
    t = np.array([0.35, 1.05, 1.999])
    closed = second_order_closed_form(kappa, q0, v0, eta, beta, lam, F, t)
    m = eta * (1 + beta) / 2

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        f = F[min(int(s / eta), F.shape[0] - 1)]
        return np.concatenate([y[2:], f - ((1 - beta) * y[2:] + kappa * lam * y[:2]) / m])

    grid = np.union1d(eta * np.arange(21), t)
    y = np.concatenate([q0, v0])
    ref = {}
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        y = solve_ivp(rhs, (a, b), y, method="DOP853", rtol=1e-12, atol=1e-14).y[:, -1]
        ref[b] = y[:2]
    assert _rel(closed, np.array([ref[x] for x in t])) <= RTOL


@pytest.mark.parametrize(
    ("beta", "tau", "nesterov", "lam"),
    [
        (0.9, 0.0, False, 0.02),
        (0.9, 0.4, False, 0.02),
        (0.8, 0.0, True, 0.3),
        (0.0, 0.0, False, 0.3),
    ],
)
def test_second_order_schedule_dampening_nesterov_vs_ivp(
    beta: float, tau: float, nesterov: bool, lam: float
) -> None:
    """Per-step lr; dampening scales the weight-decay term by (1 - tau); Nesterov starts at
    Q'(0) = -(1 + beta) kappa lam Q0."""
    rng = np.random.default_rng(11)
    n, kappa = 150, 2.0
    lr = rng.uniform(0.02, 0.3, size=n)
    q0, data = _synthetic(n, 2, seed=5)
    hyper = SGDHyper(lr=lr, momentum=beta, dampening=tau, weight_decay=lam, nesterov=nesterov)
    out = predict_laws(kappa, q0, hyper, data)
    v0 = -(1 + beta if nesterov else 1.0) * kappa * lam * q0
    klam = (1 - tau) * kappa * lam
    assert _rel(out["second_order"], _ivp_second(q0, v0, lr, beta, klam, data["uJu"])) <= RTOL
    np.testing.assert_allclose(out["t"][1:], np.cumsum(lr), rtol=1e-14)


@pytest.mark.parametrize("lam", [0.0, 1e-2, 1.0])
@pytest.mark.parametrize("schedule", [False, True])
def test_first_order_vs_ivp(lam: float, schedule: bool) -> None:
    rng = np.random.default_rng(2)
    n, kappa = 120, 2.0
    lr = rng.uniform(0.01, 0.4, size=n) if schedule else 0.1
    q0, data = _synthetic(n, 2, seed=9)
    out = predict_laws(kappa, q0, SGDHyper(lr=lr, weight_decay=lam), data)
    ref = _ivp_first(q0, SGDHyper(lr=lr).lr_at(n), kappa * lam, data["gJg"])
    assert _rel(out["first_order"], ref) <= RTOL
    np.testing.assert_array_equal(out["continuous"], out["first_order"])
    np.testing.assert_array_equal(out["gradient_flow"], np.tile(q0, (n + 1, 1)))


# ---------------------------------------------------------------- 100,000 steps


def _discrete_reference(
    kappa: float,
    q0: float,
    eta: float,
    beta: float,
    lam: float,
    blocks: list[tuple[int, float, float]],
) -> list[float]:
    """Discrete law for piecewise-constant data (U = uJu, B = uJb per block).

    The state (Q_k, m_{k-1}, 1) moves by a fixed affine map within a block, applied as a matrix
    power (repeated squaring: ~17 products, no accumulation over 25,000 steps). The first step
    of a block still sees the previous block's B (m_k uses uJb_{k-1}); m_{-1} = eta B_0 makes
    m_0 = p_0 as torch's first step does.
    """

    def step_matrix(U: float, B_prev: float) -> np.ndarray:
        return np.array(
            [
                [1 - eta * kappa * lam, -eta * beta, eta * eta * (beta * B_prev + U / 2)],
                [kappa * lam, beta, -beta * eta * B_prev],
                [0.0, 0.0, 1.0],
            ]
        )

    state = np.array([q0, eta * blocks[0][2], 1.0])
    b_prev = blocks[0][2]
    out = []
    for steps, U, B in blocks:
        state = step_matrix(U, b_prev) @ state
        state = np.linalg.matrix_power(step_matrix(U, B), steps - 1) @ state
        b_prev = B
        out.append(float(state[0]))
    return out


@pytest.mark.parametrize("eta", [0.1, 1e-3])  # underdamped / overdamped at beta = 0.99
def test_long_run_finite_and_accurate(eta: float) -> None:
    kappa, beta, lam, q0 = 2.0, 0.99, 1e-3, 1.0
    block, values = 25_000, [(1.0, 0.9, 0.5), (3.0, 2.5, 2.0), (0.2, 0.1, 0.0), (1.5, 1.4, 1.0)]
    n = block * len(values)
    data = {
        key: np.repeat([v[i] for v in values], block)[:, None]
        for i, key in enumerate(("uJu", "uJb", "gJg"))
    }
    out = predict_laws(kappa, np.array([q0]), SGDHyper(eta, beta, 0.0, lam), data)
    for key, arr in out.items():
        assert np.isfinite(arr).all(), key
    ends = block * np.arange(1, len(values) + 1)
    checkpoints = np.concatenate([[0, 10, 1000, 12_345], ends, ends - block // 2])

    # second order: Green's-kernel closed form, every step's forcing summed at each checkpoint
    ref2 = second_order_closed_form(
        kappa, q0, -kappa * lam * q0, eta, beta, lam, data["uJu"], eta * checkpoints
    )
    assert _rel(out["second_order"][checkpoints], ref2) <= 1e-9

    # first order: Q(t) = e^{-k l t} Q0 + sum_j (eta/2) gJg_j int_{t_j}^{t_j+eta} e^{-k l (t-s)} ds
    kl, t = kappa * lam, eta * checkpoints[:, None]
    tj = eta * np.arange(n)[None, :]
    done = np.arange(n)[None, :] < checkpoints[:, None]  # steps finished by each checkpoint
    lag = np.where(done, t - tj - eta, 0.0)
    w = np.where(done, np.exp(-kl * lag) * -np.expm1(-kl * eta) / kl, 0.0)
    ref1 = np.exp(-kl * t[:, 0]) * q0 + w @ (0.5 * eta * data["gJg"][:, 0])
    assert _rel(out["first_order"][checkpoints, 0], ref1) <= 1e-9

    # discrete: matrix powers per block
    ref_d = _discrete_reference(kappa, q0, eta, beta, lam, [(block, U, B) for U, B, _ in values])
    assert _rel(out["discrete"][ends, 0], np.array(ref_d)) <= 1e-9


# ---------------------------------------------------------------- small API facts


def test_one_dimensional_inputs_mean_one_group() -> None:
    data = {k: np.ones(4) for k in ("uJu", "uJb", "gJg")}
    out = predict_laws(2.0, 0.5, SGDHyper(lr=0.1, momentum=0.9), data)
    assert out["discrete"].shape == (5, 1) and out["t"].shape == (5,)


def test_lr_at() -> None:
    np.testing.assert_array_equal(SGDHyper(lr=0.1).lr_at(3), [0.1, 0.1, 0.1])
    np.testing.assert_array_equal(SGDHyper(lr=np.array([0.1, 0.2])).lr_at(2), [0.1, 0.2])


def test_damping_regime_boundaries() -> None:
    assert damping_regime(2.0, 0.1, 0.9, 0.0) == "overdamped"
    assert damping_regime(2.0, 0.1, 0.0, 0.0) == "overdamped"
    lam_c = (1 - 0.5) ** 2 / (4 * 0.1 * 1.5 / 2 * 2.0)
    assert damping_regime(2.0, 0.1, 0.5, lam_c) == "critical"
    assert damping_regime(2.0, 0.1, 0.5, lam_c * (1 + 1e-9)) == "underdamped"
    assert damping_regime(2.0, 0.1, 0.5, lam_c * (1 - 1e-9)) == "overdamped"


# ---------------------------------------------------------------- errors


def _ok_data(n: int = 3, G: int = 2) -> dict[str, np.ndarray]:
    return {k: np.ones((n, G)) for k in ("uJu", "uJb", "gJg")}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -0.1}, r"learning rate: -0\.1"),
        ({"lr": np.array([0.1, -0.5, 0.1])}, r"-0\.5 at step 1"),
        ({"lr": np.array([0.1, np.nan])}, r"lr must be finite, got nan at step 1"),
        ({"lr": 0.1, "momentum": 1.0}, r"momentum value: 1\.0"),
        ({"lr": 0.1, "momentum": -0.2}, r"momentum value: -0\.2"),
        ({"lr": 0.1, "weight_decay": -1e-3}, r"weight_decay value: -0\.001"),
        ({"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}, r"dampening=0\.1"),
        ({"lr": 0.1, "nesterov": True}, r"Nesterov momentum requires a momentum.*momentum=0\.0"),
    ],
)
def test_bad_hyper(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SGDHyper(**kwargs)


def test_bad_data() -> None:
    hyper, q0 = SGDHyper(lr=0.1), np.zeros(2)
    d = _ok_data()
    del d["uJb"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['uJb'\]"):
        predict_laws(2.0, q0, hyper, d)
    d = _ok_data()
    d["gJg"] = np.ones((3, 5))
    with pytest.raises(
        ValueError, match=r"data\['gJg'\] must have shape \(n_steps, 2\), got \(3, 5\)"
    ):
        predict_laws(2.0, q0, hyper, d)
    d = _ok_data()
    d["uJb"] = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"data\['uJb'\] has 4 steps but data\['uJu'\] has 3"):
        predict_laws(2.0, q0, hyper, d)
    d = _ok_data()
    d["uJu"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"data\['uJu'\] is not finite at step 2, group 1: nan"):
        predict_laws(2.0, q0, hyper, d)
    d = _ok_data()
    d["r"] = np.full((3, 2), np.inf)
    with pytest.raises(ValueError, match=r"data\['r'\] is not finite at step 0, group 0: inf"):
        predict_laws(2.0, q0, hyper, d)
    with pytest.raises(ValueError, match=r"Q0 is not finite in group 1: nan"):
        predict_laws(2.0, np.array([0.0, np.nan]), hyper, _ok_data())
    with pytest.raises(ValueError, match=r"Q0 must be a scalar or have shape \(G,\)"):
        predict_laws(2.0, np.zeros((2, 2)), hyper, _ok_data())
    with pytest.raises(ValueError, match=r"lr schedule has 2 entries but there are 3 steps"):
        predict_laws(2.0, q0, SGDHyper(lr=np.array([0.1, 0.1])), _ok_data())
    with pytest.raises(ValueError, match=r"kappa must be >= 0, got -1\.0"):
        predict_laws(-1.0, q0, hyper, _ok_data())
    with pytest.raises(ValueError, match=r"kappa must be finite, got nan"):
        predict_laws(float("nan"), q0, hyper, _ok_data())
