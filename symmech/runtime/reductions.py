"""Fused per-group reductions shared across families within one hook call.

A conv weight of shape (O, I, kh, kw) is a scale group per output channel (dim 0) and the
outgoing side of a rescale group per input channel (dim 1). Both read the same product
x ∘ y, so the tracker forms each product once per hook call and each family reduces it along
the axis it needs with long contiguous reductions (row sums for dim 0, a matrix-vector
product with 𝟙 for other dims); squared norms over dim 0 need no product at all. Generated helpers (``_sq``, ``_dot``, ``_sum``) use these objects when given
them, and plain ``(tensor, reduce_dims)`` pairs otherwise.
"""

from __future__ import annotations

import torch

from .binding import BoundSlice


class ReductionCache:
    """Grids computed during one hook call, keyed by the storage they read."""

    def __init__(self) -> None:
        self.grids: dict[tuple, torch.Tensor] = {}
        #: gradients to read instead of ``.grad`` (unscaled ones under a GradScaler), by id
        self.grads: dict[int, torch.Tensor] = {}
        self._alive: list[torch.Tensor] = []  # temporaries, kept so no storage is reused

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Hold a temporary until :meth:`clear` (cache keys are storage addresses)."""
        self._alive.append(t)
        return t

    def clear(self) -> None:
        self.grids.clear()
        self.grads.clear()
        self._alive.clear()


def _key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


class GridSlice:
    """One bound slice of θ, g or b, with cached fused reductions."""

    __slots__ = ("value", "spec", "cache")

    def __init__(self, raw: torch.Tensor, spec: BoundSlice, cache: ReductionCache) -> None:
        if raw.dtype in (torch.float16, torch.bfloat16):  # reduce in float32 at least
            key = ("float32", _key(raw))
            wide = cache.grids.get(key)
            if wide is None:
                wide = cache.grids[key] = raw.float()
            raw = wide
        self.value = spec.shaped(raw)
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

    def _groups(self, p: torch.Tensor) -> torch.Tensor:
        """Sum ``p`` over every dimension but the group dimension, with long contiguous
        reductions: rows for the leading dimension, a matrix-vector product otherwise."""
        dim = self.spec.dim
        if dim is None:
            return p.sum().reshape(1)
        if p.ndim == 1:
            return p
        dim = dim % p.ndim
        if dim == 0:
            return p.reshape(p.shape[0], -1).sum(dim=1)
        shape = p.shape
        lead = 1
        for n in shape[:dim]:
            lead *= n
        groups = shape[dim]
        p3 = p.reshape(lead, groups, -1)
        if lead > 1:
            ones = torch.ones(lead, dtype=p.dtype, device=p.device)
            p2 = (ones @ p3.reshape(lead, -1)).reshape(groups, -1)
        else:
            p2 = p3.reshape(groups, -1)
        return p2.sum(dim=1) if p2.shape[1] > 1 else p2.reshape(groups)

    def sq(self) -> torch.Tensor:
        x = self.value
        if (
            self.spec.dim is not None
            and self.spec.dim % max(x.ndim, 1) == 0
            and x.is_contiguous()
            and x.ndim > 1
        ):
            return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()
        return self._groups(self._product(None))

    def dot(self, other: GridSlice) -> torch.Tensor:
        return self._groups(self._product(other))

    def sum(self) -> torch.Tensor:
        return self._groups(self.value)

    def pair(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The plain (tensor, reduce_dims) form, for whole-matrix products."""
        return self.value, self.spec.reduce_dims(self.value.ndim)
