"""Per-step history of a tracker: device tensors while training, host rows on demand."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .tracker import Family

COLUMNS = (
    "step",
    "t",
    "symmetry",
    "layer",
    "group",
    "observed",
    "gradient_flow",
    "continuous",
    "discrete",
    "discrete_residual",
    "first_order",
    "second_order",
    "residual",
    "status",
    "note",
)


@dataclass
class Entry:
    step: int
    t: float
    family: Family
    tensors: dict[str, torch.Tensor | None]
    momentum: float


class History:
    """Snapshots are cloned device tensors; nothing is copied to the host until :meth:`rows`."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def last_step(self) -> int | None:
        return self.entries[-1].step if self.entries else None

    def add(
        self,
        step: int,
        family: Family,
        observed: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> None:
        laws = family.laws
        tensors: dict[str, torch.Tensor | None] = {
            "observed": observed.detach().clone(),
            "residual": None,
        }
        if residual is not None:
            tensors["residual"] = residual.detach().clone()
        t = 0.0
        if laws is not None:
            t = laws.t
            for name in (
                "gradient_flow",
                "discrete",
                "discrete_residual",
                "first_order",
                "second_order",
            ):
                tensors[name] = getattr(laws, name).clone()
        group = family.optimizer.param_groups[family._group_of[id(family.binding.tensors[0])]]
        self.entries.append(Entry(step, t, family, tensors, float(group.get("momentum", 0.0))))

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for e in self.entries:
            host = {
                k: (
                    v.detach().to("cpu", torch.float64).reshape(-1).tolist()
                    if v is not None
                    else None
                )
                for k, v in e.tensors.items()
            }
            predicted = (
                e.family.status == "tracked" or e.family.laws is not None and "discrete" in host
            )
            n = len(host["observed"])
            for j in range(n):
                row: dict[str, Any] = {
                    "step": e.step,
                    "t": e.t,
                    "symmetry": e.family.symmetry,
                    "layer": e.family.layer,
                    "group": j,
                    "observed": host["observed"][j],
                    "residual": host["residual"][j] if host["residual"] is not None else None,
                    "status": e.family.status,
                    "note": e.family.note,
                }
                for name in (
                    "gradient_flow",
                    "discrete",
                    "discrete_residual",
                    "first_order",
                    "second_order",
                ):
                    values = host.get(name)
                    row[name] = values[j] if (predicted and values is not None) else None
                row["continuous"] = row["first_order"] if e.momentum == 0.0 else row["second_order"]
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
