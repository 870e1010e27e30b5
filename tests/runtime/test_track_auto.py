"""track(model, optimizer) with no bindings: detection from the graph, on a batch or on the
first step, and the cases where detection finds nothing or must not be trusted."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.zoo import build as build_model

import symmech
from symmech.model.detect import detect

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(
        0, 10, (n,), generator=g
    )


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _max_rel(rows, law):
    scale = {}
    for r in rows:
        key = (r["layer"], r["group"])
        scale[key] = max(scale.get(key, 0.0), abs(r["observed"]))
    return max(
        abs(r[law] - r["observed"]) / max(scale[(r["layer"], r["group"])], 1e-300)
        for r in rows
        if r[law] is not None
    )


def test_detection_on_first_step_tracks_the_same_families_as_detect():
    torch.manual_seed(0)
    model = build_model("vgg-tiny-bn").double()
    x, y = _batch()
    expected = [(f.symmetry, f.layer, f.n_groups) for f in detect(model, x)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tracker = symmech.track(model, opt)
    with pytest.warns(symmech.TrackerWarning, match="without confirming"):
        _train(model, opt, x, y, 30)
    assert [(f.symmetry, f.layer, f.n_groups) for f in tracker.families] == expected
    rows = tracker.records()
    # BatchNorm's default eps breaks scale slightly; the law fed the measured residual is exact
    assert _max_rel(rows, "discrete_residual") < 1e-9
    exact = [r for r in rows if r["symmetry"] != "scale"]
    assert _max_rel(exact, "discrete") < 1e-9


def test_detection_does_not_change_training():
    x, y = _batch()
    torch.manual_seed(1)
    a = build_model("vgg-tiny-bn").double()
    b = build_model("vgg-tiny-bn").double()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    symmech.track(b, opt_b, example_input=(x, y))  # confirms on the batch: forward passes on copies
    _train(a, opt_a, x, y, 5)
    _train(b, opt_b, x, y, 5)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_model_without_symmetry_trains_untouched():
    class Tanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return torch.tanh(self.fc(x.flatten(1)))

    x, y = _batch()
    model = Tanh().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(Warning, match="no symmetry found"):
        tracker = symmech.track(model, opt, example_input=(x, y))
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, x, y, 3)
    assert tracker.families == [] and tracker.records() == []
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_eval_mode_and_affine_free_batchnorm_are_reported_not_crashed():
    x, y = _batch()
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 16),
        torch.nn.BatchNorm1d(16, affine=False),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 10),
    ).double()
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = symmech.track(model, opt, example_input=(x, y))
    text = " ".join(str(w.message) for w in caught)
    assert "affine=False" in text or "affine" in text
    assert "eval" in text
    model.train()
    _train(model, opt, x, y, 3)
    assert all(f.symmetry != "rescale" for f in tracker.families)
    assert tracker.records()


def test_track_without_inputs_and_without_forward_warns_instead_of_raising():
    model = build_model("mlp").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = symmech.track(model, opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.warns(symmech.TrackerWarning, match="not called before the first step"):
        opt.step()
    assert tracker.families == []


def test_linear_layer_pair_without_activation_is_a_rescale_family():
    # Linear(64→16) → Dropout(p=0) → Linear(16→10): W2 W1 x is unchanged by (α w1_j, α b1_j, w2[:, j]/α)
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Dropout(0.0), torch.nn.Linear(16, 10)
    ).double()
    x, y = _batch()
    families = detect(model, x, confirm_batch=(x, y))
    pairs = [f for f in families if f.symmetry == "rescale"]
    assert len(pairs) == 1 and pairs[0].n_groups == 16 and pairs[0].confirmed is True
    assert "linear pair" in pairs[0].layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = symmech.track(model, opt, example_input=(x, y))
    _train(model, opt, x, y, 100)
    rows = [r for r in tracker.records() if r["symmetry"] == "rescale"]
    assert _max_rel(rows, "discrete") < 1e-10


class _Masked(torch.nn.Module):
    """A model with two inputs: forward(x, mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x * mask)))


def test_several_inputs_take_a_nested_batch_and_a_bare_pair_is_refused():
    torch.manual_seed(0)
    net = _Masked().double()
    x = torch.randn(32, 4, dtype=torch.float64)
    mask = (torch.rand(32, 4) > 0.2).double()
    y = torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(
        symmech.BindingError, match=r"_Masked\.forward requires 2 inputs.*\(\(x, mask\), y\)"
    ):
        symmech.track(net, opt, example_input=(x, mask))  # mask must not be read as labels
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # nothing moved
    tracker = symmech.track(net, opt, example_input=((x, mask), y))
    assert sorted(f.symmetry for f in tracker.families) == ["rescale", "translation", "translation"]
    charges = []
    for _ in range(20):
        charges.append(net.b.bias.detach().sum().item())  # translation of the bias, by hand
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x, mask), y).backward()
        opt.step()
    charges.append(net.b.bias.detach().sum().item())
    rows = [
        r
        for r in tracker.records()
        if r["layer"].endswith("bias") and r["symmetry"] == "translation"
    ]
    assert [r["step"] for r in rows] == list(range(21))
    scale = max(net.b.bias.abs().sum().item(), 1e-3)
    assert max(abs(r["discrete"] - q) for r, q in zip(rows, charges)) <= 1e-12 * scale
    assert {f.status for f in tracker.families} == {"tracked"}
    other = _Masked()
    inputs_only = symmech.track(other, torch.optim.SGD(other.parameters(), lr=0.1),
                                example_input=((x.float(), mask.float()),))  # fmt: skip
    assert len(inputs_only.families) == 3


def test_track_reads_the_graph_and_confirms_on_the_first_samples_only():
    torch.manual_seed(0)
    model = build_model("vgg-tiny-bn")
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = symmech.track(model, opt, example_input=(x, y))
    handle.remove()
    assert seen and set(seen) == {8}, seen  # detection's pass and every confirmation pass
    full = detect(model, x, confirm_batch=(x, y), confirm_samples=None)
    assert {(f.symmetry, f.layer) for f in tracker.families} == {
        (f.symmetry, f.layer) for f in full if f.confirmed
    }
