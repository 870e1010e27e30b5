"""Closed forms for the damped driven oscillator m Q'' + (1-beta) Q' + kappa*lam Q = m F(t).

Two independent paths live here:

* :func:`oscillator_step` -- the exact one-step state transition of ``Q'' + a Q' + b Q = F`` for a
  forcing held constant over a step of length ``h``, written with functions that are entire in
  the scaled discriminant ``z = (a h / 2)**2 - b h**2``. It is what the per-step recurrence of
  :func:`symmech.reference.numeric_laws.predict_laws` uses; it never divides by a root difference that can
  be small and never forms a growing exponential.
* :func:`second_order_closed_form` -- the textbook Green's-kernel solution (roots, three regimes),
  summed over all steps at once. It exists to cross-check the recurrence.
"""

from __future__ import annotations

from math import factorial

import numpy as np

__all__ = ["damping_regime", "oscillator_step", "second_order_closed_form"]

#: |disc| below this fraction of max((1-beta)^2, 4 m kappa lam) counts as critical damping.
CRITICAL_RTOL = 1e-12

_N_SERIES = 11  # terms of the z-series; |z| <= 1 so the tail is below 1/(2*11)! ~ 1e-21
_N_J = 32  # terms of the series for J_k(alpha), alpha < sqrt(2): tail below 1.5**32/33! ~ 1e-31
_INV_FACT = np.array([1.0 / factorial(i) for i in range(2 * _N_SERIES + _N_J + 4)])


def _phi1(x: np.ndarray) -> np.ndarray:
    """(e^x - 1) / x, equal to 1 at x = 0, accurate for small |x| (x <= 0 here)."""
    out = np.ones_like(x)
    nz = x != 0
    out[nz] = np.expm1(x[nz]) / x[nz]
    return out


def _j_series(alpha: np.ndarray, k: int) -> np.ndarray:
    """J_k(alpha) = int_0^1 e^{-alpha s} s^k / k! ds = e^{-alpha} sum_j alpha^j / (j+k+1)!.

    The sum has only positive terms (no cancellation); it is used for 0 <= alpha < sqrt(2).
    """
    total = np.zeros_like(alpha)
    for j in range(_N_J - 1, -1, -1):  # Horner, smallest terms first
        total = total * alpha + _INV_FACT[j + k + 1]
    return np.exp(-alpha) * total


def oscillator_step(alpha: np.ndarray, bt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dimensionless kernels of one step of ``Q'' + a Q' + b Q = F`` (F constant on the step).

    With ``alpha = a h / 2 >= 0``, ``bt = b h**2 >= 0`` and ``z = alpha**2 - bt`` this returns
    ``(EC, ES, P)``:

    * ``EC = e^{-alpha} cosh(sqrt z)``, ``ES = e^{-alpha} sinh(sqrt z)/sqrt z`` (cos/sin for z < 0),
    * ``P = int_0^1 e^{-alpha s} s sinh(sqrt(z) s)/(sqrt(z) s) ds`` (the integral of the Green's
      kernel over the step, in units of h**2).

    The state (Q, V = Q') then moves as::

        Q+ = (EC + alpha ES) Q + h ES V + h**2 P F
        V+ = -(b h) ES Q + (EC - alpha ES) V + h ES F

    Regimes: ``|z| <= 1`` uses power series in z (covers critical damping and both sides of it,
    no root differences); ``z > 1`` (strongly overdamped) the real roots; ``z < -1`` (strongly
    underdamped) cos/sin. All exponentials are decaying.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    bt = np.asarray(bt, dtype=np.float64)
    alpha, bt = np.broadcast_arrays(alpha, bt)
    alpha = alpha.astype(np.float64, copy=True)
    bt = bt.astype(np.float64, copy=True)
    z = alpha * alpha - bt
    ec = np.empty_like(z)
    es = np.empty_like(z)
    p = np.empty_like(z)
    damp = np.exp(-alpha)

    mid = np.abs(z) <= 1.0
    if mid.any():
        zm, am = z[mid], alpha[mid]
        sc = np.zeros_like(zm)
        ss = np.zeros_like(zm)
        for n in range(_N_SERIES - 1, -1, -1):
            sc = sc * zm + _INV_FACT[2 * n]
            ss = ss * zm + _INV_FACT[2 * n + 1]
        ec[mid] = damp[mid] * sc
        es[mid] = damp[mid] * ss
        pm = np.empty_like(zm)
        bm = bt[mid]
        small_b = bm < 1.0  # then alpha**2 = z + bt < 2: the J-series converges fast
        if small_b.any():
            a_s, z_s = am[small_b], zm[small_b]
            acc = np.zeros_like(a_s)
            for n in range(_N_SERIES - 1, -1, -1):
                acc = acc * z_s + _j_series(a_s, 2 * n + 1)
            pm[small_b] = acc
        if (~small_b).any():
            phi11 = ec[mid][~small_b] + am[~small_b] * es[mid][~small_b]
            pm[~small_b] = (1.0 - phi11) / bm[~small_b]
        p[mid] = pm

    over = z > 1.0
    if over.any():
        sq = np.sqrt(z[over])
        rm = -alpha[over] - sq  # fast root (times h)
        rp = -bt[over] / (alpha[over] + sq)  # slow root, r+ r- = bt, no cancellation
        ep, em = np.exp(rp), np.exp(rm)
        ec[over] = 0.5 * (ep + em)
        es[over] = (ep - em) / (2.0 * sq)
        p[over] = (_phi1(rp) - _phi1(rm)) / (2.0 * sq)

    under = z < -1.0
    if under.any():
        nu = np.sqrt(-z[under])
        ec[under] = damp[under] * np.cos(nu)
        es[under] = damp[under] * np.sin(nu) / nu
        phi11 = ec[under] + alpha[under] * es[under]
        p[under] = (1.0 - phi11) / bt[under]  # bt = alpha^2 + nu^2 > 1
    return ec, es, p


def _disc(kappa: float, eta: float, beta: float, lam: float) -> tuple[float, float]:
    m = eta * (1.0 + beta) / 2.0
    return (1.0 - beta) ** 2 - 4.0 * m * kappa * lam, max((1.0 - beta) ** 2, 4.0 * m * kappa * lam)


def damping_regime(kappa: float, eta: float, beta: float, lam: float) -> str:
    """Regime of m Q'' + (1-beta) Q' + kappa lam Q = 0 with m = eta (1+beta)/2.

    Returns ``"overdamped"``, ``"critical"`` (|disc| within 1e-12 relative) or ``"underdamped"``.

    >>> damping_regime(2.0, 0.1, 0.9, 0.0)
    'overdamped'
    """
    disc, scale = _disc(kappa, eta, beta, lam)
    if abs(disc) <= CRITICAL_RTOL * scale:
        return "critical"
    return "overdamped" if disc > 0 else "underdamped"


def second_order_closed_form(
    kappa: float,
    Q0: np.ndarray | float,
    Qdot0: np.ndarray | float,
    eta: float,
    beta: float,
    lam: float,
    F: np.ndarray,
    t_eval: np.ndarray,
) -> np.ndarray:
    """Textbook Green's-kernel solution of m Q'' + (1-beta) Q' + kappa lam Q = m F(t).

    ``F`` has shape (n_steps,) or (n_steps, G) and is held constant on each step
    [k eta, (k+1) eta). ``Q0``/``Qdot0`` are scalars or shape (G,). Returns Q at ``t_eval``
    (shape (len(t_eval),) + group shape), computed as
    ``Q0 Phi11(t) + Qdot0 G(t) + sum_k F_k [I(t - t_k) - I(t - t_{k+1})]`` with the kernel
    ``G``, its integral ``I`` and ``Phi11`` in the closed form of the regime (roots r+-, double
    root, or mu +- i nu). Cost O(len(t_eval) * n_steps). Independent of the recurrence; near but
    not at the critical boundary it loses accuracy (root differences in denominators).
    """
    F = np.asarray(F, dtype=np.float64)
    t = np.asarray(t_eval, dtype=np.float64)
    m = eta * (1.0 + beta) / 2.0
    a = (1.0 - beta) / m
    b = kappa * lam / m
    regime = damping_regime(kappa, eta, beta, lam)

    if regime == "overdamped":
        sq = np.sqrt(a * a - 4.0 * b)
        rm = (-a - sq) / 2.0
        rp = -2.0 * b / (a + sq)  # = (-a + sq)/2 without cancellation

        def green(s: np.ndarray) -> np.ndarray:
            return (np.exp(rp * s) - np.exp(rm * s)) / (rp - rm)

        def phi11(s: np.ndarray) -> np.ndarray:
            return (rp * np.exp(rm * s) - rm * np.exp(rp * s)) / (rp - rm)

        def integral(s: np.ndarray) -> np.ndarray:
            ip = s if rp == 0.0 else np.expm1(rp * s) / rp
            return (ip - np.expm1(rm * s) / rm) / (rp - rm)

    elif regime == "critical":
        r = -a / 2.0

        def green(s: np.ndarray) -> np.ndarray:
            return s * np.exp(r * s)

        def phi11(s: np.ndarray) -> np.ndarray:
            return (1.0 - r * s) * np.exp(r * s)

        def integral(s: np.ndarray) -> np.ndarray:
            return (np.exp(r * s) * (r * s - 1.0) + 1.0) / (r * r)

    else:
        mu = -a / 2.0
        nu = np.sqrt(b - a * a / 4.0)

        def green(s: np.ndarray) -> np.ndarray:
            return np.exp(mu * s) * np.sin(nu * s) / nu

        def phi11(s: np.ndarray) -> np.ndarray:
            return np.exp(mu * s) * (np.cos(nu * s) - mu / nu * np.sin(nu * s))

        def integral(s: np.ndarray) -> np.ndarray:
            e = np.exp(mu * s)
            return (nu - e * (nu * np.cos(nu * s) - mu * np.sin(nu * s))) / (nu * (mu**2 + nu**2))

    n = F.shape[0]
    starts = eta * np.arange(n)
    lag0 = np.clip(t[:, None] - starts[None, :], 0.0, None)  # (n_eval, n_steps)
    lag1 = np.clip(t[:, None] - (starts[None, :] + eta), 0.0, None)
    weights = integral(lag0) - integral(lag1)
    forced = np.tensordot(weights, F, axes=([1], [0]))
    q0 = np.asarray(Q0, dtype=np.float64)
    qd0 = np.asarray(Qdot0, dtype=np.float64)
    shape = (-1,) + (1,) * max(F.ndim - 1, q0.ndim, qd0.ndim)
    return q0 * phi11(t).reshape(shape) + qd0 * green(t).reshape(shape) + forced
