"""The exact law for any optimizer, and the anatomy of a charge's change, against real training.

Real ``torch.optim`` optimizers train a small float64 network; NumPy replicas written from the
optimizers' algorithms (``tests/support/numpy_optimizers.py``, fed only θₖ and gₖ) give the update
direction aₖ. Then, per symmetry group:

* the replica's θₖ₊₁ = sₖθₖ − ηₖaₖ is torch's θₖ₊₁ to round-off (the oracle is right);
* the exact one-step law chained over the run predicts the observed charge to ≤ 1e-9 relative;
* the anatomy (decay + breaking + step) adds up to Q − Q₀; for SGD the finer split of
  :func:`sgd_anatomy` does too, also when tracking starts on an optimizer with momentum buffers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support import numpy_optimizers as npo
from torch import nn

from symmech.reference.any_optimizer import (
    angular_equilibrium,
    angular_update,
    sgd_anatomy,
    step_law,
)

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5, dtype=DTYPE),
        nn.BatchNorm1d(5, dtype=DTYPE),
        nn.ReLU(),
        nn.Linear(5, 4, dtype=DTYPE),
    )


# Groups of the net as (J weight per tensor slice, c) on a flat parameter vector: for each family,
# a list of groups, each a list of (tensor index, index tuple, J weight, c).
def _groups(net: nn.Sequential) -> dict[str, list[list[tuple[int, tuple, float, float]]]]:
    w1, b1, w2, b2 = 0, 1, 4, 5  # parameter order: W1, b1, gamma, beta, W2, b2
    scale = [[(w1, (j,), 1.0, 0.0), (b1, (j,), 1.0, 0.0)] for j in range(5)]
    rescale = [[(2, (j,), 1.0, 0.0), (3, (j,), 1.0, 0.0), (w2, (slice(None), j), -1.0, 0.0)]
               for j in range(5)]  # fmt: skip
    translation = [[(w2, (slice(None), j), 0.0, 1.0)] for j in range(5)] + [[(b2, (), 0.0, 1.0)]]
    return {"scale": scale, "rescale": rescale, "translation": translation}


def _forms(group, theta: list[np.ndarray], a: list[np.ndarray]) -> dict[str, float]:
    QJ = Qc = Ja = ca = aJa = 0.0
    for i, idx, w, c in group:
        t, u = theta[i][idx], a[i][idx]
        QJ += 0.5 * w * float(np.sum(t * t))
        Qc += c * float(np.sum(t))
        Ja += w * float(np.sum(t * u))
        ca += c * float(np.sum(u))
        aJa += w * float(np.sum(u * u))
    return {"QJ": QJ, "Qc": Qc, "Ja": Ja, "ca": ca, "aJa": aJa}


def _charge(group, theta: list[np.ndarray]) -> float:
    f = _forms(group, theta, theta)
    return f["QJ"] + f["Qc"]


OPTIMIZERS: dict[str, tuple[Callable, Callable]] = {
    "sgd": (
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
        lambda: npo.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    ),
    "adam": (
        lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
        lambda: npo.Adam(lr=1e-2, weight_decay=1e-2),
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda: npo.Adam(lr=1e-2, weight_decay=0.1, decoupled=True),
    ),
    "adamw_amsgrad_maximize": (
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, amsgrad=True, maximize=True),
        lambda: npo.Adam(lr=1e-3, weight_decay=0.1, decoupled=True, amsgrad=True, maximize=True),
    ),
    "rmsprop_momentum_centered": (
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
        lambda: npo.RMSprop(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
    ),
    "adagrad": (
        lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=1e-3, weight_decay=1e-2),
        lambda: npo.Adagrad(lr=0.05, lr_decay=1e-3, weight_decay=1e-2),
    ),
}


def _train(name: str, n_steps: int, seed: int = 0):
    """Train with torch; per step, the replica's (s, η, a) from θₖ and gₖ, and θ after each step."""
    net = _net(seed)
    params = list(net.parameters())
    make_torch, make_np = OPTIMIZERS[name]
    opt, replicas = make_torch(params), [make_np() for _ in params]
    gen = torch.Generator().manual_seed(seed)
    X, y = (
        torch.randn(256, 6, generator=gen, dtype=DTYPE),
        torch.randint(0, 4, (256,), generator=gen),
    )
    thetas, steps, worst = [[p.detach().numpy().copy() for p in params]], [], 0.0
    for _ in range(n_steps):
        idx = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(X[idx]), y[idx]).backward()
        before = thetas[-1]
        rows = [r.step(t, p.grad.numpy().copy()) for r, t, p in zip(replicas, before, params)]
        opt.step()
        after = [p.detach().numpy().copy() for p in params]
        for (s, eta, a), t0, t1 in zip(rows, before, after):
            worst = max(worst, float(np.max(np.abs(s * t0 - eta * a - t1)) / np.max(np.abs(t1))))
        steps.append(rows)
        thetas.append(after)
    return thetas, steps, worst


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_exact_law_for_every_optimizer(name):
    n = 300
    thetas, steps, replica_err = _train(name, n)
    assert replica_err < 1e-12, f"{name}: NumPy replica differs from torch by {replica_err:.2e}"
    lr = np.array([row[0][1] for row in steps])
    shrink = np.array([row[0][0] for row in steps])  # one decay for every tensor in these nets
    for family, groups in _groups(None).items():
        for group in groups:
            forms = [_forms(group, thetas[k], [row[2] for row in steps[k]]) for k in range(n)]
            cols = {key: np.array([[f[key]] for f in forms]) for key in forms[0]}
            law = step_law(**cols, lr=lr, shrink=shrink)
            observed = np.array([_charge(group, thetas[k]) for k in range(n + 1)])
            predicted = observed[0] + np.concatenate(
                [[0.0], np.cumsum(law["decay"] + law["breaking"] + law["step"])]
            )
            scale = np.max(np.abs(observed)) + 1e-300
            err = np.max(np.abs(predicted - observed)) / scale
            assert err < 1e-9, f"{name}/{family}: exact law off by {err:.2e} relative"
            assert np.allclose(law["Q_next"][:, 0], observed[1:], rtol=0, atol=1e-12 * scale)


@settings(max_examples=8, deadline=None)
@given(
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    nesterov=st.booleans(),
    late=st.booleans(),
)
def test_sgd_anatomy_adds_up(momentum, dampening, weight_decay, nesterov, late):
    """decay + breaking + step (+ history when attached late) = ΔQ, per group and step."""
    nesterov = nesterov and momentum > 0
    dampening = 0.0 if nesterov else dampening
    net = _net(1)
    params = list(net.parameters())
    opt = torch.optim.SGD(
        params, lr=0.05, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(64, 6, generator=gen, dtype=DTYPE), torch.randint(0, 4, (64,), generator=gen)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        opt.step()

    for _ in range(5 if late else 0):
        step()
    group = _groups(net)["scale"][2]  # κ = 2; BatchNorm's eps makes r ≠ 0: breaking is not 0
    theta0 = [p.detach().numpy().copy() for p in params]
    bufs = [opt.state[p].get("momentum_buffer") for p in params]
    xi_b_prev = None
    if late and momentum > 0:
        b = [bb.numpy().copy() for bb in bufs]
        xi_b_prev = np.array([_forms(group, theta0, b)["Ja"]])
    n = 40
    Q, r, uJu, uJb, obs = [], [], [], [], [_charge(group, theta0)]
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        theta = [p.detach().numpy().copy() for p in params]
        g = [p.grad.numpy().copy() for p in params]
        opt.step()
        nxt = [p.detach().numpy().copy() for p in params]
        u = [(t0 - t1) / 0.05 for t0, t1 in zip(theta, nxt)]
        b = [opt.state[p]["momentum_buffer"].numpy().copy() if momentum > 0 else uu
             for p, uu in zip(params, u)]  # fmt: skip
        Q.append([_charge(group, theta)])
        r.append([_forms(group, theta, g)["Ja"]])
        uJu.append([_forms(group, u, u)["Ja"]])
        uJb.append([_forms(group, u, b)["Ja"]])
        obs.append(_charge(group, nxt))
    parts = sgd_anatomy(
        2.0, np.array(Q), np.array(r), np.array(uJu), np.array(uJb), np.full(n, 0.05),
        momentum, dampening, weight_decay, nesterov,
        first_step=not late, xi_b_prev=xi_b_prev,
    )  # fmt: skip
    total = sum(parts.values())[:, 0]
    dq = np.diff(np.array(obs))
    scale = np.max(np.abs(obs))
    assert np.max(np.abs(total - dq)) < 1e-10 * scale
    assert np.max(np.abs(parts["breaking"])) > 0  # eps breaks the scale symmetry, measurably
    if weight_decay == 0:
        assert np.all(parts["decay"] == 0)


def test_angular_update_and_equilibria():
    rng = np.random.default_rng(0)
    t0, t1 = rng.normal(size=10), rng.normal(size=10)
    want = np.arccos(t0 @ t1 / np.linalg.norm(t0) / np.linalg.norm(t1))
    got = angular_update(np.array(t0 @ t0), np.array(t1 @ t1), np.array(t0 @ t1))
    assert abs(float(got) - want) < 1e-14
    assert angular_equilibrium("sgd", 0.1, 5e-4, 0.9)[0] == pytest.approx(np.sqrt(1e-4 / 1.9))
    assert angular_equilibrium("adamw", 1e-3, 0.1)[0] == pytest.approx(np.sqrt(2e-4))
    value, why = angular_equilibrium("adagrad", 0.1, 1e-2)
    assert value is None and "decays" in why
    assert angular_equilibrium("sgd", 0.1, 0.0)[0] is None


def test_a_wrong_step_model_is_caught():
    """The check has teeth: AdamW's law without its decoupled shrink misses the charge."""
    n = 100
    thetas, steps, _ = _train("adamw", n)
    group = _groups(None)["scale"][0]
    forms = [_forms(group, thetas[k], [row[2] for row in steps[k]]) for k in range(n)]
    cols = {key: np.array([[f[key]] for f in forms]) for key in forms[0]}
    law = step_law(**cols, lr=np.array([row[0][1] for row in steps]))  # shrink forgotten
    observed = np.array([_charge(group, thetas[k]) for k in range(1, n + 1)])
    assert np.max(np.abs(law["Q_next"][:, 0] - observed)) / np.max(np.abs(observed)) > 1e-4
