"""Where a tracker's records go: pandas DataFrames, Parquet, CSV, TensorBoard and per-layer summaries.

Every function here takes the records of :meth:`symmech.Tracker.records` (one dict per logged
step and group) and needs only what it writes with: pandas and pyarrow for frames and Parquet
(``pip install "symmech[frames]"``), a ``SummaryWriter`` for TensorBoard (``symmech[tb]``).
They are imported when a function is called, never by ``import symmech``.

Per-layer summaries (:func:`layer_summaries`, used by TensorBoard and the framework callbacks)
give, for each family (symmetry, layer) and logged step, the sum over its groups of the observed
Q and of each law (every law is linear and holds per group, so the sums are as exact as the
groups), and ``rel_error/discrete``: the largest over groups of |Q_discrete − Q_obs| / S, where S
is the family's scale as :mod:`symmech.runtime.error_scale` defines it: the largest |Q_obs| over
the rows given and, when ``terms`` are passed (``error_scale.term_scales(tracker.families)``),
the size of Q's terms. S = 0 gives the absolute error.

>>> rows = [{"step": 0, "symmetry": "scale", "layer": "fc", "group": j, "observed": 1.0 + j,
...          "discrete": 1.0 + j + 1e-3} for j in range(2)]
>>> summary = layer_summaries(rows)[0]
>>> summary["symmech/scale/fc/observed"], round(summary["symmech/scale/fc/rel_error/discrete"], 6)
(3.0, 0.0005)
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from symmech.errors import BindingError, explain
from symmech.laws.names import DISCRETE, LAWS

from .history import COLUMNS, History

if TYPE_CHECKING:  # pandas is optional: imported when a frame is made
    import pandas

__all__ = [
    "layer_summaries",
    "log_to_tensorboard",
    "record_columns",
    "records_to_dataframe",
    "tag_part",
    "write_parquet",
    "write_records",
]

#: (symmetry, layer): a family, as records name it.
Key = tuple[str, str]
_TEXT = frozenset({"symmetry", "layer", "status", "note"})
REL_ERROR = "rel_error"
_NOT_IN_TAG = re.compile(r"[^-/\w.]+")  # what TensorBoard would replace in a tag


def tag_part(name: str) -> str:
    """A layer or symmetry name as a tag part: every run of characters TensorBoard does not keep
    in a tag (anything but letters, digits, ``_ - . /``) becomes one ``_``.

    >>> tag_part("0 → 1 → 2"), tag_part("fc (output layer) bias")
    ('0_1_2', 'fc_output_layer_bias')
    """
    return _NOT_IN_TAG.sub("_", name).strip("_") or "_"


def _require(module: str, extra: str, call: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            explain(
                call,
                f"it needs {module.split('.')[0]}, which is not installed ({err})",
                f'pip install "symmech[{extra}]"',
            )
        ) from err


# -- frames ------------------------------------------------------------------------------------


def record_columns(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[str]:
    """The columns of a frame of ``rows``: :data:`~symmech.runtime.history.COLUMNS` first (those
    present), then every other key of the first row (or of a dict of columns) in its order."""
    first: Iterable[str] = rows.keys() if isinstance(rows, Mapping) else (rows[0] if rows else {})
    keys = list(first)
    known = [c for c in COLUMNS if c in keys] if keys else list(COLUMNS)
    return known + [k for k in keys if k not in COLUMNS]


def records_to_dataframe(
    rows: Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
) -> pandas.DataFrame:
    """The records as a long-format :class:`pandas.DataFrame`: one row per logged step × group.

    ``rows`` is a list of record dicts (``tracker.records()``) or a dict of columns (lists of
    equal length, as ``History.columns()`` gives). Columns: :func:`record_columns`; ``step`` and
    ``group`` are integers, laws and other numbers float64 (None: NaN), text stays text.
    """
    pd = _require("pandas", "frames", "records_to_dataframe(rows)")
    if isinstance(rows, Mapping):
        columns = record_columns(rows)
        data = {c: list(rows[c]) for c in columns}
    else:
        rows = list(rows)
        columns = record_columns(rows)
        data = {c: [r.get(c) for r in rows] for c in columns}
    frame = pd.DataFrame(data, columns=columns)
    for c in columns:
        if c in _TEXT:
            frame[c] = frame[c].fillna("")  # pandas' text dtype (str from pandas 3)
        elif frame[c].dtype == object and all(v is None or _is_number(v) for v in data[c]):
            frame[c] = frame[c].astype("float64")  # a law that no row has: all NaN
    return frame


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def write_parquet(
    rows: Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]], path: str | Path
) -> Path:
    """Write the records as Parquet (pyarrow, zstd): the frame of :func:`records_to_dataframe`."""
    call = f"write_parquet(rows, {str(path)!r})"
    _require("pyarrow", "frames", call)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records_to_dataframe(rows).to_parquet(path, engine="pyarrow", compression="zstd", index=False)
    return path


def write_records(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the records by the file's suffix: ``.parquet`` (all columns) or ``.csv`` (the
    columns of :data:`~symmech.runtime.history.COLUMNS`, through ``History.to_csv``)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return write_parquet(list(rows), path)
    if suffix == ".csv":
        return History.to_csv(rows, path)
    raise BindingError(
        explain(
            f"write_records(rows, {str(path)!r})",
            f"unknown suffix {suffix or '(none)'!r}",
            "name the file *.parquet or *.csv",
        )
    )


# -- per-layer summaries -----------------------------------------------------------------------


class _Family:
    """One family's records as (steps × groups) grids; NaN where a value is absent."""

    def __init__(self, rows: list[Mapping[str, Any]]) -> None:
        steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
        self.steps, row = np.unique(steps, return_inverse=True)
        groups = [r.get("group", 0) for r in rows]
        index: dict[Any, int] = {}
        col = np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.intp)
        self.groups = list(index)
        self._at = (row, col)
        self.observed = self._grid([r.get("observed") for r in rows])
        self.laws = {law: self._grid([r.get(law) for r in rows]) for law in LAWS}

    def _grid(self, values: list[Any]) -> np.ndarray:
        out = np.full((len(self.steps), len(self.groups)), np.nan)
        out[self._at] = [math.nan if v is None else float(v) for v in values]
        return out


def _families(rows: Iterable[Mapping[str, Any]]) -> dict[Key, _Family]:
    by_key: dict[Key, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((str(r["symmetry"]), str(r["layer"])), []).append(r)
    return {key: _Family(recs) for key, recs in by_key.items()}


def _scale(family: _Family, term: float) -> float:
    observed = np.abs(family.observed[np.isfinite(family.observed)])
    s = max(float(observed.max()) if observed.size else 0.0, float(term))
    return s if math.isfinite(s) and s > 0 else 1.0


def layer_summaries(
    rows: Iterable[Mapping[str, Any]],
    *,
    per_group: bool = False,
    since_step: int | None = None,
    terms: Mapping[Key, float] | None = None,
    prefix: str = "symmech",
) -> dict[int, dict[str, float]]:
    """Per logged step (after ``since_step``), the scalars of every family, by tag.

    Tags: ``{prefix}/{symmetry}/{layer}/observed`` (names through :func:`tag_part`; sum over groups), one per law present
    (``gradient_flow``, ``continuous``, ``discrete``, ``discrete_residual``: the sum over groups,
    absent at a step where a group lacks it) and ``.../rel_error/discrete`` (see the module
    docstring; S is taken over all ``rows``, also those before ``since_step``). ``per_group``
    adds ``.../group{j}/observed`` and ``.../group{j}/{law}``. Non-finite values are left out.
    """
    out: dict[int, dict[str, float]] = {}
    for (symmetry, layer), fam in _families(rows).items():
        base = f"{prefix}/{tag_part(symmetry)}/{tag_part(layer)}"
        scale = _scale(fam, (terms or {}).get((symmetry, layer), 0.0))
        keep = fam.steps > since_step if since_step is not None else np.ones(len(fam.steps), bool)
        with np.errstate(invalid="ignore"):
            error = np.abs(fam.laws[DISCRETE] - fam.observed) / scale
        for i in np.flatnonzero(keep).tolist():
            tags = out.setdefault(int(fam.steps[i]), {})
            values = {"observed": fam.observed[i], **{law: fam.laws[law][i] for law in LAWS}}
            for name, v in values.items():
                total = float(v.sum())
                if math.isfinite(total):
                    tags[f"{base}/{name}"] = total
                if per_group:
                    for j, g in enumerate(fam.groups):
                        if math.isfinite(v[j]):
                            tags[f"{base}/group{g}/{name}"] = float(v[j])
            finite = error[i][np.isfinite(error[i])]
            if finite.size:
                tags[f"{base}/{REL_ERROR}/{DISCRETE}"] = float(finite.max())
    return dict(sorted(out.items()))


def log_to_tensorboard(
    rows: Iterable[Mapping[str, Any]],
    writer: Any,
    *,
    per_group: bool = False,
    since_step: int | None = None,
    terms: Mapping[Key, float] | None = None,
    prefix: str = "symmech",
) -> int:
    """Write :func:`layer_summaries` to a TensorBoard ``writer`` (anything with
    ``add_scalar(tag, value, global_step)``, e.g. ``torch.utils.tensorboard.SummaryWriter``),
    one scalar per tag and logged step, the step being the tracker's. Returns how many were
    written. ``since_step`` writes only later steps (a callback logging as training goes)."""
    if not callable(getattr(writer, "add_scalar", None)):
        raise BindingError(
            explain(
                f"log_to_tensorboard(rows, {type(writer).__name__})",
                "the writer has no add_scalar(tag, value, global_step)",
                "pass a torch.utils.tensorboard.SummaryWriter",
            )
        )
    n = 0
    summaries = layer_summaries(
        rows, per_group=per_group, since_step=since_step, terms=terms, prefix=prefix
    )
    for step, tags in summaries.items():
        for tag, value in tags.items():
            writer.add_scalar(tag, value, global_step=step)
            n += 1
    return n
