"""Shared per-group Gram matrices for ⟨x M, y⟩ and slices kept across hook calls.

* ⟨x M, y⟩ per group from the slices' Gram matrix (one ``bmm`` shared by every constant M)
  against numpy's einsum of the formed product (float64, ≤1e-12 relative), for random shapes,
  group dims, strided views and constants; the formed product where the Gram does not apply;
* the Gram matrix is computed once per pair of slices in a hook call, whatever the number of
  constants;
* a slice of θ or of the momentum buffer is the same object in the next hook call, a new one
  after ``p.data`` is replaced, and a gradient is never kept.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from symmech.runtime import kernels
from symmech.runtime.binding import BoundSlice
from symmech.runtime.reductions import GridSlice, ReductionCache

SHAPES = st.sampled_from([(5, 3), (4, 3, 6), (2, 5, 3, 4), (6, 1, 4), (3, 7)])


def _numpy_scaled_dot(x: np.ndarray, m: np.ndarray, y: np.ndarray, dim: int | None) -> np.ndarray:
    prod = (x @ m) * y  # (x M) ∘ y, formed
    if dim is None:
        return np.array([prod.sum()])
    dim = dim % x.ndim
    axes = tuple(i for i in range(prod.ndim) if i != dim)
    return prod.sum(axis=axes)


def _rel(a: torch.Tensor, b: np.ndarray) -> float:
    b_t = torch.as_tensor(b, dtype=torch.float64)
    return float((a.double() - b_t).abs().max() / b_t.abs().max().clamp_min(1e-300))


@settings(max_examples=60, deadline=None)
@given(shape=SHAPES, dim_pick=st.integers(-1, 3), seed=st.integers(0, 2**16),
       diagonal=st.booleans())  # fmt: skip
def test_scaled_dot_matches_numpy(shape, dim_pick, seed, diagonal) -> None:
    """Any constant M, and a diagonal one (only the Gram's diagonal is read then)."""
    dim = None if dim_pick < 0 else dim_pick % len(shape)
    gen = torch.Generator().manual_seed(seed)
    theta, grad = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    c = shape[-1]
    m = torch.randn(c, c, generator=gen, dtype=torch.float64)
    if diagonal:
        m = torch.diag(torch.randn(c, generator=gen, dtype=torch.float64))
    cache = ReductionCache()
    spec = BoundSlice(theta, dim)
    x, y = GridSlice(theta, spec, cache), GridSlice(grad, spec, cache)
    ref = _numpy_scaled_dot(theta.numpy(), m.numpy(), grad.numpy(), dim)
    got = kernels.dot(kernels.mm([x], m), [y])
    assert got.shape == (ref.size,)
    assert _rel(got, ref) <= 1e-12
    swapped = kernels.dot([y], kernels.mm([x], m))  # ⟨y, x M⟩ = ⟨x M, y⟩
    assert _rel(swapped, ref) <= 1e-12
    used = {k[-1] for k in cache.grids if k[0] == "gram"}  # diagonal or not
    last = dim is not None and dim == len(shape) - 1
    assert used == (set() if last else {diagonal})  # group axis last: the product is formed


@settings(max_examples=30, deadline=None)
@given(shape=SHAPES, dim_pick=st.integers(-1, 3), seed=st.integers(0, 2**16),
       off=st.booleans())  # fmt: skip
def test_stacked_diagonal_constants_read_the_grams_diagonal(shape, dim_pick, seed, off) -> None:
    """Stacked generators eᵢeᵢᵀ (a large attention head's families, batched): (F, G) against
    numpy family by family, from the Gram's diagonal, without a ``bmm``; one entry off the
    diagonal in one of them sends the whole stack to the full Gram, with the same values."""
    dim = None if dim_pick < 0 else dim_pick % len(shape)
    if dim is not None and dim == len(shape) - 1:
        dim = 0 if len(shape) > 1 else None
    gen = torch.Generator().manual_seed(seed)
    theta, grad = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    c = shape[-1]
    stack = torch.stack([torch.diag(torch.eye(c, dtype=torch.float64)[i]) for i in range(c)])
    if off and c > 1:
        stack[-1, 0, 1] = 0.5
    cache = ReductionCache()
    spec = BoundSlice(theta, dim)
    x, y = GridSlice(theta, spec, cache), GridSlice(grad, spec, cache)
    with kernels.stacked(c):
        got = kernels.dot(kernels.mm([x], stack), [y])
    assert got.shape[0] == c
    for i in range(c):
        ref = _numpy_scaled_dot(theta.numpy(), stack[i].numpy(), grad.numpy(), dim)
        assert _rel(got[i], ref) <= 1e-12
    kinds = {k[-1] for k in cache.grids if k[0] == "gram"}
    assert kinds == {not (off and c > 1)}


def test_strided_head_view_matches_numpy() -> None:
    """One attention head's rows of a q weight, read through the strided view as tracked."""
    gen = torch.Generator().manual_seed(3)
    w, g = (torch.randn(12, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    view = ("strided", (3, 12, 4), (48, 1, 12), 0)  # heads × input features × head dims
    spec = BoundSlice(w, 0, view)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    cache = ReductionCache()
    got = kernels.dot(kernels.mm([GridSlice(w, spec, cache)], m), [GridSlice(g, spec, cache)])
    xs, ys = spec.shaped(w).numpy(), spec.shaped(g).numpy()
    assert _rel(got, _numpy_scaled_dot(xs, m.numpy(), ys, 0)) <= 1e-12


def test_gram_computed_once_for_many_constants(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(0)
    theta, grad = (torch.randn(4, 6, 5, generator=gen) for _ in range(2))
    cache = ReductionCache()
    spec = BoundSlice(theta, 0)
    x, y = GridSlice(theta, spec, cache), GridSlice(grad, spec, cache)
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(1) or real(a, b))
    constants = [torch.randn(5, 5, generator=gen) for _ in range(7)]
    values = [kernels.dot(kernels.mm([x], m), [y]) for m in constants]
    assert len(calls) == 1
    for m, v in zip(constants, values):
        ref = ((theta.double() @ m.double()) * grad.double()).sum((1, 2))
        assert float((v.double() - ref).abs().max() / ref.abs().max()) <= 1e-5  # float32


def test_slices_kept_across_calls_only_for_parameters_and_buffers() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    buf = torch.randn(4, 3)
    cache = ReductionCache()
    spec = BoundSlice(p, 0)
    first = cache.slice(p, spec, "theta")
    cache.clear()
    assert cache.slice(p, spec, "theta") is first
    assert cache.slice(buf, spec, "buffer") is cache.slice(buf, spec, "buffer")
    grad = cache.slice(p.grad, spec)
    assert cache.slice(p.grad, spec) is grad  # shared within one hook call
    cache.clear()
    assert cache.slice(p.grad, spec) is not grad  # never kept across calls (zero_grad frees it)
    with torch.no_grad():
        p.data = torch.randn(4, 3)  # new storage: the old view would read stale values
    again = cache.slice(p, spec, "theta")
    assert again is not first
    ref = (p.detach().double().numpy() ** 2).sum(1)  # the new values, not the old storage's
    assert _rel(again.sq(), ref) <= 1e-6
