"""A generated function read as a linear combination of per-group products: the traced form.

Every data term a generated module computes (Q, rₖ = ⟨ξ, g⟩, the forms ⟨x, J y⟩) is, for a
spec without constants, a fixed linear combination of per-group inner products ⟨x, y⟩ of one
bound slice's θ, g or momentum buffer, and of per-group sums ⟨𝟙, x⟩ (translations). A term
⟨x M, y⟩ with a diagonal constant M (a large attention head's generator eᵢeᵢᵀ) is one too:
Σ_a M_aa times the per-group products of the slices' a-th entries along their last axis.
:func:`trace` runs the function once on stand-in slices that record that combination instead of
computing it, so a bank can later compute the terms of all its families by one gather from the
products of one sweep (:mod:`.program`).

Anything else, a constant off its diagonal, a whole-matrix product, a product of two terms, a
branch on a value, makes the trace fail (:class:`NotTraced`) and the family keeps its own
evaluation: a stand-in's whole-matrix form (``pair``) is NaN, so a term computed from it cannot
pass for zero.

>>> import torch
>>> from symmech.runtime.binding import BoundSlice
>>> w = torch.zeros(3, 4)
>>> th = {"theta": [Stand(BoundSlice(w, 0), "t")]}
>>> gr = {"theta": [Stand(BoundSlice(w, 0), "g")]}
>>> from symmech.runtime.kernels import dot, sq
>>> (0.5 * sq(th["theta"]) - dot(th["theta"], gr["theta"])).terms
{('prod', (..., None, 0), 't', 't'): 0.5, ('prod', (..., None, 0), 'g', 't'): -1.0}
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .binding import BoundSlice
from .kernels import Forms

#: what a term reads: ("prod", slot, role, role) with the roles sorted, ("sum", slot, role), or
#: ("diag", slot, role, role, a): the per-group products of the slices' entries a along their
#: last axis; a slot is (id of the bound tensor, its view, its group dimension)
Atom = tuple
FORM_FIELDS = ("tt", "tg", "gg", "tb", "gb", "bb")


class NotTraced(Exception):
    """A generated function whose value is not a linear combination of per-group products."""


def slot(spec: BoundSlice) -> tuple:
    """What identifies a bound slice's layout: its tensor, view and group dimension."""
    dim = spec.dim
    if dim is not None:
        ndim = spec.shaped(torch.empty(spec.tensor.shape, device="meta")).ndim
        dim = dim % max(ndim, 1)
    return (id(spec.tensor), spec.view, dim)


class Lin:
    """Σ coefficient × atom, per group; the arithmetic a generated function does on its terms."""

    __slots__ = ("terms",)
    ndim = 1  # read by kernels._groups: a per-group value

    def __init__(self, terms: dict[Atom, float] | None = None) -> None:
        self.terms: dict[Atom, float] = terms or {}

    @staticmethod
    def of(value: Any) -> Lin:
        """``value`` as a combination: a Lin, or a tensor that is exactly zero (a vanishing term,
        ``kernels.zeros``); anything else fails the trace."""
        if isinstance(value, Lin):
            return value
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            if bool(torch.isfinite(value).all()) and not bool(value.any()):
                return Lin()
        raise NotTraced(f"a term that is not a sum of products ({type(value).__name__})")

    def _scaled(self, c: Any) -> Lin:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise NotTraced(f"a term multiplied by {type(c).__name__}")
        return Lin({a: v * float(c) for a, v in self.terms.items()})

    def __add__(self, other: Any) -> Lin:
        out = dict(self.terms)
        for a, v in Lin.of(other).terms.items():
            out[a] = out.get(a, 0.0) + v
        return Lin(out)

    __radd__ = __add__

    def __neg__(self) -> Lin:
        return self._scaled(-1.0)

    def __sub__(self, other: Any) -> Lin:
        return self + (-Lin.of(other))

    def __rsub__(self, other: Any) -> Lin:
        return Lin.of(other) + (-self)

    def __mul__(self, c: Any) -> Lin:
        return self._scaled(c)

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> Lin:
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0:
            return self._scaled(1.0 / c)
        raise NotTraced(f"a term divided by {c!r}")

    def __bool__(self) -> bool:
        raise NotTraced("a branch on a term's value")


class Stand:
    """Stands for one bound slice of θ (role "t"), g ("g") or the momentum buffer ("b") while a
    generated function is traced; its reductions return :class:`Lin` terms."""

    __slots__ = ("spec", "role", "slot")

    def __init__(self, spec: BoundSlice, role: str) -> None:
        self.spec = spec
        self.role = role
        self.slot = slot(spec)

    def dot(self, other: Any) -> Lin:
        if type(other) is not Stand or other.slot != self.slot:
            raise NotTraced("a product of two different layouts")
        first, second = sorted((self.role, other.role))
        return Lin({("prod", self.slot, first, second): 1.0})

    def sq(self) -> Lin:
        return self.dot(self)

    def sum(self) -> Lin:
        return Lin({("sum", self.slot, self.role): 1.0})

    def scaled_dot(self, diagonal: torch.Tensor | None, other: Any) -> Lin:
        """⟨x M, y⟩ per group for a constant M whose ``diagonal`` is all it holds (None: M is
        not a diagonal matrix, :func:`.kernels._converted`): Σ_a M_aa ("diag", slot, …, a); any
        other M, or y in another layout, fails the trace."""
        if type(other) is not Stand or other.slot != self.slot:
            raise NotTraced("a product of two different layouts")
        if diagonal is None:
            raise NotTraced("a constant that is not diagonal")
        meta = self.spec.shaped(torch.empty(self.spec.tensor.shape, device="meta"))
        dim = self.spec.dim
        if meta.ndim < 2 or meta.shape[-1] != diagonal.numel():
            raise NotTraced(f"a constant of {diagonal.numel()} rows on a slice {tuple(meta.shape)}")
        if dim is not None and dim % meta.ndim == meta.ndim - 1:
            raise NotTraced("a constant that mixes groups (the group axis last)")
        first, second = sorted((self.role, other.role))
        return Lin(
            {("diag", self.slot, first, second, a): v for a, v in enumerate(diagonal.tolist()) if v}
        )

    def gram(self, *args: Any) -> None:
        return None  # no shared Gram matrix: a constant's term goes through pair() (NaN)

    def pair(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The whole-matrix form: NaN, so only a term that ignores the values (zeros) survives."""
        t = self.spec.tensor
        nan = torch.full((), float("nan"), dtype=t.dtype).expand(t.shape)
        return self.spec.prepare(nan)


def trace(
    module: Any,
    name: str,
    blocks: dict[str, list[BoundSlice]],
    roles: tuple,
    constants: dict[str, torch.Tensor] | None = None,
) -> Any:
    """``module.<name>`` of stand-ins with the given roles (None: an absent argument) and the
    family's ``constants`` as a :class:`Lin`, or a :class:`~.kernels.Forms` of them; raises
    :class:`NotTraced`."""
    if module.CONSTANTS and constants is None:
        raise NotTraced("a spec with constants, and none given")
    args: list[Any] = [
        None if r is None else {b: [Stand(s, r) for s in slices] for b, slices in blocks.items()}
        for r in roles
    ]
    if module.CONSTANTS:
        args.append(constants)
    try:
        value = getattr(module, name)(*args)
    except NotTraced:
        raise
    except Exception as err:  # noqa: BLE001 - any other use of a term: not linear in products
        raise NotTraced(f"{type(err).__name__}: {err}") from err
    if isinstance(value, Forms):
        fields = {f: getattr(value, f) for f in FORM_FIELDS}
        return Forms(**{f: None if v is None else Lin.of(v) for f, v in fields.items()})
    return Lin.of(value)
