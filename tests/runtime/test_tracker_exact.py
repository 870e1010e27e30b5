"""The tracker is exact, or says it is not, in everyday training situations.

Every test trains a real float64 network, measures the charge Q by hand (``support.reference_sgd``)
after every step and compares the tracker's ``discrete`` law with it; a twin network trained
without the tracker checks that training stays bit-identical.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from support.training import (
    DTYPE,
    Net,
    assert_same_training,
    hand_charges,
    law_error,
    make_net,
)

import symmech
from symmech.reference.any_optimizer import sgd_anatomy

pytestmark = pytest.mark.usefixtures("single_thread")

EXACT = 1e-10


def _twins(name: str, **opt_kw) -> tuple[list[Net], list[torch.optim.SGD]]:
    nets = [make_net(name), make_net(name)]
    opts = [torch.optim.SGD(n.model.parameters(), **{"lr": n.lr, **opt_kw}) for n in nets]
    return nets, opts


def _step(net: Net, opt, sched=None) -> None:
    opt.zero_grad(set_to_none=True)
    net.loss().backward()
    opt.step()
    if sched is not None:
        sched.step()


def _statuses(tracker) -> set[str]:
    return {f.status for f in tracker.families}


SETTINGS = [
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 1e-3},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
]


# ---------------------------------------------------------------------------------------------
# 1. Attaching to an optimizer that already has momentum buffers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["translation", "rescale"])
@pytest.mark.parametrize("kw", SETTINGS)
def test_attach_on_existing_momentum_buffers_is_exact_from_the_first_step(name, kw):
    (net, twin), (opt, opt_t) = _twins(name, **kw)
    for _ in range(5):
        _step(net, opt), _step(twin, opt_t)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    for _ in range(10):
        _step(net, opt), _step(twin, opt_t)
        charges.append(hand_charges(net))
    assert law_error(tracker.records(), charges) < EXACT
    assert _statuses(tracker) == {"tracked"}
    assert_same_training(net.model, twin.model, opt, opt_t)


def test_detach_then_track_again_starts_from_the_buffer():
    (net,), (opt,) = ([make_net("rescale")], [None])
    opt = torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9)
    first = symmech.track(net.model, opt, net.bindings())
    for _ in range(4):
        _step(net, opt)
    first.detach()
    for _ in range(3):
        _step(net, opt)
    second = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    for _ in range(6):
        _step(net, opt)
        charges.append(hand_charges(net))
    assert law_error(second.records(), charges) < EXACT


def test_attach_on_buffers_agrees_with_the_numpy_anatomy():
    """ΔQ split by sgd_anatomy(first_step=False, xi_b_prev=⟨ξ(θ₀), b₋₁⟩) sums to the law."""
    net = make_net("rescale")
    beta, lr = 0.9, 0.05
    opt = torch.optim.SGD(net.model.parameters(), lr=lr, momentum=beta)
    for _ in range(5):
        _step(net, opt)
    fam = net.families[0]
    ref = fam.reference()
    th = {n: p.detach().clone() for n, p in net.params().items()}
    buf = {n: opt.state[p]["momentum_buffer"].clone() for n, p in net.params().items()}
    xi_b_prev = ref.xi_dot(th, buf).numpy()
    tracker = symmech.track(net.model, opt, net.bindings()[:1])
    q, r, uju, ujb = [], [], [], []
    for _ in range(8):
        opt.zero_grad()
        net.loss().backward()
        th = {n: p.detach().clone() for n, p in net.params().items()}
        gr = {n: p.grad.detach().clone() for n, p in net.params().items()}
        q.append(ref.charge(th).numpy())
        r.append(ref.xi_dot(th, gr).numpy())
        opt.step()
        b = {n: opt.state[p]["momentum_buffer"] for n, p in net.params().items()}
        uju.append(ref.form(b, b).numpy())
        ujb.append(uju[-1])
    parts = sgd_anatomy(
        2.0,
        np.array(q),
        np.array(r),
        np.array(uju),
        np.array(ujb),
        np.full(8, lr),
        momentum=beta,
        first_step=False,
        xi_b_prev=xi_b_prev,
    )
    want = q[0] + np.cumsum(sum(parts.values()), axis=0)
    rows = [r for r in tracker.records() if r["step"] >= 1]
    got = np.array([[r["discrete_residual"] for r in rows if r["step"] == k] for k in range(1, 9)])
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < EXACT


# ---------------------------------------------------------------------------------------------
# 2. Learning rate zero at some steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["warmup", "cosine"])
def test_lr_zero_is_a_step_that_changes_nothing(kind):
    (net, twin), (opt, opt_t) = _twins("rescale", momentum=0.9, weight_decay=1e-3)

    def schedule(o):
        if kind == "warmup":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda k: min(1.0, k / 5))
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=0.0)

    sched, sched_t = schedule(opt), schedule(opt_t)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        _step(net, opt, sched), _step(twin, opt_t, sched_t)
        charges.append(hand_charges(net))
    assert 0.0 in lrs
    assert _statuses(tracker) == {"tracked"}
    rows = tracker.records()
    assert law_error(rows, charges) < EXACT
    assert all(r["second_order"] is not None and np.isfinite(r["second_order"]) for r in rows)
    assert_same_training(net.model, twin.model, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# 3. fused / foreach SGD under a GradScaler: unscaled gradients, skipped steps are not steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_grad_scaler_reads_unscaled_gradients_and_skips_inf_steps(impl):
    kw = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, impl: True}
    (net, twin), (opt, opt_t) = _twins("rescale", **kw)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    overflow = {2, 3, 7}  # inf gradients: the scaler skips these steps and backs off
    for k in range(14):
        for n, o, sc in ((net, opt, scalers[0]), (twin, opt_t, scalers[1])):
            o.zero_grad()
            loss = n.loss() * (float("inf") if k in overflow else 1.0)
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
        if k not in overflow:
            charges.append(hand_charges(net))
    skipped = len(overflow)
    assert scalers[0].get_scale() < 1024.0
    assert tracker.step == 14 - skipped
    assert _statuses(tracker) == {"tracked"}
    assert law_error(tracker.records(), charges) < EXACT
    assert_same_training(net.model, twin.model, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# 5. optimizer.step(closure): measured right after the closure computed the gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positional", [True, False])
def test_step_with_closure_measures_the_new_gradients(positional):
    (net, twin), (opt, opt_t) = _twins("rescale", momentum=0.9)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    for _ in range(8):
        for n, o in ((net, opt), (twin, opt_t)):

            def closure(n=n, o=o):
                o.zero_grad()
                loss = n.loss()
                loss.backward()
                return loss

            # the first step has no gradients before the closure runs; later ones stale ones
            out = o.step(closure) if positional else o.step(closure=closure)
            assert torch.is_tensor(out)
        charges.append(hand_charges(net))
    assert _statuses(tracker) == {"tracked"}
    rows = tracker.records()
    assert law_error(rows, charges) < EXACT
    assert law_error(rows, charges, "discrete_residual") < EXACT
    assert_same_training(net.model, twin.model, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# 4. Frozen parameters, layers without gradients at some steps
# ---------------------------------------------------------------------------------------------


def _output_layer_charges(model) -> dict[str, np.ndarray]:
    """Translation charges of the last Linear by hand: column sums of W and the bias sum."""
    w, b = model[-1].weight.detach(), model[-1].bias.detach()
    return {"columns": w.sum(0).numpy(), "bias": b.sum().reshape(1).numpy()}


def _output_layer_error(rows, charges) -> float:
    worst, seen = 0.0, 0
    for r in rows:
        if r["symmetry"] != "translation" or r["discrete"] is None:
            continue
        key = "columns" if "columns" in r["layer"] else "bias"
        want = charges[r["step"]][key][r["group"]]
        worst = max(worst, abs(r["discrete"] - want) / max(1.0, abs(want)))
        seen += 1
    assert seen > 0
    return worst


@pytest.mark.parametrize("on_first_step", [False, True])
def test_frozen_parameters_drop_only_their_families(on_first_step):
    nets = [make_net("rescale"), make_net("rescale")]
    opts = []
    for n in nets:
        for p in n.model[0].parameters():
            p.requires_grad_(False)
        trainable = [p for p in n.model.parameters() if p.requires_grad]
        opts.append(torch.optim.SGD(trainable, lr=0.1, momentum=0.9))
    (net, twin), (opt, opt_t) = nets, opts
    x = net.model[0].weight.new_tensor(np.random.default_rng(0).normal(size=(8, 64)))
    y = torch.randint(0, 10, (8,))
    with pytest.warns(symmech.TrackerWarning, match=r"not in the optimizer \(frozen\)"):
        if on_first_step:
            tracker = symmech.track(net.model, opt)
            charges = [_output_layer_charges(net.model)]
            _step(net, opt), _step(twin, opt_t)
            charges.append(_output_layer_charges(net.model))
        else:
            tracker = symmech.track(net.model, opt, example_input=(x, y))
            charges = [_output_layer_charges(net.model)]
    for _ in range(6):
        _step(net, opt), _step(twin, opt_t)
        charges.append(_output_layer_charges(net.model))
    status = {f.symmetry: f for f in tracker.families}
    assert status["translation"].status == "tracked"
    assert status["rescale"].status == "observed only"
    assert "frozen" in status["rescale"].note
    assert _output_layer_error(tracker.records(), charges) < EXACT
    assert_same_training(net.model, twin.model, opt, opt_t)


def test_explicit_binding_of_a_tensor_outside_the_optimizer_is_still_refused():
    net = make_net("rescale")
    opt = torch.optim.SGD(net.model[2].parameters(), lr=0.1)
    with pytest.raises(symmech.BindingError, match=r"not in the optimizer"):
        symmech.track(net.model, opt, net.bindings())


def test_layer_without_gradient_at_some_steps_stays_exact():
    """requires_grad=False on some steps (the optimizer skips the tensors): nothing moves."""
    (net, twin), (opt, opt_t) = _twins("rescale", momentum=0.9, weight_decay=1e-3)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    for k in range(10):
        for n, o in ((net, opt), (twin, opt_t)):
            o.zero_grad(set_to_none=True)
            n.loss().backward()
            if k % 3 == 1:  # the hidden layer gets no gradient at this step
                for p in (n.model[0].weight, n.model[0].bias, n.model[2].weight):
                    p.grad = None
            o.step()
        charges.append(hand_charges(net))
    assert _statuses(tracker) == {"tracked"}
    assert law_error(tracker.records(), charges) < EXACT
    assert_same_training(net.model, twin.model, opt, opt_t)


def test_part_of_a_group_without_gradient_restarts_the_law_with_a_note():
    (net, twin), (opt, opt_t) = _twins("rescale", momentum=0.9)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    for k in range(10):
        for n, o in ((net, opt), (twin, opt_t)):
            o.zero_grad(set_to_none=True)
            n.loss().backward()
            if k == 4:  # only the outgoing weights move: the law cannot predict this step
                n.model[0].weight.grad = None
                n.model[0].bias.grad = None
            o.step()
        charges.append(hand_charges(net))
    fam = tracker.families[0]
    assert fam.status == "tracked"
    assert "restarted at step 5" in fam.note
    rows = tracker.records()
    before = [r for r in rows if r["step"] <= 4]
    after = [r for r in rows if r["step"] >= 5]
    assert law_error(before, charges) < EXACT
    assert law_error(after, charges) < EXACT
    assert_same_training(net.model, twin.model, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# 6. A NaN step, then a rollback to a good checkpoint
# ---------------------------------------------------------------------------------------------


def _nan_then_rollback(net: Net, opt, bad: int, noticed: int, n: int, charges=None) -> None:
    """Train ``n`` steps; step ``bad`` has a NaN loss; after step ``noticed`` roll back to the
    checkpoint taken before step ``bad``."""

    good = None
    for k in range(n):
        if k == bad:
            good = copy.deepcopy((net.model.state_dict(), opt.state_dict()))
        opt.zero_grad()
        (net.loss() * (float("nan") if k == bad else 1.0)).backward()
        opt.step()
        if k == noticed:
            assert good is not None and torch.isnan(net.model[0].weight).all()
            net.model.load_state_dict(good[0])
            opt.load_state_dict(good[1])
        if charges is not None:
            charges.append(hand_charges(net))


def test_nan_step_then_rollback_restarts_the_laws_with_a_note():
    (net, twin), (opt, opt_t) = _twins("rescale", momentum=0.9, weight_decay=1e-3)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    _nan_then_rollback(net, opt, bad=4, noticed=6, n=14, charges=charges)
    _nan_then_rollback(twin, opt_t, bad=4, noticed=6, n=14)
    with pytest.warns(symmech.TrackerWarning, match=r"from step 4 on .*gradients were non-finite"):
        rows = tracker.records()
    nan_rows = [r for r in rows if r["step"] in (5, 6)]
    assert nan_rows and all(np.isnan(r["observed"]) for r in nan_rows)
    assert all("parameters were NaN" in r["note"] for r in nan_rows)
    assert all("gradients were non-finite" in r["note"] for r in rows if r["step"] == 4)
    assert law_error([r for r in rows if r["step"] <= 4], charges) < EXACT
    after = [r for r in rows if r["step"] >= 7]
    assert law_error(after, charges) < EXACT
    assert all(np.isfinite(r["discrete"]) for r in after)
    assert all("restarted at step 7" in r["note"] for r in after)
    assert tracker.families[0].status == "tracked"
    assert_same_training(net.model, twin.model, opt, opt_t)


def test_resuming_from_a_checkpoint_mid_run_restarts_exactly():
    """Loading optimizer state (with other momentum buffers) mid-run: exact again at once."""

    net = make_net("rescale")
    opt = torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(3):
        _step(net, opt)
    saved = copy.deepcopy((net.model.state_dict(), opt.state_dict()))
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    for k in range(10):
        _step(net, opt)
        if k == 5:
            net.model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
        charges.append(hand_charges(net))
    assert law_error(tracker.records(), charges) < EXACT


# ---------------------------------------------------------------------------------------------
# 7. Momentum switched between 0 and β mid-run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0.0, 0.9])
@pytest.mark.parametrize("extra", [{}, {"dampening": 0.2, "weight_decay": 1e-3}])
def test_momentum_switched_mid_run_stays_exact(start, extra):
    (net, twin), (opt, opt_t) = _twins("rescale", momentum=start, **extra)
    tracker = symmech.track(net.model, opt, net.bindings())
    charges = [hand_charges(net)]
    plan = [start] * 3 + [0.9 - start] * 4 + [start] * 3 + [0.7] * 3
    for beta in plan:
        for o in (opt, opt_t):
            o.param_groups[0]["momentum"] = beta
        _step(net, opt), _step(twin, opt_t)
        charges.append(hand_charges(net))
    assert _statuses(tracker) == {"tracked"}
    assert law_error(tracker.records(), charges) < EXACT
    assert_same_training(net.model, twin.model, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# Weight tying and low precision
# ---------------------------------------------------------------------------------------------


def test_tied_weights_skip_their_families_with_the_true_reason():
    def tied_model():
        torch.manual_seed(0)
        lin = [torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
        m = torch.nn.Sequential(
            lin[0], torch.nn.ReLU(), lin[1], torch.nn.ReLU(), lin[2], torch.nn.ReLU()
        )
        m.append(torch.nn.Linear(8, 3))
        m[4].weight = m[2].weight  # one Parameter in two layers
        return m.to(DTYPE)

    models = [tied_model(), tied_model()]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    x = torch.randn(32, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    # detection refuses them, naming the tie (the tracker never sees them)
    with pytest.warns(symmech.SymmetryWarning, match=r"2\.weight is tied to 4\.weight") as w:
        tracker = symmech.track(models[0], opts[0], example_input=(x, y))
    assert sum("tied to" in str(i.message) for i in w) == 3  # the three rescale families
    charges = [_output_layer_charges(models[0])]
    for _ in range(6):
        for m, o in zip(models, opts):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        charges.append(_output_layer_charges(models[0]))
    assert {f.symmetry for f in tracker.families} == {"translation"}
    assert _statuses(tracker) == {"tracked"}
    assert _output_layer_error(tracker.records(), charges) < EXACT
    assert_same_training(models[0], models[1], opts[0], opts[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_approximate_and_says_how_much(dtype):
    nets = [make_net("rescale", dtype=dtype), make_net("rescale", dtype=dtype)]
    with torch.no_grad():  # Σθ² of the hidden groups beyond float16's range (65504)
        for n in nets:
            n.model[0].weight.mul_(600.0)
    opts = [torch.optim.SGD(n.model.parameters(), lr=1e-4, momentum=0.9) for n in nets]
    (net, twin), (opt, opt_t) = nets, opts
    with pytest.warns(symmech.TrackerWarning, match=r"approximate laws: .*rounded to") as w:
        tracker = symmech.track(net.model, opt, net.bindings())
    assert len(w) == 1  # once, for every family
    ref = net.families[0].reference()
    charges, scale = [hand_charges(net)], []
    for _ in range(8):
        scale.append(float(ref.charge_abs({k: v.detach() for k, v in net.params().items()}).max()))
        _step(net, opt), _step(twin, opt_t)
        charges.append(hand_charges(net))
    eps = torch.finfo(dtype).eps
    status = tracker.families[0].status
    assert status.startswith("approximate: ") and f"{eps:.1e}" in status
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = tracker.records()  # no non-finite values (float32 reductions), no warning
    assert all(np.isfinite(r["observed"]) for r in rows)
    assert max(charges[0]["hidden"]) > 65504
    assert all(r["status"] == status for r in rows)
    err = max(
        abs(r["discrete"] - charges[r["step"]]["hidden"][r["group"]]) for r in rows if r["step"]
    )
    assert err <= 8 * eps * max(scale)  # what the status promises
    assert_same_training(net.model, twin.model, opt, opt_t)


# ---------------------------------------------------------------------------------------------
# Tracker.state_dict / load_state_dict: a resumed run in a new process continues exactly
# ---------------------------------------------------------------------------------------------

_RESUME = """
import json, sys, torch
from support.training import make_net
import symmech

net = make_net("rescale")
opt = torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
saved = torch.load(sys.argv[1], weights_only=False)
net.model.load_state_dict(saved["model"])
opt.load_state_dict(saved["opt"])
tracker = symmech.track(net.model, opt, net.bindings())
tracker.load_state_dict(saved["tracker"])
for _ in range(6):
    opt.zero_grad(); net.loss().backward(); opt.step()
json.dump(tracker.records(), open(sys.argv[2], "w"))
"""


def _resumable():
    net = make_net("rescale")
    opt = torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return net, opt


def test_state_dict_resumes_exactly_in_a_new_process(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    net, opt = _resumable()
    for _ in range(3):  # buffers exist before tracking starts
        _step(net, opt)
    tracker = symmech.track(net.model, opt, net.bindings())
    for _ in range(6):
        _step(net, opt)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(
        {"model": net.model.state_dict(), "opt": opt.state_dict(), "tracker": tracker.state_dict()},
        ckpt,
    )
    for _ in range(6):
        _step(net, opt)
    want = tracker.records()
    out = tmp_path / "resumed.json"
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    subprocess.run(
        [sys.executable, "-c", _RESUME, str(ckpt), str(out)], check=True, env=env, timeout=300
    )
    got = json.loads(out.read_text())
    assert len(got) == len(want) and {r["step"] for r in got} == set(range(13))
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k, v in b.items():
            if isinstance(v, float):
                assert abs(a[k] - v) <= 1e-12 * max(1.0, abs(v)), (k, a, b)
            else:
                assert a[k] == v, (k, a, b)
    again, opt2 = _resumable()
    for _ in range(3):
        _step(again, opt2)
    charges = [hand_charges(again)]  # the laws are exact across the resume too
    for _ in range(12):
        _step(again, opt2)
        charges.append(hand_charges(again))
    assert law_error(got, charges) < EXACT


def test_load_state_dict_of_other_families_is_refused():
    net, opt = _resumable()
    tracker = symmech.track(net.model, opt, net.bindings())
    _step(net, opt)
    state = tracker.state_dict()
    other = make_net("translation")
    opt2 = torch.optim.SGD(other.model.parameters(), lr=0.1)
    with pytest.raises(symmech.BindingError, match=r"the saved tracker has the families"):
        symmech.track(other.model, opt2, other.bindings()).load_state_dict(state)


def test_load_state_dict_with_other_banks_says_what_to_do():
    # a state whose laws fill another number of banks (saved before the specs with constants
    # had banks of their own: one bank held the heads and the norms) is refused with the counts
    # and the way on, and the tracker is left as it was
    net, opt = _resumable()
    tracker = symmech.track(net.model, opt, net.bindings())
    _step(net, opt)
    state = tracker.state_dict()
    state["banks"] = state["banks"] + [None]
    fresh = symmech.track(net.model, opt, net.bindings())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(symmech.BindingError, match=r"fill 2 banks, this tracker has 1.*track "
                       r"without load_state_dict"):  # fmt: skip
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert after["families"] == before["families"] and after["banks"] == before["banks"]
    assert after["step"] == before["step"]


# ---------------------------------------------------------------------------------------------
# 9. A symmetry the loss does not have: the measured residual is the evidence
# ---------------------------------------------------------------------------------------------


def _bce_setup():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    m = m.to(DTYPE)
    x = torch.randn(32, 4, dtype=DTYPE)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (32,)), 3).to(DTYPE)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    return m, x, y, opt


def test_broken_symmetry_is_approximate_with_the_measured_residual():
    """Translation of the logits is a symmetry of cross-entropy, not of BCE: the default
    confirmation (cross-entropy) passes it, training with BCE breaks it, and the rows say so."""
    (m, x, y, opt), (m2, _, _, opt2) = _bce_setup(), _bce_setup()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    tracker = symmech.track(m, opt, example_input=(x, y))
    charges = [_output_layer_charges(m)]
    for _ in range(10):
        for model, o in ((m, opt), (m2, opt2)):
            o.zero_grad()
            bce(model(x), y).backward()
            o.step()
        charges.append(_output_layer_charges(m))
    with pytest.warns(
        symmech.TrackerWarning, match=r"approximate: \|r\| = .*does not have this symmetry"
    ):
        rows = tracker.records()
    translation = [r for r in rows if r["symmetry"] == "translation"]
    assert translation and all(r["status"].startswith("approximate: |r| = ") for r in translation)
    assert _output_layer_error(rows, charges) > 0.1  # the pure law is wrong, and says so
    exact = [{**r, "discrete": r["discrete_residual"]} for r in translation]
    assert _output_layer_error(exact, charges) < EXACT  # the law fed the measured rₖ is exact
    by_symmetry = {f.symmetry: f.status for f in tracker.families}
    assert by_symmetry["rescale"] == "tracked"  # ReLU rescaling is a symmetry of any loss
    assert_same_training(m, m2, opt, opt2)


def test_confirmation_with_the_users_loss_skips_the_broken_symmetry():
    m, x, y, opt = _bce_setup()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with pytest.warns(symmech.TrackerWarning, match=r"translation on .* not tracked: loss changed"):
        tracker = symmech.track(m, opt, example_input=(x, y), loss_fn=bce)
    assert {f.symmetry for f in tracker.families} == {"rescale"}


def test_exact_symmetries_stay_tracked_over_a_long_float32_run():
    """No false alarm: round-off residuals of real symmetries in float32 stay 'tracked'."""
    net = make_net("conv_flatten", dtype=torch.float32)
    opt = torch.optim.SGD(net.model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tracker = symmech.track(net.model, opt, net.bindings(), log_every=10)
    for _ in range(300):
        _step(net, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = tracker.records()
    assert {r["status"] for r in rows} == {"tracked"}
