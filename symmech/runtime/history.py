"""Per-step history of a tracker: compact float64 chunks on the parameters' device, host rows on demand.

Each family keeps one row per logged step in preallocated chunks of shape
``(rows, 7·G)``: observed Q, the residual rₖ and the five predictions, one column per group.
Writing a row queues a few device copies and never waits for the device. A full chunk is
copied to the host with a non-blocking copy (on the CPU the chunk already is host memory) and,
with ``spill_dir``, written to disk as ``.npy`` and read back by :meth:`History.rows`.

Bounded memory, two ways:

* ``spill_dir=PATH``: full chunks go to disk (one ``.npy`` per chunk and family, metadata in
  its first columns); memory holds at most one chunk per family.
* ``max_history=N``: at most N logged steps are kept, thinned evenly over the whole run. The
  first logged step and every ``stride``-th after it are kept, plus always the latest; when more
  than N would be kept the stride doubles and every other kept step is dropped. Rows of a
  thinned history say so in their ``note`` column (``history thinned: ...``).

>>> import torch
>>> h = History(max_history=4)
>>> for k in range(10):
...     h.add([Snapshot(k, None, "scale", "c", torch.tensor([float(k)]), None, None, None,
...                     0.0, False, "observed only", "", False)])
>>> [r["step"] for r in h.rows()]
[0, 4, 8, 9]
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from symmech.errors import BindingError, explain
from symmech.laws.names import (
    ANATOMY,
    CONTINUOUS,
    CONTINUOUS_MODELS,
    DISCRETE_RESIDUAL,
    FIRST_ORDER,
    LAWS,
    PREDICTIONS,
    ROTATION,
    ROTATION_PARTS,
    SECOND_ORDER,
)

from .family import TrackerWarning

#: The columns of ``Tracker.records()`` rows and of the CSV, in order.
COLUMNS = (
    "step",
    "t",
    "symmetry",
    "layer",
    "group",
    "label",
    "observed",
    *LAWS,
    *CONTINUOUS_MODELS,
    "residual",
    *ANATOMY,
    *ROTATION,
    "status",
    "note",
)
#: The keys of a record, in the order a record dict holds them.
_KEYS = (
    *COLUMNS[:7], "residual", "status", "note", *PREDICTIONS, CONTINUOUS, *ANATOMY, *ROTATION,
    *ROTATION_PARTS,
)  # fmt: skip
#: What the laws store per group and logged step, after observed Q and rₖ.
_STORED = (*PREDICTIONS, *ANATOMY, *ROTATION, *ROTATION_PARTS)
_META = 4  # log index, step, t (NaN: None), settings code
_TRACKED = "tracked"
_APPROXIMATE = "approximate"  # "approximate: <measured reason>": predicted, and says how well


@dataclass(frozen=True)
class Snapshot:
    """One family at one logged step, as it was then (device tensors, copied settings)."""

    step: int
    t: float | None
    symmetry: str
    layer: str
    observed: torch.Tensor | None
    residual: torch.Tensor | None
    laws: Mapping[str, torch.Tensor] | None  # the bank's predictions, shared by its families
    segment: slice | None  # the family's groups in them
    momentum: float
    nesterov: bool
    status: str
    note: str
    residuals: bool  # rₖ fed to discrete_residual every step
    continuous: bool = True  # the continuous models apply (torch.optim.SGD's own law)
    rotation: bool = False  # a ½|θ|² charge: the rotation of θ is reported
    labels: tuple[str, ...] = ()  # the groups' names (e.g. ``h0[1,2]``); () = their indices


@dataclass(frozen=True)
class _Code:
    """What a row's text and missing values depend on, interned once per distinct value."""

    status: str
    note: str
    has_residual: bool
    has_laws: bool
    residuals: bool
    nesterov: bool
    no_momentum: bool
    continuous: bool
    rotation: bool


class _Chunk:
    """Up to ``capacity`` rows of one family: data on the device, metadata on the host."""

    def __init__(self, capacity: int, width: int, device: torch.device) -> None:
        self.data: torch.Tensor | None = torch.empty(
            (capacity, width), dtype=torch.float64, device=device
        )
        self.meta = np.empty((capacity, _META), dtype=np.float64)
        self.capacity = capacity
        self.n = 0
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
        self.path, self.host, self.meta = path, None, np.empty((0, _META))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(metadata, data) of the filled rows as host arrays (waits for a pending copy)."""
        if self.path is not None:
            both = np.load(self.path)
            return both[:, :_META], both[:, _META:]
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.host is not None:
            return self.meta[: self.n], self.host[: self.n].numpy()
        assert self.data is not None
        return self.meta[: self.n], self.data[: self.n].cpu().numpy()


def _labels(series: _Series) -> tuple[str, ...]:
    """The series' group names (histories saved before labels existed: the group indices)."""
    labels = getattr(series, "labels", ())
    return labels if len(labels) == series.groups else tuple(str(g) for g in range(series.groups))


class _Series:
    """The rows of one family (one position in the tracker's list of families)."""

    def __init__(
        self,
        position: int,
        symmetry: str,
        layer: str,
        groups: int,
        rows: int,
        labels: tuple[str, ...] = (),
    ) -> None:
        self.position = position
        self.symmetry = symmetry
        self.layer = layer
        self.groups = groups
        self.labels = labels  # as given; read through _labels()
        self.rows = rows
        self.chunks: list[_Chunk] = []

    @property
    def width(self) -> int:
        return (2 + len(_STORED)) * self.groups

    def last_index(self) -> float | None:
        for chunk in reversed(self.chunks):
            if chunk.n and chunk.path is None:
                return float(chunk.meta[chunk.n - 1, 0])
        return None

    def log_indices(self) -> np.ndarray:
        """The log index of every row (host metadata only: nothing is read from the device)."""
        parts = [c.meta[: c.n, 0] for c in self.chunks if c.path is None]
        return np.concatenate(parts) if parts else np.empty(0)

    def drop_last(self) -> None:
        self.chunks[-1].n -= 1

    def write(self, meta: tuple[float, ...], s: Snapshot, laws: torch.Tensor | None) -> _Chunk:
        """Queue one row; returns its chunk (the caller offloads it when full)."""
        assert s.observed is not None
        if not self.chunks or self.chunks[-1].full:
            self.chunks.append(_Chunk(self.rows, self.width, s.observed.device))
        chunk = self.chunks[-1]
        assert chunk.data is not None
        g = self.groups
        row = chunk.data[chunk.n]
        row[:g].copy_(s.observed.detach().reshape(-1))
        if s.residual is not None:
            row[g : 2 * g].copy_(s.residual.detach().reshape(-1))
        if laws is not None:
            row[2 * g :].view(len(_STORED), g).copy_(laws[:, s.segment])
        chunk.meta[chunk.n] = meta
        chunk.n += 1
        return chunk

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [c.arrays() for c in self.chunks if c.n or c.path is not None]
        if not parts:
            return np.empty((0, _META)), np.empty((0, self.width))
        return np.concatenate([m for m, _ in parts]), np.concatenate([d for _, d in parts])

    def keep(self, index: np.ndarray) -> None:
        """Keep only the rows at ``index`` (sorted), compacted into one device chunk."""
        meta = np.concatenate([c.meta[: c.n] for c in self.chunks])
        data = torch.cat([c.data[: c.n] for c in self.chunks if c.data is not None])
        chunk = _Chunk(max(self.rows, len(index) + 1), self.width, data.device)
        assert chunk.data is not None
        chunk.data[: len(index)] = data[torch.as_tensor(index, device=data.device)]
        chunk.meta[: len(index)] = meta[index]
        chunk.n = len(index)
        self.chunks = [chunk]


def _chunk_rows(width: int, chunk_bytes: int) -> int:
    return int(min(4096, max(16, chunk_bytes // (8 * width))))


class History:
    """Logged rows of every family, compact on the device; :meth:`rows` builds host records.

    ``max_history`` (≥ 2) bounds the number of logged steps kept (even thinning, see the
    module docstring); ``spill_dir`` writes full chunks to disk instead. ``chunk_bytes`` sizes
    the chunks (rows of a family per chunk: that many bytes, 16 to 4096 rows).
    """

    def __init__(
        self,
        max_history: int | None = None,
        spill_dir: str | Path | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        call = f"History(max_history={max_history!r}, spill_dir={spill_dir!r})"
        if max_history is not None and (
            isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 2
        ):
            raise BindingError(
                explain(call, f"max_history must be an integer ≥ 2, got {max_history!r}")
            )
        if max_history is not None and spill_dir is not None:
            raise BindingError(
                explain(call, "max_history and spill_dir exclude each other", "choose one")
            )
        self.max_history = max_history
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_bytes = chunk_bytes
        self.stride = 1  # every stride-th logged step is kept (max_history)
        self._count = 0  # logged steps so far (the log index of the next)
        self._last_step: int | None = None
        self._series: dict[tuple[int, str, str], _Series] = {}
        self._codes: dict[_Code, int] = {}
        self._pending: list[tuple[_Series, _Chunk]] = []  # offloaded, not yet spilled
        self._spilled = 0
        self._broken: dict[tuple[int, str, str], str] = {}  # families whose rows failed

    def last_step(self) -> int | None:
        return self._last_step

    def __len__(self) -> int:
        """Rows kept (one per family and logged step), without touching the device."""
        return sum(c.n for s in self._series.values() for c in s.chunks)

    @property
    def thinned(self) -> bool:
        """Whether logged steps were dropped to stay within ``max_history``."""
        return self.stride > 1

    def _code(self, s: Snapshot) -> int:
        code = _Code(
            s.status,
            s.note,
            s.residual is not None,
            s.laws is not None,
            s.residuals,
            s.nesterov,
            s.momentum == 0.0,
            s.continuous,
            s.rotation,
        )
        return self._codes.setdefault(code, len(self._codes))

    def add(self, snapshots: list[Snapshot]) -> None:
        """Store every family's row of one logged step (device copies only, no wait)."""
        index = self._count
        self._count += 1
        if snapshots:
            self._last_step = snapshots[-1].step
        stacked: dict[int, torch.Tensor] = {}
        for position, s in enumerate(snapshots):
            if s.observed is None:
                continue
            key = (position, s.symmetry, s.layer)
            if key in self._broken:
                continue
            series = self._series.get(key)
            if series is None:
                groups = s.observed.numel()
                width = (2 + len(_STORED)) * groups
                series = _Series(position, s.symmetry, s.layer, groups, self._rows(width), s.labels)
                self._series[key] = series
            last = series.last_index() if self.stride > 1 else None
            if last is not None and last % self.stride != 0:
                series.drop_last()  # a provisional latest row, replaced by this one
            laws = None
            if s.laws is not None:
                if id(s.laws) not in stacked:
                    stacked[id(s.laws)] = torch.stack(
                        [s.laws[n].detach().reshape(-1).to(torch.float64) for n in _STORED]
                    )
                laws = stacked[id(s.laws)]
            t = float("nan") if s.t is None else float(s.t)
            try:
                chunk = series.write((index, s.step, t, self._code(s)), s, laws)
                if chunk.full and self.max_history is None:
                    self._offload(series, chunk)
            except Exception as err:  # the tracker must never break training
                self._broken[key] = f"{type(err).__name__}: {err}"
                warnings.warn(
                    f"symmech: history of {s.symmetry} on {s.layer} stopped at step {s.step} "
                    f"({self._broken[key]}); rows before it are kept",
                    TrackerWarning,
                    stacklevel=4,
                )
        if self.max_history is not None and index // self.stride + 1 > self.max_history:
            self._thin()

    def _rows(self, width: int) -> int:
        rows = _chunk_rows(width, self.chunk_bytes)
        if self.max_history is not None:
            rows = min(rows, self.max_history + 1)
        return rows

    def _offload(self, series: _Series, chunk: _Chunk) -> None:
        chunk.offload()
        if self.spill_dir is None:
            return
        # spill the chunks offloaded before: their copies finished long ago
        for s, c in self._pending:
            c.spill(self.spill_dir / f"family{s.position}_{self._spilled:06d}.npy")
            self._spilled += 1
        self._pending = [(series, chunk)]

    def _thin(self) -> None:
        self.stride *= 2
        for series in self._series.values():
            index = series.log_indices()
            keep = np.flatnonzero(index % self.stride == 0)
            if len(index) and (not len(keep) or keep[-1] != len(index) - 1):
                keep = np.append(keep, len(index) - 1)  # the latest row stays
            series.keep(keep)

    # -- host rows ---------------------------------------------------------------------
    def columns(self) -> dict[str, list[Any]]:
        """Every record field as one host list (None where a value does not apply), in row
        order: by logged step, then family, then group."""
        codes = list(self._codes)
        has_res = np.array([c.has_residual for c in codes] or [False])
        predicted = np.array(
            [
                c.has_laws and (c.status == _TRACKED or c.status.startswith(_APPROXIMATE))
                for c in codes
            ]
            or [False]
        )
        no_dres = np.array([not c.has_residual and not c.residuals for c in codes] or [False])
        nesterov = np.array([c.nesterov for c in codes] or [False])
        no_momentum = np.array([c.no_momentum for c in codes] or [False])
        continuous = np.array([c.continuous for c in codes] or [False])
        rotation = np.array([c.rotation for c in codes] or [False])
        parts: list[dict[str, np.ndarray]] = []
        names: list[tuple[str, str]] = []
        n_positions = 1 + max((s.position for s in self._series.values()), default=0)
        for series in self._series.values():
            meta, data = series.arrays()
            n, g = len(meta), series.groups
            if not n:
                continue
            names.append((series.symmetry, series.layer))
            code = meta[:, 3].astype(np.intp)
            cols = {
                "order": np.repeat(meta[:, 0] * n_positions + series.position, g),
                "series": np.full(n * g, len(names) - 1, dtype=np.intp),
                "step": np.repeat(meta[:, 1], g),
                "t": np.repeat(meta[:, 2], g),
                "group": np.tile(np.arange(g), n),
                "label": np.tile(np.asarray(_labels(series), dtype=object), n),
                "code": np.repeat(code, g),
                "observed": data[:, :g].ravel(),
                "residual": data[:, g : 2 * g].ravel(),
            }
            for k, name in enumerate(_STORED):
                cols[name] = data[:, (2 + k) * g : (3 + k) * g].ravel()
            parts.append(cols)
        if not parts:
            return {k: [] for k in _KEYS}
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(merged["order"], kind="stable")
        col = {k: v[order] for k, v in merged.items()}
        code = col["code"]
        pred = predicted[code]
        out: dict[str, list[Any]] = {
            "step": col["step"].astype(np.int64).tolist(),
            "t": _with_none(col["t"], ~np.isnan(col["t"])),
            "symmetry": np.array([s for s, _ in names], dtype=object)[col["series"]].tolist(),
            "layer": np.array([layer for _, layer in names], dtype=object)[col["series"]].tolist(),
            "group": col["group"].tolist(),
            "label": col["label"].tolist(),
            "observed": col["observed"].tolist(),
            "residual": _with_none(col["residual"], has_res[code]),
        }
        notes = [c.note for c in codes]
        if self.thinned:
            extra = (
                f"history thinned: every {self.stride}th logged step kept, and the latest "
                f"(max_history={self.max_history})"
            )
            notes = [f"{n}; {extra}" if n else extra for n in notes]
        out["status"] = np.array([c.status for c in codes], dtype=object)[code].tolist()
        out["note"] = np.array(notes, dtype=object)[code].tolist()
        cont = continuous[code]
        for name in PREDICTIONS:
            present = pred & ~no_dres[code] if name == DISCRETE_RESIDUAL else pred
            if name in CONTINUOUS_MODELS:
                present = present & cont
            out[name] = _with_none(col[name], present)
        model = np.where(no_momentum[code], col[FIRST_ORDER], col[SECOND_ORDER])
        out[CONTINUOUS] = _with_none(model, pred & ~nesterov[code] & cont)
        for name in ANATOMY:
            out[name] = _with_none(col[name], pred & ~no_dres[code])
        turning = pred & rotation[code]
        for name in ROTATION:
            out[name] = _with_none(col[name], turning & ~np.isnan(col[name]))
        for name in ROTATION_PARTS:  # removed from the records by ``without_parts``
            out[name] = _with_none(col[name], turning)
        return out

    def rows(self, parts: bool = False) -> list[dict[str, Any]]:
        """One row per logged step and group (host floats; None where a law does not apply);
        with ``parts`` also :data:`~symmech.laws.names.ROTATION_PARTS` (see
        :func:`without_parts`)."""
        cols = self.columns()
        keys = _KEYS if parts else _KEYS[: len(_KEYS) - len(ROTATION_PARTS)]
        return [dict(zip(keys, values)) for values in zip(*(cols[k] for k in keys))]

    @staticmethod
    def to_csv(rows: Iterable[Mapping[str, Any]], path) -> Path:
        """Write rows as CSV with the columns :data:`COLUMNS` (None: an empty cell), streamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows([r.get(k) for k in COLUMNS] for r in rows)  # None: ""
        return path


def without_parts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without :data:`~symmech.laws.names.ROTATION_PARTS` (read only to rebuild the
    angle from sums over ranks; not record columns)."""
    for r in rows:
        for name in ROTATION_PARTS:
            r.pop(name, None)
    return rows


def _with_none(values: np.ndarray, present: np.ndarray) -> list[Any]:
    out = values.tolist()
    if not present.all():
        for i in np.flatnonzero(~present).tolist():
            out[i] = None
    return out
