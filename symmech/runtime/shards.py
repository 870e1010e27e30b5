"""Where this rank's entries of a bound slice lie, for parameters sharded by FSDP2.

``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor sharded on dim 0
over a 1-D device mesh: rank r holds rows ``torch.chunk(range(N), world)[r]`` (the last ranks
may hold fewer rows, or none). A bound slice may view the parameter first (``"T"`` or a reshape),
so the rows a rank holds become a range along some axis of the viewed tensor; a reshape that
cuts through a viewed row is padded with zeros to whole rows. Every per-group reduction of the
generated code is a sum over entries, so each rank reduces its own entries and the sum over
ranks is the global value (see :mod:`.distributed`).

>>> row_ranges(5, 2)
[(0, 3), (3, 5)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from symmech.errors import BindingError, explain

if TYPE_CHECKING:
    from .binding import BoundSlice


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None where torch has no distributed support."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter, gradient or buffer under FSDP2)."""
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def probe(t: torch.Tensor) -> torch.Tensor:
    """A tensor with ``t``'s global shape that views and reshapes without communication."""
    if is_sharded(t):
        return torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
    return t.detach()


def row_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each rank for a dim-0 shard of ``n`` rows (``torch.chunk``)."""
    size = -(-n // world) if n else 0
    return [(min(r * size, n), min((r + 1) * size, n)) for r in range(world)]


def shard_rows(t: torch.Tensor) -> tuple[int, int, int]:
    """(start, stop, world) of this rank's rows of a DTensor sharded on dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    if t.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise BindingError(
            explain(
                f"track(...) on a DTensor of shape {tuple(t.shape)}",
                f"placements {placements} on a {t.device_mesh.ndim}-D mesh",
                "symmech follows parameters sharded on dim 0 over a 1-D mesh (fully_shard's "
                "default); replicated or 2-D layouts (HSDP) would be counted once per replica",
            )
        )
    world = t.device_mesh.size()
    rank = t.device_mesh.get_local_rank()
    start, stop = row_ranges(int(t.shape[0]), world)[rank]
    return start, stop, world


@dataclass(frozen=True)
class LocalPart:
    """This rank's entries of a shaped slice: ``value`` covers ``[offset, offset + n)`` along
    ``axis`` of the global shaped tensor of shape ``shape`` (zeros where a reshape cut a row)."""

    value: torch.Tensor
    axis: int
    offset: int
    shape: tuple[int, ...]

    def embed(self) -> torch.Tensor:
        """The global shaped tensor with this rank's entries and zeros elsewhere."""
        full = self.value.new_zeros(self.shape)
        full.narrow(self.axis, self.offset, self.value.shape[self.axis]).copy_(self.value)
        return full

    def place(self, local_groups: torch.Tensor, n_groups: int) -> torch.Tensor:
        """Per-group values of the local groups along ``axis``, zero for every other group."""
        out = local_groups.new_zeros(n_groups)
        out.narrow(0, self.offset, local_groups.shape[0]).copy_(local_groups)
        return out


def global_shape(spec: BoundSlice) -> tuple[int, ...]:
    """The shape of the bound slice of the whole (unsharded) parameter."""
    return tuple(spec.shaped(probe(spec.tensor)).shape)


def local_part(raw: torch.Tensor, spec: BoundSlice) -> LocalPart:
    """This rank's entries of ``spec.shaped(raw)`` for a DTensor ``raw`` sharded on dim 0."""
    start, stop, _ = shard_rows(raw)
    local = raw.to_local()
    shape = tuple(spec.shaped(torch.empty(tuple(raw.shape), device="meta")).shape)
    if spec.view is None:
        return LocalPart(local, 0, start, shape)
    if spec.view == "T":  # mT swaps the last two axes: rows become columns of a matrix
        axis = local.ndim - 1 if local.ndim == 2 else 0
        return LocalPart(local.mT, axis, start, shape)
    per_row = math.prod(raw.shape[1:])  # entries per parameter row
    per_view_row = math.prod(shape[1:])  # entries per row of the viewed tensor
    first, last = start * per_row, stop * per_row  # this rank's flat range
    lead = first // per_view_row if per_view_row else 0
    pre = first - lead * per_view_row
    rows = -(-(last - lead * per_view_row) // per_view_row) if per_view_row else 0
    post = rows * per_view_row - (last - lead * per_view_row)
    flat = local.reshape(-1)
    if pre or post:
        flat = torch.cat([flat.new_zeros(pre), flat, flat.new_zeros(post)])
    return LocalPart(flat.reshape(rows, *shape[1:]), 0, lead, shape)
