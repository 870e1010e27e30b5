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

Any other step θₖ₊₁ = sθₖ − ηₖaₖ (Adam, AdamW, RMSprop, Adagrad, or SGD with per-tensor settings;
:mod:`.directions`) is advanced by the same exact law written for a measured direction:
Qₖ₊₁ = s^κ Qₖ + Mₖ − Xₖ + ½Aₖ with Xₖ = ⟨ξ(Sθₖ), ηa⟩, Aₖ = ⟨ηa, J ηa⟩ and Mₖ the measured
Q(Sθ) − s^κQ(θ) of tensors whose shrink differs (docs/theory.md, "Any optimizer"). There the
continuous models do not close and are NaN.

Beside the predictions, every step adds to the anatomy of the change (``dQ_decay``,
``dQ_breaking``, ``dQ_step``, ``dQ_history``, which sum to ``discrete_residual`` − Q₀) and, for
groups whose charge is ½|θ|², gives the angle between θₖ and θₖ₊₁ from the same terms.

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from symmech.derive.data_terms import sgd_case
from symmech.laws.names import ANATOMY, PREDICTIONS, ROTATION, ROTATION_PARTS

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
    uJu: torch.Tensor | None
    uJb: torch.Tensor | None
    gJg: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    xi_b: torch.Tensor | None = None
    fresh: torch.Tensor | bool | None = None  # None: on the laws' first step only
    restart: torch.Tensor | None = None
    idle: torch.Tensor | bool = False
    #: the general step θₖ₊₁ = sθₖ − ηa (None: torch.optim.SGD's law from uJu and uJb)
    general: General | None = None
    #: the random-walk equilibrium angle of the step's settings (None: no model applies)
    rotation_eq: float | None = None


@dataclass
class General:
    """Measured terms of a step θₖ₊₁ = Sθₖ − ηa (S: each tensor's shrink, ``shrink`` the first's).

    ``xi_a`` = ⟨ξ(Sθₖ), ηa⟩, ``aJa`` = ⟨ηa, J ηa⟩, ``mixed`` = Q(Sθₖ) − s^κ Q(θₖ) (None: every
    tensor shrinks alike), ``dJd`` = ⟨δ, J δ⟩ of the whole displacement δ = θₖ₊₁ − θₖ, measured only
    where shrinks differ (None: computed from the others).
    """

    shrink: float
    xi_a: torch.Tensor
    aJa: torch.Tensor
    mixed: torch.Tensor | None = None
    dJd: torch.Tensor | None = None
    #: factors ``xi_a`` and ``aJa`` are still to be multiplied by (η s^(κ−1), η²: a family hands
    #: its raw sums, and its bank multiplies all of its families' at once)
    scale: tuple[float, float] = (1.0, 1.0)


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
    *ANATOMY,
    *ROTATION,
    *ROTATION_PARTS,
    "xi_b_decay",
    "xi_b_breaking",
    "xi_b_step",
    "xi_b_history",
)
#: The momentum share ⟨ξ, b⟩ split by where it came from, one per part of the anatomy.
_SPLIT = dict(zip(ANATOMY, ("xi_b_decay", "xi_b_breaking", "xi_b_step", "xi_b_history")))
#: The rows of the stack :meth:`Laws._sgd_step` advances at once: each law of Q and each part
#: of its anatomy, with the share of the buffer that feeds it in the same row of
#: :data:`_XI_ROWS`; the first three take the step's ½η²uᵀJu (and lose η uᵀJb from the share).
_ROWS = ("discrete", "discrete_residual", "dQ_step", "dQ_decay", "dQ_breaking", "dQ_history")
_XI_ROWS = ("xi_b", "xi_b_residual", *(_SPLIT[name] for name in _ROWS[2:]))


class Laws:
    """Every law's prediction of Q per group, advanced once per optimizer step."""

    def __init__(self, kappa: float, q0: torch.Tensor, turning: torch.Tensor | None = None) -> None:
        q0 = q0.detach().to(torch.float64)
        self.kappa = float(kappa)
        #: the groups whose rotation is reported (a ½|θ|² charge; None: every group): the
        #: angular update is computed there only (NaN elsewhere, as the records show it)
        self._turning: torch.Tensor | None = None
        if turning is not None and not bool(turning.all()):
            self._turning = turning.nonzero().reshape(-1).to(q0.device)
        self.q0 = q0.clone()
        self.discrete = q0.clone()
        self.discrete_residual = q0.clone()
        self.first_order = q0.clone()
        self.second_order = q0.clone()
        self.second_order_rate = torch.zeros_like(q0)
        #: ⟨ξ(θₖ), bₖ₋₁⟩ of the pure law and of the law fed rₖ (zero before any buffer)
        self.xi_b = torch.zeros_like(q0)
        self.xi_b_residual = torch.zeros_like(q0)
        for name in (*ANATOMY, *_SPLIT.values()):
            setattr(self, name, torch.zeros_like(q0))
        for name in (*ROTATION, *ROTATION_PARTS):
            setattr(self, name, torch.full_like(q0, float("nan")))
        self.t = 0.0
        self.steps = 0
        self._cache: dict[tuple[float, float, float], tuple] = {}
        #: the steady step's matrix per setting (:meth:`_sgd_linear`)
        self._linear: dict[tuple, torch.Tensor] = {}

    @property
    def gradient_flow(self) -> torch.Tensor:
        return self.q0

    def predictions(self) -> dict[str, torch.Tensor]:
        """Every prediction as it is now, keyed by law name: the live tensors (a step replaces
        them rather than writing into them; copy before the next step to keep them)."""
        names = (*PREDICTIONS, *ANATOMY, *ROTATION, *ROTATION_PARTS)
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict:
        """Everything the laws carry, to continue exactly in another process."""
        out: dict = {name: getattr(self, name).clone() for name in _STATE}
        out.update(kappa=self.kappa, t=self.t, steps=self.steps)
        return out

    def load_state_dict(self, state: dict) -> None:
        for name in _STATE:
            if name in state:  # a state saved before the rotation parts were kept lacks them
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
        for name in ANATOMY:
            setattr(self, name, torch.where(mask, 0.0, getattr(self, name)))
        return mask

    def step(self, data: StepData) -> None:
        """Advance every law by one optimizer step with these settings and data."""
        if self._steady_sgd(data):  # one product with the step's linear map (the usual step)
            q_before = self.discrete_residual
            dq, delta_sq = self._sgd_linear(data)
            self._rotation(data, q_before, dq, delta_sq)
            self.t += data.hyper.lr
            self.steps += 1
            return
        before = {name: getattr(self, name) for name in _STATE}
        start = self.steps == 0
        if data.restart is not None:
            start = self.restart(data.restart.to(torch.float64)) | start
        q_before = self.discrete_residual
        if data.general is None:
            dq, delta_sq = self._sgd_step(data, start)
        else:
            dq, delta_sq = self._general_step(data.general)
        self._rotation(data, q_before, dq, delta_sq)
        if not (isinstance(data.idle, bool) and not data.idle):  # skipped groups keep their state
            idle = torch.as_tensor(data.idle, device=self.discrete.device)
            for name, old in before.items():
                setattr(self, name, torch.where(idle, old, getattr(self, name)))
        self.t += data.hyper.lr
        self.steps += 1

    def _sgd_step(self, data: StepData, start: torch.Tensor | bool):
        """``torch.optim.SGD``'s exact law and both continuous models; returns the step's change
        of ``discrete_residual`` and ⟨δ, Jδ⟩ of the displacement δ = −ηu."""
        h = data.hyper
        lr, beta, tau = h.lr, h.momentum, h.dampening
        kl = self.kappa * h.weight_decay
        zero = torch.zeros_like(self.discrete)
        r = zero if data.residual is None else data.residual.to(torch.float64)
        gJg = zero if data.gJg is None else data.gJg.to(torch.float64)
        assert data.uJu is not None and data.uJb is not None
        uJu = data.uJu.to(torch.float64)
        uJb = data.uJb.to(torch.float64)
        # One (6, G) stack advances every linear share together (rows: :data:`_ROWS`): the
        # predictions Q, the buffer's shares ⟨ξ, b⟩ and the sources p that feed them.
        q_res = self.discrete_residual
        Q = torch.stack([getattr(self, name) for name in _ROWS])
        X = torch.stack([getattr(self, name) for name in _XI_ROWS])
        if data.xi_b is not None:  # a buffer the law has not followed: its measured share
            measured = data.xi_b.to(torch.float64)
            # what the buffer held when tracking began is history; the other parts start at 0
            fill = torch.stack([measured, measured, zero, zero, zero, measured])
            X = torch.where(torch.isnan(measured), X, fill)
        kq = kl * Q[:2]  # κλ Qₖ of the pure law and of the law fed rₖ
        k_res = kq[1]
        P = torch.stack([kq[0], r + k_res, zero, k_res, r, zero])
        if beta == 0.0:
            V, M = P, X  # the buffer stays; the law re-reads it when β returns
        else:
            fresh = self.steps == 0 if data.fresh is None else data.fresh
            M = _pick(fresh, P, lambda: beta * X + (1.0 - tau) * P)
            V = P + beta * M if h.nesterov else M
        half_lr2 = 0.5 * lr * lr
        if not (isinstance(start, bool) and not start):
            self.second_order_rate = _pick(start, -V[0], lambda: self.second_order_rate)
        Q = Q - lr * V
        Q[:3] += half_lr2 * uJu  # the step's own ½η²uᵀJu: both laws and dQ_step
        for name, row in zip(_ROWS, Q.unbind(0)):
            setattr(self, name, row)
        shares = zip(_XI_ROWS, M.unbind(0))
        if beta != 0.0:  # ⟨ξ(θₖ₊₁), bₖ⟩ = mₖ − ηₖ⟨uₖ, J bₖ⟩ (the step part included)
            M[:3] -= lr * uJb  # M is this step's own tensor (P's, or a new one)
        else:  # only the split is re-read; ⟨ξ, b⟩ itself waits for β to return
            shares = list(shares)[2:]
        for name, row in shares:
            setattr(self, name, row)
        # the equilibrium of the exact law under stationary forcing (heavy ball or plain SGD)
        if kl > 0.0 and lr > 0.0 and not h.nesterov:
            self.equilibrium = ((1.0 - beta) * 0.5 * lr * uJu + beta * lr * uJb) / (
                (1.0 - tau if beta > 0.0 else 1.0) * kl
            )
        else:
            self.equilibrium = torch.full_like(zero, float("nan"))
        # first-order modified flow, forcing held over the step (exact exponential update)
        decay = math.exp(-kl * lr)
        phi = -math.expm1(-kl * lr) / kl if kl > 0.0 else lr
        self.first_order = decay * self.first_order
        if data.gJg is not None:  # no forcing measured (momentum): zero, nothing to add
            self.first_order = self.first_order + 0.5 * lr * phi * gJg
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
        return self.discrete_residual - q_res, lr * lr * uJu

    def _steady_sgd(self, data: StepData) -> bool:
        """Whether the step is SGD's law with nothing but its data: not the first, no restart,
        no buffer share to re-read, no fresh or idle group. The law is then linear in the
        state and the data, and :meth:`_sgd_linear` applies it as one matrix."""
        return (
            data.general is None
            and self.steps > 0
            and data.restart is None
            and data.xi_b is None
            and data.fresh is not True
            and not isinstance(data.fresh, torch.Tensor)
            and data.idle is False
            and data.uJu is not None
            and data.uJb is not None
        )

    def _sgd_linear(self, data: StepData) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_sgd_step` of a steady step as one product: [state; r; uᵀJu; uᵀJb; gᵀJg]
        times the step's matrix, made once per setting by running :meth:`_sgd_step` itself on
        the unit vectors (the law is linear there), so both give the same law to round-off."""
        h = data.hyper
        key = (h.lr, h.momentum, h.dampening, self.kappa * h.weight_decay, h.nesterov)
        matrix = self._linear.get(key)
        if matrix is None:
            if len(self._linear) >= 64:  # bounded: a schedule gives a new lr every step
                self._linear.pop(next(iter(self._linear)))
            matrix = self._linear[key] = _step_matrix(self.kappa, h).to(self.q0.device)
        q_res = self.discrete_residual
        zero = None
        data_rows = []
        for value in (data.residual, data.uJu, data.uJb, data.gJg):
            if value is None:
                zero = torch.zeros_like(q_res) if zero is None else zero
                value = zero
            data_rows.append(value.to(torch.float64))
        stacked = torch.stack([getattr(self, name) for name in _LINEAR_IN] + data_rows)
        for name, row in zip(_LINEAR_OUT, (matrix @ stacked).unbind(0)):
            setattr(self, name, row)
        return self.discrete_residual - q_res, (h.lr * h.lr) * data_rows[1]

    def _general_step(self, g: General):
        """The exact law of θₖ₊₁ = Sθₖ − ηa from measured terms; the continuous models do not
        close here (NaN). Returns the change of ``discrete_residual`` and ⟨δ, Jδ⟩."""
        s, k = g.shrink, self.kappa
        sk = s**k
        X = (g.xi_a * g.scale[0] if g.scale[0] != 1.0 else g.xi_a).to(torch.float64)
        A = (g.aJa * g.scale[1] if g.scale[1] != 1.0 else g.aJa).to(torch.float64)
        mixed = None if g.mixed is None else g.mixed.to(torch.float64)  # None: zero
        q_res = self.discrete_residual
        half_a = 0.5 * A
        # both laws at once: sQ + mixed − X + ½A, in that order, for the pure law and the fed one
        both = sk * torch.stack([self.discrete, q_res])
        if mixed is not None:
            both = both + mixed
        self.discrete, self.discrete_residual = (both - X + half_a).unbind(0)
        self.dQ_decay = self.dQ_decay + (sk - 1.0) * q_res
        if mixed is not None:
            self.dQ_decay = self.dQ_decay + mixed
        self.dQ_breaking = self.dQ_breaking - X
        self.dQ_step = self.dQ_step + half_a
        nan = torch.full_like(X, float("nan"))
        self.first_order = self.second_order = self.second_order_rate = nan
        # the SGD buffer share is not followed in this mode: re-measured when SGD's law resumes
        self.equilibrium = (half_a - X) / (1.0 - sk) if sk < 1.0 else nan
        if g.dJd is not None:
            delta_sq = g.dJd.to(torch.float64)
        elif s != 0.0:  # δ = (s − 1)θ − ηa and ⟨ξ(θ), ηa⟩ = X / s for a ½|θ|² charge
            delta_sq = (s - 1.0) ** 2 * 2.0 * q_res - 2.0 * (s - 1.0) * X / s + A
        else:
            delta_sq = nan
        return self.discrete_residual - q_res, delta_sq

    def _rotation(self, data: StepData, q_before, dq, delta_sq) -> None:
        """The angle between θₖ and θₖ₊₁ of a group whose charge is Q = ½|θ|² (NaN elsewhere).

        With a = |θₖ|, b = |θₖ₊₁|, c = |θₖ₊₁ − θₖ|: 1 − cos∠ = (c² − (a − b)²)/(2ab) and
        a − b = −2ΔQ/(a + b), free of the cancellation in ⟨θₖ, θₖ₊₁⟩/(ab) for small angles.
        """
        q_after = self.discrete_residual
        self.rotation_dq, self.rotation_delta_sq = dq, delta_sq
        rows = self._turning
        if rows is None:
            self.angular_update = _angle(q_before, q_after, dq, delta_sq)
        elif rows.numel():  # only where it is reported (other charges may be < 0: NaN, slow)
            angle = _angle(q_before[rows], q_after[rows], dq[rows], delta_sq[rows])
            self.angular_update = torch.full_like(q_after, float("nan")).index_copy_(0, rows, angle)
        eq = float("nan") if data.rotation_eq is None else float(data.rotation_eq)
        self.angular_equilibrium = torch.full_like(q_after, eq)


#: The state :meth:`Laws._sgd_linear` reads and what it writes (its inputs and the equilibrium).
_LINEAR_IN = (*_ROWS, *_XI_ROWS, "first_order", "second_order", "second_order_rate")
_LINEAR_OUT = (*_LINEAR_IN, "equilibrium")
_DATA_ROWS = 4  # r, uᵀJu, uᵀJb, gᵀJg


def _step_matrix(kappa: float, hyper: Hyper) -> torch.Tensor:
    """The matrix of :meth:`Laws._sgd_step` for one steady step with these settings: its
    column j is the step of the unit state (or data) j, computed by the step itself on a probe
    whose groups are the unit vectors (float64, on the CPU)."""
    n = len(_LINEAR_IN) + _DATA_ROWS
    unit = torch.eye(n, dtype=torch.float64)
    probe = Laws(kappa, torch.zeros(n, dtype=torch.float64))
    for name, row in zip(_LINEAR_IN, unit):
        setattr(probe, name, row.clone())
    probe.steps = 1
    r, uJu, uJb, gJg = unit[len(_LINEAR_IN) :]
    probe._sgd_step(StepData(hyper, uJu, uJb, gJg, r, fresh=False), False)
    return torch.stack([getattr(probe, name) for name in _LINEAR_OUT])


def angle_from_parts(q_after, dq, delta_sq) -> torch.Tensor:
    """``angular_update`` from Qₖ₊₁ and the parts :data:`~symmech.laws.names.ROTATION_PARTS`
    (sums over entries: summed over ranks first when each holds part of a group)."""
    return _angle(q_after - dq, q_after, dq, delta_sq)


def _angle(q_before, q_after, dq, delta_sq) -> torch.Tensor:
    """The angle of :meth:`Laws._rotation` from Qₖ, Qₖ₊₁, their difference and ⟨δ, Jδ⟩."""
    a = torch.sqrt(2.0 * q_before)
    b = torch.sqrt(2.0 * q_after)
    diff = -2.0 * dq / (a + b)
    one_minus_cos = (delta_sq - diff * diff) / (2.0 * a * b)
    half = torch.clamp(one_minus_cos / 2.0, min=0.0, max=1.0)
    return 2.0 * torch.asin(torch.sqrt(half))


def _pick(mask: torch.Tensor | bool, yes: torch.Tensor, no: Callable[[], torch.Tensor]):
    """``torch.where(mask, yes, no())``, with ``no()`` alone (not even computed: ``yes``) where
    ``mask`` is a plain bool: the same values, fewer operations in the usual step."""
    if isinstance(mask, bool):
        return yes if mask else no()
    return torch.where(mask, yes, no())
