"""Bad input gets a clear error or warning naming the problem; training is never changed.

Bindings that cannot work raise ``BindingError`` at ``bind``/``track`` time; things the tracker
cannot follow while training (an adaptive optimizer, mixed weight decay in a group, NaN
gradients) are warnings, the family falls back to "observed only", and the trajectory stays
bit-identical to training without the tracker.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from support.training import RICH, Config, columns, make_net, make_opt, make_scheduler, train
from torch import nn

import symmech
from symmech import BindingError, TrackerWarning

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor: equal bits ⇔ identical values, NaN included."""
    return t.detach().contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _same_training(a: nn.Module, b: nn.Module, opt_a, opt_b) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(_bits(p), _bits(q)), name
    for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(p, q), name
    for p, q in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(_bits(sa[k].to(DTYPE)), _bits(sb[k].to(DTYPE))), k


# ---------------------------------------------------------------------------------------------
# Binding errors
# ---------------------------------------------------------------------------------------------


def test_slices_disagreeing_in_group_count():
    l1, l2 = nn.Linear(5, 8), nn.Linear(8, 10)
    with pytest.raises(BindingError, match="disagree in group count") as info:
        # outgoing weights bound along dim 0 (10 rows) instead of dim 1 (8 hidden units)
        symmech.bind("rescale", theta_1=[(l1.weight, 0), (l1.bias, 0)], theta_2=[(l2.weight, 0)])
    msg = str(info.value)
    assert re.search(r"theta_1\[0\] \(shape \(8, 5\), dim=0\): 8", msg), msg
    assert re.search(r"theta_2\[0\] \(shape \(10, 8\), dim=0\): 10", msg), msg


def test_unknown_block_name():
    conv = nn.Conv2d(1, 4, 3)
    with pytest.raises(BindingError, match=r"unknown block\(s\) \['weights'\].*\['theta'\]"):
        symmech.bind("scale", weights=[(conv.weight, 0)])


def test_missing_block():
    l1 = nn.Linear(5, 8)
    with pytest.raises(BindingError, match=r"no slices given for block\(s\) \['theta_2'\]"):
        symmech.bind("rescale", theta_1=[(l1.weight, 0)])


def test_missing_constant():
    fc1, fc2 = nn.Linear(6, 3, bias=False), nn.Linear(3, 4, bias=False)
    blocks = {"U": [(fc1.weight, None, "T")], "V": [(fc2.weight, None)]}
    with pytest.raises(BindingError, match=r"constants \[\] given, \['E'\] needed"):
        symmech.bind("linear_pair", **blocks)
    with pytest.raises(BindingError, match=r"constants \['F'\] given, \['E'\] needed"):
        symmech.bind("linear_pair", constants={"F": torch.eye(3)}, **blocks)
    assert symmech.bind("linear_pair", constants={"E": torch.eye(3)}, **blocks).n_groups == 1


def test_unknown_symmetry_name():
    with pytest.raises(BindingError, match="unknown symmetry name"):
        symmech.bind("shear", theta=[(torch.zeros(3), 0)])


def test_bad_dim_and_view():
    w = torch.zeros(4, 6)
    with pytest.raises(BindingError, match=r"dim=2 is out of range for shape \(4, 6\)"):
        symmech.bind("scale", theta=[(w, 2)])
    with pytest.raises(BindingError, match=r"view \(5, 5\) does not fit shape \(4, 6\)"):
        symmech.bind("scale", theta=[(w, 0, (5, 5))])
    with pytest.raises(BindingError, match="give \\(tensor, dim\\) or \\(tensor, dim, view\\)"):
        symmech.bind("scale", theta=[w])


def test_tensor_not_in_optimizer():
    net = make_net("rescale")
    opt = torch.optim.SGD(net.model[2].parameters(), lr=0.1)  # only the second layer
    with pytest.raises(
        BindingError, match=r"the tensors \['0\.weight', '0\.bias'\] are not in the optimizer"
    ):
        symmech.track(net.model, opt, net.bindings())


def test_track_arguments():
    net = make_net("rescale")
    opt = make_opt(net, RICH)
    with pytest.raises(BindingError, match="log_every must be"):
        symmech.track(net.model, opt, net.bindings(), log_every=0)
    with pytest.raises(BindingError, match="is not a binding"):
        symmech.track(net.model, opt, ["rescale"])
    tracker = symmech.track(net.model, opt)  # no bindings, no input: detection waits for step 0
    assert tracker.families == [] and tracker.detection_pending
    tracker.detach()


def test_bind_and_track_refuse_malformed_arguments_at_the_call():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(DTYPE)
    w = m[0].weight
    with pytest.raises(BindingError, match=r"block 'theta' is a bare tensor of shape \(3, 4\)"):
        symmech.bind("scale", theta=w)
    with pytest.raises(BindingError, match=r"dim='0' \(str\)"):
        symmech.bind("scale", theta=[(w, "0")])
    with pytest.raises(BindingError, match=r"dim=0\.0 \(float\)"):
        symmech.bind("scale", theta=[(w, 0.0)])
    with pytest.raises(BindingError, match=r"dim=True \(bool\)"):
        symmech.bind("scale", theta=[(w, True)])
    with pytest.raises(BindingError, match=r"constants \{'E': \(7, 7\)\} do not fit linear_pair"):
        symmech.bind(
            "linear_pair",
            U=[(w, None, "T")],
            V=[(m[1].weight, None)],
            constants={"E": torch.zeros(7, 7, dtype=DTYPE)},
        )
    with pytest.raises(BindingError, match=r"constants \{'E': 'list'\} are not tensors"):
        symmech.bind(
            "linear_pair", U=[(w, None, "T")], V=[(m[1].weight, None)], constants={"E": [1]}
        )
    fits = symmech.bind(
        "linear_pair",
        U=[(w, None, "T")],
        V=[(m[1].weight, None)],
        constants={"E": torch.zeros(3, 3, dtype=DTYPE)},
    )
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    one = symmech.bind("scale", theta=[(w, 0)])
    with pytest.raises(
        BindingError, match=r"track\(model, optimizer, Binding\): symmetries must be a list"
    ):
        symmech.track(m, opt, one)
    with pytest.raises(BindingError, match=r"log_every=2\.5\): log_every must be an int"):
        symmech.track(m, opt, [one], log_every=2.5)
    with pytest.raises(BindingError, match=r"schedule=3\): schedule must be a function"):
        symmech.track(m, opt, [one], schedule=3)
    symmech.track(m, opt, [one, fits]).detach()


# ---------------------------------------------------------------------------------------------
# Things the tracker cannot follow: warnings, "observed only", training unchanged
# ---------------------------------------------------------------------------------------------


def _nadam_run(tracked: bool):
    net = make_net("rescale")
    opt = torch.optim.NAdam(net.model.parameters(), lr=1e-2, weight_decay=1e-3)
    tracker = None
    if tracked:
        with pytest.warns(TrackerWarning, match="NAdam is not modelled"):
            tracker = symmech.track(net.model, opt, net.bindings())
    train(net, opt, 15)
    return net, opt, tracker


def test_an_optimizer_not_modelled_is_observed_only_and_training_is_unchanged():
    net0, opt0, _ = _nadam_run(False)
    net1, opt1, tracker = _nadam_run(True)
    _same_training(net0.model, net1.model, opt0, opt1)
    (fam,) = tracker.families
    assert fam.status == "observed only"
    assert "MeasuredDirection" in fam.note and "AdamW" in fam.note
    assert "observed only" in tracker.summary()
    rows = tracker.records()
    got = columns(rows, "hidden")
    assert got["observed"].shape == (16, 6) and np.all(np.isfinite(got["observed"]))
    # observed Q really moves under NAdam (rescale is not conserved by a preconditioned update)
    assert np.max(np.abs(got["observed"][-1] - got["observed"][0])) > 1e-6
    # no frozen Q_0 shown as a 'prediction' for a family the laws do not cover
    assert all(r["discrete"] is None and r["dQ_step"] is None for r in rows if r["step"] > 0)


def test_a_subclass_of_a_modelled_optimizer_is_not_trusted():
    class MySGD(torch.optim.SGD):
        pass

    net = make_net("rescale")
    opt = MySGD(net.model.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(TrackerWarning, match="MySGD is not modelled"):
        tracker = symmech.track(net.model, opt, net.bindings())
    train(net, opt, 3)
    assert tracker.families[0].status == "observed only"


K_NAN = 4


def _nan_run(tracked: bool):
    net = make_net("rescale")
    opt = make_opt(net, Config(momentum=0.9, weight_decay=1e-3))
    tracker = symmech.track(net.model, opt, net.bindings()) if tracked else None
    step = {"k": 0}

    def poison(g: torch.Tensor) -> torch.Tensor:
        if step["k"] == K_NAN:
            g = g.clone()
            g[0, 0] = float("nan")
        return g

    net.model[0].weight.register_hook(poison)  # a tracked parameter
    for k in range(10):
        step["k"] = k
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        opt.step()
    return net, opt, tracker


def test_nan_gradient_mid_run_warns_and_training_continues():
    net0, opt0, _ = _nan_run(False)
    net1, opt1, tracker = _nan_run(True)
    assert torch.isnan(net0.model[0].weight).any()  # the NaN did reach training
    _same_training(net0.model, net1.model, opt0, opt1)
    with pytest.warns(TrackerWarning, match=r"non-finite values from step \d+") as info:
        rows = tracker.records()
    got = columns(rows, "hidden")
    assert np.all(np.isfinite(got["observed"][: K_NAN + 1]))
    assert np.all(np.isfinite(got["residual"][:K_NAN]))
    assert not np.all(np.isfinite(got["residual"][K_NAN]))  # r_k reads the NaN gradient
    step = int(re.search(r"from step (\d+)", str(info[0].message)).group(1))
    assert step in (K_NAN, K_NAN + 1)


def test_nan_warning_names_the_step_of_the_nan_gradient():
    _, _, tracker = _nan_run(True)
    with pytest.warns(TrackerWarning, match=rf"non-finite values from step {K_NAN} on"):
        tracker.records()


# ---------------------------------------------------------------------------------------------
# log_every and schedule thin the history only
# ---------------------------------------------------------------------------------------------


def _thinned(**kwargs):
    net = make_net("conv_flatten")
    cfg = Config(momentum=0.9, weight_decay=1e-3, nesterov=True, scheduler="exp")
    opt = make_opt(net, cfg)
    sched = make_scheduler(opt, cfg.scheduler)
    tracker = symmech.track(net.model, opt, net.bindings(), **kwargs)
    train(net, opt, 30, sched)
    return {layer: columns(tracker.records(), layer) for layer in ("conv", "fc.channels")}


def test_log_every_thins_only():
    full = _thinned(log_every=1)
    thin = _thinned(log_every=7)
    custom = _thinned(schedule=lambda step: step in (3, 11))
    for layer in full:
        assert list(thin[layer]["step"]) == [0, 7, 14, 21, 28, 30]
        assert list(custom[layer]["step"]) == [3, 11, 30]
        for other in (thin, custom):
            idx = other[layer]["step"]
            for col in ("observed", "discrete", "discrete_residual", "second_order", "t"):
                np.testing.assert_array_equal(other[layer][col], full[layer][col][idx], err_msg=col)
