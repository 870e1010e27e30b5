"""The exact law under Adam, AdamW, RMSprop, Adagrad and per-tensor settings; the anatomy of the
change; the rotation of scale groups.

Every expected value here comes from the parameters themselves: the charge Q, the decoupled
decay's share Q(Sθₖ) − Q(θₖ) and the finite-step share ½⟨δ, Jδ⟩ are computed by the hand-written
reference (``support.reference_sgd``) on snapshots of the real ``torch.optim`` run, and angles with
``arccos`` of the snapshots' inner products. Nothing is read back from the tracker to build them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.training import assert_same_training, make_net

import symmech

pytestmark = pytest.mark.usefixtures("single_thread")

DECAY_FREE = ("bias",)  # the usual set-up: no weight decay on biases


def _split(model: torch.nn.Module, **no_decay) -> list[dict]:
    plain = [p for n, p in model.named_parameters() if not n.endswith(DECAY_FREE)]
    biases = [p for n, p in model.named_parameters() if n.endswith(DECAY_FREE)]
    return [{"params": plain}, {"params": biases, "weight_decay": 0.0, **no_decay}]


OPTIMIZERS = {
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-3),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=5e-2),
    "AdamW+amsgrad": lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-2, weight_decay=5e-2, amsgrad=True
    ),
    "AdamW, no decay on biases": lambda m: torch.optim.AdamW(_split(m), lr=1e-2, weight_decay=5e-2),
    "RMSprop": lambda m: torch.optim.RMSprop(
        m.parameters(), lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3
    ),
    "Adagrad": lambda m: torch.optim.Adagrad(
        m.parameters(), lr=5e-2, weight_decay=1e-3, lr_decay=1e-3
    ),
    "SGD, per-tensor lr and decay": lambda m: torch.optim.SGD(
        _split(m, lr=0.02), lr=0.05, momentum=0.9, weight_decay=1e-2
    ),
    "SGD, maximize": lambda m: torch.optim.SGD(
        m.parameters(), lr=-0.0, momentum=0.9, weight_decay=1e-3, maximize=True
    ),
}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(netname: str, make, steps: int, tracked: bool = True):
    net = make_net(netname)
    opt = make(net.model)
    tracker = symmech.track(net.model, opt, net.bindings()) if tracked else None
    snaps = [_params(net.model)]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (-net.loss() if opt.param_groups[0].get("maximize") else net.loss()).backward()
        opt.step()
        snaps.append(_params(net.model))
    return net, opt, tracker, snaps


def _by_step(rows, layer):
    out: dict[int, dict[int, dict]] = {}
    for r in rows:
        if r["layer"] == layer:
            out.setdefault(r["step"], {})[r["group"]] = r
    return out


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("netname", ["translation", "scale", "rescale", "conv_flatten"])
def test_the_exact_law_holds_under_every_modelled_optimizer(netname, opt_name):
    make = OPTIMIZERS[opt_name]
    if opt_name == "SGD, maximize":  # gradient ascent on −L: the same descent, other signs

        def make(m):
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, maximize=True)

    steps = 150
    net, opt, tracker, snaps = _run(netname, make, steps)
    plain_net, plain_opt, _, _ = _run(netname, make, steps, tracked=False)
    assert_same_training(net.model, plain_net.model, opt, plain_opt)
    rows = tracker.records()
    for fam in net.families:
        ref = fam.reference()
        want = np.stack([ref.charge(s).numpy() for s in snaps])  # (steps + 1, G)
        scale = np.abs(want).max() + 1e-300
        got = _by_step(rows, fam.layer)
        assert sorted(got) == list(range(steps + 1))
        for k, groups in got.items():
            for j, r in groups.items():
                assert r["status"] == "tracked", r["status"]
                assert abs(r["discrete"] - want[k, j]) <= 1e-9 * scale, (fam.layer, k, j)
                parts = sum(r[p] for p in ("dQ_decay", "dQ_breaking", "dQ_step", "dQ_history"))
                assert abs(want[0, j] + parts - want[k, j]) <= 1e-9 * scale
                if not opt_name.startswith("SGD"):  # no continuous model under a preconditioner
                    assert r["continuous"] is None and r["first_order"] is None


def _anatomy_replay(fam, snaps, shrink_of) -> dict[str, np.ndarray]:
    """Per-step decay, breaking and finite-step parts of ΔQ under θₖ₊₁ = Sθₖ − ηa, from the
    parameter snapshots only: decay = Q(Sθₖ) − Q(θₖ), step = ½⟨δ, Jδ⟩ with δ = θₖ₊₁ − Sθₖ,
    breaking = the rest."""
    ref = fam.reference()
    decay, step, breaking = [], [], []
    for before, after in zip(snaps[:-1], snaps[1:]):
        shrunk = {n: t * shrink_of[n] for n, t in before.items()}
        delta = {n: after[n] - shrunk[n] for n in before}
        q0, qs, q1 = ref.charge(before), ref.charge(shrunk), ref.charge(after)
        s = 0.5 * ref.form(delta, delta)
        decay.append((qs - q0).numpy())
        step.append(s.numpy())
        breaking.append((q1 - qs - s).numpy())
    return {
        "dQ_decay": np.cumsum(decay, axis=0),
        "dQ_breaking": np.cumsum(breaking, axis=0),
        "dQ_step": np.cumsum(step, axis=0),
    }


@pytest.mark.parametrize("netname", ["scale", "rescale", "translation"])
def test_adamw_anatomy_equals_a_replay_from_the_parameters(netname):
    lr, wd = 1e-2, 5e-2
    net, opt, tracker, snaps = _run(
        netname, lambda m: torch.optim.AdamW(_split(m), lr=lr, weight_decay=wd), 80
    )
    shrink_of = {n: 1.0 if n.endswith(DECAY_FREE) else 1.0 - lr * wd for n in snaps[0]}
    rows = tracker.records()
    for fam in net.families:
        want = _anatomy_replay(fam, snaps, shrink_of)
        scale = max(np.abs(fam.reference().charge(s).numpy()).max() for s in snaps)
        got = _by_step(rows, fam.layer)
        for part, series in want.items():
            for k in range(1, len(snaps)):
                for j, r in got[k].items():
                    assert abs(r[part] - series[k - 1, j]) <= 1e-9 * scale, (part, k, j)
            if netname == "translation" and part == "dQ_step":  # J = 0: no finite-step term
                assert all(r[part] == 0.0 for r in got[len(snaps) - 1].values())
            elif part != "dQ_decay":  # the parts really move (the bias group has no decay)
                assert np.abs(series).max() > 1e-12 * scale


def test_sgd_anatomy_equals_momentum_filtered_sums_of_measured_terms():
    """SGD: decay = −Σ ηₖ filtered(κλQₖ), breaking = −Σ ηₖ filtered(rₖ), with Q and r from the
    parameters and gradients, filtered by torch's momentum recurrence; step is the rest."""
    lr, beta, wd = 0.05, 0.9, 1e-2
    net = make_net("scale")
    opt = torch.optim.SGD(net.model.parameters(), lr=lr, momentum=beta, weight_decay=wd)
    tracker = symmech.track(net.model, opt, net.bindings())
    (fam,) = net.families
    ref = fam.reference()
    dec = brk = 0.0
    m_dec = m_brk = None
    dec_sum, brk_sum = [], []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        theta = _params(net.model)
        grad = {n: p.grad.detach().clone() for n, p in net.model.named_parameters()}
        q = ref.charge(theta)
        r = ref.xi_dot(theta, grad)
        p_dec, p_brk = 2.0 * wd * q, r
        m_dec = p_dec if m_dec is None else beta * m_dec + p_dec
        m_brk = p_brk if m_brk is None else beta * m_brk + p_brk
        dec, brk = dec - lr * m_dec, brk - lr * m_brk
        dec_sum.append(dec.numpy())
        brk_sum.append(brk.numpy())
        opt.step()
    got = _by_step(tracker.records(), fam.layer)
    scale = float(ref.charge(_params(net.model)).abs().max())
    for k in range(1, 61):
        for j, row in got[k].items():
            assert abs(row["dQ_decay"] - dec_sum[k - 1][j]) <= 1e-10 * scale
            assert abs(row["dQ_breaking"] - brk_sum[k - 1][j]) <= 1e-10 * scale
    assert max(abs(row["dQ_step"]) for row in got[60].values()) > 0.0


@pytest.mark.parametrize("kind", ["SGD", "AdamW", "AdamW, no decay on biases"])
def test_angular_update_is_the_angle_between_successive_weights(kind):
    lr, wd, beta = 0.05, 5e-2, 0.9
    make = {
        "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=beta, weight_decay=wd),
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=lr / 10, weight_decay=wd),
        "AdamW, no decay on biases": lambda m: torch.optim.AdamW(
            _split(m), lr=lr / 10, weight_decay=wd
        ),
    }[kind]
    net, opt, tracker, snaps = _run("scale", make, 40)
    got = _by_step(tracker.records(), "conv")
    w, b = "0.weight", "0.bias"
    for k in range(1, len(snaps)):
        x = torch.cat([snaps[k - 1][w].flatten(1), snaps[k - 1][b][:, None]], dim=1)
        y = torch.cat([snaps[k][w].flatten(1), snaps[k][b][:, None]], dim=1)
        cos = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
        want = torch.arccos(cos.clamp(-1, 1))
        for j, row in got[k].items():
            assert math.isclose(row["angular_update"], float(want[j]), rel_tol=1e-7, abs_tol=1e-12)
    equilibrium = {
        "SGD": math.sqrt(2 * lr * wd / (1 + beta)),
        "AdamW": math.sqrt(2 * lr / 10 * wd),
        "AdamW, no decay on biases": math.sqrt(2 * lr / 10 * wd),
    }[kind]
    assert all(math.isclose(r["angular_equilibrium"], equilibrium) for r in got[1].values())
    assert all(r["angular_update"] is None for r in got[0].values())  # no previous step yet


def test_rotation_is_reported_for_scale_groups_only():
    net, opt, tracker, _ = _run(
        "rescale", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2), 5
    )
    rows = tracker.records()
    assert all(r["angular_update"] is None and r["angular_equilibrium"] is None for r in rows)
    assert any(r["dQ_decay"] not in (None, 0.0) for r in rows)


@settings(max_examples=15, deadline=None)
@given(
    lr=st.floats(1e-4, 3e-2),
    beta1=st.floats(0.0, 0.95),
    beta2=st.floats(0.9, 0.9999),
    eps=st.sampled_from([1e-8, 1e-3, 1.0]),
    wd=st.floats(0.0, 0.1),
    decoupled=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
)
def test_adam_settings_keep_the_law_exact(lr, beta1, beta2, eps, wd, decoupled, amsgrad, maximize):
    kw = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, amsgrad=amsgrad)
    net, opt, tracker, snaps = _run(
        "rescale",
        lambda m: torch.optim.Adam(
            m.parameters(), decoupled_weight_decay=decoupled, maximize=maximize, **kw
        ),
        40,
    )
    (fam,) = net.families
    want = np.stack([fam.reference().charge(s).numpy() for s in snaps])
    scale = np.abs(want).max()
    for k, groups in _by_step(tracker.records(), "hidden").items():
        for j, r in groups.items():
            assert abs(r["discrete"] - want[k, j]) <= 1e-9 * scale


def test_fused_adamw_under_a_grad_scaler_reads_the_unscaled_gradients():
    net = make_net("rescale")
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-2, weight_decay=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tracker = symmech.track(net.model, opt, net.bindings())
    (fam,) = net.families
    snaps = [_params(net.model)]
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        scaler.scale(net.loss()).backward()
        scaler.step(opt)
        scaler.update()
        snaps.append(_params(net.model))
    want = np.stack([fam.reference().charge(s).numpy() for s in snaps])
    got = _by_step(tracker.records(), "hidden")
    for k, groups in got.items():
        for j, r in groups.items():
            assert abs(r["discrete"] - want[k, j]) <= 1e-9 * np.abs(want).max()


class _SignDescent(torch.optim.Optimizer):
    """A user's own optimizer (Lion-like sign step with decoupled decay): nothing symmech models."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize("kind", ["NAdam", "user's own"])
def test_measured_updates_track_an_optimizer_symmech_does_not_model(kind):
    def make(m):
        if kind == "NAdam":
            return torch.optim.NAdam(m.parameters(), lr=1e-2, weight_decay=1e-3)
        return _SignDescent(m.parameters(), lr=1e-3, weight_decay=1e-2)

    def run(tracked: bool):
        net = make_net("rescale")
        opt = make(net.model)
        tracker = None
        if tracked:
            tracker = symmech.track(
                net.model, opt, net.bindings(), measure_updates=True, max_history=16
            )
        snaps = [_params(net.model)]
        for _ in range(40):
            opt.zero_grad(set_to_none=True)
            net.loss().backward()
            opt.step()
            snaps.append(_params(net.model))
        return net, opt, tracker, snaps

    net, opt, tracker, snaps = run(True)
    plain, plain_opt, _, _ = run(False)
    assert_same_training(net.model, plain.model, opt, plain_opt)
    (fam,) = net.families
    want = np.stack([fam.reference().charge(s).numpy() for s in snaps])
    rows = _by_step(tracker.records(), "hidden")
    assert len(rows) <= 17  # max_history thins the logged steps
    for k, groups in rows.items():
        for j, r in groups.items():
            assert r["status"] == "tracked"
            assert abs(r["discrete"] - want[k, j]) <= 1e-9 * np.abs(want).max()
    assert not tracker._copies  # the copy of θₖ lives only across one step
