"""The exact discrete law against real float64 ``torch.optim.SGD`` training.

``predict_laws(...)["discrete"]`` is a pure prediction: it gets Q_0 and the per-step quadratic
forms (u^T J u, u^T J b, g^T J g) measured by ``sgd_fixtures`` with plain torch, never an
observed Q after step 0. It must match Q observed on the real network at every step.

Error measure (``sgd_fixtures.rel_error``): max over steps of |Q_pred - Q_obs| divided by the
group's max over steps of Qabs = 1/2 theta^T |J| theta + |c|^T |theta| (Q with every term made
positive). That is the scale of the round-off in computing Q itself; |Q| alone is no scale,
since rescale and translation Q cross zero.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.sgd import NAMES, Record, make_problem, rel_error, run_sgd

from symmech.reference.numeric_laws import predict_laws

N_STEPS = 200
#: base learning rate per fixture: large enough to move Q visibly, small enough to stay finite
BASE_LR = {"translation": 0.5, "scale": 0.2, "rescale": 0.2, "quadratic": 0.05}


@st.composite
def sgd_settings(draw: st.DrawFn) -> dict:
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.3, 0.95)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9)))
    return {
        "lr_factor": draw(st.floats(0.2, 1.0)),
        "momentum": momentum,
        "nesterov": nesterov,
        "dampening": dampening,
        "weight_decay": draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.1))),
        "scheduler": draw(st.sampled_from([None, "step", "exp", "lambda"])),
    }


def _predict(rec: Record, run) -> dict[str, np.ndarray]:  # noqa: ANN001
    return predict_laws(rec.kappa, rec.Q[0], run.hyper(), rec.data)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None)
@given(cfg=sgd_settings())
def test_discrete_law_matches_torch_sgd(name: str, cfg: dict) -> None:
    # effective step lr / (1 - momentum): keep it comparable across momenta so training is stable
    lr = BASE_LR[name] * cfg["lr_factor"] * (1.0 - cfg["momentum"]) ** 0.5
    run = run_sgd(
        make_problem(name),
        N_STEPS,
        lr=lr,
        momentum=cfg["momentum"],
        dampening=cfg["dampening"],
        weight_decay=cfg["weight_decay"],
        nesterov=cfg["nesterov"],
        scheduler=cfg["scheduler"],
    )
    for fam, rec in run.records.items():
        assert np.isfinite(rec.Q).all(), (fam, "training diverged")
        out = _predict(rec, run)
        # exact symmetries: round-off only; BatchNorm (eps = 1e-14) leaves r_k ~ eps / var
        tol = 1e-9 if name == "scale" else 1e-12
        assert rel_error(out["discrete"], rec) <= tol, fam
        assert rel_error(out["discrete_residual"], rec) <= 1e-12, fam


def test_discrete_law_moves_q_a_lot() -> None:
    """Guard against a vacuous pass: Q really changes, and the continuous laws do miss it."""
    run = run_sgd(make_problem("rescale"), N_STEPS, lr=0.1, momentum=0.9, weight_decay=1e-2)
    rec = run.records["hidden"]
    out = _predict(rec, run)
    assert rel_error(out["gradient_flow"], rec) > 1e-2
    assert rel_error(out["second_order"], rec) > 1e-5
    assert rel_error(out["discrete"], rec) <= 1e-12


@pytest.mark.parametrize("bn_eps", [1e-3, 1e-5])
def test_batchnorm_eps_breaks_scale_symmetry_and_the_residual_explains_it(bn_eps: float) -> None:
    """With a real eps, r_k = <theta, g> != 0: the r = 0 prediction drifts, the law with the
    measured r_k is still exact."""
    run = run_sgd(
        make_problem("scale", bn_eps=bn_eps), N_STEPS, lr=0.1, momentum=0.9, weight_decay=5e-3
    )
    rec = run.records["conv"]
    out = _predict(rec, run)
    assert np.abs(rec.data["r"]).max() > 1e-8
    assert rel_error(out["discrete"], rec) > 1e-7
    assert rel_error(out["discrete_residual"], rec) <= 1e-12


def test_translation_bias_and_columns_with_nesterov_and_schedule() -> None:
    run = run_sgd(
        make_problem("translation"),
        N_STEPS,
        lr=0.5,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.05,
        scheduler="lambda",
    )
    assert set(run.records) == {"columns", "bias"}
    assert run.records["columns"].Q.shape == (N_STEPS + 1, 64)
    for rec in run.records.values():
        out = _predict(rec, run)
        assert rel_error(out["discrete"], rec) <= 1e-13
        # weight decay shrinks sum(W[:, j]) geometrically: a strong, checkable change
        assert np.abs(rec.Q[-1]).max() < 0.8 * np.abs(rec.Q[0]).max()
