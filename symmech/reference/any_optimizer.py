"""The exact one-step law of a charge under any optimizer, and its anatomy (NumPy reference).

Write one optimizer step as θₖ₊₁ = sₖ θₖ − ηₖ aₖ, with sₖ = 1 − ηₖ λ_dec for a decoupled weight
decay (AdamW; sₖ = 1 otherwise: a coupled decay, as in SGD, Adam or RMSprop, sits inside aₖ). For an
affine generator ξ = Jθ + c and its charge Q = ½θᵀJθ + cᵀθ, exactly::

    Q(θₖ₊₁) = sₖ² Q_J + sₖ Q_c − ηₖ (sₖ⟨Jθₖ, aₖ⟩ + ⟨c, aₖ⟩) + ½ηₖ² aₖᵀJaₖ,

with Q_J = ½θₖᵀJθₖ and Q_c = cᵀθₖ. Nothing here needs the symmetry: for SGD the middle term is
fixed by G1 and the momentum recurrence, for a preconditioned direction (Adam's m̂/(√v̂+ε)) it is a
measured data term, the kinetic symmetry breaking of the preconditioner.

The anatomy splits each step's change into three cumulative parts that add up to Q − Q₀:

* ``decay``: the decoupled decay, (sₖ² − 1)Q_J + (sₖ − 1)Q_c;
* ``breaking``: −ηₖ(sₖ⟨Jθₖ, aₖ⟩ + ⟨c, aₖ⟩), what moves Q along the direction of the update;
* ``step``: ½ηₖ² aₖᵀJaₖ, the finite-step term.

For SGD, :func:`sgd_anatomy` splits the direction term further by the linearity of the momentum
recurrence: coupled decay (κλQ), symmetry breaking (the residual r = ⟨ξ, g⟩) and the finite-step
part of the buffer (−β ηₖ₋₁ uₖ₋₁ᵀJbₖ₋₁).

>>> import numpy as np
>>> one = np.ones((1, 1))
>>> out = step_law(QJ=one, Qc=0 * one, Ja=0 * one, ca=0 * one, aJa=one, lr=np.array([0.1]),
...                shrink=np.array([0.95]))
>>> round(float(out["Q_next"][0, 0]), 6)   # 0.95² + ½·0.1²
0.9075
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["angular_equilibrium", "angular_update", "sgd_anatomy", "step_law"]


def step_law(
    QJ: np.ndarray,
    Qc: np.ndarray,
    Ja: np.ndarray,
    ca: np.ndarray,
    aJa: np.ndarray,
    lr: np.ndarray,
    shrink: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One exact step per row: Q(θₖ₊₁) and the parts of its change, each shape (n, G).

    ``QJ`` = ½θᵀJθ, ``Qc`` = cᵀθ, ``Ja`` = ⟨Jθ, a⟩, ``ca`` = ⟨c, a⟩, ``aJa`` = aᵀJa per step and
    group; ``lr`` (n,) the step size ηₖ that multiplies aₖ (Adam's lr / (1 − β₁ᵏ)); ``shrink`` (n,)
    the factor sₖ of the decoupled decay (AdamW: 1 − lr·λ with the base lr), 1 when omitted.
    """
    eta = np.asarray(lr, dtype=np.float64)[:, None]
    s = np.ones_like(eta) if shrink is None else np.asarray(shrink, dtype=np.float64)[:, None]
    decay = (s * s - 1.0) * QJ + (s - 1.0) * Qc
    breaking = -eta * (s * Ja + ca)
    step = 0.5 * eta * eta * aJa
    return {
        "Q_next": QJ + Qc + decay + breaking + step,
        "decay": decay,
        "breaking": breaking,
        "step": step,
    }


def sgd_anatomy(
    kappa: float,
    Q: np.ndarray,
    r: np.ndarray,
    uJu: np.ndarray,
    uJb: np.ndarray,
    lr: np.ndarray,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first_step: bool = True,
    xi_b_prev: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-step parts of ΔQ under ``torch.optim.SGD``: coupled decay, breaking, finite step.

    ``Q`` (n, G) is the observed charge before each step (the decay part of ⟨ξ, d⟩ is κλQₖ).
    When ``first_step`` is False the run was attached to an optimizer that already has momentum
    buffers b₋₁; ``xi_b_prev`` (G,) is then ⟨ξ(θ₀), b₋₁⟩ and its share of the first step counts as
    ``history`` (what happened before tracking started). Returns (n, G) arrays ``decay``,
    ``breaking``, ``step`` and ``history`` whose sum is Qₖ₊₁ − Qₖ exactly.
    """
    n, g = Q.shape
    beta, tau, lam = momentum, dampening, weight_decay
    parts = {k: np.zeros((n, g)) for k in ("decay", "breaking", "step", "history")}
    # m = ⟨ξ, b⟩ split by source; p = ⟨ξ, d⟩ = r + κλQ split likewise.
    m = {k: np.zeros(g) for k in parts}
    for k in range(n):
        p = {"decay": kappa * lam * Q[k], "breaking": r[k], "step": np.zeros(g)}
        p["history"] = np.zeros(g)
        if beta == 0.0:
            x = p
        else:
            if k == 0 and first_step:
                m = dict(p)
            elif k == 0:
                hist = np.zeros(g) if xi_b_prev is None else np.asarray(xi_b_prev, np.float64)
                m = {key: (1.0 - tau) * p[key] for key in p}
                m["history"] = beta * hist
            else:
                m = {key: beta * m[key] + (1.0 - tau) * p[key] for key in p}
                m["step"] = m["step"] - beta * lr[k - 1] * uJb[k - 1]
            x = {key: p[key] + beta * m[key] for key in p} if nesterov else m
        for key in parts:
            parts[key][k] = -lr[k] * x[key]
        parts["step"][k] += 0.5 * lr[k] ** 2 * uJu[k]
    return parts


def angular_update(theta_sq: np.ndarray, next_sq: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """Angle (radians) between θₖ and θₖ₊₁ from |θₖ|², |θₖ₊₁|² and ⟨θₖ, θₖ₊₁⟩."""
    cos = cross / np.sqrt(theta_sq * next_sq)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def angular_equilibrium(
    optimizer: str, lr: float, weight_decay: float, momentum: float = 0.0
) -> tuple[float | None, str]:
    """Equilibrium angular update of a scale-invariant group (random-walk model) and its source.

    SGD with momentum: √(2ηλ/(1+β)) (Wan et al. 2021, spherical motion dynamics); AdamW:
    √(2ηλ) (Kosson, Messmer & Jaggi, ICML 2024). Other optimizers: None and the reason.
    """
    name = optimizer.lower()
    if weight_decay <= 0 or lr <= 0:
        return None, "no equilibrium without weight decay and a positive learning rate"
    if name == "sgd":
        return math.sqrt(
            2 * lr * weight_decay / (1 + momentum)
        ), "SGD: sqrt(2 lr wd / (1 + momentum))"
    if name == "adamw":
        return math.sqrt(2 * lr * weight_decay), "AdamW: sqrt(2 lr wd)"
    reasons: Mapping[str, str] = {
        "adam": "Adam's L2 decay is rescaled by the preconditioner: no closed equilibrium",
        "rmsprop": "RMSprop's coupled decay is preconditioned: no closed equilibrium",
        "adagrad": "Adagrad's step size decays: no equilibrium",
    }
    return None, reasons.get(name, f"no equilibrium model for {optimizer!r}")
