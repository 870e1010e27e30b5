"""The storage of :class:`~symmech.runtime.history.History`: frames of float64 rows on the device.

A *frame* holds the families written together under one layout (the same families, group counts,
residuals, laws mappings and shown laws; one frame per device), one wide row per logged step::

    [observed of every family | rₖ of those that have one | pieces of the laws mappings]

A laws mapping (one per bank, shared by its families) holds one vector per law over the bank's
groups; a piece is one such vector over the span of groups whose rows show that law (the whole
vector, usually). A family's part of it is taken on the host, when rows are read. Writing a row
is two concatenations on the device, whatever the number of families; a frame's first row, or one
a concatenation cannot write, goes family by family with the copies of a row per family, so that
a family whose values do not fit its columns fails alone.

The host metadata of a row: its log index, then per family the step, t (NaN: None) and the
settings code (-1: the family has no row there, e.g. a provisional row replaced under
``max_history``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from symmech.laws.names import ANATOMY, PREDICTIONS, ROTATION, ROTATION_PARTS

#: What a laws mapping holds per group and logged step.
STORED = (*PREDICTIONS, *ANATOMY, *ROTATION, *ROTATION_PARTS)
FIELDS = 3  # metadata per family and row: step, t, code


def code_column(slot: int) -> int:
    """The metadata column of a family's settings code (-1: no row)."""
    return 1 + FIELDS * slot + 2


class Chunk:
    """Up to ``capacity`` rows of one frame: data on the device, metadata on the host."""

    def __init__(self, capacity: int, width: int, meta_width: int, device: torch.device) -> None:
        self.data: torch.Tensor | None = torch.empty(
            (capacity, width), dtype=torch.float64, device=device
        )
        self.meta = np.empty((capacity, meta_width), dtype=np.float64)
        self.meta_width = meta_width
        self.capacity = capacity
        self.n = 0  # rows written
        self.entries = 0  # rows of families kept (a row holds one per family at most)
        self.host: torch.Tensor | None = None  # the host copy of a full device chunk
        self.event: Any = None  # the copy's CUDA event
        self.path: Path | None = None  # where a spilled chunk lives

    @property
    def full(self) -> bool:
        return self.n == self.capacity

    def offload(self) -> None:
        """Queue the copy of a full chunk to (pinned) host memory; no wait."""
        assert self.data is not None
        if self.data.device.type == "cpu":
            self.host, self.data = self.data, None
            return
        host = torch.empty(self.data.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(self.data, non_blocking=True)
        if self.data.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()
        self.host, self.data = host, None

    def spill(self, path: Path) -> None:
        """Write the offloaded chunk with its metadata to ``path`` and free it."""
        meta, data = self.arrays()
        np.save(path, np.concatenate([meta, data], axis=1))
        self.path, self.host = path, None
        self.meta = np.empty((0, self.meta_width))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(metadata, data) of the written rows as host arrays (waits for a pending copy)."""
        if self.path is not None:
            both = np.load(self.path)
            return both[:, : self.meta_width], both[:, self.meta_width :]
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.host is not None:
            return self.meta[: self.n], self.host[: self.n].numpy()
        assert self.data is not None
        return self.meta[: self.n], self.data[: self.n].cpu().numpy()


class Series:
    """One family (one position in the tracker's list of families): its name and groups."""

    def __init__(
        self, position: int, symmetry: str, layer: str, groups: int, labels: tuple[str, ...] = ()
    ) -> None:
        self.position = position
        self.symmetry = symmetry
        self.layer = layer
        self.groups = groups
        self.labels = labels  # as given; read through names()
        #: its latest row (chunk, row, code column) and that row's log index: kept under
        #: max_history only, where a latest row off the stride is replaced by the next
        self.tail: tuple[Chunk, int, int] | None = None
        self.tail_index = 0

    def drop_provisional(self, stride: int) -> None:
        """Drop the latest row if it is off the stride (the row the call now writes replaces
        it); a row no family keeps any more goes."""
        if self.tail is None or self.tail_index % stride == 0:
            return
        chunk, row, column = self.tail
        self.tail = None
        if chunk.meta[row, column] < 0:
            return
        chunk.meta[row, column] = -1
        chunk.entries -= 1
        if row == chunk.n - 1 and (chunk.meta[row, code_column(0) :: FIELDS] < 0).all():
            chunk.n -= 1

    def names(self) -> tuple[str, ...]:
        """The group names (the group indices where none were given)."""
        if len(self.labels) == self.groups:
            return self.labels
        return tuple(str(g) for g in range(self.groups))


@dataclass
class Slot:
    """A family's columns in a frame's rows."""

    series: Series
    observed: int  # first column of observed Q
    residual: int | None  # first column of rₖ (None: not stored)
    block: int | None  # the laws mapping it reads (an index into the frame's mappings)
    segment: Any  # its groups in the mapping's vectors (a slice)
    shows: tuple[bool, ...]  # per STORED law: whether its rows show it (else not stored)


class Call:
    """What one ``History.add`` takes from its snapshots, for the families it writes (in
    order): their layout, values, laws mappings and the row's metadata."""

    __slots__ = ("index", "written", "shape", "observed", "residual", "mappings", "vectors", "meta")

    def __init__(self, index: int) -> None:
        self.index = index
        self.written: list[Any] = []  # their snapshots
        #: per family: position, symmetry, layer, value sizes, mapping, segment, shown laws
        self.shape: list[tuple] = []
        self.observed: list[torch.Tensor] = []
        self.residual: list[torch.Tensor] = []  # of the families that have one
        self.mappings: list[Mapping[str, torch.Tensor]] = []  # distinct laws, by first use
        self.vectors: list[torch.Tensor] = []  # every mapping's STORED vectors, in turn
        self.meta: list[float] = [index]  # then per family: step, t (NaN: None), code

    def key(self) -> tuple:
        """What the layout of the row depends on (equal keys: the same columns; segments are
        slices, compared by value)."""
        return tuple(self.shape), tuple([v.numel() for v in self.vectors])


def hashable(key: tuple) -> tuple:
    """A layout key with its segments as tuples (slices are dict keys from Python 3.12 only)."""
    shape, sizes = key
    return tuple((*f[:6], _slice(f[6]), *f[7:]) for f in shape), sizes


def _slice(segment: Any) -> Any:
    if isinstance(segment, slice):
        return ("slice", segment.start, segment.stop, segment.step)
    return segment


def _groups(segment: Any, length: int) -> np.ndarray:
    """The indices of a family's groups in its mapping's vectors."""
    try:
        return np.arange(length)[segment].reshape(-1)
    except (IndexError, TypeError, ValueError):  # the family's write fails: it has no rows
        return np.arange(length)


class Frame:
    """The rows of the families written together under one layout, on one device.

    ``families``: per family its series, whether it has rₖ, its mapping (an index into
    ``mappings``, the call's mappings this frame holds; None: no laws), segment and shown laws.
    ``lengths``: each mapping's vector length. ``members``: the call's families it holds, by
    their index among those written (None: all).
    """

    def __init__(
        self,
        number: int,
        families: Sequence[tuple[Series, bool, int | None, Any, tuple[bool, ...]]],
        mappings: list[int],
        lengths: list[int],
        device: torch.device,
        members: list[int] | None = None,
    ) -> None:
        self.number = number
        self.device = device
        self.members = members
        self.mappings = mappings
        self.lengths = lengths
        self.slots: list[Slot] = []
        at, residual = 0, sum(f[0].groups for f in families)
        for series, has_residual, block, segment, shows in families:
            self.slots.append(
                Slot(series, at, residual if has_residual else None, block, segment, shows)
            )
            at += series.groups
            residual += series.groups if has_residual else 0
        self.split = residual  # where the laws start
        #: per piece: its mapping, law, first group, end and first column
        self.pieces: list[tuple[int, int, int, int, int]] = []
        self.places: dict[tuple[int, int], tuple[int, int]] = {}  # -> (column, first group)
        for (block, law), (lo, hi) in sorted(self._spans().items()):
            self.places[block, law] = (residual, lo)
            self.pieces.append((block, law, lo, hi, residual))
            residual += hi - lo
        self.width = residual
        n = len(STORED)
        #: per piece: the index of its vector among the call's, and its cut (None: whole)
        self.cuts = [
            (n * mappings[b] + k, None if (lo, hi) == (0, lengths[b]) else (lo, hi))
            for b, k, lo, hi, _ in self.pieces
        ]
        self.meta_width = 1 + FIELDS * len(self.slots)
        self.rows = 16  # per chunk; set by the history
        self.chunks: list[Chunk] = []
        self.regular = False  # the values fit the columns as they are: written at once
        #: the values in runs of one dtype: (first, end, first column, end column, float64);
        #: a float64 run is concatenated straight into the row, others then widened
        self.runs: list[tuple[int, int, int, int, bool]] = []  # set by group() when regular
        self.fast: bool | None = None  # None: not written yet (the first row goes family by family)

    def _spans(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Per mapping and law: the span of groups of the families that show it."""
        spans: dict[tuple[int, int], tuple[int, int]] = {}
        for slot in self.slots:
            if slot.block is None:
                continue
            groups = _groups(slot.segment, self.lengths[slot.block])
            if not len(groups):
                continue
            lo, hi = int(groups.min()), int(groups.max()) + 1
            for law, shown in enumerate(slot.shows):
                if shown:
                    a, b = spans.get((slot.block, law), (lo, hi))
                    spans[slot.block, law] = (min(a, lo), max(b, hi))
        return spans

    def group(self, values: list[torch.Tensor]) -> None:
        """Split the row's values (as :meth:`write` takes them) into runs of one dtype."""
        self.runs, column = [], 0
        for i, v in enumerate(values):
            end = column + v.numel()
            if i and v.dtype == values[i - 1].dtype:
                first, _, a, _, wide = self.runs[-1]
                self.runs[-1] = (first, i + 1, a, end, wide)
            else:
                self.runs.append((i, i + 1, column, end, v.dtype == torch.float64))
            column = end

    def chunk(self) -> Chunk:
        """The chunk the next row goes to (a new one when the last is full)."""
        if not self.chunks or self.chunks[-1].full:
            self.chunks.append(Chunk(self.rows, self.width, self.meta_width, self.device))
        return self.chunks[-1]

    def write(
        self, row: torch.Tensor, values: list[torch.Tensor], vectors: list[torch.Tensor]
    ) -> None:
        """Write a row at once: ``values`` (observed, then rₖ; 1-D) and the pieces of the
        call's laws ``vectors``, each concatenated on the device."""
        laws = [vectors[i] if cut is None else vectors[i][cut[0] : cut[1]] for i, cut in self.cuts]
        with torch.no_grad():
            for i, j, a, b, wide in self.runs:
                if j - i == 1:
                    row[a:b].copy_(values[i])
                elif wide:
                    torch.cat(values[i:j], out=row[a:b])
                else:  # a cat of mixed dtypes is slow: one dtype, then widened
                    row[a:b].copy_(torch.cat(values[i:j]))
            if laws:
                torch.cat(laws, out=row[self.split :])

    def write_each(
        self, row: torch.Tensor, snapshots: list[Any], stacked: list[torch.Tensor]
    ) -> list[tuple[int, Exception]]:
        """Write a row family by family, each value with the copy a row of its own would take;
        ``stacked``: each mapping's laws (one row per STORED law). Returns the families that
        failed (by slot) with their error."""
        for block, law, lo, hi, at in self.pieces:
            row[at : at + hi - lo].copy_(stacked[block][law, lo:hi])
        failed = []
        for j, (slot, s) in enumerate(zip(self.slots, snapshots)):
            g = slot.series.groups
            try:
                row[slot.observed : slot.observed + g].copy_(s.observed.detach().reshape(-1))
                if slot.residual is not None:
                    row[slot.residual : slot.residual + g].copy_(s.residual.detach().reshape(-1))
                if slot.block is not None:
                    laws = stacked[slot.block]
                    part = torch.empty((len(STORED), g), dtype=torch.float64, device=row.device)
                    part.copy_(laws[:, s.segment])
            except Exception as err:  # noqa: BLE001 - the family stops, the others go on
                failed.append((j, err))
        return failed

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(metadata, data) of every row, on the host."""
        parts = [c.arrays() for c in self.chunks if c.n or c.path is not None]
        if not parts:
            return np.empty((0, self.meta_width)), np.empty((0, self.width))
        return np.concatenate([m for m, _ in parts]), np.concatenate([d for _, d in parts])

    def meta(self) -> np.ndarray:
        """The metadata of every row kept in memory (nothing is read from the device)."""
        parts = [c.meta[: c.n] for c in self.chunks if c.path is None]
        return np.concatenate(parts) if parts else np.empty((0, self.meta_width))

    def thin(self, meta: np.ndarray, stride: int, latest: np.ndarray) -> None:
        """Keep the rows of a family whose log index is a multiple of ``stride`` or its
        ``latest`` (-1: none), compacted into one chunk; rows no family keeps go."""
        if not len(meta):
            return
        index = meta[:, 0]
        kept = (meta[:, code_column(0) :: FIELDS] >= 0) & (
            (index % stride == 0)[:, None] | (index[:, None] == latest[None, :])
        )
        rows = np.flatnonzero(kept.any(axis=1))
        data = torch.cat([c.data[: c.n] for c in self.chunks if c.data is not None])
        chunk = Chunk(max(self.rows, len(rows) + 1), self.width, self.meta_width, data.device)
        assert chunk.data is not None
        chunk.data[: len(rows)] = data[torch.as_tensor(rows, device=data.device)]
        new = meta[rows]
        new[:, code_column(0) :: FIELDS][~kept[rows]] = -1
        chunk.meta[: len(rows)] = new
        chunk.n, chunk.entries = len(rows), int(kept.sum())
        self.chunks = [chunk]

    def find_tails(self, latest: dict[int, float]) -> None:
        """Point every family whose latest row (``latest``: log index by id(series)) is here
        at it."""
        for chunk in self.chunks:
            index = chunk.meta[: chunk.n, 0]
            for j, slot in enumerate(self.slots):
                mine = chunk.meta[: chunk.n, code_column(j)] >= 0
                rows = np.flatnonzero(mine & (index == latest.get(id(slot.series), -1.0)))
                if len(rows):
                    slot.series.tail = (chunk, int(rows[-1]), code_column(j))
                    slot.series.tail_index = int(index[rows[-1]])

    def columns(self, n_positions: int) -> list[tuple[Series, dict[str, np.ndarray]]]:
        """Every family's rows as flat columns (one value per row and group; NaN where a law
        is not stored, as its rows do not show it)."""
        meta, data = self.arrays()
        out = []
        for j, slot in enumerate(self.slots):
            mine = meta[:, code_column(j)] >= 0
            if not mine.any():
                continue
            m, d = (meta, data) if mine.all() else (meta[mine], data[mine])
            series, g, n = slot.series, slot.series.groups, int(mine.sum())
            at = 1 + FIELDS * j
            cols = {
                "order": np.repeat(m[:, 0] * n_positions + series.position, g),
                "step": np.repeat(m[:, at], g),
                "t": np.repeat(m[:, at + 1], g),
                "group": np.tile(np.arange(g), n),
                "label": np.tile(np.asarray(series.names(), dtype=object), n),
                "code": np.repeat(m[:, at + 2].astype(np.intp), g),
                "observed": d[:, slot.observed : slot.observed + g].ravel(),
            }
            r = slot.residual
            cols["residual"] = np.full(n * g, np.nan) if r is None else d[:, r : r + g].ravel()
            groups = None
            if slot.block is not None:
                groups = _groups(slot.segment, self.lengths[slot.block])
                if len(groups) != g:  # one value for every group (a copy broadcasts it)
                    groups = np.repeat(groups, g)
            for law, name in enumerate(STORED):
                place = None if groups is None else self.places.get((slot.block, law))
                if place is None or not slot.shows[law]:
                    cols[name] = np.full(n * g, np.nan)
                else:
                    cols[name] = d[:, place[0] + groups - place[1]].ravel()
            out.append((series, cols))
        return out
