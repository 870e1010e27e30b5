"""Per-step history of a tracker: snapshots of device tensors while training, host rows on demand."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from symmech.laws.names import (
    CONTINUOUS,
    CONTINUOUS_MODELS,
    DISCRETE_RESIDUAL,
    FIRST_ORDER,
    LAWS,
    PREDICTIONS,
    SECOND_ORDER,
)

#: The columns of ``Tracker.records()`` rows and of the CSV, in order.
COLUMNS = (
    "step",
    "t",
    "symmetry",
    "layer",
    "group",
    "observed",
    *LAWS,
    *CONTINUOUS_MODELS,
    "residual",
    "status",
    "note",
)


@dataclass(frozen=True)
class Snapshot:
    """One family at one logged step, as it was then (cloned tensors, copied settings)."""

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


def _host(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.detach().to("cpu", torch.float64).reshape(-1).tolist()


class History:
    """Snapshots hold device tensors; nothing is copied to the host until :meth:`rows`."""

    def __init__(self) -> None:
        self.snapshots: list[Snapshot] = []

    def last_step(self) -> int | None:
        return self.snapshots[-1].step if self.snapshots else None

    def add(self, snapshots: list[Snapshot]) -> None:
        self.snapshots.extend(snapshots)

    def rows(self) -> list[dict[str, Any]]:
        """One row per logged step and group (host floats; None where a law does not apply)."""
        rows: list[dict[str, Any]] = []
        host_laws: dict[int, dict[str, list[float]]] = {}
        for s in self.snapshots:
            if s.observed is None:
                continue
            observed = _host(s.observed)
            residual = _host(s.residual)
            laws = None
            if s.laws is not None:
                if id(s.laws) not in host_laws:
                    host_laws[id(s.laws)] = {n: _host(v) for n, v in s.laws.items()}
                laws = {n: v[s.segment] for n, v in host_laws[id(s.laws)].items()}
            predicted = laws is not None and s.status == "tracked"
            for j, value in enumerate(observed):
                row: dict[str, Any] = {
                    "step": s.step,
                    "t": s.t,
                    "symmetry": s.symmetry,
                    "layer": s.layer,
                    "group": j,
                    "observed": value,
                    "residual": residual[j] if residual is not None else None,
                    "status": s.status,
                    "note": s.note,
                }
                for name in PREDICTIONS:
                    row[name] = laws[name][j] if predicted else None
                if predicted and residual is None and not s.residuals:
                    row[DISCRETE_RESIDUAL] = None
                # the momentum flow models heavy-ball momentum; Nesterov has no continuous model
                if s.nesterov:
                    row[CONTINUOUS] = None
                else:
                    row[CONTINUOUS] = row[FIRST_ORDER if s.momentum == 0.0 else SECOND_ORDER]
                rows.append(row)
        return rows

    @staticmethod
    def to_csv(rows: list[dict[str, Any]], path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
        return path
