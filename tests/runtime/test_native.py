"""symmech's C++ kernel (symmech/runtime/native.py, csrc/group_products.cpp) against independent
computations.

* every per-group product of random shapes, group dims and pair sets, several layouts of the
  same sources in one call, against numpy's einsum in float64 (float64 and float32 inputs);
* layouts the kernel does not read come back None, the others of the same call still computed;
* a float64 conv net with BatchNorm tracked with ``MODE = "native"`` and ``"eager"``: the same
  records to ≤1e-12, training bit-identical to an untracked twin, the kernel ran (its every
  value checked against numpy inside the run), and the exact discrete law holds;
* the same net under AdamW: its coming step aₖ is the kernel's third source (read by name), the
  records equal the eager ones and the general law holds;
* a failed build: one warning, then exactly the eager records;
* ``"auto"`` on the CPU: the background build, then the kernel, with the eager records; a first
  build started by a script that ends at once completes in its own process and is loaded next;
* ``torch.compile``'s recompile limit no longer turns the compiled path off after a few layouts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.training import train_with_reductions

import symmech
from symmech.demo.models import vgg
from symmech.runtime import fused, native

STEPS = 8
RECORD_KEYS = ("observed", "discrete", "discrete_residual", "residual")


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """Build (or load the cached build of) the kernel once for the whole file."""
    assert native.build(), f"the C++ kernel could not be built: {native.failure()}"


@pytest.fixture
def restore_mode():
    saved = fused.MODE
    yield
    fused.MODE = saved


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def _einsum(x: np.ndarray, y: np.ndarray, dim: int | None) -> np.ndarray:
    """Σ over every dimension but ``dim`` of x·y, in float64, by numpy (None: over all, one
    value)."""
    letters = "abcdefgh"[: x.ndim]
    if dim is None:
        return np.einsum(f"{letters},{letters}->", x, y).reshape(1)
    dim = dim % x.ndim
    return np.einsum(f"{letters},{letters}->{letters[dim]}", x, y)


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _check_layout(
    got: torch.Tensor,
    sources: list[torch.Tensor],
    dim: int | None,
    pairs,
    cancelling: bool = False,
    dtype: torch.dtype | None = None,
) -> float:
    """Assert one layout's kernel values against numpy; return the worst error in units of
    the bound. ``cancelling``: the sums may cancel (a tracker's θ·g across a symmetry is ~0),
    so float64 is held to Σ|x||y| per group rather than to the largest value. A pair (i, -1)
    is source i alone (a sum); ``dim`` None is the whole tensor; ``dtype``: the values' dtype
    (default: the sources')."""
    assert got.dtype == (dtype or sources[0].dtype), (got.dtype, sources[0].dtype)
    groups = 1 if dim is None else sources[0].shape[dim % sources[0].ndim]
    assert tuple(got.shape) == (len(pairs), groups), (tuple(got.shape), pairs, groups)
    values = _f64(got)
    worst = 0.0
    for k, (i, j) in enumerate(pairs):
        x = _f64(sources[i])
        y = np.ones_like(x) if j < 0 else _f64(sources[j])
        exact = _einsum(x, y, dim)
        if sources[0].dtype == torch.float64 and not cancelling:
            bound = 1e-12 * max(np.abs(exact).max(), 1e-300)
        elif sources[0].dtype == torch.float64:
            # any order of summation errs by at most n·2⁻⁵³·Σ|x||y| (n ≤ 4096 entries a group)
            bound = 1e-12 * _einsum(np.abs(x), np.abs(y), dim) + 1e-300
        else:
            # float32 inputs: each product x·y of two 24-bit significands fits in double's 53
            # bits, so it is exact; the double sums (the kernel's and numpy's) each err by at most
            # n·2⁻⁵³·Σ|x||y|, and the final rounding to float32 by 2⁻²⁴ of the value
            # (≤ 2⁻²⁴·Σ|x||y|). 1e-6·Σ|x||y| per group covers it sixteen times over.
            bound = 1e-6 * _einsum(np.abs(x), np.abs(y), dim) + 1e-300
        err = np.abs(values[k] - exact)
        assert np.all(err <= bound), (k, (i, j), dim, float((err / bound).max()))
        worst = max(worst, float((err / bound).max()))
    return worst


# ---------------------------------------------------------------------------------------------
# 1. the kernel against numpy
# ---------------------------------------------------------------------------------------------

# first dimensions 1..9 (R not a multiple of 4 included); rows of one entry (a 1-D tensor, or
# trailing dimensions of size 1)
SHAPES = st.lists(st.integers(1, 6), min_size=0, max_size=3).flatmap(
    lambda rest: st.integers(1, 9).map(lambda r: (r, *rest))
)


@st.composite
def calls(draw) -> tuple[list[list[torch.Tensor]], list[tuple[int, tuple]]]:
    """A kernel call: 1-3 tensors, each with 1-3 sources, and 1-6 layouts over them (several
    dims and pair sets of the same sources, pairs in either order, (i, i) included)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(draw(st.integers(1, 3))):
        shape = draw(SHAPES)
        count = draw(st.integers(1, 3))
        tensors.append([torch.randn(shape, generator=gen, dtype=dtype) for _ in range(count)])
    layouts = []
    for _ in range(draw(st.integers(1, 6))):
        t = draw(st.integers(0, len(tensors) - 1))
        ndim, count = tensors[t][0].ndim, len(tensors[t])
        dim = draw(st.integers(-ndim, ndim - 1))
        # each unordered pair at most once per layout (asking for (i, j) and (j, i) in one
        # layout: test_a_pair_asked_in_both_orders), in either order
        every = [(i, j) for i in range(count) for j in range(i, count)]
        pairs = draw(st.lists(st.sampled_from(every), min_size=1, max_size=6, unique=True))
        flips = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
        pairs = [(j, i) if flip else (i, j) for (i, j), flip in zip(pairs, flips)]
        layouts.append((t, (dim, tuple(pairs))))
    return tensors, layouts


@settings(max_examples=150, deadline=None)
@given(call=calls())
def test_layout_products_match_numpy(call) -> None:
    tensors, layouts = call
    structure = [layout for _, layout in layouts]
    # a fresh list per layout: layouts share a sweep through their sources, not the list
    members = [list(tensors[t]) for t, _ in layouts]
    got = native.layout_products(structure, members)
    assert len(got) == len(layouts)
    for value, (dim, pairs), sources in zip(got, structure, members, strict=True):
        assert value is not None
        _check_layout(value, sources, dim, pairs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threaded_sweep_matches_numpy(dtype) -> None:
    """A tensor large enough for the rows to be split across threads (R·C·pairs > 2¹⁶), R not a
    multiple of 4, every dimension asked for in one call."""
    gen = torch.Generator().manual_seed(3)
    shape = (131, 33, 3, 3)
    sources = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3)]
    pairs = ((0, 0), (1, 0), (1, 1), (0, 2), (2, 1), (2, 2))
    structure = [(d, pairs) for d in (0, 1, 2, -1)] + [(1, ((2, 0),))]
    got = native.layout_products(structure, [sources] * len(structure))
    for value, (dim, p) in zip(got, structure, strict=True):
        assert value is not None
        _check_layout(value, sources, dim, p)
    # sums (j = -1) and the whole tensor (dim -1), threaded too
    sums = [0, -1, 1, -1, 0, 2]
    out = torch.empty(3 * (131 + 33 + 1), dtype=torch.float64)
    assert native.products_into([sources], [sums], [[0, 1, -1]], [0], out) == []
    listed = ((0, -1), (1, -1), (0, 2))
    for k, (dim, groups) in enumerate(((0, 131), (1, 33), (None, 1))):
        start = 3 * (0, 131, 131 + 33)[k]
        block = out[start : start + 3 * groups].view(3, groups)
        _check_layout(block, sources, dim, listed, dtype=torch.float64)


@pytest.mark.parametrize("pairs", [[0, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(131, 33, 3, 3), (7, 5), (6,)])
def test_a_square_and_a_cross_in_one_pass_match_numpy(pairs, dtype, shape) -> None:
    """Two pairs x·x and x·y in either order (a logged step's θ·θ and θ·g, Adam's a·a and a·θ)
    are read in one pass: rows, columns and totals against numpy, with R not a multiple of 4
    and rows split across threads."""
    gen = torch.Generator().manual_seed(17)
    sources = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2)]
    dims = [d for d in (0, 1, -1) if d < len(shape)]
    n = 2 * sum(1 if d < 0 else shape[d] for d in dims)
    out = torch.empty(n, dtype=torch.float64)
    assert native.products_into([sources], [pairs], [dims], [0], out) == []
    listed = tuple(zip(pairs[::2], pairs[1::2]))
    at = 0
    for d in dims:
        groups = 1 if d < 0 else shape[d]
        block = out[at : at + 2 * groups].view(2, groups)
        _check_layout(block, sources, None if d < 0 else d, listed, dtype=torch.float64)
        at += 2 * groups


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(131, 33, 3, 3), (8, 40), (5, 7, 2), (9,), (4, 1, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    pairs=st.sampled_from([[0, 0], [1, 1], [0, 1], [0, -1], [0, 0, 1, 0], [1, 1, 0, 1],
                           [0, 0, 1, 1], [0, -1, 1, 1, 0, 1]]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_sums_of_small_integers_are_exact(shape, dtype, pairs, seed) -> None:
    """On integer entries every product and every partial sum is an integer below 2⁵³, so the
    kernel's sums must equal numpy's int64 sums exactly, whatever its order of additions, its
    vector width or its fused multiply-adds: each kind of pair (a sum, a square, a cross, the
    square and the cross read in one pass), rows, columns and totals."""
    rng = np.random.default_rng(seed)
    ints = [rng.integers(-64, 65, size=shape) for _ in range(2)]
    sources = [torch.tensor(a, dtype=dtype) for a in ints]
    dims = [d for d in (0, 1, -1) if d < len(shape)]
    n = len(pairs) // 2
    out = torch.empty(n * sum(1 if d < 0 else shape[d] for d in dims), dtype=torch.float64)
    assert native.products_into([sources], [pairs], [dims], [0], out) == []
    at = 0
    for d in dims:
        for i, j in zip(pairs[::2], pairs[1::2]):
            value = ints[i] if j < 0 else ints[i] * ints[j]
            axes = tuple(a for a in range(len(shape)) if a != d) if d >= 0 else None
            want = np.atleast_1d(value.sum(axis=axes))
            got = out[at : at + want.size].numpy()
            assert np.array_equal(got, want.astype(np.float64)), (d, (i, j), got, want)
            at += want.size


def test_a_pair_asked_in_both_orders() -> None:
    """One layout asks for (0, 1) and (1, 0), another layout of the same sources for (0, 0)."""
    gen = torch.Generator().manual_seed(11)
    sources = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    structure = [(0, ((0, 0),)), (0, ((0, 1), (1, 0)))]
    got = native.layout_products(structure, [sources, sources])
    for value, (dim, pairs) in zip(got, structure, strict=True):
        assert value is not None
        _check_layout(value, sources, dim, pairs)


@st.composite
def product_calls(draw) -> tuple[list[list[torch.Tensor]], list[list[int]], list[list[int]]]:
    """A call of ``products_into``: 1-4 tensors (some the kernel does not read), each with 1-3
    sources, pairs with a sum (j = -1) among them, and dimensions with -1 (the whole tensor)."""
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    sources, pairs, dims = [], [], []
    for _ in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        shape = draw(SHAPES)
        count = draw(st.integers(1, 3))
        members = [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(count)]
        unreadable = draw(st.sampled_from([None, None, None, "transposed", "half"]))
        if unreadable == "transposed" and len(shape) >= 2 and shape[0] > 1 and shape[1] > 1:
            members[0] = members[0].transpose(0, 1).contiguous().transpose(0, 1)
        elif unreadable == "half":
            members = [m.half() for m in members]
        every = [(i, j) for i in range(count) for j in [-1, *range(i, count)]]
        chosen = draw(st.lists(st.sampled_from(every), min_size=1, max_size=5, unique=True))
        ndim = len(shape)
        sources.append(members)
        pairs.append([k for pair in chosen for k in pair])
        dims.append(draw(st.lists(st.integers(-1, ndim - 1), min_size=1, max_size=3, unique=True)))
    return sources, pairs, dims


@settings(max_examples=150, deadline=None)
@given(call=product_calls(), gaps=st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_products_into_match_numpy_and_leave_the_rest(call, gaps) -> None:
    """Every value the kernel writes, at its offset (gaps between tensors), against numpy in
    float64; a sum (j = -1) and the whole tensor (dim -1) included; the tensors it does not read
    are the ones it reports, and every place it does not write keeps its sentinel."""
    sources, pairs, dims = call
    offsets, at = [], 0
    for members, flat, tensor_dims, gap in zip(sources, pairs, dims, gaps, strict=False):
        at += gap
        offsets.append(at)
        n = len(flat) // 2
        at += n * sum(1 if d < 0 else members[0].shape[d] for d in tensor_dims)
    out = torch.full((at + 2,), 12345.0, dtype=torch.float64)
    skipped = native.products_into(sources, pairs, dims, offsets, out)
    readable = [native.eligible(m) for m in sources]
    assert skipped == [t for t, ok in enumerate(readable) if not ok]
    written = torch.zeros(out.shape, dtype=torch.bool)
    for t, (members, flat, tensor_dims) in enumerate(zip(sources, pairs, dims, strict=True)):
        if not readable[t]:
            continue
        listed = tuple(zip(flat[::2], flat[1::2]))
        start = offsets[t]
        for d in tensor_dims:
            groups = 1 if d < 0 else members[0].shape[d]
            block = out[start : start + len(listed) * groups].view(len(listed), groups)
            _check_layout(block, members, None if d < 0 else d, listed, dtype=torch.float64)
            written[start : start + len(listed) * groups] = True
            start += len(listed) * groups
    assert bool((out[~written] == 12345.0).all())


@settings(max_examples=50, deadline=None)
@given(n_values=st.integers(1, 40), n=st.integers(0, 200), size=st.integers(1, 30),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_scatter_matches_numpy(n_values, n, size, seed) -> None:
    """out[dst] += values[src] · coef, repeated destinations accumulating, against numpy."""
    rng = np.random.default_rng(seed)
    values = torch.from_numpy(rng.standard_normal(n_values))
    src = torch.from_numpy(rng.integers(0, n_values, n))
    dst = torch.from_numpy(rng.integers(0, size, n))
    coef = torch.from_numpy(rng.standard_normal(n))
    start = rng.standard_normal(size)
    out = torch.from_numpy(start.copy())
    native.scatter(values, src, dst, coef, out)
    expected = start.copy()
    np.add.at(expected, dst.numpy(), values.numpy()[src.numpy()] * coef.numpy())
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-13, atol=1e-13)


def test_scatter_refuses_an_index_out_of_range() -> None:
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="index out of range"):
        native.scatter(one, torch.tensor([1]), torch.tensor([0]), one, torch.zeros(1).double())


# ---------------------------------------------------------------------------------------------
# 2. layouts the kernel does not read
# ---------------------------------------------------------------------------------------------


def test_ineligible_layouts_are_none_and_the_others_computed() -> None:
    gen = torch.Generator().manual_seed(5)
    good = [torch.randn(6, 5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    good32 = [torch.randn(7, 4, generator=gen) for _ in range(2)]
    transposed = [torch.randn(5, 6, generator=gen).t(), torch.randn(6, 5, generator=gen)]
    assert not transposed[0].is_contiguous()
    half = [torch.randn(4, 3, generator=gen).half() for _ in range(2)]
    mixed_shapes = [torch.randn(4, 3, generator=gen), torch.randn(3, 4, generator=gen)]
    mixed_dtypes = [torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen).double()]
    scalar = [torch.tensor(2.0), torch.tensor(3.0)]
    both = ((0, 0), (0, 1), (1, 1))
    structure = [
        (0, both),
        (1, both),
        (1, both),
        (2, ((1, 0),)),
        (0, both),
        (1, both),
        (0, both),
        (0, both),
        (-1, both),
        (0, both),
    ]
    members = [good, transposed, good32, good, half, mixed_shapes, mixed_dtypes, scalar, good32, []]
    got = native.layout_products(structure, members)
    for index in (1, 4, 5, 6, 7, 9):
        assert got[index] is None, (index, got[index])
    for index in (0, 2, 3, 8):
        value = got[index]
        assert value is not None, index
        _check_layout(value, members[index], *structure[index])


# ---------------------------------------------------------------------------------------------
# 3-5. the tracker
# ---------------------------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return vgg(
        "vgg-tiny", True, in_channels=3, num_classes=5, image_size=16, width_multiplier=0.25
    ).double()


def _train(
    mode: str | None,
    steps: int = STEPS,
    between: Callable[[int], None] | None = None,
    optimizer: Callable | None = None,
) -> tuple[torch.nn.Module, symmech.Tracker | None]:
    """SGD with momentum and weight decay (or ``optimizer(parameters)``) on one fixed float64
    batch; ``between(step)`` runs after each step."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (8,), generator=gen)
    return train_with_reductions(
        _model(), (x, y), mode, steps, between, optimizer=optimizer, residuals=True
    )


def _records(tracker: symmech.Tracker | None) -> list[dict]:
    assert tracker is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the approximate BatchNorm scale families say so
        return tracker.records()


@pytest.fixture(scope="module")
def eager_run() -> tuple[torch.nn.Module, list[dict]]:
    saved = fused.MODE
    try:
        model, tracker = _train("eager")
    finally:
        fused.MODE = saved
    return model, _records(tracker)


def _worst_difference(rows: list[dict], reference: list[dict]) -> float:
    """The largest difference of the law columns, relative to the row's scale."""
    assert len(rows) == len(reference) > 0
    worst = 0.0
    for row, ref in zip(rows, reference, strict=True):
        assert (row["symmetry"], row["layer"], row["group"], row["step"]) == (
            ref["symmetry"],
            ref["layer"],
            ref["group"],
            ref["step"],
        )
        for key in RECORD_KEYS:
            if ref.get(key) is None:
                assert row.get(key) is None, key
                continue
            scale = max(abs(ref[key]), abs(ref["observed"]), 1e-300)
            worst = max(worst, abs(row[key] - ref[key]) / scale)
    return worst


def _adam_reference(members: list[torch.Tensor], made: list[int], scalars: list[float]):
    """Adam's step m'/(√v'/√(1 − β₂ᵏ) + ε) from the sources ``made`` names, by numpy's
    element-wise ops in the sources' dtype (each rounds once, as IEEE asks): m' by torch's lerp
    (the form exact at its nearer end), v' = β₂v + (1 − β₂)g·g, the running maximum under
    amsgrad."""
    g, m, v = (_np(members[i]) for i in made[:3])
    w1, beta2, bc2_sqrt, eps = scalars
    c = g.dtype.type
    m1 = m + c(w1) * (g - m) if w1 < 0.5 else g - (g - m) * c(1.0 - w1)
    v1 = v * c(beta2) + c(1.0 - beta2) * g * g
    if made[3] >= 0:
        v1 = np.maximum(_np(members[made[3]]), v1)
    return torch.from_numpy(m1 / (np.sqrt(v1) / c(bc2_sqrt) + c(eps)))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class KernelSpy:
    """Wraps ``native.products_into``, the kernel's one product call (the families' fused pass
    and the banks read at once both go through it): counts the calls and the (tensor,
    dimension) values it computed and checks each against numpy on the spot (inside the
    tracker's own call, which turns exceptions into notes: a mismatch is kept in ``wrong`` for
    the test to assert)."""

    def __init__(self) -> None:
        self.calls = 0
        self.layouts = 0
        self.sources = 0  # the most sources one sweep read
        self.wrong: list[str] = []
        self.original = native.products_into

    def __call__(self, sources, pairs, dims, offsets, out, made=None, scalars=None):
        skipped = self.original(sources, pairs, dims, offsets, out, made, scalars)
        self.calls += 1
        for t, (members, flat, tensor_dims, at) in enumerate(
            zip(sources, pairs, dims, offsets, strict=True)
        ):
            if t in skipped:
                continue
            members = [m.detach() for m in members]
            if made and made[t]:  # Adam's step made in the sweep: its own reference joins
                members.append(_adam_reference(members, made[t], scalars[t]))
            self.sources = max(self.sources, len(members))
            listed = tuple(zip(flat[::2], flat[1::2]))
            for dim in tensor_dims:
                groups = 1 if dim < 0 else int(members[0].shape[dim])
                value = out[at : at + len(listed) * groups].view(len(listed), groups)
                at += len(listed) * groups
                self.layouts += 1
                try:
                    _check_layout(value, members, None if dim < 0 else dim, listed,
                                  cancelling=True, dtype=torch.float64)  # fmt: skip
                except AssertionError as err:
                    self.wrong.append(f"{tuple(members[0].shape)} dim {dim} {listed}: {err}")
        return skipped


@pytest.fixture
def spy(monkeypatch) -> KernelSpy:
    wrapper = KernelSpy()
    monkeypatch.setattr(native, "products_into", wrapper)
    return wrapper


def _families(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        out.setdefault((row["symmetry"], row["layer"]), []).append(row)
    return out


def _law_misses(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per family: the worst |discrete − observed| and |discrete_residual − observed|, relative
    to the family's largest |observed|."""
    out = {}
    for family, members in _families(rows).items():
        scale = max(max(abs(r["observed"]) for r in members), 1e-300)
        plain = max(abs(r["discrete"] - r["observed"]) for r in members) / scale
        fed = max(abs(r["discrete_residual"] - r["observed"]) for r in members) / scale
        out[family] = (plain, fed)
    return out


def test_native_tracker_equals_eager_and_training_is_untouched(
    restore_mode, spy, eager_run
) -> None:
    plain, _ = _train(None)
    eager_model, eager_rows = eager_run
    native_model, tracker = _train("native")
    assert spy.calls >= STEPS and spy.layouts > 0, (spy.calls, spy.layouts)
    assert not spy.wrong, spy.wrong[:3]
    for a, b, c in zip(plain.parameters(), eager_model.parameters(), native_model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    rows = _records(tracker)
    assert _worst_difference(rows, eager_rows) <= 1e-12

    # the exact discrete law: Q's observed change is the discrete law's, to round-off, in every
    # family. The BatchNorm scale families are approximate (BatchNorm's ε breaks the symmetry,
    # |rₖ| ~ 1e-5 here): their plain discrete law misses Q by the residual's share (≈6e-5 in the
    # eager run too), and discrete_residual, fed the measured rₖ, is their exact law.
    native_misses, eager_misses = _law_misses(rows), _law_misses(eager_rows)
    assert native_misses.keys() == eager_misses.keys()
    approximate = {f for f, members in _families(rows).items()
                   if any(r["status"] != "tracked" for r in members)}  # fmt: skip
    assert {symmetry for symmetry, _ in approximate} == {"scale"}, approximate
    assert {"translation", "rescale", "scale"} <= {symmetry for symmetry, _ in native_misses}
    for family, (miss, miss_fed) in native_misses.items():
        assert miss_fed <= 1e-10, (family, miss_fed)
        if family in approximate:
            assert miss > 1e-10  # the residual's share is visible, as in the eager run
            assert abs(miss - eager_misses[family][0]) <= 1e-10 * max(miss, 1.0), family
        else:
            assert miss <= 1e-10, (family, miss)


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)


def test_adamw_steps_join_the_native_pass_by_name(restore_mode, spy) -> None:
    # AdamW's coming step aₖ is made anew every hook call: read by name ("a"), it joins θ and g
    # in the kernel's sweep (as a storage-keyed kept tensor it never did: the plan never settled)
    plain, _ = _train(None, optimizer=_adamw)
    eager_model, eager_tracker = _train("eager", optimizer=_adamw)
    eager_rows = _records(eager_tracker)
    native_model, tracker = _train("native", optimizer=_adamw)
    assert spy.calls >= STEPS - 2 and spy.layouts > 0, (spy.calls, spy.layouts)
    assert spy.sources == 3  # θ, g and aₖ (AdamW keeps no momentum buffer)
    assert not spy.wrong, spy.wrong[:3]
    for a, b, c in zip(plain.parameters(), eager_model.parameters(), native_model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    rows = _records(tracker)
    assert _worst_difference(rows, eager_rows) <= 1e-12
    # the general law under AdamW, fed the measured rₖ, holds to round-off in both runs
    for family, (_, miss_fed) in _law_misses(rows).items():
        assert miss_fed <= 1e-10, (family, miss_fed)


def test_failed_build_warns_once_and_gives_the_eager_records(
    restore_mode, spy, monkeypatch, eager_run
) -> None:
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_thread", None)
    monkeypatch.setattr(native, "_failed", "OSError: no C++ compiler here")
    monkeypatch.setattr(fused, "_native_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, tracker = _train("native")
    said = [w for w in caught if "could not be built" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert said[0].category is RuntimeWarning
    assert "no C++ compiler here" in str(said[0].message)
    assert spy.calls == 0
    rows, eager_rows = _records(tracker), eager_run[1]
    assert len(rows) == len(eager_rows) > 0
    for row, ref in zip(rows, eager_rows, strict=True):
        for key in RECORD_KEYS:
            assert row[key] == ref[key], (key, row, ref)


def test_auto_builds_in_the_background_then_uses_the_kernel(
    restore_mode, spy, monkeypatch, eager_run
) -> None:
    # the cached build exists (the module fixture); forget it so "auto" has to load it again
    for name in ("_module", "_failed", "_thread"):
        monkeypatch.setattr(native, name, getattr(native, name))
    native.clear()
    monkeypatch.setattr(fused, "AUTO_MIN_ELEMENTS_CPU", 1000)  # the model has 2265 entries
    assert sum(p.numel() for p in _model().parameters()) >= 1000
    started: list[int] = []

    def wait_for_build(step: int) -> None:
        if step == STEPS // 2 - 1:
            thread = native._thread
            assert thread is not None, "auto did not start the build"
            thread.join(timeout=300)
            assert native.ready(), native.failure()
            started.append(spy.calls)

    _, tracker = _train("auto", between=wait_for_build)
    assert started, "the build was never waited for"
    assert spy.calls > started[0] and spy.layouts > 0, (started, spy.calls)
    assert not spy.wrong, spy.wrong[:3]
    assert _worst_difference(_records(tracker), eager_run[1]) <= 1e-12


def test_auto_below_the_threshold_counts_each_tensor_once_and_stays_eager(
    restore_mode, spy, monkeypatch, eager_run
) -> None:
    # between the model's entries and the sum over its layouts (a tensor read along two dims
    # is two layouts): the model is below the threshold, as auto must see it
    entries = sum(p.numel() for p in _model().parameters())
    monkeypatch.setattr(fused, "AUTO_MIN_ELEMENTS_CPU", entries + 1)
    monkeypatch.setattr(native, "_thread", None)
    asked: list[int] = []
    monkeypatch.setattr(
        fused,
        "_large_enough",
        lambda phase, real=fused._large_enough: asked.append(1) or real(phase),
    )
    _, tracker = _train("auto")
    assert tracker is not None
    plan = tracker.cache.plan
    layouts = [lay for phase in plan.phases.values() for lay in phase.layouts.values()]
    assert sum(lay.spec.tensor.numel() for lay in layouts) > entries  # the old count was above
    assert plan.off, "auto kept fusing a model below its threshold"
    assert native._thread is None and spy.calls == 0
    # asked once per hook call at most (it was asked on every product before)
    assert len(asked) <= 2 * STEPS, len(asked)
    assert _worst_difference(_records(tracker), eager_run[1]) <= 1e-12


# ---------------------------------------------------------------------------------------------
# 6. torch.compile: one code object per compiled function
# ---------------------------------------------------------------------------------------------


def test_compiled_layouts_beyond_the_recompile_limit(monkeypatch) -> None:
    import torch._dynamo.config as dynamo_config

    assert hasattr(dynamo_config, "recompile_limit")
    monkeypatch.setattr(dynamo_config, "recompile_limit", 2)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failed", None)
    gen = torch.Generator().manual_seed(7)
    layouts = [((3,), 0), ((2, 3), 1), ((3, 2), 0), ((2, 2, 2), 2)]  # four model layouts
    pairs = ((0, 0), (0, 1), (1, 1))
    for shape, dim in layouts:
        members = [[torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]]
        got = fused.run_compiled(((dim, pairs),), members)
        assert got is not None, (shape, fused._failed)
        assert fused._failed is None
        _check_layout(got[0], members[0], dim, pairs)
    assert len(fused._compiled) == len(layouts)

    # the premise: one code object shared by the layouts' functions (as before the fix) fails
    # past the limit, so the loop above would have caught the old behaviour
    def shared(structure):
        def run(members):
            return fused.all_products(structure, members)

        return torch.compile(run, dynamic=False, fullgraph=True)

    monkeypatch.setattr(fused, "_compile", shared)
    monkeypatch.setattr(fused, "_compiled", {})
    outcomes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run_compiled's own warning about the failure
        for shape, dim in layouts[:3]:
            members = [[torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]]
            outcomes.append(fused.run_compiled(((dim, pairs),), members) is not None)
    assert outcomes == [True, True, False], outcomes
    assert "RecompileLimit" in str(fused._failed), fused._failed


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    shape=st.sampled_from([(9, 7), (4, 3, 2, 2), (5,), (130, 33, 3)]),
    beta1=st.sampled_from([0.9, 0.3]),  # both forms of torch's lerp (weight below and above ½)
    beta2=st.sampled_from([0.5, 0.999]),
    amsgrad=st.booleans(),
    dims=st.sampled_from([[0], [0, 1], [-1, 0]]),
    seed=st.integers(0, 2**16),
)
def test_adam_step_made_in_the_sweep_is_the_one_adam_direction_makes(
    dtype, shape, beta1, beta2, amsgrad, dims, seed
) -> None:
    """The products of θ, g and Adam's step aₖ made inside the sweep (``made``: never stored)
    are bit for bit those of the same sweep reading aₖ made by :func:`native.adam_direction`
    beforehand, and match numpy against a float64 reference of the step."""
    gen = torch.Generator().manual_seed(seed)
    theta, g, m = (torch.randn(shape, generator=gen, dtype=dtype) for _ in range(3))
    v = torch.rand(shape, generator=gen, dtype=dtype)
    vmax = v + torch.rand(shape, generator=gen, dtype=dtype) * 0.5 if amsgrad else None
    sources = [theta, g, m, v] + ([vmax] if amsgrad else [])
    bc2_sqrt = (1 - beta2**3) ** 0.5
    a = native.adam_direction(g, m, v, vmax, (beta1, beta2), bc2_sqrt, 1e-8)
    assert a is not None
    k = len(sources)  # the made step's source number
    pairs = [0, k, k, k, k, -1, 1, k, 0, 1]
    dims = [d for d in dims if d < len(shape)]
    n = len(pairs) // 2 * sum(1 if d < 0 else shape[d] for d in dims)
    made_out, read_out = torch.empty(n, dtype=torch.float64), torch.empty(n, dtype=torch.float64)
    made = [[1, 2, 3, 4 if amsgrad else -1]]
    scalars = [[1.0 - beta1, beta2, bc2_sqrt, 1e-8]]
    assert native.products_into([sources], [pairs], [dims], [0], made_out, made, scalars) == []
    assert native.products_into([sources + [a]], [pairs], [dims], [0], read_out) == []
    assert torch.equal(made_out, read_out)
    step = _adam_reference(sources, made[0], scalars[0])
    assert torch.equal(step, a)  # the kernel's step: IEEE element-wise ops, bit for bit
    reference = sources + [step]
    listed = tuple(zip(pairs[::2], pairs[1::2]))
    at = 0
    for d in dims:
        groups = 1 if d < 0 else shape[d]
        block = made_out[at : at + len(listed) * groups].view(len(listed), groups)
        _check_layout(block, reference, None if d < 0 else d, listed, cancelling=True,
                      dtype=torch.float64)  # fmt: skip
        at += len(listed) * groups


def test_a_made_step_must_name_its_sources() -> None:
    x = [torch.randn(4, 3) for _ in range(4)]
    out = torch.empty(8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="made step reads source 7 of 4"):
        native.products_into([x], [[0, 4]], [[0]], [0], out, [[1, 2, 7, -1]], [[0.1, 0.9, 1, 0]])
    with pytest.raises(RuntimeError, match="pair index 5 out of range"):
        native.products_into([x], [[0, 5]], [[0]], [0], out, [[1, 2, 3, -1]], [[0.1, 0.9, 1, 0]])


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path) -> None:
    """torch waits for a build lock forever; one older than STALE_LOCK_S is removed instead, a
    fresh one (a build running elsewhere) is waited for until it goes."""
    import os
    import threading
    import time

    stale = tmp_path / "stale" / "lock"
    stale.parent.mkdir()
    stale.write_text("")
    old = time.time() - native.STALE_LOCK_S - 5
    os.utime(stale, (old, old))
    native._wait_for_lock(stale)
    assert not stale.exists()

    live = tmp_path / "live" / "lock"
    live.parent.mkdir()
    live.write_text("")
    threading.Timer(0.6, live.unlink).start()
    start = time.perf_counter()
    native._wait_for_lock(live)
    assert not live.exists() and time.perf_counter() - start >= 0.5
    native._wait_for_lock(tmp_path / "none" / "lock")  # no lock: returns at once


def test_a_first_build_started_by_a_short_script_completes_after_it_exits(tmp_path) -> None:
    """auto starts the build in the background; a script that ends at once must neither kill
    it half-way (leaving torch's lock for the next runs to wait on) nor lose it."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-c", "from symmech.runtime import native; native.start()"],
        env=env,
        check=True,
        timeout=120,
    )
    directory = tmp_path / native.NAME
    library, lock = directory / f"{native.NAME}.so", directory / "lock"
    deadline = time.time() + 600
    while time.time() < deadline and (not library.exists() or lock.exists()):
        time.sleep(0.5)
    assert library.exists() and not lock.exists(), sorted(p.name for p in directory.iterdir())
    built = library.stat().st_mtime
    loaded = subprocess.run(
        [sys.executable, "-c", "from symmech.runtime import native; print(native.build())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.stdout.split() == ["True"], loaded.stderr[-2000:]
    assert library.stat().st_mtime == built  # loaded, not built again


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float64]),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    beta1=st.sampled_from([0.0, 0.3, 0.9]),  # 1 − β₁ ≥ 0.5 takes torch's other lerp form
    beta2=st.sampled_from([0.5, 0.999]),
    amsgrad=st.booleans(),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_adam_direction_in_one_pass_is_the_step_adam_takes(
    dtype, shape, beta1, beta2, amsgrad, steps, seed
) -> None:
    """aₖ from the kernel, scaled by η/(1 − β₁ᵏ), against the update torch.optim.Adam then
    applies (the real optimizer, not a replay): equal to round-off of the step's size."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype))
    opt = torch.optim.Adam([p], lr=0.01, betas=(beta1, beta2), eps=1e-8, amsgrad=amsgrad)
    for k in range(1, steps + 1):
        p.grad = torch.randn(shape, generator=gen, dtype=dtype)
        state = opt.state.get(p, {})
        zeros = torch.zeros_like(p)
        m, v = state.get("exp_avg", zeros), state.get("exp_avg_sq", zeros)
        vmax = state.get("max_exp_avg_sq", zeros) if amsgrad else None
        a = native.adam_direction(p.grad, m, v, vmax, (beta1, beta2), (1 - beta2**k) ** 0.5, 1e-8)
        assert a is not None and a.dtype == dtype
        before = p.detach().clone()
        opt.step()
        moved = before - p.detach()
        want = 0.01 / (1 - beta1**k) * a
        eps = torch.finfo(dtype).eps  # θ − θ' rounds at θ's size, the step at its own
        tol = 4 * eps * before.abs().max() + 64 * eps * moved.abs().max()
        assert (moved - want).abs().max() <= tol, k


def test_the_source_is_staged_once_per_content(tmp_path, monkeypatch) -> None:
    """The build compiles a copy of the source kept in the build directory, rewritten only when
    the contents differ: a second checkout of the same source (another path, a newer file)
    leaves the copy and its time untouched, so the build stays current; a changed source
    replaces it."""
    import os

    checkout = tmp_path / "one" / "group_products.cpp"
    other = tmp_path / "two" / "group_products.cpp"
    build = tmp_path / "build"
    for path in (checkout.parent, other.parent, build):
        path.mkdir()
    checkout.write_text("int a;\n")
    other.write_text("int a;\n")
    monkeypatch.setattr(native, "SOURCE", checkout)
    staged = native._staged(build)
    assert staged.parent == build and staged.read_text() == "int a;\n"
    os.utime(staged, (1_000_000, 1_000_000))
    monkeypatch.setattr(native, "SOURCE", other)  # the same source from another checkout
    assert native._staged(build) == staged and staged.stat().st_mtime == 1_000_000
    other.write_text("int b;\n")
    assert native._staged(build).read_text() == "int b;\n"
    assert staged.stat().st_mtime > 1_000_000
    assert list(build.iterdir()) == [staged]  # no partial file left behind


def test_the_kernel_shares_torchs_openmp_runtime() -> None:
    """The kernel is built with OpenMP, so torch's parallel_for splits its rows across torch's
    threads; it must use the OpenMP runtime torch loaded, not a second one (two runtimes would
    each keep a thread pool). Once the kernel is loaded the process maps no ``libgomp.so.1``
    but torch's (other packages' renamed copies, e.g. scikit-learn's, are theirs)."""
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.exists():  # pragma: no cover - Linux only; CI runs on Linux
        pytest.skip("no /proc/self/maps on this platform")
    assert native.build(), native.failure()
    assert "-fopenmp" in native.CFLAGS and "-fopenmp" in native.LDFLAGS
    mapped = {Path(line.split()[-1]) for line in maps.read_text().splitlines() if "gomp" in line}
    plain = {path for path in mapped if path.name.startswith("libgomp.so")}
    torch_lib = Path(torch.__file__).parent / "lib"
    assert plain == {torch_lib / "libgomp.so.1"}, plain
