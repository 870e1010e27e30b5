"""The family's error scale: the size of Q's terms by hand, and errors that mean something at Q = 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import symmech
from symmech.runtime.error_scale import charge_terms, error_scales, max_errors, term_scales

pytestmark = pytest.mark.usefixtures("single_thread")

shapes = st.tuples(st.integers(1, 5), st.integers(1, 6))


def _tensor(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@settings(max_examples=25)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_terms_by_hand_for_the_paper_three(shape, seed: int) -> None:
    w = _tensor(shape, seed)
    v = _tensor((shape[1], 3), seed + 1)
    # translation over rows (group = column j): sum_i |w_ij|
    got = charge_terms(symmech.bind("translation", theta=[(w, 1)]))
    np.testing.assert_allclose(got.numpy(), w.abs().sum(0).numpy(), rtol=1e-13)
    # scale per row: ½ ||w_i||²
    got = charge_terms(symmech.bind("scale", theta=[(w, 0)]))
    np.testing.assert_allclose(got.numpy(), 0.5 * (w**2).sum(1).numpy(), rtol=1e-13)
    # rescale per hidden unit j: ½ (||w_:j||² + ||v_j:||²), whatever the sign of Q
    got = charge_terms(symmech.bind("rescale", theta_1=[(w, 0)], theta_2=[(v, 1)]) if False else
                       symmech.bind("rescale", theta_1=[(w.T.contiguous(), 0)], theta_2=[(v, 0)]))  # fmt: skip
    expected = 0.5 * ((w**2).sum(0) + (v**2).sum(1))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-13)


@settings(max_examples=25)
@given(shape=shapes, seed=st.integers(0, 10_000), name=st.sampled_from(["translation", "scale"]))
def test_terms_bound_q_and_equal_it_when_every_term_has_one_sign(shape, seed, name) -> None:
    w = _tensor(shape, seed)
    b = symmech.bind(name, theta=[(w, 0)])
    q = b.module.charge({"theta": [(w, (1,))]})
    m = charge_terms(b)
    assert (q.abs() <= m * (1 + 1e-12)).all()
    b_pos = symmech.bind(name, theta=[(w.abs(), 0)])
    q_pos = b_pos.module.charge({"theta": [(w.abs(), (1,))]})
    np.testing.assert_allclose(charge_terms(b_pos).numpy(), q_pos.numpy(), rtol=1e-13)


def test_terms_leave_training_state_alone() -> None:
    layer = nn.Linear(3, 4).double()
    layer(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    grad, weight = layer.weight.grad.clone(), layer.weight.detach().clone()
    m = charge_terms(symmech.bind("scale", theta=[(layer.weight, 0), (layer.bias, 0)]))
    assert not m.requires_grad and m.dtype == torch.float64
    assert torch.equal(layer.weight.grad, grad) and torch.equal(layer.weight.detach(), weight)


def _zero_head_run(steps: int = 60):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    tracker = symmech.track(model, opt, example_input=(x, y))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return tracker


def test_zero_head_has_a_tiny_error_and_a_wrong_law_a_large_one() -> None:
    tracker = _zero_head_run()
    records = tracker.records()
    heads = {(r["symmetry"], r["layer"]) for r in records if r["symmetry"] == "translation"}
    assert heads, "the classifier head's translation families are tracked"
    for key in heads:  # Q ≡ 0 up to round-off: the old per-group measure read it as O(1)
        obs = np.array([r["observed"] for r in records if (r["symmetry"], r["layer"]) == key])
        assert np.abs(obs).max() < 1e-14
    terms = term_scales(tracker.families)
    errors = max_errors(records, terms)
    for key in heads:
        assert terms[key] > 1e-3  # the head's weights moved
        assert errors[key]["discrete"] < 1e-12 and errors[key]["gradient_flow"] < 1e-12
    scales = error_scales(records, terms)
    wrong = [dict(r) for r in records]
    for r in wrong:  # a law off by 1e-3 of the family's scale after step 10
        key = (r["symmetry"], r["layer"])
        if r["step"] > 10 and r["discrete"] is not None:
            r["discrete"] += 1e-3 * scales[key]
    for key, row in max_errors(wrong, terms).items():
        if row["discrete"] is not None:
            assert row["discrete"] == pytest.approx(1e-3, rel=1e-6), key
    # the rescale law without weight decay's pull (gradient flow) is wrong by far more
    rescale = [row for (s, _), row in errors.items() if s == "rescale"]
    assert rescale and all(row["gradient_flow"] > 1e-4 > row["discrete"] for row in rescale)


def test_scale_without_terms_is_the_family_largest_observed() -> None:
    rows = [{"step": k, "t": 0.0, "symmetry": "scale", "layer": "c", "group": j,
             "observed": q, "discrete": q + 0.1} for k in range(3)
            for j, q in enumerate([1.0, 4.0 * (k + 1)])]  # fmt: skip
    assert error_scales(rows) == {("scale", "c"): 12.0}
    assert error_scales(rows, {("scale", "c"): 20.0}) == {("scale", "c"): 20.0}
    assert max_errors(rows)[("scale", "c")]["discrete"] == pytest.approx(0.1 / 12)
