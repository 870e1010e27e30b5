"""The direction of an optimizer step, computed before the step, against real torch training.

Real ``torch.optim`` optimizers train small float64 networks of random shapes; before every step
(the first one included) ``direction`` gives (sₖ, ηₖ, aₖ). Then:

* sₖθₖ − ηₖaₖ is torch's θₖ₊₁ after ``opt.step()`` to ≤ 1e-14 relative, for the for-loop, foreach
  and fused implementations and every modelled setting (capturable Adam too, run on the CPU);
* the optimizer's state, the parameters and the gradients are bit-identical before and after the
  call, and a run that calls ``direction`` ends bit-identical to one that does not;
* (sₖ, ηₖ, aₖ) agree with NumPy replicas rebuilt from θₖ and gₖ alone
  (``tests/support/numpy_optimizers.py``);
* chained through the exact one-step law, aₖ predicts the scale charge of every unit of a
  Linear → BatchNorm1d layer under AdamW over 1,000 steps to ≤ 1e-9; a direction without Adam's
  bias correction or AdamW's shrink misses it;
* ``MeasuredDirection`` recovers a Lion-style optimizer's direction from the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from support import numpy_optimizers as npo
from torch import nn

from symmech.reference.any_optimizer import step_law
from symmech.runtime.directions import (
    Direction,
    MeasuredDirection,
    UnsupportedOptimizerError,
    direction,
    directions,
)

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")

# --------------------------------------------------------------------------- optimizer settings


def _sgd(draw: Callable) -> tuple[str, dict[str, Any], dict[str, Any]]:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    kw = {
        "lr": draw(st.sampled_from([0.01, 0.1])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
        "nesterov": nesterov,
        "maximize": draw(st.booleans()),
    }
    return "SGD", kw, dict(kw)


def _adam(draw: Callable) -> tuple[str, dict[str, Any], dict[str, Any]]:
    name = draw(st.sampled_from(["Adam", "AdamW"]))
    kw = {
        "lr": draw(st.sampled_from([1e-3, 1e-2])),
        "betas": draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9)])),
        "eps": draw(st.sampled_from([1e-8, 1e-3])),
        "weight_decay": draw(st.sampled_from([0.0, 0.1])),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }
    return name, kw, {**kw, "decoupled": name == "AdamW"}


def _rmsprop(draw: Callable) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kw = {
        "lr": draw(st.sampled_from([1e-3, 1e-2])),
        "alpha": draw(st.sampled_from([0.9, 0.99])),
        "eps": draw(st.sampled_from([1e-8, 1e-3])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
        "momentum": draw(st.sampled_from([0.0, 0.9])),
        "centered": draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }
    return "RMSprop", kw, dict(kw)


def _adagrad(draw: Callable) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kw = {
        "lr": draw(st.sampled_from([0.01, 0.1])),
        "lr_decay": draw(st.sampled_from([0.0, 1e-2])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
        "eps": draw(st.sampled_from([1e-10, 1e-3])),
        "initial_accumulator_value": draw(st.sampled_from([0.0, 0.5])),
        "maximize": draw(st.booleans()),
    }
    return "Adagrad", kw, dict(kw)


REPLICAS = {"SGD": npo.SGD, "Adam": npo.Adam, "AdamW": npo.Adam, "RMSprop": npo.RMSprop}
REPLICAS["Adagrad"] = npo.Adagrad
FUSED = {"SGD", "Adam", "AdamW", "Adagrad"}  # fused kernels torch has on the CPU


@st.composite
def settings_(draw: Callable) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(optimizer name, torch keyword arguments incl. the implementation, replica arguments)."""
    name, kw, replica = draw(st.sampled_from([_sgd, _adam, _rmsprop, _adagrad]))(draw)
    impl = draw(
        st.sampled_from(["for", "foreach", "fused"] if name in FUSED else ["for", "foreach"])
    )
    kw["foreach"] = impl == "foreach"
    if impl == "fused":
        kw["fused"] = True
    return name, kw, replica


# --------------------------------------------------------------------------- training helpers


def _net(d_in: int, hidden: int, d_out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden, dtype=DTYPE),
        nn.BatchNorm1d(hidden, dtype=DTYPE),
        nn.ReLU(),
        nn.Linear(hidden, d_out, dtype=DTYPE),
    )


def _batches(d_in: int, d_out: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(128, d_in, generator=gen, dtype=DTYPE)
    y = torch.randint(0, d_out, (128,), generator=gen)
    while True:
        idx = torch.randint(0, 128, (32,), generator=gen)
        yield X[idx], y[idx]


def _snapshot(opt: torch.optim.Optimizer) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for group in opt.param_groups:
        out += [(k, v) for k, v in group.items() if k != "params"]
        for p in group["params"]:
            out += [("param", p.detach().clone())]
            out += [("grad", None if p.grad is None else p.grad.clone())]
            for k, v in sorted(opt.state.get(p, {}).items()):
                out.append((k, v.clone() if isinstance(v, torch.Tensor) else v))
    return out


def _identical(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> bool:
    if [k for k, _ in a] != [k for k, _ in b]:
        return False
    for (_, x), (_, y) in zip(a, b):
        if isinstance(x, torch.Tensor):
            same = isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.device == y.device
            if not (same and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


def _run(name: str, kw: dict[str, Any], replica_kw: dict[str, Any], shape, n_steps: int, seed: int):
    """Train; per step the worst step error, the worst replica error and whether state stayed."""
    d_in, hidden, d_out = shape
    net = _net(d_in, hidden, d_out, seed)
    params = list(net.parameters())
    opt = getattr(torch.optim, name)(params, **kw)
    replicas = [REPLICAS[name](**replica_kw) for _ in params]
    batches = _batches(d_in, d_out, seed)
    step_err = replica_err = 0.0
    untouched = True
    for _ in range(n_steps):
        X, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        before = _snapshot(opt)
        dirs = directions(opt)
        untouched &= _identical(before, _snapshot(opt))
        theta = [p.detach().clone() for p in params]
        rows = [
            r.step(t.numpy().copy(), p.grad.numpy().copy())
            for r, t, p in zip(replicas, theta, params)
        ]
        opt.step()
        for p, t, (s, eta, a) in zip(params, theta, rows):
            d = dirs[p]
            assert d.a.dtype == p.dtype and d.a.shape == p.shape and d.a.device == p.device
            step_err = max(step_err, _rel(d.shrink * t - d.eta * d.a, p.detach()))
            replica_err = max(replica_err, abs(d.shrink - s), abs(d.eta - eta) / eta)
            replica_err = max(replica_err, _rel(d.a, torch.from_numpy(a)))
    return net, step_err, replica_err, untouched


# --------------------------------------------------------------------------- the tests


@settings(max_examples=40, deadline=None)
@given(
    setting=settings_(),
    shape=st.tuples(st.integers(2, 7), st.integers(2, 6), st.integers(2, 5)),
    seed=st.integers(0, 1000),
)
def test_direction_is_the_step_torch_takes(setting, shape, seed):
    name, kw, replica_kw = setting
    _, step_err, replica_err, untouched = _run(name, kw, replica_kw, shape, 6, seed)
    assert step_err <= 1e-14, f"{name} {kw}: s·θ − η·a differs from torch by {step_err:.2e}"
    assert untouched, f"{name} {kw}: direction() changed the optimizer's state"
    assert replica_err <= 1e-12, f"{name} {kw}: differs from the NumPy replica by {replica_err:.2e}"


@pytest.mark.parametrize(
    "name, kw",
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": True}),
        ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True, "weight_decay": 0.1}),
        ("RMSprop", {"lr": 1e-3, "momentum": 0.9, "centered": True}),
        ("Adagrad", {"lr": 0.1, "lr_decay": 1e-2, "initial_accumulator_value": 0.1}),
    ],
)
def test_calling_direction_does_not_change_training(name, kw):
    """Bit-identical end of two runs, one calling direction() before every step."""
    finals = []
    for call in (False, True):
        net = _net(5, 4, 3, 0)
        opt = getattr(torch.optim, name)(net.parameters(), **kw)
        batches = _batches(5, 3, 0)
        for _ in range(20):
            X, y = next(batches)
            opt.zero_grad()
            F.cross_entropy(net(X), y).backward()
            if call:
                directions(opt)
            opt.step()
        finals.append(_snapshot(opt))
    assert _identical(finals[0], finals[1])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_capturable_adam(monkeypatch, foreach, default_dtype, name):
    """Capturable Adam computes its bias corrections as tensors in the step counter's dtype
    (float32 unless the default dtype is float64); allowed on the CPU here to run that path."""
    import torch.optim.adam as adam_module

    monkeypatch.setattr(adam_module, "_get_capturable_supported_devices", lambda **_: ["cpu"])
    monkeypatch.setattr(torch, "get_default_dtype", lambda: default_dtype)
    kw = {"lr": 3e-2, "weight_decay": 0.1, "amsgrad": True, "capturable": True, "foreach": foreach}
    net = _net(4, 3, 2, 1)
    opt = getattr(torch.optim, name)(net.parameters(), **kw)
    batches = _batches(4, 2, 1)
    worst = 0.0
    for _ in range(8):
        X, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        before = _snapshot(opt)
        dirs = directions(opt)
        assert _identical(before, _snapshot(opt))
        theta = {p: p.detach().clone() for p in net.parameters()}
        opt.step()
        for p, d in dirs.items():
            worst = max(worst, _rel(d.shrink * theta[p] - d.eta * d.a, p.detach()))
    assert opt.state[next(net.parameters())]["step"].dtype == default_dtype
    assert worst <= 1e-14, f"capturable {name}: off by {worst:.2e}"


def _scale_charges(net: nn.Sequential, dirs: dict[torch.Tensor, Direction] | None = None):
    """Per unit j of the first layer (W1 row j, b1 j): Q_J, ⟨θ, a⟩ and aᵀa (J = I, c = 0)."""
    W, b = net[0].weight.detach(), net[0].bias.detach()
    QJ = 0.5 * (W.pow(2).sum(1) + b.pow(2))
    if dirs is None:
        return QJ
    aW, ab = dirs[net[0].weight].a, dirs[net[0].bias].a
    return QJ, (W * aW).sum(1) + b * ab, aW.pow(2).sum(1) + ab.pow(2)


def _adamw_law(n: int, wrong: Callable[[Direction, int], Direction] | None = None) -> float:
    """Worst relative error of the chained exact law for the charges of a BN-preceded layer."""
    net = _net(6, 5, 4, 0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    batches = _batches(6, 4, 0)
    rows, observed = {k: [] for k in ("QJ", "Ja", "aJa", "lr", "shrink")}, [_scale_charges(net)]
    for k in range(n):
        X, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        dirs = directions(opt)
        if wrong is not None:
            dirs = {p: wrong(d, k + 1) for p, d in dirs.items()}
        QJ, Ja, aJa = _scale_charges(net, dirs)
        d = dirs[net[0].weight]
        assert dirs[net[0].bias].eta == d.eta and dirs[net[0].bias].shrink == d.shrink
        for key, value in zip(rows, (QJ, Ja, aJa, d.eta, d.shrink)):
            rows[key].append(value.numpy() if isinstance(value, torch.Tensor) else value)
        opt.step()
        observed.append(_scale_charges(net))
    cols = {k: np.array(rows[k]) for k in ("QJ", "Ja", "aJa")}
    zero = np.zeros_like(cols["QJ"])
    law = step_law(
        **cols, Qc=zero, ca=zero, lr=np.array(rows["lr"]), shrink=np.array(rows["shrink"])
    )
    obs = np.array([q.numpy() for q in observed])
    change = law["decay"] + law["breaking"] + law["step"]
    predicted = obs[0] + np.concatenate([np.zeros((1, obs.shape[1])), np.cumsum(change, axis=0)])
    return float(np.max(np.abs(predicted - obs)) / np.max(np.abs(obs)))


def test_exact_law_for_adamw_over_1000_steps():
    err = _adamw_law(1000)
    assert err <= 1e-9, f"chained law vs observed scale charges: {err:.2e} relative"


@pytest.mark.parametrize(
    "mistake, wrong",
    [
        ("no bias correction", lambda d, k: Direction(d.shrink, d.eta * (1 - 0.9**k), d.a)),
        ("no decoupled shrink", lambda d, k: Direction(1.0, d.eta, d.a)),
    ],
)
def test_a_wrong_direction_is_caught(mistake, wrong):
    assert _adamw_law(100, wrong) > 1e-4, f"{mistake} went unnoticed"


def test_measured_direction_of_an_unmodelled_optimizer():
    """A Lion-style optimizer (sign of an EMA, decoupled decay): measured a is sign(c) + λθ."""

    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3, beta=0.9, weight_decay=0.1):
            super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    m = self.state[p].setdefault("m", torch.zeros_like(p))
                    c = m.mul(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(
                        c.sign(), alpha=-group["lr"]
                    )
                    m.copy_(c)

    net = _net(4, 3, 2, 2)
    opt = Lion(net.parameters(), lr=1e-2)
    with pytest.raises(
        UnsupportedOptimizerError, match=r"direction\(Lion.*is not modelled.*MeasuredDirection"
    ):
        directions(opt)
    tracked = [net[0].weight, net[0].bias]
    measured = MeasuredDirection(opt, tracked)
    batches = _batches(4, 2, 2)
    for _ in range(5):
        X, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        theta = {p: p.detach().clone() for p in tracked}
        want = {
            p: (0.9 * opt.state[p].get("m", torch.zeros_like(p)) + 0.1 * p.grad).sign()
            + 0.1 * theta[p]
            for p in tracked
        }
        measured.before()
        opt.step()
        got = measured.after()
        assert set(got) == set(tracked)
        for p in tracked:
            assert got[p].shrink == 1.0 and got[p].eta == 1e-2
            assert _rel(theta[p] - got[p].eta * got[p].a, p.detach()) <= 1e-15
            assert _rel(got[p].a, want[p]) <= 1e-12


def test_parameter_without_gradient_does_not_move():
    net = _net(3, 2, 2, 0)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    F.cross_entropy(
        net[0](torch.randn(4, 3, dtype=DTYPE)), torch.zeros(4, dtype=torch.long)
    ).backward()
    last = net[3].weight
    assert last.grad is None
    before = last.detach().clone()
    d = direction(opt, 0, last)
    opt.step()
    assert torch.equal(d.shrink * before - d.eta * d.a, last.detach())
    assert torch.equal(last.detach(), before)


def _with_grad(opt_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
    w = nn.Parameter(torch.ones(3, dtype=DTYPE))
    opt = opt_factory([w])
    w.grad = torch.ones(3, dtype=DTYPE)
    return opt, w


@pytest.mark.parametrize(
    "factory, match",
    [
        (
            lambda p: torch.optim.NAdam(p),
            r"direction\(NAdam, group=0, param\): torch\.optim\.nadam\.NAdam is not modelled",
        ),
        (lambda p: type("MySGD", (torch.optim.SGD,), {})(p, lr=0.1), r"MySGD is not modelled"),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, differentiable=True),
            r"differentiable=True is not modelled",
        ),
        (
            lambda p: torch.optim.Adam(p, lr=torch.tensor(0.1)),
            r"lr as a tensor is not modelled, got tensor\(0\.1",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=torch.tensor(0.1)),
            r"weight_decay as a tensor",
        ),
    ],
)
def test_unsupported_settings_are_refused(factory, match):
    opt, w = _with_grad(factory)
    with pytest.raises(UnsupportedOptimizerError, match=match):
        direction(opt, 0, w)


def test_bad_calls_are_refused():
    opt, w = _with_grad(lambda p: torch.optim.Adam(p, lr=0.1))
    other = nn.Parameter(torch.ones(2, dtype=DTYPE))
    other.grad = torch.ones(2, dtype=DTYPE)
    with pytest.raises(
        ValueError,
        match=r"direction\(Adam, group=0, param\): parameter of shape \(2,\) is not in group",
    ):
        direction(opt, 0, other)
    with pytest.raises(IndexError, match=r"group 3 out of range: 1 groups"):
        direction(opt, 3, w)
    with pytest.raises(ValueError, match=r"not one of optimizer\.param_groups"):
        direction(opt, {"params": [w]}, w)
    # amsgrad switched on after the first step: torch itself would fail, so does direction
    opt.step()
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(UnsupportedOptimizerError, match=r"no 'max_exp_avg_sq'"):
        direction(opt, opt.param_groups[0], w)
    measured = MeasuredDirection(opt)
    with pytest.raises(
        RuntimeError, match=r"MeasuredDirection\.after\(\): before\(\) was not called"
    ):
        measured.after()
    with pytest.raises(ValueError, match=r"1 of the params are not in the optimizer"):
        MeasuredDirection(opt, [w, other])
    opt.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match=r"MeasuredDirection\.before\(\): group 0 has lr = 0"):
        measured.before()


# --------------------------------------------------------------------------- pending Adam steps


def test_a_pending_adam_step_is_made_once_before_the_step_and_refused_after_it(
    monkeypatch,
) -> None:
    """``defer=True`` leaves Adam's aₖ of a large contiguous tensor pending: read before the
    step it is the direction ``direction`` makes (bit for bit) and the step torch takes; read
    after ``opt.step()`` changed the moments in place it is refused with a clear error. The
    public ``direction`` always returns a made step."""
    from symmech.runtime import directions as directions_module
    from symmech.runtime import fused, native

    assert native.build(), native.failure()
    monkeypatch.setattr(fused, "MODE", "native")
    monkeypatch.setattr(directions_module, "SMALL", 8)
    monkeypatch.setattr(directions_module, "SMALL_PENDING", 8)
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5, generator=gen, dtype=DTYPE))
    opt = torch.optim.AdamW([w], lr=0.01, weight_decay=0.1, amsgrad=True)
    for k in range(3):
        w.grad = torch.randn(6, 5, generator=gen, dtype=DTYPE)
        pending = direction(opt, 0, w, defer=True)
        made = direction(opt, 0, w)
        assert made.made and not pending.made and pending.pending is not None
        assert "pending" in repr(pending)
        assert torch.equal(pending.a, made.a) and pending.made  # made on first read
        late = direction(opt, 0, w, defer=True)
        before = w.detach().clone()
        opt.step()
        want = pending.shrink * before - pending.eta * pending.a
        assert torch.allclose(w.detach(), want, rtol=1e-14, atol=0)
        if k == 0:  # no moments before the first step: its zeros are not the state's
            continue
        with pytest.raises(RuntimeError, match=r"Direction\.a: .*changed in place"):
            _ = late.a
    with pytest.raises(TypeError):
        Direction(1.0, 0.1)
