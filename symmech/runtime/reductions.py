"""Fused per-group reductions shared across families within one hook call.

A conv weight of shape (O, I, kh, kw) is a scale group per output channel (dim 0) and the
outgoing side of a rescale group per input channel (dim 1). Both read the same products, so
the tracker reduces each product once to the (O, I) grid,
``grid[o, i] = Σ_{kh, kw} x[o, i] y[o, i]``, and each family sums the small grid along the
axis it needs. Generated helpers (``_sq``, ``_dot``, ``_sum``) use these objects when given
them, and plain ``(tensor, reduce_dims)`` pairs otherwise.
"""

from __future__ import annotations

import torch

from .binding import BoundSlice


class ReductionCache:
    """Grids computed during one hook call, keyed by the storage they read."""

    def __init__(self) -> None:
        self.grids: dict[tuple, torch.Tensor] = {}

    def clear(self) -> None:
        self.grids.clear()


def _key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()))


class GridSlice:
    """One bound slice of θ, g or b, with cached fused reductions."""

    __slots__ = ("value", "spec", "cache")

    def __init__(self, raw: torch.Tensor, spec: BoundSlice, cache: ReductionCache) -> None:
        self.value = spec.shaped(raw)
        self.spec = spec
        self.cache = cache

    def _grid(self, other: GridSlice | None) -> torch.Tensor:
        x = self.value
        y = x if other is None else other.value
        key = ("prod", _key(x), _key(y))
        grid = self.cache.grids.get(key)
        if grid is None:
            if x.ndim >= 3:
                xf = x.reshape(x.shape[0], x.shape[1], -1)
                grid = (
                    torch.linalg.vector_norm(xf, dim=2).square()
                    if other is None or y is x
                    else torch.linalg.vecdot(xf, y.reshape(xf.shape), dim=2)
                )
            else:
                grid = x * y
            self.cache.grids[key] = grid
        return grid

    def _groups(self, grid: torch.Tensor) -> torch.Tensor:
        dim = self.spec.dim
        if dim is None:
            return grid.sum().reshape(1)
        dims = tuple(i for i in range(grid.ndim) if i != dim)
        return grid.sum(dim=dims) if dims else grid

    def sq(self) -> torch.Tensor:
        return self._groups(self._grid(None))

    def dot(self, other: GridSlice) -> torch.Tensor:
        return self._groups(self._grid(other))

    def sum(self) -> torch.Tensor:
        x = self.value
        key = ("sum", _key(x))
        grid = self.cache.grids.get(key)
        if grid is None:
            grid = x.reshape(x.shape[0], x.shape[1], -1).sum(dim=2) if x.ndim >= 3 else x
            self.cache.grids[key] = grid
        return self._groups(grid)

    def pair(self) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The plain (tensor, reduce_dims) form, for whole-matrix products."""
        return self.value, self.spec.reduce_dims(self.value.ndim)
