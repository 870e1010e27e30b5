"""Plots of a tracker's history: theory against training, and the error of each law.

The input is the tracker's records (``Tracker.records()``, or the rows of its CSV): one dict per
logged step and group with ``step, t, symmetry, layer, group, observed, gradient_flow,
continuous, discrete, residual``; a law that is not available for a family is ``None``/NaN.

* :func:`records_figure` / :func:`plot_records`: one panel per symmetry; per layer, the sum of Q
  over the layer's groups, observed (solid) against the exact discrete law (dashed) and the
  continuous model (dotted), one colour per layer from a sequential colormap. Every law is linear
  and holds per group, so the sum over a layer's groups of the observed Q is predicted by the sum
  of the per-group predictions: the layer curves are as exact as the group curves.
* :func:`errors_figure` / :func:`plot_errors`: per symmetry, the error of each law relative to
  its family's scale against the step, worst group (see :func:`relative_error_curves`), on a
  log scale.

Figures are drawn with matplotlib's Agg canvas (no display needed); the ``*_figure`` functions
return the :class:`~matplotlib.figure.Figure` so tests and notebooks can inspect its axes.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from symmech.laws.names import CONTINUOUS, DISCRETE, DISCRETE_RESIDUAL, GRADIENT_FLOW, LAWS
from symmech.spec.library import BUILTIN

__all__ = [
    "LAWS",
    "LAW_LABELS",
    "GroupHistory",
    "errors_figure",
    "group_histories",
    "plot_errors",
    "plot_records",
    "read_records_csv",
    "records_figure",
    "relative_error_curves",
    "short_labels",
    "symmetry_order",
]

LAW_LABELS: dict[str, str] = {
    GRADIENT_FLOW: "gradient flow (Q conserved)",
    CONTINUOUS: "continuous model",
    DISCRETE: "exact discrete law",
    DISCRETE_RESIDUAL: "exact discrete law + measured r",
}
_LAW_STYLE = {DISCRETE: "--", CONTINUOUS: ":", GRADIENT_FLOW: "-.", DISCRETE_RESIDUAL: "-"}
_LAW_COLOURS = {
    GRADIENT_FLOW: "tab:gray",
    CONTINUOUS: "tab:orange",
    DISCRETE: "tab:blue",
    DISCRETE_RESIDUAL: "tab:green",
}
_COLORMAP = "viridis"
_LABEL_WIDTH = 52
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.\w+)+")


# --------------------------------------------------------------------------------------------
# records -> arrays


def _number(value: Any) -> float:
    """A record field as a float; ``None``, ``""`` and unparsable text become NaN."""
    if value is None:
        return math.nan
    if hasattr(value, "item"):  # numpy or torch scalar
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class GroupHistory:
    """The history of one layer (one family) of one symmetry, groups along the last axis.

    ``observed`` and each ``laws[name]`` have shape ``(n_steps, n_groups)``; an entry without a
    record, or whose law is unavailable, is NaN.
    """

    symmetry: str
    layer: str
    steps: np.ndarray
    t: np.ndarray
    groups: list[Any]
    observed: np.ndarray
    laws: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def layer_sum(self, values: np.ndarray) -> np.ndarray:
        """Sum over groups per step; NaN where any group is NaN (no partial sums)."""
        return values.sum(axis=1)


def symmetry_order(names: Iterable[str]) -> list[str]:
    """The registry's symmetries first, in its order (translation, scale, rescale, ...), when
    present; then the rest sorted."""
    present = set(names)
    known = [s for s in BUILTIN if s in present]
    return known + sorted(present - set(known))


def group_histories(
    records: Iterable[Mapping[str, Any]] | Sequence[GroupHistory],
) -> list[GroupHistory]:
    """Arrange records into one :class:`GroupHistory` per (symmetry, layer).

    Layers keep the order in which they first appear (the tracker logs them in network order);
    symmetries are ordered by :func:`symmetry_order`. A list of histories is returned as is, so
    every function here takes either records or the histories made from them once.
    """
    records = list(records)
    if records and all(isinstance(r, GroupHistory) for r in records):
        return records  # type: ignore[return-value]
    by_layer: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for rec in records:
        key = (str(rec["symmetry"]), str(rec["layer"]))
        by_layer.setdefault(key, []).append(rec)
    histories = [_history(symmetry, layer, recs) for (symmetry, layer), recs in by_layer.items()]
    rank = {s: i for i, s in enumerate(symmetry_order(h.symmetry for h in histories))}
    return sorted(histories, key=lambda h: rank[h.symmetry])  # stable: layer order kept


def _column(recs: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """One field of every record as float64 (None, missing and unparsable values: NaN)."""
    values = [r.get(key) for r in recs]
    try:
        return np.asarray(values, dtype=np.float64)  # None -> NaN
    except (TypeError, ValueError):
        return np.array([_number(v) for v in values], dtype=np.float64)


def _history(symmetry: str, layer: str, recs: Sequence[Mapping[str, Any]]) -> GroupHistory:
    step_values = _column(recs, "step")
    steps, row = np.unique(step_values, return_inverse=True)
    keys = [_group_key(_group_name(r)) for r in recs]
    groups = list(dict.fromkeys(keys))
    index = {g: j for j, g in enumerate(groups)}
    col = np.fromiter((index[k] for k in keys), dtype=np.intp, count=len(keys))
    shape = (len(steps), len(groups))

    def grid(values: np.ndarray) -> np.ndarray:
        out = np.full(shape, np.nan)
        out[row, col] = values
        return out

    t = np.full(len(steps), np.nan)
    t[row] = _column(recs, "t")
    notes = dict.fromkeys(str(r["note"]) for r in recs if r.get("note"))
    return GroupHistory(
        symmetry,
        layer,
        steps,
        t,
        groups,
        grid(_column(recs, "observed")),
        {law: grid(_column(recs, law)) for law in LAWS},
        list(notes),
    )


def _group_name(rec: Mapping[str, Any]) -> Any:
    """A group's name within its (symmetry, layer): its label where records carry one (several
    families can share a layer, e.g. one attention module's heads, each counting groups from 0),
    else its index."""
    label = rec.get("label")
    return rec.get("group", 0) if label is None or label == "" else label


def _group_key(value: Any) -> Any:
    if type(value) is int:
        return value
    number = _number(value)
    return int(number) if math.isfinite(number) and number == int(number) else str(value)


_TEXT_COLUMNS = frozenset({"symmetry", "layer", "label", "status", "note"})


def read_records_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a tracker CSV as records: ``step`` and ``group`` as ints, the other
    columns but ``symmetry``, ``layer``, ``status`` and ``note`` as floats, empty cells ``None``.
    """
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rec: dict[str, Any] = dict(row)
            for key, text in row.items():
                if key in _TEXT_COLUMNS or key is None:
                    continue
                text = (text or "").strip()
                rec[key] = None if text == "" else _number(text)
                if key in ("step", "group") and rec[key] is not None:
                    rec[key] = _group_key(text)
            rows.append(rec)
    return rows


# --------------------------------------------------------------------------------------------
# relative errors


def relative_error_curves(
    records: Iterable[Mapping[str, Any]] | Sequence[GroupHistory],
    scales: Mapping[tuple[str, str], float] | None = None,
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per symmetry and law: ``(steps, error)``, the largest error over groups per step.

    The error of group j at step k is ``|Q_pred(k) − Q_obs(k)| / S``, S the scale of the
    group's family (its layer): ``scales[(symmetry, layer)]`` when given (the tracker's, see
    ``symmech.runtime.error_scale``, which adds the size of Q's terms so that a Q that stays
    at 0 is measured against its parameters), else the largest |Q_obs| over every logged step
    and group of the family; S = 0 gives the absolute error. The curve of a symmetry takes,
    at each step, the largest value over all groups of all its layers. Groups without the law
    (NaN) are skipped; a law that no group has is left out of the result.
    """
    histories = group_histories(records)
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for h in histories:
            scale = (scales or {}).get((h.symmetry, h.layer))
            if scale is None:
                scale = _fmax_reduce(np.abs(h.observed).reshape(-1), axis=0)
            scale = float(scale) if np.isfinite(scale) and scale > 0 else 1.0
            for law in LAWS:
                err = np.abs(h.laws[law] - h.observed) / scale
                per_step = _fmax_reduce(err, axis=1)
                if not np.isfinite(per_step).any():
                    continue
                per_law = curves.setdefault(h.symmetry, {})
                per_law[law] = _merge_max(per_law.get(law), (h.steps, per_step))
    return {s: {law: c[law] for law in LAWS if law in c} for s, c in curves.items()}


def _fmax_reduce(values: np.ndarray, axis: int) -> np.ndarray:
    """Largest value along ``axis`` ignoring NaN (NaN where all are NaN), without warnings."""
    if values.shape[axis] == 0:
        shape = list(values.shape)
        del shape[axis]
        return np.full(shape, np.nan)
    return np.fmax.reduce(values, axis=axis)


def _merge_max(
    a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    if a is None:
        return b
    steps = np.union1d(a[0], b[0])
    out = np.full(len(steps), np.nan)
    for s, v in (a, b):
        idx = np.searchsorted(steps, s)
        out[idx] = np.fmax(out[idx], v)
    return steps, out


# --------------------------------------------------------------------------------------------
# figures


def _new_figure(n_panels: int, width: float = 6.0, height: float = 4.2) -> Figure:
    n_panels = max(n_panels, 1)
    ncols = min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(nrows, ncols, squeeze=False)
    for ax in fig.axes[n_panels:]:
        fig.delaxes(ax)
    return fig


def short_labels(labels: Sequence[str], width: int = _LABEL_WIDTH) -> list[str]:
    """Legend labels: each dotted module path cut to its shortest suffix that stays unique.

    ``features.conv1_1 → features.bn1_1`` becomes ``conv1_1 → bn1_1``; ``layer1.0.conv1`` and
    ``layer2.0.conv1`` keep ``layer1.0.conv1`` and ``layer2.0.conv1``. Labels longer than
    ``width`` are cut with an ellipsis.
    """
    paths = sorted({m.group(0) for label in labels for m in _DOTTED.finditer(label)})
    short: dict[str, str] = {}
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if sum(p == suffix or p.endswith("." + suffix) for p in paths) == 1:
                short[path] = suffix
                break
    out = []
    for label in labels:
        text = _DOTTED.sub(lambda m: short.get(m.group(0), m.group(0)), label)
        out.append(text if len(text) <= width else text[: width - 1] + "…")
    return out


def _x_values(h: GroupHistory, x: str) -> np.ndarray:
    if x == "t":
        return h.t
    if x == "step":
        return h.steps
    raise ValueError(f"x must be 'step' or 't', got {x!r}")


def records_figure(
    records: Iterable[Mapping[str, Any]],
    title: str | None = None,
    *,
    x: str = "step",
    show_gradient_flow: bool = False,
) -> Figure:
    """The theory-vs-observed figure: one panel per symmetry, per-layer curves.

    Each layer's curve is the sum of Q over its groups: observed (solid), exact discrete law
    (dashed), continuous model (dotted) and, with ``show_gradient_flow``, the conserved value
    Q(0) (dash-dot). Layer colours run along a sequential colormap in network order. The y axis
    is logarithmic when every plotted value of the panel is positive. ``x`` is ``"step"`` or
    ``"t"`` (the continuous time Σ η). A records list with no rows gives one empty panel.
    """
    histories = group_histories(records)
    symmetries = symmetry_order(h.symmetry for h in histories)
    fig = _new_figure(len(symmetries))
    laws = (DISCRETE, CONTINUOUS) + ((GRADIENT_FLOW,) if show_gradient_flow else ())
    if not symmetries:
        fig.axes[0].text(0.5, 0.5, "no records", ha="center", va="center")
    for ax, symmetry in zip(fig.axes, symmetries):
        layers = [h for h in histories if h.symmetry == symmetry]
        colours = _layer_colours(len(layers))
        plotted: list[np.ndarray] = []
        labels = short_labels([f"{h.layer} [{h.n_groups}]" for h in layers])
        for h, colour, label in zip(layers, colours, labels):
            xs = _x_values(h, x)
            obs = h.layer_sum(h.observed)
            # observed: wide and pale, so the thin theory lines on top of it stay visible
            ax.plot(xs, obs, "-", color=colour, lw=3.0, alpha=0.45, label=label)
            plotted.append(obs)
            for law in laws:
                pred = h.layer_sum(h.laws[law])
                if np.isfinite(pred).any():
                    ax.plot(xs, pred, _LAW_STYLE[law], color=colour, lw=1.2, alpha=0.9)
                    plotted.append(pred)
        values = np.concatenate(plotted) if plotted else np.array([])
        values = values[np.isfinite(values)]
        if values.size and (values > 0).all():
            ax.set_yscale("log")
        ax.set_title(symmetry)
        ax.set_xlabel("step" if x == "step" else "t = Σ η")
        ax.set_ylabel("Q, summed over the layer's groups")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6, loc="best", title="layer [groups]", title_fontsize=7,
                  ncol=1 if len(layers) <= 8 else 2)  # fmt: skip
    style = [Line2D([], [], color="k", ls="-", lw=3.0, alpha=0.45, label="observed")]
    style += [Line2D([], [], color="k", ls=_LAW_STYLE[law], label=LAW_LABELS[law]) for law in laws]
    fig.legend(handles=style, loc="outside lower center", ncol=len(style), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _layer_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps[_COLORMAP]
    if n == 1:
        return [cmap(0.35)]
    return [cmap(0.9 * i / (n - 1)) for i in range(n)]  # 0.9: keep off the palest yellow


def errors_figure(
    records: Iterable[Mapping[str, Any]],
    title: str | None = None,
    *,
    x: str = "step",
    scales: Mapping[tuple[str, str], float] | None = None,
) -> Figure:
    """Error of each law against the step, one panel per symmetry, log y axis.

    The error is the worst group's, relative to its family's scale (see
    :func:`relative_error_curves`); exact zeros, which a log axis cannot show, are left out
    (every law equals the observation at the first logged step).
    """
    histories = group_histories(records)
    curves = relative_error_curves(histories, scales)
    t_of_step: dict[float, float] = {}
    for h in histories:
        t_of_step.update(zip(h.steps.tolist(), h.t.tolist()))
    symmetries = symmetry_order(curves)
    fig = _new_figure(len(symmetries), width=5.0, height=3.6)
    if not symmetries:
        fig.axes[0].text(0.5, 0.5, "no records", ha="center", va="center")
    for ax, symmetry in zip(fig.axes, symmetries):
        for law, (steps, err) in curves[symmetry].items():
            keep = np.isfinite(err) & (err > 0)
            if not keep.any():
                continue
            xs = steps if x == "step" else np.array([t_of_step[s] for s in steps.tolist()])
            ax.plot(xs[keep], err[keep], _LAW_STYLE[law], color=_LAW_COLOURS[law],
                    label=f"{LAW_LABELS[law]} (max {err[keep].max():.1e})")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(symmetry)
        ax.set_xlabel("step" if x == "step" else "t = Σ η")
        ax.set_ylabel("|pred − obs| / family scale, worst group")
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_records(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    *,
    x: str = "step",
    show_gradient_flow: bool = False,
    dpi: int = 120,
) -> Path:
    """Write :func:`records_figure` to ``path`` (PNG, or any format matplotlib knows by suffix)."""
    return _save(records_figure(records, title, x=x, show_gradient_flow=show_gradient_flow),
                 path, dpi)  # fmt: skip


def plot_errors(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    *,
    x: str = "step",
    scales: Mapping[tuple[str, str], float] | None = None,
    dpi: int = 120,
) -> Path:
    """Write :func:`errors_figure` to ``path``."""
    return _save(errors_figure(records, title, x=x, scales=scales), path, dpi)
