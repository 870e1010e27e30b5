"""Per-step history of a tracker: compact float64 chunks on the parameters' device, host rows on demand.

Every logged step is one wide row per *frame* (the families written together under one layout,
see :mod:`.history_frames`): observed Q and the residual rₖ of every family, one column per group,
then the laws of each bank (the predictions, anatomy and rotation its families' rows show).
Writing a row queues two device concatenations, whatever the number of families, and never waits
for the device. A full chunk is copied to the host with a non-blocking copy (on the CPU the chunk
already is host memory) and, with ``spill_dir``, written to disk as ``.npy`` and read back by
:meth:`History.rows`, which splits the rows per family.

Bounded memory, two ways:

* ``spill_dir=PATH``: full chunks go to disk (one ``.npy`` per chunk, metadata in its first
  columns); memory holds the chunk each frame is filling and the last one filled.
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
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
from .history_frames import FIELDS, STORED, Call, Chunk, Frame, Series, code_column, hashable

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


class _Code(NamedTuple):
    """What a row's text and missing values depend on, interned once per distinct value (looked
    up with the plain tuple of the same fields: equal, and hashed alike)."""

    status: str
    note: str
    has_residual: bool
    has_laws: bool
    residuals: bool
    nesterov: bool
    no_momentum: bool
    continuous: bool
    rotation: bool


def _shown(codes: Sequence[_Code]) -> dict[str, np.ndarray]:
    """Per stored law: which codes' rows show it (None elsewhere, and then it is not stored)."""
    predicted = np.array(
        [c.has_laws and (c.status == _TRACKED or c.status.startswith(_APPROXIMATE)) for c in codes]
        or [False]
    )
    split = predicted & ~np.array(
        [not c.has_residual and not c.residuals for c in codes] or [False]
    )
    models = predicted & np.array([c.continuous for c in codes] or [False])
    turning = predicted & np.array([c.rotation for c in codes] or [False])
    shown = {name: predicted for name in STORED}
    shown.update({name: split for name in (DISCRETE_RESIDUAL, *ANATOMY)})
    shown.update({name: models for name in CONTINUOUS_MODELS})
    shown.update({name: turning for name in (*ROTATION, *ROTATION_PARTS)})
    return shown


def _chunk_rows(width: int, chunk_bytes: int) -> int:
    return int(min(4096, max(16, chunk_bytes // (8 * width))))


class History:
    """Logged rows of every family, compact on the device; :meth:`rows` builds host records.

    ``max_history`` (≥ 2) bounds the number of logged steps kept (even thinning, see the
    module docstring); ``spill_dir`` writes full chunks to disk instead. ``chunk_bytes`` sizes
    the chunks (rows per chunk: that many bytes, 16 to 4096 rows).
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
        self._series: dict[tuple[int, str, str], Series] = {}
        self._codes: dict[tuple, int] = {}  # _Code -> its number
        self._shows: list[tuple[bool, ...]] = []  # per code number: the laws its rows show
        self._frames: list[Frame] = []  # in the order they were made
        self._layouts: dict[tuple, list[Frame]] = {}  # layout key -> its frames, one per device
        self._key: tuple | None = None  # the layout key of the last call
        self._layout: list[Frame] = []
        self._pending: list[tuple[Frame, Chunk]] = []  # offloaded, not yet spilled
        self._spilled = 0
        self._broken: dict[tuple[int, str, str], str] = {}  # families whose rows failed

    def last_step(self) -> int | None:
        return self._last_step

    def __len__(self) -> int:
        """Rows kept (one per family and logged step), without touching the device."""
        return sum(c.entries for f in self._frames for c in f.chunks)

    @property
    def thinned(self) -> bool:
        """Whether logged steps were dropped to stay within ``max_history``."""
        return self.stride > 1

    def add(self, snapshots: list[Snapshot]) -> None:
        """Store every family's row of one logged step (device copies only, no wait)."""
        call = self._gather(snapshots)
        if call.written:
            key = call.key()
            if key != self._key:
                fixed = hashable(key)
                self._layout = self._layouts.get(fixed) or self._make_layout(fixed, call)
                self._key = key
            if self.stride > 1:
                self._drop_provisional()
            for frame in self._layout:
                self._write(frame, call)
        if self.max_history is not None and call.index // self.stride + 1 > self.max_history:
            self._thin()

    def _gather(self, snapshots: list[Snapshot]) -> Call:
        """The families this call writes (observed, not stopped), with their layout, values
        and metadata."""
        call = Call(self._count)
        self._count += 1
        if snapshots:
            self._last_step = snapshots[-1].step
        blocks: dict[int, int] = {}  # id(laws mapping) -> its number in this call
        codes, shows, broken, meta, nan = (
            self._codes,
            self._shows,
            self._broken,
            call.meta,
            math.nan,
        )
        shape, written = call.shape.append, call.written.append
        observed, residual = call.observed.append, call.residual.append
        for position, s in enumerate(snapshots):
            q = s.observed
            if q is None or (broken and (position, s.symmetry, s.layer) in broken):
                continue
            r, laws = s.residual, s.laws
            if laws is None:
                block = -1
            else:
                block = blocks.setdefault(id(laws), len(blocks))
                if block == len(call.mappings):
                    call.mappings.append(laws)
                    call.vectors += [laws[name] for name in STORED]
            code = (s.status, s.note, r is not None, laws is not None, s.residuals, s.nesterov,
                    s.momentum == 0.0, s.continuous, s.rotation)  # fmt: skip
            number = codes.get(code)
            if number is None:
                number = self._intern(_Code(*code))
            shape((position, s.symmetry, s.layer, q.numel(), -1 if r is None else r.numel(), block,
                   None if laws is None else s.segment, shows[number]))  # fmt: skip
            written(s)
            observed(q)
            if r is not None:
                residual(r)
            t = s.t
            meta += (s.step, nan if t is None else float(t), number)
        return call

    def _intern(self, code: _Code) -> int:
        shown = _shown([code])
        self._shows.append(tuple(bool(shown[name][0]) for name in STORED))
        self._codes[code] = len(self._codes)
        return self._codes[code]

    def _make_layout(self, key: tuple, call: Call) -> list[Frame]:
        """The frames of a new layout: one per device the families' values are on."""
        devices: dict[torch.device, list[int]] = {}
        for i, q in enumerate(call.observed):
            devices.setdefault(q.device, []).append(i)
        layout, n = [], len(STORED)
        for device, members in devices.items():
            shape, written = [call.shape[i] for i in members], [call.written[i] for i in members]
            mappings = [b for b in dict.fromkeys(f[5] for f in shape) if b >= 0]
            local = {b: k for k, b in enumerate(mappings)}
            families = []
            for f, s in zip(shape, written):
                series = self._series.setdefault(
                    f[:3], Series(f[0], s.symmetry, s.layer, f[3], s.labels)
                )
                families.append((series, s.residual is not None, local.get(f[5]), s.segment, f[7]))
            frame = Frame(
                len(self._frames),
                families,
                mappings,
                [call.vectors[n * b].numel() for b in mappings],
                device,
                members=None if len(devices) == 1 else members,
            )
            frame.rows = self._rows(frame.width)
            values = [(s.observed, f[0].groups) for s, f in zip(written, families)]
            values += [(s.residual, f[0].groups) for s, f in zip(written, families) if f[1]]
            vectors = [call.vectors[i] for i, _ in frame.cuts]
            frame.regular = all(
                v.dim() == 1 and v.numel() == g and v.device == device for v, g in values
            ) and all(v.dim() == 1 and v.device == device for v in vectors)
            if frame.regular:
                frame.group([v for v, _ in values])
            self._frames.append(frame)
            layout.append(frame)
        self._layouts[key] = layout
        return layout

    def _drop_provisional(self) -> None:
        """Under thinning, a family's latest row off the stride is replaced by its next."""
        for frame in self._layout:
            for slot in frame.slots:
                slot.series.drop_provisional(self.stride)

    def _write(self, frame: Frame, call: Call) -> None:
        """Queue the frame's row of this call; a family whose values cannot be stored stops."""
        members = frame.members
        if members is None:
            written, meta, values = call.written, call.meta, call.observed + call.residual
        else:
            written = [call.written[i] for i in members]
            meta = [
                call.index,
                *(call.meta[1 + FIELDS * i + k] for i in members for k in range(FIELDS)),
            ]
            values = [s.observed for s in written]
            values += [s.residual for s in written if s.residual is not None]
        try:
            chunk = frame.chunk()
        except Exception as err:  # the tracker must never break training
            for slot, s in zip(frame.slots, written):
                self._stop(slot.series, s, err)
            return
        assert chunk.data is not None
        n = chunk.n
        row = chunk.data[n]
        failed: list[tuple[int, Exception]] = []
        if frame.fast:
            try:
                frame.write(row, values, call.vectors)
            except Exception:  # noqa: BLE001 - written family by family from now on
                frame.fast = False
        if not frame.fast:
            stacked = [
                torch.stack(
                    [call.mappings[b][k].detach().reshape(-1).to(torch.float64) for k in STORED]
                )
                for b in frame.mappings
            ]
            failed = frame.write_each(row, written, stacked)
            if frame.fast is None:
                frame.fast = frame.regular
        chunk.meta[n] = meta
        for j, err in failed:
            chunk.meta[n, code_column(j)] = -1
            self._stop(frame.slots[j].series, written[j], err)
        if len(failed) == len(written):
            return
        chunk.entries += len(written) - len(failed)
        chunk.n = n + 1
        if self.max_history is not None:
            stopped = {j for j, _ in failed}
            for j, slot in enumerate(frame.slots):
                if j not in stopped:
                    slot.series.tail = (chunk, n, code_column(j))
                    slot.series.tail_index = call.index
        elif chunk.full:
            self._offload(frame, chunk)

    def _stop(self, series: Series, s: Snapshot, err: Exception) -> None:
        name = (series.position, series.symmetry, series.layer)
        self._broken[name] = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"symmech: history of {s.symmetry} on {s.layer} stopped at step {s.step} "
            f"({self._broken[name]}); rows before it are kept",
            TrackerWarning,
            stacklevel=6,  # as History.add warned with stacklevel=4 (from _write, from add)
        )

    def _rows(self, width: int) -> int:
        rows = _chunk_rows(width, self.chunk_bytes)
        if self.max_history is not None:
            rows = min(rows, self.max_history + 1)
        return rows

    def _offload(self, frame: Frame, chunk: Chunk) -> None:
        chunk.offload()
        if self.spill_dir is None:
            return
        # spill the chunks offloaded before: their copies finished long ago
        for f, c in self._pending:
            c.spill(self.spill_dir / f"frame{f.number}_{self._spilled:06d}.npy")
            self._spilled += 1
        self._pending = [(frame, chunk)]

    def _thin(self) -> None:
        """Double the stride: keep each family's rows on it, and its latest."""
        self.stride *= 2
        metas = [f.meta() for f in self._frames]
        latest: dict[int, float] = {}  # id(series) -> the log index of its latest row
        for frame, meta in zip(self._frames, metas):
            for j, slot in enumerate(frame.slots):
                index = meta[meta[:, code_column(j)] >= 0, 0]
                if len(index):
                    latest[id(slot.series)] = max(latest.get(id(slot.series), -1.0), index.max())
        for frame, meta in zip(self._frames, metas):
            last = np.array([latest.get(id(slot.series), -1.0) for slot in frame.slots])
            frame.thin(meta, self.stride, last)
        for series in self._series.values():
            series.tail = None
        for frame in self._frames:
            frame.find_tails(latest)

    # -- host rows ---------------------------------------------------------------------
    def columns(self) -> dict[str, list[Any]]:
        """Every record field as one host list (None where a value does not apply), in row
        order: by logged step, then family, then group."""
        codes = list(self._codes)
        shown = _shown(codes)
        has_res = np.array([c.has_residual for c in codes] or [False])
        nesterov = np.array([c.nesterov for c in codes] or [False])
        no_momentum = np.array([c.no_momentum for c in codes] or [False])
        parts: list[dict[str, np.ndarray]] = []
        names: list[tuple[str, str]] = []
        n_positions = 1 + max((s.position for s in self._series.values()), default=0)
        for frame in self._frames:
            for series, cols in frame.columns(n_positions):
                names.append((series.symmetry, series.layer))
                cols["series"] = np.full(len(cols["order"]), len(names) - 1, dtype=np.intp)
                parts.append(cols)
        if not parts:
            return {k: [] for k in _KEYS}
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(merged["order"], kind="stable")
        col = {k: v[order] for k, v in merged.items()}
        code = col["code"]
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
        for name in PREDICTIONS:
            out[name] = _with_none(col[name], shown[name][code])
        model = np.where(no_momentum[code], col[FIRST_ORDER], col[SECOND_ORDER])
        out[CONTINUOUS] = _with_none(model, shown[FIRST_ORDER][code] & ~nesterov[code])
        for name in ANATOMY:
            out[name] = _with_none(col[name], shown[name][code])
        for name in ROTATION:
            out[name] = _with_none(col[name], shown[name][code] & ~np.isnan(col[name]))
        for name in ROTATION_PARTS:  # removed from the records by ``without_parts``
            out[name] = _with_none(col[name], shown[name][code])
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
