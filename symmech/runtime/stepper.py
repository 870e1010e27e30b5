"""Every law advanced by one optimizer step, from per-group inner products: one code for all specs.

For ξ = Jθ + c with ⟨ξ, θ⟩ = κQ a spec's generated module supplies only Q, r = ⟨ξ, g⟩ and the
bilinear forms B_xy = ⟨x, J y⟩ for x, y ∈ {θₖ, gₖ, bₖ₋₁} (:class:`~.kernels.Forms`). With
``torch.optim.SGD``'s update d = g + λθ, b = βb₋ + (1−τ)d, u = b (or d + βb with Nesterov,
or d without momentum), :func:`update_forms` writes uᵀJu and uᵀJb in those forms, and
:class:`Laws` advances

* ``gradient_flow``      Q(t) = Q(0);
* ``discrete``           the exact law Qₖ₊₁ = Qₖ − ηₖ⟨ξₖ, uₖ⟩ + ½ηₖ² uₖᵀJuₖ (docs/theory.md,
  "The exact discrete law"), and ``discrete_residual``, the same law fed the measured rₖ;
* ``first_order``        Q̇ + κλQ = (η/2) gᵀJg, forcing held over the step (exact exponential step);
* ``second_order``       m Q̈ + (1−β)Q̇ + (1−τ)κλQ = m uᵀJu, m = η(1+β)/2, exact step propagator.

State is float64 on the parameters' device; hyperparameters are Python floats, so a step
queues device work only and never waits for the device.

>>> import torch
>>> laws = Laws(2.0, torch.tensor([1.0]))
>>> one = torch.ones(1, dtype=torch.float64)
>>> laws.step(StepData(Hyper(lr=0.1), uJu=one, uJb=one, gJg=one))
>>> round(float(laws.discrete), 4), laws.t
(1.005, 0.1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from symmech.derive.data_terms import sgd_case
from symmech.laws.names import PREDICTIONS

from .kernels import Forms


@dataclass(frozen=True)
class Hyper:
    """The settings of ``torch.optim.SGD`` for one param group at one step."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def case(self, first_step: bool) -> str:
        """Which update form the step uses (see :func:`symmech.derive.data_terms.sgd_case`)."""
        return sgd_case(self.momentum, self.nesterov, first_step=first_step)


@dataclass
class StepData:
    """What the laws need from one optimizer step, per group (float64 once in :class:`Laws`).

    ``gJg`` is the first-order forcing (measured only without momentum, None: zero) and
    ``residual`` the measured rₖ fed to ``discrete_residual`` (None: zero). The rest say where
    the law's state comes from this step (NaN or False: carried on from the previous step):
    ``xi_b`` is the measured ⟨ξ(θₖ), bₖ₋₁⟩ of a buffer the law has not followed (tracking starts
    on an existing buffer, or momentum comes back after steps without it); ``fresh`` marks groups
    whose buffer torch creates in this step (b = d); ``restart`` is the observed Qₖ where every
    law starts anew; ``idle`` marks groups the optimizer skips (no gradient: nothing moves).
    """

    hyper: Hyper
    uJu: torch.Tensor
    uJb: torch.Tensor
    gJg: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    xi_b: torch.Tensor | None = None
    fresh: torch.Tensor | bool | None = None  # None: on the laws' first step only
    restart: torch.Tensor | None = None
    idle: torch.Tensor | bool = False


def update_forms(case: str, hyper: Hyper, B: Forms) -> tuple[torch.Tensor, torch.Tensor]:
    """(uᵀJu, uᵀJb) of the coming update from the forms of (θₖ, gₖ, bₖ₋₁) before the step.

    With B_dd = ⟨d, Jd⟩ = B_gg + 2λB_θg + λ²B_θθ and B_db = ⟨d, Jb₋⟩ = B_gb + λB_θb:
    ``sgd``: uᵀJu = uᵀJb = β²B_bb + 2β(1−τ)B_db + (1−τ)²B_dd; ``first`` and ``plain``: B_dd;
    ``nesterov``: u = d + βb with b = βb₋ + (1−τ)d; ``nesterov_first``: u = (1+β)d, b = d.
    """
    beta, tau, lam = hyper.momentum, hyper.dampening, hyper.weight_decay
    dd = B.gg + 2.0 * lam * B.tg + lam * lam * B.tt
    if case in ("first", "plain"):
        return dd, dd
    if case == "nesterov_first":
        return (1.0 + beta) ** 2 * dd, (1.0 + beta) * dd
    if B.bb is None or B.gb is None or B.tb is None:
        raise ValueError(f"update_forms: the case {case!r} needs the momentum buffer's forms")
    db = B.gb + lam * B.tb
    bb = beta * beta * B.bb + 2.0 * beta * (1.0 - tau) * db + (1.0 - tau) ** 2 * dd  # ⟨b, Jb⟩
    if case == "sgd":
        return bb, bb
    if case == "nesterov":
        d_b = beta * db + (1.0 - tau) * dd  # ⟨d, Jb⟩ with the new buffer
        return dd + 2.0 * beta * d_b + beta * beta * bb, d_b + beta * bb
    raise ValueError(f"update_forms: unknown case {case!r}")


def _m2_coefficients(h: float, a: float, b: float):
    """Exact one-step propagator of Q'' + a Q' + b Q = F with F held over the step.

    Returns (Phi, Gamma): [Q, Q'](t + h) = Phi [Q, Q'](t) + Gamma F. Computed once per
    distinct (h, a, b) on the host in float64 from the 3x3 augmented matrix exponential, which
    covers the over-, critically and under-damped cases and b = 0 alike; Phi's eigenvalues are
    exp(r h) with Re r <= 0, so repeated application decays and never overflows.
    """
    if h == 0.0:  # a step with lr = 0 takes no time: nothing moves
        return (1.0, 0.0, 0.0, 1.0), (0.0, 0.0)
    m = torch.tensor([[0.0, 1.0, 0.0], [-b, -a, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64) * h
    e = torch.linalg.matrix_exp(torch.stack([m, m]))[0].tolist()  # batched: torch's accurate path
    return (e[0][0], e[0][1], e[1][0], e[1][1]), (e[0][2], e[1][2])


_STATE = (
    "q0",
    "discrete",
    "discrete_residual",
    "first_order",
    "second_order",
    "second_order_rate",
    "xi_b",
    "xi_b_residual",
)


class Laws:
    """Every law's prediction of Q per group, advanced once per optimizer step."""

    def __init__(self, kappa: float, q0: torch.Tensor) -> None:
        q0 = q0.detach().to(torch.float64)
        self.kappa = float(kappa)
        self.q0 = q0.clone()
        self.discrete = q0.clone()
        self.discrete_residual = q0.clone()
        self.first_order = q0.clone()
        self.second_order = q0.clone()
        self.second_order_rate = torch.zeros_like(q0)
        #: ⟨ξ(θₖ), bₖ₋₁⟩ of the pure law and of the law fed rₖ (zero before any buffer)
        self.xi_b = torch.zeros_like(q0)
        self.xi_b_residual = torch.zeros_like(q0)
        self.t = 0.0
        self.steps = 0
        self._cache: dict[tuple[float, float, float], tuple] = {}

    @property
    def gradient_flow(self) -> torch.Tensor:
        return self.q0

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every prediction, keyed by law name (device tensors, nothing synced)."""
        return {name: getattr(self, name).clone() for name in PREDICTIONS}

    def state_dict(self) -> dict:
        """Everything the laws carry, to continue exactly in another process."""
        out: dict = {name: getattr(self, name).clone() for name in _STATE}
        out.update(kappa=self.kappa, t=self.t, steps=self.steps)
        return out

    def load_state_dict(self, state: dict) -> None:
        for name in _STATE:
            setattr(self, name, state[name].to(self.q0.device, torch.float64).clone())
        self.kappa, self.t, self.steps = (
            float(state["kappa"]),
            float(state["t"]),
            int(state["steps"]),
        )

    def restart(self, q: torch.Tensor) -> torch.Tensor:
        """Start every law anew at the observed Q where ``q`` is not NaN; returns that mask."""
        mask = ~torch.isnan(q)
        for name in ("q0", "discrete", "discrete_residual", "first_order", "second_order"):
            setattr(self, name, torch.where(mask, q, getattr(self, name)))
        return mask

    def step(self, data: StepData) -> None:
        """Advance every law by one ``torch.optim.SGD`` step with these settings and data."""
        h = data.hyper
        lr, beta, tau = h.lr, h.momentum, h.dampening
        kl = self.kappa * h.weight_decay
        before = {name: getattr(self, name) for name in _STATE}
        start = self.steps == 0
        if data.restart is not None:
            start = self.restart(data.restart.to(torch.float64)) | start
        zero = torch.zeros_like(self.discrete)
        r = zero if data.residual is None else data.residual.to(torch.float64)
        gJg = zero if data.gJg is None else data.gJg.to(torch.float64)
        uJu = data.uJu.to(torch.float64)
        uJb = data.uJb.to(torch.float64)
        xi_b, xi_b_res = self.xi_b, self.xi_b_residual
        if data.xi_b is not None:  # a buffer the law has not followed: its measured share
            measured = data.xi_b.to(torch.float64)
            known = torch.isnan(measured)
            xi_b = torch.where(known, xi_b, measured)
            xi_b_res = torch.where(known, xi_b_res, measured)
        p, p_res = kl * self.discrete, r + kl * self.discrete_residual
        if beta == 0.0:
            v, v_res = p, p_res
            m, m_res = xi_b, xi_b_res  # the buffer stays; the law re-reads it when β returns
        else:
            fresh = torch.as_tensor(self.steps == 0 if data.fresh is None else data.fresh)
            m = torch.where(fresh, p, beta * xi_b + (1.0 - tau) * p)
            m_res = torch.where(fresh, p_res, beta * xi_b_res + (1.0 - tau) * p_res)
            v, v_res = (p + beta * m, p_res + beta * m_res) if h.nesterov else (m, m_res)
        half_lr2 = 0.5 * lr * lr
        self.second_order_rate = torch.where(torch.as_tensor(start), -v, self.second_order_rate)
        self.discrete = self.discrete - lr * v + half_lr2 * uJu
        self.discrete_residual = self.discrete_residual - lr * v_res + half_lr2 * uJu
        if beta != 0.0:  # ⟨ξ(θₖ₊₁), bₖ⟩ = mₖ − ηₖ⟨uₖ, J bₖ⟩
            self.xi_b, self.xi_b_residual = m - lr * uJb, m_res - lr * uJb
        # first-order modified flow, forcing held over the step (exact exponential update)
        decay = math.exp(-kl * lr)
        phi = -math.expm1(-kl * lr) / kl if kl > 0.0 else lr
        self.first_order = decay * self.first_order + 0.5 * lr * phi * gJg
        # second-order (momentum) modified flow
        mass = lr * (1.0 + beta) / 2.0
        stiffness = (1.0 - tau) * kl if beta > 0.0 else kl
        key = (lr, beta, stiffness)
        if key not in self._cache:
            a, b = ((1.0 - beta) / mass, stiffness / mass) if lr > 0.0 else (0.0, 0.0)
            if len(self._cache) >= 64:  # bounded: a schedule gives a new lr every step
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = _m2_coefficients(lr, a, b)
        (p00, p01, p10, p11), (g0, g1) = self._cache[key]
        q, qd = self.second_order, self.second_order_rate
        self.second_order = p00 * q + p01 * qd + g0 * uJu
        self.second_order_rate = p10 * q + p11 * qd + g1 * uJu
        if not (isinstance(data.idle, bool) and not data.idle):  # skipped groups keep their state
            idle = torch.as_tensor(data.idle, device=self.discrete.device)
            for name, old in before.items():
                setattr(self, name, torch.where(idle, old, getattr(self, name)))
        self.t += lr
        self.steps += 1
