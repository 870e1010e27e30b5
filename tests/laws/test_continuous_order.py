"""Convergence order of the continuous laws on real training, measured, not assumed.

The rescale network of ``sgd_fixtures`` (Linear -> ReLU -> Linear, full batch of digits) is
trained by ``torch.optim.SGD`` for a fixed time T = eta * steps while eta is halved; the error
of each prediction against observed Q is fitted as C * eta^p on a log-log scale.

What the measurements show, and why (in the notation of docs/theory.md):

* gradient flow (Q constant): O(eta) when lam = 0 (the discrete law adds eta^2/2 u^T J u per
  step, so Q drifts by ~eta/2 * int g^T J g); O(1) when lam > 0 (weight decay shrinks Q by
  e^{-kappa lam t} whatever eta is).
* first order (M1) with beta = 0, lam = 0: *exact*. Its zero-order-hold step is
  Q + eta^2/2 g^T J g, which is the discrete law itself when u = g.
* first order with lam > 0: O(eta), not O(eta^2). M1 as specified, Q' + kappa lam Q =
  (eta/2) g^T J g, drops a term: the modified flow of theta' = -d - (eta/2) (H + lam) d (the
  Hessian of the loss *with* weight decay) projects to Q' + kappa lam (1 + eta lam/2) Q =
  (eta/2) g^T J g. Equivalently the discrete law shrinks Q by (1 - lam eta)^kappa per step while
  e^{-kappa lam eta} differs by kappa lam^2 eta^2/2. Passing kappa (1 + lam eta/2) as kappa
  restores O(eta^2); the test checks both.
* second order (M2), beta = 0 or lam = 0: O(eta^2).
* second order, beta > 0 and lam > 0: O(eta), for two separate reasons:
  1. the largest error is in the first ~1/(1-beta) steps: the discrete law has a fast mode
     decaying like beta^k with amplitude ~eta kappa lam beta Q0/(1-beta)^2, the continuous
     model's fast mode decays like e^{-2(1-beta)/(1+beta)} per step; no initial condition
     matches both, so the max over the whole run is O(eta);
  2. after that transient the error stays O(eta) because of the initial condition
     Q'(0) = -<xi_0, u_0> = -kappa lam Q0 (the specified one): it puts a relative error
     kappa eta lam beta / (2 (1 - beta)) into the slow mode's amplitude (the "~4e-4 later" of
     the reference code's momentum law at eta = 0.1, beta = 0.9, lam = 5e-4). Matching the slow-mode amplitude of the
     discrete law instead gives Q'(0) = -(1 + tau) kappa lam Q0 / (1 + beta); with it the
     late-time error is O(eta^2). The test checks the predicted size of the O(eta) offset, and
     the O(eta^2) with the matched start (via ``second_order_closed_form``).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from support.sgd import make_problem, run_sgd

from symmech.reference.numeric_laws import predict_laws, second_order_closed_form

T = 1.0
ETAS = np.array([0.01, 0.005, 0.0025, 0.00125])


@cache
def _errors(beta: float, lam: float) -> dict[str, np.ndarray]:
    """Per eta: max |pred - Q_obs| over the run (``<key>``) and over t >= T/2 (``<key>@late``)."""
    rows: dict[str, list[float]] = {}
    for eta in ETAS:
        run = run_sgd(
            make_problem("rescale", n_batches=1),
            int(round(T / eta)),
            lr=eta,
            momentum=beta,
            weight_decay=lam,
        )
        rec = run.records["hidden"]
        out = predict_laws(rec.kappa, rec.Q[0], run.hyper(), rec.data)
        # M1 with the weight-decay Hessian term put back: damping kappa lam (1 + lam eta / 2)
        kappa_wd = rec.kappa * (1.0 + lam * eta / 2.0)
        out["first_order_wd"] = predict_laws(kappa_wd, rec.Q[0], run.hyper(), rec.data)[
            "first_order"
        ]
        p0 = rec.kappa * lam * rec.Q[0]
        out["second_order_matched"] = second_order_closed_form(
            rec.kappa, rec.Q[0], -p0 / (1.0 + beta), eta, beta, lam, rec.data["uJu"], out["t"]
        )
        half = len(rec.Q) // 2
        keys = ("gradient_flow", "first_order", "first_order_wd", "second_order")
        for key in keys + ("second_order_matched",):
            err = np.abs(out[key] - rec.Q)
            rows.setdefault(key, []).append(float(err.max()))
            rows.setdefault(key + "@late", []).append(float(err[half:].max()))
        rows.setdefault("scale", []).append(float(rec.Qabs.max()))
        # predicted late O(eta) offset of the specified start: kappa eta lam beta/(2(1-beta)) Q0,
        # carried by the slow mode e^{-kappa lam t/(1-beta)}, checked at t = T
        offset = rec.kappa * eta * lam * beta / (2.0 * (1.0 - beta)) * np.abs(rec.Q[0])
        rows.setdefault("offset_pred", []).append(
            float((offset * np.exp(-rec.kappa * lam * T / (1.0 - beta))).max())
        )
        rows.setdefault("offset_seen", []).append(
            float(np.abs(out["second_order"] - rec.Q)[-1].max())
        )
    return {k: np.array(v) for k, v in rows.items()}


def _order(err: np.ndarray, first: int = 0) -> float:
    """Least-squares slope of log(err) against log(eta), from ETAS[first] on."""
    return float(np.polyfit(np.log(ETAS[first:]), np.log(err[first:]), 1)[0])


def test_plain_gd_without_weight_decay() -> None:
    e = _errors(0.0, 0.0)
    assert _order(e["gradient_flow"]) == pytest.approx(1.0, abs=0.1)
    assert (e["first_order"] / e["scale"]).max() <= 1e-12  # exact, see module docstring
    assert _order(e["second_order"]) == pytest.approx(2.0, abs=0.15)


def test_plain_gd_with_weight_decay() -> None:
    e = _errors(0.0, 0.1)
    assert abs(_order(e["gradient_flow"])) < 0.1  # does not converge: O(1)
    assert _order(e["first_order"]) == pytest.approx(1.0, abs=0.1)  # M1 drops O(eta lam^2)
    assert _order(e["first_order_wd"]) == pytest.approx(2.0, abs=0.15)
    assert e["first_order_wd"][-1] < 0.01 * e["first_order"][-1]
    assert _order(e["second_order"]) == pytest.approx(2.0, abs=0.15)


def test_momentum_without_weight_decay() -> None:
    e = _errors(0.5, 0.0)
    assert _order(e["gradient_flow"]) == pytest.approx(1.0, abs=0.1)
    assert _order(e["second_order"]) == pytest.approx(2.0, abs=0.15)


@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_momentum_with_weight_decay(beta: float) -> None:
    e = _errors(beta, 0.1)
    assert abs(_order(e["gradient_flow"])) < 0.15
    # reason 1: the transient fast mode, whatever the initial condition
    assert _order(e["second_order"]) == pytest.approx(1.0, abs=0.15)
    assert _order(e["second_order_matched"], first=1) == pytest.approx(1.0, abs=0.2)
    # reason 2: the specified start leaves an O(eta) slow-mode offset of the predicted size
    assert _order(e["second_order@late"]) == pytest.approx(1.0, abs=0.15)
    np.testing.assert_allclose(e["offset_seen"][-2:], e["offset_pred"][-2:], rtol=0.1)
    # ... which the matched start removes
    assert _order(e["second_order_matched@late"]) == pytest.approx(2.0, abs=0.25)
    assert e["second_order_matched@late"][-1] < 0.1 * e["second_order@late"][-1]


def test_dampening_scales_the_weight_decay_term() -> None:
    """With dampening tau the buffer averages (1 - tau) d, so the projected M2 reads
    m Q'' + (1-beta) Q' + (1-tau) kappa lam Q = m u^T J u. Without the (1 - tau) the error is
    O(1) (worse than gradient flow here); with it the law converges like the tau = 0 case."""
    beta, tau, lam = 0.9, 0.5, 0.1
    errs, errs_no_tau = [], []
    for eta in ETAS[:2]:
        run = run_sgd(
            make_problem("rescale", n_batches=1),
            int(round(T / eta)),
            lr=eta,
            momentum=beta,
            dampening=tau,
            weight_decay=lam,
        )
        rec = run.records["hidden"]
        out = predict_laws(rec.kappa, rec.Q[0], run.hyper(), rec.data)
        no_tau = second_order_closed_form(
            rec.kappa,
            rec.Q[0],
            -rec.kappa * lam * rec.Q[0],
            eta,
            beta,
            lam,
            rec.data["uJu"],
            out["t"],
        )
        errs.append(np.abs(out["second_order"] - rec.Q).max())
        errs_no_tau.append(np.abs(no_tau - rec.Q).max())
    assert errs[1] < 0.6 * errs[0]  # converging, O(eta)
    assert min(errs_no_tau) > 20 * max(errs)  # not converging
    assert abs(np.log(errs_no_tau[1] / errs_no_tau[0])) < 0.1
