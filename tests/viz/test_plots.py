"""Plots of tracker records: panels per symmetry, per-layer sums, relative-error curves."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from symmech.viz.plots import (
    errors_figure,
    group_histories,
    plot_errors,
    plot_records,
    read_records_csv,
    records_figure,
    relative_error_curves,
    short_labels,
    symmetry_order,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIELDS = ["step", "t", "symmetry", "layer", "group", "observed", "gradient_flow", "continuous",
          "discrete", "residual"]  # fmt: skip


def _records(
    layers: dict[str, list[str]], n_steps: int = 30, n_groups: int = 3, lr: float = 0.1
) -> list[dict]:
    """Scale-like Q (positive, decaying) for scale; sign-changing Q for the other symmetries."""
    out = []
    for symmetry, names in layers.items():
        for li, layer in enumerate(names):
            for g in range(n_groups):
                q0 = (1.0 + g + li) * (1 if symmetry == "scale" or g % 2 else -1)
                for k in range(n_steps):
                    q = q0 * math.exp(-k / 20)
                    out.append({
                        "step": k, "t": lr * k, "symmetry": symmetry, "layer": layer, "group": g,
                        "observed": q, "gradient_flow": q0, "continuous": q * (1 + 1e-2),
                        "discrete": q * (1 + 1e-9), "residual": 0.0,
                    })  # fmt: skip
    return out


STANDARD = {
    "rescale": ["r1", "r2"],
    "translation": ["fc bias", "fc columns"],
    "scale": ["c1", "c2", "c3"],
}


def test_symmetry_order_puts_the_paper_three_first() -> None:
    assert symmetry_order(["zeta", "rescale", "scale", "alpha", "translation"]) == [
        "translation", "scale", "rescale", "alpha", "zeta"
    ]  # fmt: skip


def test_symmetry_order_follows_the_registry_then_sorts_user_specs() -> None:
    # registry order: translation, scale, rescale, quadratic_rescale, linear_pair, ...
    names = ["my_spec", "linear_pair", "quadratic_rescale", "scale", "another"]
    assert symmetry_order(names) == [
        "scale", "quadratic_rescale", "linear_pair", "another", "my_spec"
    ]  # fmt: skip


def test_group_histories_arrange_and_sum_per_layer() -> None:
    histories = group_histories(_records(STANDARD, n_steps=4, n_groups=2))
    assert [(h.symmetry, h.layer) for h in histories] == [
        ("translation", "fc bias"), ("translation", "fc columns"),
        ("scale", "c1"), ("scale", "c2"), ("scale", "c3"), ("rescale", "r1"), ("rescale", "r2"),
    ]  # fmt: skip
    h = histories[2]  # scale c1: groups q0 = 1, 2
    assert h.observed.shape == (4, 2) and h.n_groups == 2
    np.testing.assert_allclose(h.layer_sum(h.observed), 3 * np.exp(-np.arange(4) / 20))
    np.testing.assert_allclose(h.t, 0.1 * np.arange(4))


def test_layer_sum_is_nan_when_a_group_lacks_the_law() -> None:
    recs = _records({"scale": ["c1"]}, n_steps=3, n_groups=2)
    for r in recs:
        if r["group"] == 1:
            r["continuous"] = None
    (h,) = group_histories(recs)
    assert np.isnan(h.layer_sum(h.laws["continuous"])).all()
    assert np.isfinite(h.layer_sum(h.laws["discrete"])).all()


def test_records_figure_has_one_panel_per_symmetry() -> None:
    fig = records_figure(_records(STANDARD), title="t")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["translation", "scale", "rescale"]
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {"translation": "linear", "scale": "log", "rescale": "linear"}
    # per layer: observed, discrete, continuous
    assert [len(ax.get_lines()) for ax in fig.axes] == [6, 9, 6]
    scale_ax = fig.axes[1]
    styles = [line.get_linestyle() for line in scale_ax.get_lines()[:3]]
    assert styles == ["-", "--", ":"]
    colours = {tuple(line.get_color()) for line in scale_ax.get_lines()[::3]}
    assert len(colours) == 3  # one colour per layer
    assert fig.get_suptitle() == "t"


def test_records_figure_options() -> None:
    recs = _records({"scale": ["c1"]}, n_steps=5)
    fig = records_figure(recs, x="t", show_gradient_flow=True)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 4
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), 0.1 * np.arange(5))
    with pytest.raises(ValueError, match="x must be 'step' or 't', got 'epoch'"):
        records_figure(recs, x="epoch")


def test_unavailable_law_is_not_drawn() -> None:
    recs = _records({"rescale": ["r1"]}, n_steps=5)
    for r in recs:
        r["continuous"] = float("nan")
    (ax,) = records_figure(recs).axes
    assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "--"]


def test_empty_records_give_one_empty_panel() -> None:
    assert len(records_figure([]).axes) == 1
    assert len(errors_figure([]).axes) == 1


@pytest.mark.parametrize("n_symmetries", [1, 4, 5])
def test_panel_count_follows_symmetries(n_symmetries: int) -> None:
    names = ["translation", "scale", "rescale", "quadratic_rescale", "custom"][:n_symmetries]
    fig = records_figure(_records({s: ["a"] for s in names}, n_steps=3))
    assert len(fig.axes) == n_symmetries
    assert len(errors_figure(_records({s: ["a"] for s in names}, n_steps=3)).axes) == n_symmetries


def test_relative_error_curves_worst_group_per_step() -> None:
    curves = relative_error_curves(_records(STANDARD, n_steps=10))
    assert list(curves) == ["translation", "scale", "rescale"]
    steps, err = curves["scale"]["continuous"]
    np.testing.assert_array_equal(steps, np.arange(10))
    # |q (1 + 1e-2) - q| / |q0| = 1e-2 exp(-k/20): every group the same
    np.testing.assert_allclose(err, 1e-2 * np.exp(-np.arange(10) / 20), rtol=1e-9)
    _, flow = curves["translation"]["gradient_flow"]
    np.testing.assert_allclose(flow, 1 - np.exp(-np.arange(10) / 20), rtol=1e-9)


def test_errors_figure_log_axes_and_law_lines() -> None:
    fig = errors_figure(_records(STANDARD))
    assert [ax.get_title() for ax in fig.axes] == ["translation", "scale", "rescale"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)
    # the first step (error exactly 0) cannot be drawn on a log axis and is left out
    assert fig.axes[0].get_lines()[0].get_xdata()[0] == 1


def test_plot_files_are_png(tmp_path: Path) -> None:
    recs = _records(STANDARD)
    a = plot_records(recs, tmp_path / "sub" / "theory.png", title="demo")
    b = plot_errors(recs, tmp_path / "errors.png")
    for path in (a, b):
        assert path.is_file() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_read_records_csv_round_trip(tmp_path: Path) -> None:
    recs = _records({"scale": ["c1"], "rescale": ["r1"]}, n_steps=4)
    recs[0]["continuous"] = None
    path = tmp_path / "records.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*FIELDS, "note"])
        writer.writeheader()
        for r in recs:
            writer.writerow({**r, "continuous": "" if r["continuous"] is None else r["continuous"],
                             "note": ""})  # fmt: skip
    back = read_records_csv(path)
    assert len(back) == len(recs)
    assert back[0]["continuous"] is None and back[0]["symmetry"] == "scale"
    assert back[5]["step"] == 1 and back[5]["group"] == 1 and back[5]["note"] == ""
    assert back[1]["observed"] == pytest.approx(recs[1]["observed"], rel=1e-15)
    assert len(records_figure(back).axes) == 2


def test_short_labels_keep_the_shortest_unique_module_path() -> None:
    labels = [
        "features.conv1_1 → features.bn1_1 (BatchNorm2d) [16]",
        "classifier.fc1 → classifier.relu1 → classifier.fc2 [32]",
        "layer1.0.conv1 → layer1.0.bn1 [64]",
        "layer2.0.conv1 → layer2.0.bn1 [128]",
    ]
    assert short_labels(labels) == [
        "conv1_1 → bn1_1 (BatchNorm2d) [16]",
        "fc1 → relu1 → fc2 [32]",
        "layer1.0.conv1 → layer1.0.bn1 [64]",
        "layer2.0.conv1 → layer2.0.bn1 [128]",
    ]
    assert short_labels(["x" * 80], width=10) == ["x" * 9 + "…"]


def test_relative_error_curves_use_the_family_scale_and_given_scales() -> None:
    # one family, two groups: Q = 0 throughout for group 0 and 2 for group 1
    recs = [{"step": k, "t": 0.1 * k, "symmetry": "scale", "layer": "c", "group": g,
             "observed": 2.0 * g, "discrete": 2.0 * g + 1e-3 * (g == 0)}
            for k in range(3) for g in range(2)]  # fmt: skip
    ((_, err),) = relative_error_curves(recs)["scale"].values()
    np.testing.assert_allclose(err, 5e-4)  # 1e-3 against the family's largest |Q| = 2
    ((_, err),) = relative_error_curves(recs, scales={("scale", "c"): 100.0})["scale"].values()
    np.testing.assert_allclose(err, 1e-5)
    fig = errors_figure(recs, scales={("scale", "c"): 100.0})
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), 1e-5)
