"""The per-group reductions that generated code calls, and the record it returns.

A generated module's functions take ``th``, ``gr`` and ``bf`` (or ``x`` for any one of them):
dicts from a block name to the bound slices of θₖ (the parameter), gₖ (its ``.grad``) and
bₖ₋₁ (torch's ``momentum_buffer`` before the step), and, only for a spec with constants, ``const``,
constant names to tensors.
Every ``xs`` below is one block's list of slices: :class:`~.reductions.GridSlice` objects while
tracking (fused, cached reductions), or plain ``(tensor, reduce_dims)`` pairs. Each reduction
returns one value per group, shape (G,); ``forms`` returns the six in a :class:`Forms`.

>>> import torch
>>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
>>> sq([(x, (1,))]).tolist(), total([(x, (0,))]).tolist()
([5.0, 25.0], [4.0, 6.0])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Pair = tuple[torch.Tensor, tuple[int, ...]]


class NotBatched(Exception):
    """A term that a batched evaluation (:mod:`.batched`) cannot stack: evaluate per family."""


class _Stacked:
    """How many constants a batched evaluation stacks along a leading axis (0: not batched)."""

    count = 0


@contextmanager
def stacked(count: int) -> Iterator[None]:
    """Evaluate generated functions with constants of shape (F, a, b) for F families at once:
    a term ⟨x M, y⟩ gives (F, G), a term without a constant (G,); any other use of a stacked
    constant raises :class:`NotBatched`."""
    _Stacked.count = count
    try:
        yield
    finally:
        _Stacked.count = 0


def _no_stack() -> None:
    if _Stacked.count:
        raise NotBatched("a term that needs the constant multiplied out")


@dataclass(slots=True)
class Forms:
    """B_xy = ⟨x, J y⟩ per group for x, y ∈ {θₖ, gₖ, bₖ₋₁}; the b-terms are None without a buffer."""

    tt: torch.Tensor
    tg: torch.Tensor
    gg: torch.Tensor
    tb: torch.Tensor | None = None
    gb: torch.Tensor | None = None
    bb: torch.Tensor | None = None


def _pair(x) -> Pair:
    return x.pair() if hasattr(x, "pair") else x


_CONVERTED: dict[tuple, tuple[torch.Tensor, int, torch.Tensor | None]] = {}


def _converted(m: torch.Tensor, dtype: torch.dtype, diagonal: bool) -> torch.Tensor | None:
    """A constant matrix (or stack of them) converted to ``dtype`` once (a family's constants
    do not change): flattened, (a·b,) or (F, a·b); or with ``diagonal`` its diagonal, (a,) or
    (F, a), and None when some entry off the diagonal is not zero."""
    key = (id(m), dtype, diagonal)
    hit = _CONVERTED.get(key)
    if hit is not None and hit[0] is m and hit[1] == m._version:
        return hit[2]
    if len(_CONVERTED) >= 4096:
        _CONVERTED.clear()
    m_ = m.detach()
    if not diagonal:
        out: torch.Tensor | None = m_.flatten(-2).to(dtype)
    else:
        d = m_.diagonal(dim1=-2, dim2=-1)
        square = m_.shape[-1] == m_.shape[-2]
        out = d.to(dtype) if square and torch.equal(torch.diag_embed(d), m_) else None
    _CONVERTED[key] = (m, m._version, out)
    return out


def _flat(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m`` flattened in ``dtype``, (a·b,), or (F, a·b) for stacked constants."""
    out = _converted(m, dtype, diagonal=False)
    assert out is not None
    return out


class Scaled:
    """A tracked slice right-multiplied by a constant matrix, x M, formed only when needed:
    ⟨x M, y⟩ per group is Σ_ab M_ab Gram_ab with the slices' per-group Gram matrix, which the
    hook call computes once for every family reading x and y (attention heads: one per
    generator of the head's symmetry)."""

    __slots__ = ("base", "matrix", "_formed")

    def __init__(self, base, matrix: torch.Tensor) -> None:
        self.base = base
        self.matrix = matrix
        self._formed: Pair | None = None

    def pair(self) -> Pair:
        _no_stack()
        if self._formed is None:
            x, d = self.base.pair()
            self._formed = (x @ self.matrix.to(x.dtype), d)
        return self._formed

    def dot(self, other) -> torch.Tensor:
        m = self.matrix
        if hasattr(self.base, "scaled_dot"):  # a stand-in being traced (:mod:`.traced`)
            diag = _converted(m, torch.float64, diagonal=True) if m.ndim == 2 else None
            return self.base.scaled_dot(diag, other)
        stacked_ok = m.ndim == 2 or (m.ndim == 3 and _Stacked.count)
        if type(other) is not Scaled and hasattr(other, "gram") and stacked_ok:
            # diagonal constants (a large head's generators eᵢeᵢᵀ): only the Gram's diagonal
            diag = _converted(m, other.value.dtype, diagonal=True)
            if diag is not None:
                gram = self.base.gram(other, m.shape[-1], m.shape[-1], diagonal=True)
                if gram is not None:  # (G, a): Σ_a M_aa Gram_aa per group (and family)
                    return torch.mv(gram, diag) if m.ndim == 2 else torch.mm(diag, gram.T)
        if type(other) is not Scaled and hasattr(other, "gram") and m.ndim == 2:
            gram = self.base.gram(other, m.shape[0], m.shape[1])
            if gram is not None:
                return torch.mv(gram.reshape(gram.shape[0], -1), _flat(m, gram.dtype))
        if type(other) is not Scaled and hasattr(other, "gram") and m.ndim == 3 and _Stacked.count:
            gram = self.base.gram(other, m.shape[1], m.shape[2])
            if gram is not None:  # every stacked constant at once: (F, G)
                return torch.mm(_flat(m, gram.dtype), gram.reshape(gram.shape[0], -1).T)
        return _plain_dot(*self.pair(), _pair(other)[0])

    def sq(self) -> torch.Tensor:
        return _plain_sq(*self.pair())

    def sum(self) -> torch.Tensor:
        return _plain_sum(*self.pair())


def _groups(value: torch.Tensor) -> torch.Tensor:
    if value.ndim == 1 or (value.ndim == 2 and _Stacked.count):  # (F, G) when stacked
        return value
    return value.reshape(-1)


def _total(parts) -> torch.Tensor:
    """The sum of per-slice values, without ``sum``'s extra ``0 + x`` (one op fewer per call)."""
    it = iter(parts)
    out = next(it)
    for part in it:
        out = out + part
    return out


def sq(xs) -> torch.Tensor:
    """⟨x, x⟩ per group: one fused reduction per slice."""
    return _total(_groups(x.sq() if hasattr(x, "pair") else _plain_sq(*x)) for x in xs)


def _dot(x, y) -> torch.Tensor:
    if type(y) is Scaled and type(x) is not Scaled:
        x, y = y, x  # ⟨x, y M⟩ = ⟨y M, x⟩
    if hasattr(x, "pair") and hasattr(y, "pair"):
        return x.dot(y)
    return _plain_dot(*_pair(x), _pair(y)[0])


def dot(xs, ys) -> torch.Tensor:
    """⟨x, y⟩ per group, slice by slice."""
    return _total(_groups(_dot(x, y)) for x, y in zip(xs, ys))


def total(xs) -> torch.Tensor:
    """⟨𝟙, x⟩ per group: the sum of the entries."""
    return _total(_groups(x.sum() if hasattr(x, "pair") else _plain_sum(*x)) for x in xs)


def mm(xs, m: torch.Tensor) -> list:
    """Right-multiply every (whole-matrix) slice by a constant matrix (tracked slices: lazily,
    see :class:`Scaled`)."""
    out: list = []
    for x in xs:
        if hasattr(x, "gram"):
            out.append(Scaled(x, m))
        else:
            _no_stack()
            p, d = _pair(x)
            out.append((p @ m.to(p.dtype), d))
    return out


def tr(xs) -> list[Pair]:
    """Transpose every (whole-matrix) slice."""
    _no_stack()
    return [(x.mT, d) for x, d in map(_pair, xs)]


def zeros(xs) -> torch.Tensor:
    """Per-group zeros shaped like a reduction of the first slice (a term that vanishes)."""
    x, d = _pair(xs[0])
    return _groups(torch.zeros_like(torch.sum(x, dim=d) if d else x))


def _plain_sq(x: torch.Tensor, d: tuple[int, ...]) -> torch.Tensor:
    _no_stack()
    return torch.linalg.vector_norm(x, dim=d) ** 2 if d else x * x


def _plain_dot(x: torch.Tensor, d: tuple[int, ...], y: torch.Tensor) -> torch.Tensor:
    _no_stack()
    return torch.sum(x * y, dim=d) if d else x * y


def _plain_sum(x: torch.Tensor, d: tuple[int, ...]) -> torch.Tensor:
    _no_stack()
    return torch.sum(x, dim=d) if d else x
