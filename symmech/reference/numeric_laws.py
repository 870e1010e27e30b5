"""NumPy evaluator of the learning-dynamics laws: the independent numerical reference.

For an affine symmetry generator xi(theta) = J theta + c with Q = 1/2 theta^T J theta + c^T theta
and <xi, theta> = kappa Q, :func:`predict_laws` turns per-step quadratic forms measured during
``torch.optim.SGD`` training into predictions of Q at every step:

* ``"discrete"`` / ``"discrete_residual"`` -- the exact discrete law (docs/theory.md, "The exact discrete
  law"), without / with the measured symmetry residual r_k;
* ``"first_order"`` -- (M1) projected, Q' + kappa lam Q = (eta/2) g^T J g;
* ``"second_order"`` -- (M2) projected, m Q'' + (1-beta) Q' + (1-tau) kappa lam Q = m u^T J u;
* ``"gradient_flow"`` (Q constant) and ``"continuous"`` (M1 when beta = 0, else M2).

Every array carries a trailing group axis of size G. The continuous laws hold the forcing
constant over each step and propagate exactly from step to step (decaying factors only), so
they stay finite over any number of steps and follow per-step learning rates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from symmech.reference.green import damping_regime, oscillator_step, second_order_closed_form

__all__ = [
    "SGDHyper",
    "damping_regime",
    "predict_laws",
    "second_order_closed_form",
]

_REQUIRED = ("uJu", "uJb", "gJg")


def _check_finite_scalar(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class SGDHyper:
    """Hyperparameters of ``torch.optim.SGD``; ``lr`` may be a per-step array (a schedule).

    Validated like torch does: lr >= 0, weight_decay >= 0, momentum in [0, 1) (1 is excluded
    because the continuous laws need 1 - momentum > 0), and Nesterov needs momentum > 0 and
    dampening == 0.
    """

    lr: float | np.ndarray
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        lr = np.asarray(self.lr, dtype=np.float64)
        if lr.ndim > 1:
            raise ValueError(f"lr must be a scalar or a 1-D per-step array, got shape {lr.shape}")
        flat = np.atleast_1d(lr)
        where = (lambda i: "") if lr.ndim == 0 else (lambda i: f" at step {i}")
        bad = np.flatnonzero(~np.isfinite(flat))
        if bad.size:
            raise ValueError(f"lr must be finite, got {float(flat[bad[0]])!r}{where(bad[0])}")
        neg = np.flatnonzero(flat < 0)
        if neg.size:
            raise ValueError(
                f"Invalid learning rate: {float(flat[neg[0]])!r}{where(neg[0])} (must be >= 0)"
            )
        beta = _check_finite_scalar("momentum", self.momentum)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid momentum value: {beta!r} (must be in [0, 1))")
        tau = _check_finite_scalar("dampening", self.dampening)
        lam = _check_finite_scalar("weight_decay", self.weight_decay)
        if lam < 0:
            raise ValueError(f"Invalid weight_decay value: {lam!r} (must be >= 0)")
        if self.nesterov and (beta <= 0 or tau != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening, got "
                f"momentum={beta!r}, dampening={tau!r}"
            )

    def lr_at(self, n_steps: int) -> np.ndarray:
        """Per-step learning rates, shape (n_steps,)."""
        lr = np.asarray(self.lr, dtype=np.float64)
        if lr.ndim == 0:
            return np.full(n_steps, float(lr))
        if lr.shape[0] != n_steps:
            raise ValueError(f"lr schedule has {lr.shape[0]} entries but there are {n_steps} steps")
        return lr.copy()


def _as_steps_groups(name: str, arr: np.ndarray, n_groups: int | None) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or (n_groups is not None and a.shape[1] != n_groups):
        want = f"(n_steps, {n_groups})" if n_groups is not None else "(n_steps, G)"
        raise ValueError(f"data[{name!r}] must have shape {want}, got {np.shape(arr)}")
    bad = np.argwhere(~np.isfinite(a))
    if bad.size:
        k, g = bad[0]
        raise ValueError(f"data[{name!r}] is not finite at step {k}, group {g}: {float(a[k, g])!r}")
    return a


def _validate(
    kappa: float, Q0: np.ndarray, hyper: SGDHyper, data: Mapping[str, np.ndarray]
) -> tuple[float, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    kappa = _check_finite_scalar("kappa", kappa)
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa!r}")
    q0 = np.atleast_1d(np.asarray(Q0, dtype=np.float64))
    if q0.ndim != 1:
        raise ValueError(f"Q0 must be a scalar or have shape (G,), got shape {q0.shape}")
    bad = np.flatnonzero(~np.isfinite(q0))
    if bad.size:
        raise ValueError(f"Q0 is not finite in group {bad[0]}: {float(q0[bad[0]])!r}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ValueError(
            f"data is missing key(s) {missing}; needs {list(_REQUIRED)} (+ optional 'r')"
        )
    arrays = {k: _as_steps_groups(k, data[k], q0.shape[0]) for k in _REQUIRED}
    n = arrays["uJu"].shape[0]
    if "r" in data and data["r"] is not None:
        arrays["r"] = _as_steps_groups("r", data["r"], q0.shape[0])
    else:
        arrays["r"] = np.zeros((n, q0.shape[0]))
    for k, a in arrays.items():
        if a.shape[0] != n:
            raise ValueError(f"data[{k!r}] has {a.shape[0]} steps but data['uJu'] has {n}")
    return kappa, q0, arrays, hyper.lr_at(n)


def _discrete(
    kappa: float,
    q0: np.ndarray,
    hyper: SGDHyper,
    lr: np.ndarray,
    d: dict[str, np.ndarray],
    r: np.ndarray,
) -> np.ndarray:
    """Exact discrete law of torch.optim.SGD (docs/theory.md, "The exact discrete law")."""
    beta, tau, lam = hyper.momentum, hyper.dampening, hyper.weight_decay
    uju, ujb = d["uJu"], d["uJb"]
    out = np.empty((lr.shape[0] + 1, q0.shape[0]))
    q = q0.copy()
    out[0] = q
    m = np.zeros_like(q)
    for k in range(lr.shape[0]):
        p = r[k] + kappa * lam * q  # <xi_k, d_k>
        if beta == 0.0:
            x = p
        else:
            m = p if k == 0 else beta * (m - lr[k - 1] * ujb[k - 1]) + (1.0 - tau) * p
            x = p + beta * m if hyper.nesterov else m
        q = q - lr[k] * x + 0.5 * lr[k] ** 2 * uju[k]
        out[k + 1] = q
    return out


def _first_order(
    kappa: float, q0: np.ndarray, lam: float, lr: np.ndarray, gjg: np.ndarray
) -> np.ndarray:
    """(M1): Q' + kappa lam Q = (eta/2) gJg, zero-order hold, exact exponential step."""
    x = -kappa * lam * lr
    decay = np.exp(x)
    phi = np.ones_like(x)
    nz = x != 0
    phi[nz] = np.expm1(x[nz]) / x[nz]  # phi(-kappa lam, eta) / eta
    drive = 0.5 * lr * lr * phi  # (eta/2) * eta * phi1
    out = np.empty((lr.shape[0] + 1, q0.shape[0]))
    q = q0.copy()
    out[0] = q
    for k in range(lr.shape[0]):
        q = decay[k] * q + drive[k] * gjg[k]
        out[k + 1] = q
    return out


def _second_order(
    kappa: float, q0: np.ndarray, hyper: SGDHyper, lr: np.ndarray, uju: np.ndarray
) -> np.ndarray:
    """(M2): m Q'' + (1-beta) Q' + (1-tau) kappa lam Q = m uJu, exact step transition."""
    beta, lam = hyper.momentum, hyper.weight_decay
    lam_eff = (1.0 - hyper.dampening) * lam if beta > 0 else lam
    alpha = (1.0 - beta) / (1.0 + beta)  # a h / 2 with a = (1-beta)/m, h = eta: the same each step
    bh = 2.0 * kappa * lam_eff / (1.0 + beta)  # b h, again without dividing by eta
    ec, es, p = oscillator_step(np.full_like(lr, alpha), bh * lr)
    c11, c12, c13 = ec + alpha * es, lr * es, lr * lr * p
    c21, c22, c23 = -bh * es, ec - alpha * es, lr * es
    p0 = kappa * lam * q0  # <xi_0, d_0> with r = 0
    v = -(1.0 + beta) * p0 if hyper.nesterov else -p0  # Q'(0) = -<xi_0, u_0>
    q = q0.copy()
    out = np.empty((lr.shape[0] + 1, q0.shape[0]))
    out[0] = q
    for k in range(lr.shape[0]):
        q, v = c11[k] * q + c12[k] * v + c13[k] * uju[k], c21[k] * q + c22[k] * v + c23[k] * uju[k]
        out[k + 1] = q
    return out


def predict_laws(
    kappa: float, Q0: np.ndarray, hyper: SGDHyper, data: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Predict Q at theta_0 .. theta_n from per-step quadratic forms of an SGD run.

    ``data`` maps ``"uJu"``, ``"uJb"``, ``"gJg"`` (and optionally ``"r"``) to arrays of shape
    (n_steps, G) (1-D means G = 1); ``Q0`` has shape (G,). Returns ``"t"`` (n_steps+1,) and
    ``"gradient_flow"``, ``"discrete"``, ``"discrete_residual"``, ``"first_order"``,
    ``"second_order"``, ``"continuous"``, each (n_steps+1, G).

    Initial conditions of the second-order law: Q(0) = Q0 and Q'(0) = -<xi_0, u_0> with r = 0,
    i.e. -kappa lam Q0 ((1+beta) times that with Nesterov); Q and Q' are continuous across steps
    when the learning rate changes. With dampening tau the weight-decay term carries (1 - tau),
    as the momentum buffer does (tau = 0 gives the paper's equation). This start makes the
    law O(eta) when beta > 0 and lam > 0 (a slow-mode offset of relative size
    kappa eta lam beta / (2 (1 - beta))); Q'(0) = -(1 + tau) kappa lam Q0 / (1 + beta) would
    remove it, see tests/laws/test_continuous_order.py.

    >>> import numpy as np
    >>> n = 3
    >>> data = {"uJu": np.ones((n, 1)), "uJb": np.ones((n, 1)), "gJg": np.ones((n, 1))}
    >>> out = predict_laws(2.0, np.array([1.0]), SGDHyper(lr=0.1), data)
    >>> out["discrete"][:, 0].round(4).tolist()  # Q + eta^2/2 per step with no weight decay
    [1.0, 1.005, 1.01, 1.015]
    """
    kappa, q0, d, lr = _validate(kappa, Q0, hyper, data)
    n = lr.shape[0]
    t = np.concatenate([[0.0], np.cumsum(lr)])
    discrete = _discrete(kappa, q0, hyper, lr, d, np.zeros_like(d["r"]))
    residual = _discrete(kappa, q0, hyper, lr, d, d["r"]) if d["r"].any() else discrete.copy()
    out = {
        "t": t,
        "gradient_flow": np.broadcast_to(q0, (n + 1, q0.shape[0])).copy(),
        "discrete": discrete,
        "discrete_residual": residual,
        "first_order": _first_order(kappa, q0, hyper.weight_decay, lr, d["gJg"]),
        "second_order": _second_order(kappa, q0, hyper, lr, d["uJu"]),
    }
    out["continuous"] = out["first_order" if hyper.momentum == 0 else "second_order"]
    return out
