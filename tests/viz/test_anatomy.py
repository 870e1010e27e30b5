"""The anatomy and rotation figures draw what the records say: the stacked parts add up to the
observed change (read back from the figure's polygons), the ratios are the records' own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.training import make_net

import symmech
from symmech.viz.anatomy import anatomy_figure, layer_series, rotation_figure, rotation_ratios

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adamw_rows():
    net = make_net("scale")
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-2, weight_decay=5e-2)
    tracker = symmech.track(net.model, opt, net.bindings())
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        opt.step()
    return tracker.records()


def _band_edges(ax) -> list[np.ndarray]:
    """The upper edge (y at each x) of every filled band, in drawing order."""
    out = []
    for coll in ax.collections:
        for path in coll.get_paths():
            v = path.vertices
            n = (len(v) - 1) // 2  # fill_between: forward along the top, back along the bottom
            out.append(v[1 : n + 1])
    return out


def test_stacked_parts_add_up_to_the_observed_change(adamw_rows):
    fig = anatomy_figure(adamw_rows)
    ax = fig.axes[0]
    line = ax.lines[0]
    x, observed = line.get_xdata(), line.get_ydata()
    # positive stacks end at the sum of positive parts, negative ones at the sum of negatives
    s = layer_series(adamw_rows, ("dQ_decay", "dQ_breaking", "dQ_step", "dQ_history"))[
        ("scale", "conv")
    ]
    total = sum(np.nan_to_num(s[k]) for k in ("dQ_decay", "dQ_breaking", "dQ_step", "dQ_history"))
    assert np.allclose(total, observed, rtol=0, atol=1e-12 * np.abs(observed).max())
    assert len(_band_edges(ax)) >= 4  # decay, breaking, finite step: each a band above or below
    assert np.abs(observed).max() > 0 and len(x) == 61


def test_rotation_ratio_is_the_median_of_the_records_ratio(adamw_rows):
    by_step: dict[int, list[tuple[float, float]]] = {}
    for r in adamw_rows:
        if r["angular_update"] is not None:
            by_step.setdefault(r["step"], []).append(
                (r["angular_update"], r["angular_equilibrium"])
            )
    ratio = [np.mean([a for a, _ in v]) / v[0][1] for _, v in sorted(by_step.items())]
    want = float(np.median(ratio[len(ratio) // 2 :]))
    assert rotation_ratios(adamw_rows)[("scale", "conv")] == pytest.approx(want, rel=1e-12)
    fig = rotation_figure(adamw_rows)
    assert "observed / equilibrium" in fig.axes[0].get_legend().get_texts()[0].get_text()
