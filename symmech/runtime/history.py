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
    t: float | None
    family: Family
    observed: torch.Tensor | None
    residual: torch.Tensor | None
    laws: dict[str, torch.Tensor] | None  # the bank's state, shared by its families
    segment: slice | None
    momentum: float
    nesterov: bool
    status: str
    note: str


LAW_NAMES = ("gradient_flow", "discrete", "discrete_residual", "first_order", "second_order")


class History:
    """Snapshots are cloned device tensors; nothing is copied to the host until :meth:`rows`."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def last_step(self) -> int | None:
        return self.entries[-1].step if self.entries else None

    def add(self, step: int, families: list[Family], observed: dict, final: bool = False) -> None:
        snapshots: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        for f in families:
            bank = f.bank
            laws = None
            t = None
            if bank is not None and bank.laws is not None:
                if id(bank) not in snapshots:
                    snapshots[id(bank)] = (
                        {n: getattr(bank.laws, n).clone() for n in LAW_NAMES},
                        bank.laws.t,
                    )
                laws, t = snapshots[id(bank)]
            elif bank is not None:
                t = 0.0
            obs = observed.get(f)
            group = f.optimizer.param_groups[f._group_of[id(f.binding.tensors[0])]]
            res = None if (final or f.residual is None) else f.residual.detach().clone()
            self.entries.append(
                Entry(
                    step,
                    t,
                    f,
                    None if obs is None else obs.detach().clone(),
                    res,
                    laws,
                    bank.segment(f) if (bank is not None and laws is not None) else None,
                    float(group.get("momentum", 0.0)),
                    bool(group.get("nesterov", False)),
                    f.status,
                    f.note,
                )
            )

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        host_cache: dict[int, dict[str, list[float]]] = {}

        def host(t: torch.Tensor | None) -> list[float] | None:
            return None if t is None else t.detach().to("cpu", torch.float64).reshape(-1).tolist()

        for e in self.entries:
            if e.observed is None:
                continue
            observed = host(e.observed)
            residual = host(e.residual)
            laws = None
            if e.laws is not None:
                key = id(e.laws)
                if key not in host_cache:
                    host_cache[key] = {n: host(v) for n, v in e.laws.items()}
                laws = {n: v[e.segment] for n, v in host_cache[key].items()}
            predicted = laws is not None and e.status == "tracked"
            for j, value in enumerate(observed):
                row: dict[str, Any] = {
                    "step": e.step,
                    "t": e.t,
                    "symmetry": e.family.symmetry,
                    "layer": e.family.layer,
                    "group": j,
                    "observed": value,
                    "residual": residual[j] if residual is not None else None,
                    "status": e.status,
                    "note": e.note,
                }
                for name in LAW_NAMES:
                    row[name] = laws[name][j] if predicted else None
                if predicted and residual is None and e.family.tracker_residuals is False:
                    row["discrete_residual"] = None
                # the momentum flow models heavy-ball momentum; Nesterov has no continuous model here
                if e.nesterov:
                    row["continuous"] = None
                else:
                    row["continuous"] = (
                        row["first_order"] if e.momentum == 0.0 else row["second_order"]
                    )
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
