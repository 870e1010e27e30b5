"""Small float64 torch networks with known symmetries, trained by real ``torch.optim.SGD``.

Everything here is written the slow, obvious way with plain torch, independently of
``symmech``: per parameter group, Q, the J-quadratic forms and the residual <xi(theta), g> are
sums of elementwise products reduced onto the group axis. A group family is a list of pieces
(parameter, reduction onto groups, J weight w, shift c); on a piece xi = w * theta + c.

Families (kappa = <xi, theta> / Q):

* ``translation``: softmax classifier Linear(64, 10) + cross-entropy; groups are the input
  columns W[:, j] across classes (G = 64), and separately the bias vector (G = 1). J = 0, c = 1.
* ``scale``: Conv2d -> BatchNorm2d (tiny eps) -> ReLU -> MaxPool -> Linear; one group per conv
  output channel (weight slice and conv bias together). J = I, kappa = 2.
* ``rescale``: Linear -> ReLU -> Linear; one group per hidden unit, incoming row + bias (J = +1)
  vs outgoing column (J = -1). kappa = 2.
* ``quadratic``: Linear -> x**2 -> Linear; psi = (alpha theta1, alpha^-2 theta2), so
  xi = (theta1, -2 theta2), J = diag(I, -2 I), Q = |theta1|^2/2 - |theta2|^2, kappa = 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from symmech.reference.numeric_laws import SGDHyper

DTYPE = torch.float64
Reduce = Callable[[torch.Tensor], torch.Tensor]
TensorMap = dict[nn.Parameter, torch.Tensor]


def _rows(t: torch.Tensor) -> torch.Tensor:  # (G, ...) -> (G,)
    return t.reshape(t.shape[0], -1).sum(1)


def _cols(t: torch.Tensor) -> torch.Tensor:  # (out, G) -> (G,)
    return t.sum(0)


def _same(t: torch.Tensor) -> torch.Tensor:  # (G,) -> (G,)
    return t


def _total(t: torch.Tensor) -> torch.Tensor:  # anything -> (1,)
    return t.sum().reshape(1)


@dataclass
class Piece:
    """A parameter's share of a group family: xi = w * theta + c on it, reduced by ``reduce``."""

    param: nn.Parameter
    reduce: Reduce
    w: float
    c: float = 0.0


@dataclass
class Family:
    """One symmetry applied independently to G groups; all methods return shape (G,)."""

    name: str
    kappa: float
    pieces: list[Piece]

    def _sum(self, fn: Callable[[Piece], torch.Tensor]) -> np.ndarray:
        total = sum(p.reduce(fn(p)) for p in self.pieces)
        assert isinstance(total, torch.Tensor)
        return total.detach().numpy().astype(np.float64)

    def Q(self, th: TensorMap) -> np.ndarray:  # noqa: N802 - the paper's name
        return self._sum(lambda p: 0.5 * p.w * th[p.param] ** 2 + p.c * th[p.param])

    def Qabs(self, th: TensorMap) -> np.ndarray:  # noqa: N802
        """Round-off scale of Q: the same sum with absolute values of every term."""
        return self._sum(lambda p: 0.5 * abs(p.w) * th[p.param] ** 2 + abs(p.c) * th[p.param].abs())

    def quad(self, x: TensorMap, y: TensorMap) -> np.ndarray:
        """x^T J y per group."""
        return self._sum(lambda p: p.w * x[p.param] * y[p.param])

    def xi_dot(self, th: TensorMap, v: TensorMap) -> np.ndarray:
        """<xi(theta), v> per group."""
        return self._sum(lambda p: (p.w * th[p.param] + p.c) * v[p.param])


@dataclass
class Problem:
    name: str
    model: nn.Module
    families: list[Family]
    batches: list[tuple[torch.Tensor, torch.Tensor]]


def digits_batches(
    n_batches: int = 2, batch_size: int = 32, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few fixed batches of sklearn's digits (8x8, scaled to [0, 1]), float64."""
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).permutation(len(y))[: n_batches * batch_size]
    xs = torch.tensor(x[idx] / 16.0, dtype=DTYPE)
    ys = torch.tensor(y[idx], dtype=torch.long)
    return [
        (xs[i * batch_size : (i + 1) * batch_size], ys[i * batch_size : (i + 1) * batch_size])
        for i in range(n_batches)
    ]


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class _Image(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


NAMES = ("translation", "scale", "rescale", "quadratic")


def make_problem(
    name: str, seed: int = 0, bn_eps: float = 1e-14, hidden: int = 8, n_batches: int = 2
) -> Problem:
    """Build one of the four fixture networks (float64, seeded) with its group families."""
    torch.manual_seed(seed)
    batches = digits_batches(n_batches=n_batches, seed=seed)
    if name == "translation":
        lin = nn.Linear(64, 10)
        model: nn.Module = lin
        fams = [
            Family("columns", 1.0, [Piece(lin.weight, _cols, 0.0, 1.0)]),
            Family("bias", 1.0, [Piece(lin.bias, _total, 0.0, 1.0)]),
        ]
    elif name == "scale":
        conv, bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, eps=bn_eps)
        model = nn.Sequential(
            _Image(), conv, bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)
        )
        fams = [Family("conv", 2.0, [Piece(conv.weight, _rows, 1.0), Piece(conv.bias, _same, 1.0)])]
    elif name in ("rescale", "quadratic"):
        l1, l2 = nn.Linear(64, hidden), nn.Linear(hidden, 10)
        if name == "quadratic":
            with torch.no_grad():  # keep x**2 tame
                l1.weight.mul_(0.5)
                l1.bias.mul_(0.5)
        act: nn.Module = nn.ReLU() if name == "rescale" else _Square()
        model = nn.Sequential(l1, act, l2)
        w_out = -1.0 if name == "rescale" else -2.0
        fams = [
            Family(
                "hidden",
                2.0,
                [
                    Piece(l1.weight, _rows, 1.0),
                    Piece(l1.bias, _same, 1.0),
                    Piece(l2.weight, _cols, w_out),
                ],
            )
        ]
    else:
        raise ValueError(f"unknown fixture {name!r}; choose from {NAMES}")
    model.to(DTYPE)
    return Problem(name, model, fams, batches)


@dataclass
class Record:
    """Per-family recordings, arrays of shape (n_steps[+1], G)."""

    kappa: float
    Q: np.ndarray
    Qabs: np.ndarray
    data: dict[str, np.ndarray]


@dataclass
class Run:
    lr: np.ndarray
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    records: dict[str, Record] = field(default_factory=dict)

    def hyper(self) -> SGDHyper:
        return SGDHyper(
            lr=self.lr,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )


def make_scheduler(opt: torch.optim.Optimizer, kind: str | None) -> object | None:
    """None, 'step', 'exp' or 'lambda'."""
    if kind is None:
        return None
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    if kind == "exp":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.995)
    if kind == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.02 * k))
    raise ValueError(kind)


def run_sgd(
    problem: Problem,
    n_steps: int,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    scheduler: str | None = None,
) -> Run:
    """Train with real ``torch.optim.SGD``; before every ``step()`` record Q_k and the data terms.

    u_k and b_k are rebuilt from theta_k, g_k and torch's stored buffer b_{k-1}; after the step
    the rebuilt update and buffer are compared with what torch actually did (so a change in
    torch's SGD semantics fails here, not silently in a law). Runs on one torch thread: these
    nets are tiny, and a second thread only adds contention (20x slower on a busy 2-core box).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_sgd(
            problem, n_steps, lr, momentum, dampening, weight_decay, nesterov, scheduler
        )
    finally:
        torch.set_num_threads(threads)


def _run_sgd(
    problem: Problem,
    n_steps: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    scheduler: str | None,
) -> Run:
    model, fams = problem.model, problem.families
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    sched = make_scheduler(opt, scheduler)
    rows: dict[str, dict[str, list[np.ndarray]]] = {
        f.name: {k: [] for k in ("Q", "Qabs", "uJu", "uJb", "gJg", "r")} for f in fams
    }
    lrs = []
    for k in range(n_steps):
        x, y = problem.batches[k % len(problem.batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        eta = float(opt.param_groups[0]["lr"])
        lrs.append(eta)
        th = {p: p.detach().clone() for p in params}
        g = {p: p.grad.detach().clone() for p in params}
        u: TensorMap = {}
        b: TensorMap = {}
        for p in params:
            d = g[p] + weight_decay * th[p]
            if momentum == 0:
                u[p] = b[p] = d
                continue
            buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
            b[p] = d.clone() if buf is None else momentum * buf + (1.0 - dampening) * d
            u[p] = d + momentum * b[p] if nesterov else b[p]
        for f in fams:
            r = rows[f.name]
            r["Q"].append(f.Q(th))
            r["Qabs"].append(f.Qabs(th))
            r["uJu"].append(f.quad(u, u))
            r["uJb"].append(f.quad(u, b))
            r["gJg"].append(f.quad(g, g))
            r["r"].append(f.xi_dot(th, g))
        opt.step()
        for p in params:  # torch did what we think it did
            scale = 1.0 + float(th[p].abs().max())
            assert float((p.detach() - (th[p] - eta * u[p])).abs().max()) <= 1e-13 * scale
            if momentum != 0:
                buf = opt.state[p]["momentum_buffer"]
                bscale = 1.0 + float(b[p].abs().max())
                assert float((buf - b[p]).abs().max()) <= 1e-13 * bscale
        if sched is not None:
            sched.step()  # type: ignore[attr-defined]
    th = {p: p.detach().clone() for p in params}
    run = Run(np.array(lrs), momentum, dampening, weight_decay, nesterov)
    for f in fams:
        r = rows[f.name]
        r["Q"].append(f.Q(th))
        r["Qabs"].append(f.Qabs(th))
        run.records[f.name] = Record(
            f.kappa,
            np.array(r["Q"]),
            np.array(r["Qabs"]),
            {k: np.array(r[k]) for k in ("uJu", "uJb", "gJg", "r")},
        )
    return run


def rel_error(pred: np.ndarray, rec: Record) -> float:
    """max over groups of max_k |pred_k - Q_k| / max_k Qabs_k (Qabs = Q with |terms|).

    Normalising by the group's own round-off scale (not by |Q|, which may cross zero for
    rescale and translation) makes 1e-9 a statement about the law, not about cancellation.
    """
    num = np.abs(pred - rec.Q).max(axis=0)
    den = rec.Qabs.max(axis=0)
    return float((num / den).max())
