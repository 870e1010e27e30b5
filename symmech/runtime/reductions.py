"""Fused per-group reductions shared across families within one hook call.

A conv weight of shape (O, I, kh, kw) is a scale group per output channel (dim 0) and the
outgoing side of a rescale group per input channel (dim 1). Both read the same product
x ∘ y, so the tracker forms each product once per hook call and each family reduces it along
the axis it needs with long contiguous reductions (row sums for dim 0, a matrix-vector
product with 𝟙 for other dims); squared norms over dim 0 need no product at all. Generated helpers (``_sq``, ``_dot``, ``_sum``) use these objects when given
them, and plain ``(tensor, reduce_dims)`` pairs otherwise.

Products among θₖ and gₖ can come from one compiled pass over every layout of the hook call
(:mod:`.fused`, learned from the calls before); the rest are reduced here as asked.

Under torch.distributed a slice reduces only what this rank holds (:mod:`.distributed`): the
local shard of an FSDP2 DTensor (:mod:`.shards`), a group on this rank only getting its value
here and zero elsewhere, or nothing at all for a tensor whose optimizer state lives on another
rank (ZeRO, ``ReductionCache.absent``); the sum over ranks is the global value.
"""

from __future__ import annotations

from typing import Any

import torch

from . import fused
from .binding import BoundSlice
from .coming_step import Direction
from .fused import Plan
from .shards import LocalPart, is_sharded, local_part


class ReductionCache:
    """Grids computed during one hook call, keyed by the storage they read."""

    def __init__(self) -> None:
        self.grids: dict[tuple, torch.Tensor] = {}
        #: gradients to read instead of ``.grad`` (unscaled ones under a GradScaler), by id
        self.grads: dict[int, torch.Tensor] = {}
        #: each parameter's coming step under an adaptive optimizer, by id, for this hook call
        #: (read as role "a": its aₖ, made then if it was left pending)
        self.steps: dict[int, Direction] = {}
        #: ids of bound tensors whose terms another rank computes (ZeRO: not owned here)
        self.absent: set[int] = set()
        self._alive: list[torch.Tensor] = []  # temporaries, kept so no storage is reused
        #: the products among θ and g asked for per layout, computed in one pass (:mod:`.fused`)
        self.plan = Plan()
        #: slices of parameters and optimizer buffers kept across hook calls, one per bound
        #: slice and role (views follow in-place updates)
        self._slices: dict[tuple[int, str], tuple[torch.Tensor, tuple, GridSlice]] = {}
        #: families that differ only in their constants, by what they share (:mod:`.batched`)
        self.batches: dict[tuple, Any] = {}
        #: every tracked family's bound tensors by param group index (kept across hook calls):
        #: their coming steps are computed together (:func:`~.directions.directions_of`)
        self.bound: dict[int, dict[int, torch.Tensor]] = {}

    def slice(self, raw: torch.Tensor, spec: BoundSlice, role: str | None = None) -> GridSlice:
        """``raw`` of ``spec``'s tensor as a :class:`GridSlice`; with a ``role`` ("theta",
        "buffer": tensors that live across steps) the same object as in the last hook call while
        ``raw`` is the same plain tensor at the same storage. Gradients and temporaries get no
        role: keeping them would hold memory that ``zero_grad(set_to_none=True)`` frees."""
        if role is None:  # for this hook call only, shared by every slice of the same content
            key = ("slice", id(spec.tensor), spec.dim, spec.view, _key(raw), raw.dtype)
            # a gradient or temporary needs no detach (one alias op fewer per slice and call)
            plain = raw.detach() if raw.requires_grad else raw
            try:
                found = self.grids.get(key)
            except TypeError:  # a view that cannot be hashed
                return GridSlice(plain, spec, self)
            if found is None:
                found = self.grids[key] = GridSlice(plain, spec, self)
            return found
        key = (id(spec), role)
        where = (raw.data_ptr(), raw.shape, raw.stride(), raw.dtype, id(spec.tensor) in self.absent)
        hit = self._slices.get(key)
        if hit is not None and hit[0] is raw and hit[1] == where and hit[2].spec is spec:
            return hit[2]
        made = GridSlice(raw.detach(), spec, self)
        plain = type(raw) in (torch.Tensor, torch.nn.Parameter) and made.part is None
        if plain and made.value.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
            self._slices[key] = (raw, where, made)
        else:
            self._slices.pop(key, None)
        return made

    def read(self, role: str, p: torch.Tensor) -> torch.Tensor | None:
        """θ ("t"), its gradient ("g", unscaled when registered) or its coming step aₖ ("a",
        :attr:`steps`), as the fused pass reads them (None: not there)."""
        if role == "t":
            return p
        if role == "g":
            return self.grads.get(id(p), p.grad)
        if role == "a":
            found = self.steps.get(id(p))
            return None if found is None else found.a
        return None

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Hold a temporary until :meth:`clear` (cache keys are storage addresses)."""
        self._alive.append(t)
        return t

    def clear(self) -> None:
        self.plan.end_call()
        self.grids.clear()
        self.grads.clear()
        self.steps.clear()
        self._alive.clear()


def _key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


class GridSlice:
    """One bound slice of θ, g or b, with cached fused reductions."""

    __slots__ = ("value", "spec", "cache", "part", "absent")

    def __init__(self, raw: torch.Tensor, spec: BoundSlice, cache: ReductionCache) -> None:
        #: this rank's share of a sharded slice (None: the whole slice is here)
        self.part: LocalPart | None = None
        #: another rank computes this slice's terms (every reduction is zero here)
        self.absent = id(spec.tensor) in cache.absent
        if type(raw) not in (torch.Tensor, torch.nn.Parameter) and is_sharded(raw):
            self.part = local_part(raw, spec)
            raw = cache.keep(self.part.value)
        if raw.dtype in (torch.float16, torch.bfloat16):  # reduce in float32 at least
            key = ("float32", _key(raw))
            wide = cache.grids.get(key)
            if wide is None:
                wide = cache.grids[key] = raw.float()
            raw = wide
        self.value = raw if self.part is not None else spec.shaped(raw)
        self.spec = spec
        self.cache = cache

    def _product(self, other: GridSlice | None) -> torch.Tensor:
        """x ∘ y (or x ∘ x), computed once per hook call and shared by every family."""
        x = self.value
        y = x if other is None else other.value
        key = ("prod", _key(x), _key(y))
        prod = self.cache.grids.get(key)
        if prod is None:
            prod = x.square() if y is x else x * y
            self.cache.grids[key] = prod
        return prod

    def _share(self, groups: torch.Tensor) -> torch.Tensor:
        """This rank's per-group values: local groups of a sharded slice placed among all."""
        part = self.part
        if part is None or self.spec.dim is None:
            return groups
        if self.spec.dim % len(part.shape) != part.axis:  # every group, partial sums
            return groups
        return part.place(groups, self.spec.n_groups)

    def _none(self) -> torch.Tensor:
        return self.value.new_zeros(self.spec.n_groups)

    def _groups(self, p: torch.Tensor) -> torch.Tensor:
        """Sum ``p`` over every dimension but the group dimension (:func:`.fused.group_sums`)."""
        return fused.group_sums(p, self.spec.dim)

    def _fused(self, other: GridSlice) -> torch.Tensor | None:
        """⟨x, y⟩ per group from the hook call's fused pass when x and y are θ or g of the same
        layout (None: reduce it here)."""
        spec, o = self.spec, other.spec
        if not self.cache.plan.fusing:
            return None
        if self.part is not None or other.part is not None or spec.dim is None:
            return None
        if o is not spec and (
            o.tensor is not spec.tensor or o.dim != spec.dim or o.view != spec.view
        ):
            return None
        p = spec.tensor
        if p.dtype not in (torch.float32, torch.float64) or self.value.dtype != p.dtype:
            return None
        grad = self.cache.grads.get(id(p), p.grad)
        coming = self.cache.steps.get(id(p))
        step = coming.a if coming is not None and coming.made else None  # read: made by now
        roles: list[str | torch.Tensor] = []
        for v in (self.value, other.value):
            if v.data_ptr() == p.data_ptr():
                roles.append("t")
            elif grad is not None and v.data_ptr() == grad.data_ptr():
                roles.append("g")
            elif step is not None and v.data_ptr() == step.data_ptr():
                roles.append("a")
            else:
                roles.append(v)
        layout = (id(p), spec.view, spec.dim % max(self.value.ndim, 1))
        return self.cache.plan.lookup(layout, spec, (roles[0], roles[1]), self.cache.read)

    def gram(
        self, other: GridSlice, rows: int, cols: int, diagonal: bool = False
    ) -> torch.Tensor | None:
        """Per group, Σ over every axis but the group axis and the last of x[..., a] y[..., b]:
        (G, a, b), shared by every family that reads ⟨x M, y⟩ = Σ_ab M_ab Gram_ab for its own
        constant M (a = ``rows``, b = ``cols``); with ``diagonal`` only the entries a = b, (G, a)
        (diagonal constants M need no more). None where it does not apply (a sharded or absent
        slice, the group axis last, other shapes): the caller multiplies by M itself."""
        if self.absent or other.absent or self.part is not None or other.part is not None:
            return None
        x, y = self.value, other.value
        if x.ndim < 2 or x.shape[:-1] != y.shape[:-1] or x.shape[-1] != rows:
            return None
        if y.shape[-1] != cols or x.dtype != y.dtype:
            return None
        dim = self.spec.dim
        if dim is not None and dim % x.ndim == x.ndim - 1:
            return None
        if other.spec.dim != dim:
            return None
        if diagonal and rows != cols:
            return None
        key = ("gram", _key(x), _key(y), dim, diagonal)
        out = self.cache.grids.get(key)
        if out is None:
            if dim is not None:
                x, y = x.movedim(dim % x.ndim, 0), y.movedim(dim % y.ndim, 0)
            else:
                x, y = x.unsqueeze(0), y.unsqueeze(0)
            x = x.reshape(x.shape[0], -1, rows)
            y = y.reshape(y.shape[0], -1, cols)
            out = (x * y).sum(1) if diagonal else torch.bmm(x.mT, y)
            self.cache.grids[key] = out
        return out

    def _reduced_key(self, other: GridSlice | None) -> tuple | None:
        """What identifies ⟨x, y⟩ per group within a hook call (the same tensors, views and
        group dimension: asked for by several families, reduced once); None when sharded."""
        if self.part is not None or (other is not None and other.part is not None):
            return None
        x = self.value
        dim = None if self.spec.dim is None else self.spec.dim % max(x.ndim, 1)
        kx = (_key(x), x.dtype)
        ky = kx if other is None else (_key(other.value), other.value.dtype)
        return ("reduced", *sorted((kx, ky)), dim)

    def _kept(self, key: tuple | None, value: torch.Tensor) -> torch.Tensor:
        if key is not None:
            self.cache.grids[key] = value
        return value

    def sq(self) -> torch.Tensor:
        if self.absent:
            return self._none()
        fused = self._fused(self)
        if fused is not None:
            return fused
        key = self._reduced_key(None)
        known = None if key is None else self.cache.grids.get(key)
        if known is not None:
            return known
        x = self.value
        if (
            self.spec.dim is not None
            and self.spec.dim % max(x.ndim, 1) == 0
            and x.is_contiguous()
            and x.ndim > 1
        ):
            rows = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()
            return self._kept(key, self._share(rows))
        return self._kept(key, self._share(self._groups(self._product(None))))

    def dot(self, other: GridSlice) -> torch.Tensor:
        if self.absent or other.absent:
            return self._none()
        fused = self._fused(other)
        if fused is not None:
            return fused
        key = self._reduced_key(other)
        known = None if key is None else self.cache.grids.get(key)
        if known is not None:
            return known
        return self._kept(key, self._share(self._groups(self._product(other))))

    def sum(self) -> torch.Tensor:
        if self.absent:
            return self._none()
        return self._share(self._groups(self.value))

    def pair(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The plain (tensor, reduce_dims) form, for whole-matrix products.

        A sharded slice gives its local entries where that keeps every group and every row of
        the last axis whole (a constant matrix multiplies that axis), else the global shape
        with zeros outside this rank's entries; an absent slice gives zeros (no memory).
        """
        x, part = self.value, self.part
        if self.absent:
            x = x.new_zeros(()).expand(x.shape)
        elif part is not None:
            last = part.axis == len(part.shape) - 1
            grouped = self.spec.dim is not None and self.spec.dim % len(part.shape) == part.axis
            if last or grouped:
                x = self.cache.keep(part.embed())
        return x, self.spec.reduce_dims(x.ndim)
