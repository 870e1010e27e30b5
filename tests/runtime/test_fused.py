"""The fused reductions (one compiled pass per hook call) agree with eager ones and with numpy.

* every per-group product of random conv/linear shapes and group dims, as the fused pass computes
  it, against numpy's einsum (float64, ≤1e-12 relative), and against the eager per-product path
  the tracker uses without fusion;
* the compiled pass against the same eager values;
* a float64 network tracked with fused and with eager reductions: the same records to ≤1e-12,
  training bit-identical to an untracked twin, and the fused pass really ran;
* a compiler failure: one warning, then eager values.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.training import train_with_reductions

from symmech.runtime import fused
from symmech.runtime.binding import BoundSlice
from symmech.runtime.reductions import GridSlice, ReductionCache

SHAPES = st.sampled_from([(7,), (5, 3), (3, 9), (4, 3, 3, 3), (6, 2, 1, 5), (2, 5, 3), (1, 4)])


def _numpy_products(x: np.ndarray, y: np.ndarray, dim: int) -> np.ndarray:
    dim = dim % x.ndim
    letters = "abcdefgh"[: x.ndim]
    return np.einsum(f"{letters},{letters}->{letters[dim]}", x, y)


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    b_t = torch.as_tensor(b)
    return float((a - b_t).abs().max() / b_t.abs().max().clamp_min(1e-300))


@settings(max_examples=40, deadline=None)
@given(shape=SHAPES, dim_pick=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_layout_products_match_numpy_and_eager(shape, dim_pick, seed) -> None:
    dim = dim_pick % len(shape)
    gen = torch.Generator().manual_seed(seed)
    theta, grad, buf = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    pairs = ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))
    got = fused.layout_products([theta, grad, buf], dim, pairs)
    members = [theta.numpy(), grad.numpy(), buf.numpy()]
    cache = ReductionCache()
    spec = BoundSlice(theta, dim)
    slices = [GridSlice(t, spec, cache) for t in (theta, grad, buf)]
    saved = fused.MODE
    fused.MODE = "eager"
    try:
        for k, (i, j) in enumerate(pairs):
            ref = _numpy_products(members[i], members[j], dim)
            assert _rel(got[k], ref) <= 1e-12
            eager = slices[i].sq() if i == j else slices[i].dot(slices[j])
            assert _rel(eager, ref) <= 1e-12
    finally:
        fused.MODE = saved


def test_compiled_pass_matches_eager() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [((8, 4, 3, 3), 0), ((8, 4, 3, 3), 1), ((6, 5), 1), ((6,), 0), ((3, 7, 2), 2)]
    members = [
        [torch.randn(s, generator=gen, dtype=torch.float64) for _ in range(2)] for s, _ in shapes
    ]
    structure = tuple((d, ((0, 0), (0, 1), (1, 1))) for _, d in shapes)
    got = fused.run_compiled(structure, members)
    assert got is not None, fused._failed
    for (shape, dim), m, values in zip(shapes, members, got):
        x, y = (t.numpy() for t in m)
        for k, ref in enumerate(
            [_numpy_products(x, x, dim), _numpy_products(x, y, dim), _numpy_products(y, y, dim)]
        ):
            assert _rel(values[k], ref) <= 1e-12, (shape, dim, k)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 5),
    ).double()


def _train(mode: str | None, steps: int = 6):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (16,), generator=gen)
    return train_with_reductions(_net(), (x, y), mode, steps)


@pytest.fixture
def restore_mode():
    saved = fused.MODE
    yield
    fused.MODE = saved


def test_tracker_fused_equals_eager_and_training_is_untouched(restore_mode) -> None:
    plain, _ = _train(None)
    eager_model, eager = _train("eager")
    fused_model, tracked = _train("compiled")
    assert tracked is not None and eager is not None
    phases = tracked.cache.plan.phases
    assert phases and all(p.stable >= 1 for p in phases.values())  # the fused pass ran
    for a, b, c in zip(plain.parameters(), eager_model.parameters(), fused_model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    rows_f, rows_e = tracked.records(), eager.records()
    assert len(rows_f) == len(rows_e) > 0
    worst = 0.0
    for rf, re in zip(rows_f, rows_e):
        for key in ("observed", "discrete", "residual"):
            if re.get(key) is None:
                assert rf.get(key) is None
                continue
            scale = max(abs(re[key]), abs(re["observed"]), 1e-300)
            worst = max(worst, abs(rf[key] - re[key]) / scale)
    assert worst <= 1e-12, worst


def test_compiler_failure_warns_once_and_stays_eager(restore_mode, monkeypatch) -> None:
    def broken(structure):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_compile", broken)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tracked = _train("compiled")
        _, eager = _train("eager")
    said = [w for w in caught if "torch.compile of the fused reductions failed" in str(w.message)]
    assert len(said) == 1
    assert fused._failed is not None
    assert tracked is not None and eager is not None
    for rf, re in zip(tracked.records(), eager.records()):
        assert rf["observed"] == re["observed"]
