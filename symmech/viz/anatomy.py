"""Where each layer's charge change came from, and how fast its weights turn.

* :func:`anatomy_figure` / :func:`plot_anatomy`: one panel per family (symmetry, layer), the
  layer's Q − Q₀ (sum over its groups) split into the cumulative parts of the records
  (``dQ_decay``, ``dQ_breaking``, ``dQ_step``, ``dQ_history``), stacked: positive parts above
  zero, negative parts below, with the observed Q − Q₀ as a black line that the stacks add up to.
* :func:`rotation_figure` / :func:`plot_rotation`: per scale layer, the mean angular update of its
  groups (radians per step, solid) against the random-walk equilibrium angle of the optimizer's
  settings (dashed), with the measured ratio over the last half of the run in the legend
  (:func:`rotation_ratios`). The equilibrium is a model (Wan et al. 2021 for SGD, Kosson et al.
  2024 for AdamW); the ratio says how well it holds.

>>> rows = [dict(step=k, symmetry="scale", layer="c", group=0, observed=1.0 - 0.1 * k,
...              gradient_flow=1.0, dQ_decay=-0.1 * k, dQ_breaking=0.0, dQ_step=0.0,
...              dQ_history=0.0) for k in range(3)]
>>> fig = anatomy_figure(rows)
>>> fig.axes[0].get_title()
'scale: c'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from symmech.laws.names import ANATOMY, ANGULAR_EQUILIBRIUM, ANGULAR_UPDATE

from .plots import _new_figure, _number, _save, short_labels

__all__ = [
    "ANATOMY_LABELS",
    "anatomy_figure",
    "layer_series",
    "plot_anatomy",
    "plot_rotation",
    "rotation_figure",
    "rotation_ratios",
]

ANATOMY_LABELS = {
    "dQ_decay": "weight decay",
    "dQ_breaking": "symmetry breaking (r, preconditioner)",
    "dQ_step": "finite step (½η² term)",
    "dQ_history": "momentum from before tracking",
}
_COLOURS = {
    "dQ_decay": "tab:blue",
    "dQ_breaking": "tab:red",
    "dQ_step": "tab:green",
    "dQ_history": "tab:gray",
}


def layer_series(
    records: Iterable[Mapping[str, Any]], keys: Sequence[str], reduce: str = "sum"
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Per (symmetry, layer): ``step`` and each key reduced over the layer's groups per step
    (``sum`` or ``mean``; NaN where no group has a value)."""
    acc: dict[tuple[str, str], dict[int, dict[str, list[float]]]] = {}
    for r in records:
        by_step = acc.setdefault((str(r["symmetry"]), str(r["layer"])), {})
        cell = by_step.setdefault(int(_number(r["step"])), {k: [] for k in keys})
        for k in keys:
            v = _number(r.get(k))
            if np.isfinite(v):
                cell[k].append(v)
    out: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for fam, by_step in acc.items():
        steps = sorted(by_step)
        series: dict[str, np.ndarray] = {"step": np.asarray(steps, dtype=float)}
        for k in keys:
            values = [by_step[s][k] for s in steps]
            if reduce == "sum":
                series[k] = np.array([sum(v) if v else np.nan for v in values])
            else:
                series[k] = np.array([float(np.mean(v)) if v else np.nan for v in values])
        out[fam] = series
    return out


def anatomy_figure(
    records: Iterable[Mapping[str, Any]], title: str | None = None, max_panels: int = 9
) -> Figure:
    """Stacked parts of each family's Q − Q₀ per step (the ``max_panels`` that moved most)."""
    series = layer_series(records, ("observed", "gradient_flow", *ANATOMY))
    fams = [f for f, s in series.items() if np.isfinite(s["dQ_decay"]).any()]
    moved = {
        f: float(np.nanmax(np.abs(series[f]["observed"] - series[f]["gradient_flow"]), initial=0.0))
        for f in fams
    }
    fams = sorted(fams, key=lambda f: -moved[f])[:max_panels]
    fig = _new_figure(len(fams), width=5.5, height=3.8)
    labels = short_labels([layer for _, layer in fams])
    for ax, fam, label in zip(fig.axes, fams, labels):
        s = series[fam]
        x = s["step"]
        low = np.zeros_like(x)
        high = np.zeros_like(x)
        for part in ANATOMY:
            y = np.nan_to_num(s[part])
            if not np.any(y):
                continue
            up, down = np.clip(y, 0.0, None), np.clip(y, None, 0.0)
            ax.fill_between(x, high, high + up, color=_COLOURS[part], alpha=0.55, lw=0,
                            label=ANATOMY_LABELS[part])  # fmt: skip
            ax.fill_between(x, low + down, low, color=_COLOURS[part], alpha=0.55, lw=0)
            high, low = high + up, low + down
        ax.plot(
            x, s["observed"] - s["gradient_flow"], color="black", lw=1.2, label="observed Q − Q₀"
        )
        ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_title(f"{fam[0]}: {label}")
        ax.set_xlabel("step")
        ax.set_ylabel("Q − Q₀ (sum over groups)")
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def rotation_ratios(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """Per scale layer: median over the last half of the run of (mean angular update over its
    groups) / (equilibrium angle); NaN where the equilibrium has no model."""
    out = {}
    for fam, s in layer_series(records, (ANGULAR_UPDATE, ANGULAR_EQUILIBRIUM), "mean").items():
        ok = np.isfinite(s[ANGULAR_UPDATE]) & np.isfinite(s[ANGULAR_EQUILIBRIUM])
        if not ok.any():
            continue
        ratio = s[ANGULAR_UPDATE][ok] / s[ANGULAR_EQUILIBRIUM][ok]
        out[fam] = float(np.median(ratio[len(ratio) // 2 :]))
    return out


def rotation_figure(records: Iterable[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Observed angular updates of every scale layer against the predicted equilibrium."""
    records = list(records)
    series = layer_series(records, (ANGULAR_UPDATE, ANGULAR_EQUILIBRIUM), "mean")
    series = {f: s for f, s in series.items() if np.isfinite(s[ANGULAR_UPDATE]).any()}
    ratios = rotation_ratios(records)
    fig = _new_figure(1, width=7.0, height=4.5)
    ax = fig.axes[0]
    labels = short_labels([layer for _, layer in series])
    colours = [f"C{i % 10}" for i in range(len(series))]
    for (fam, s), label, colour in zip(series.items(), labels, colours):
        ratio = ratios.get(fam, float("nan"))
        ax.plot(s["step"], s[ANGULAR_UPDATE], color=colour, lw=1.0,
                label=f"{label} (observed / equilibrium {ratio:.2f})")  # fmt: skip
        ax.plot(s["step"], s[ANGULAR_EQUILIBRIUM], color=colour, lw=1.0, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("angle between θₖ₋₁ and θₖ (rad), mean over channels")
    ax.set_title("rotation of scale-invariant weights: observed (solid), equilibrium (dashed)")
    if series:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_anatomy(records, path: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Write :func:`anatomy_figure` to ``path``."""
    return _save(anatomy_figure(records, title), path, dpi)


def plot_rotation(records, path: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Write :func:`rotation_figure` to ``path``."""
    return _save(rotation_figure(records, title), path, dpi)
