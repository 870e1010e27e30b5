"""Sinks of a tracker's records: a DataFrame equal to the records, Parquet and CSV read back, and a
TensorBoard event file read back with tensorboard's EventAccumulator, whose tags and values
equal per-layer sums and errors recomputed here from the records in plain Python loops.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")

from support.mlp_charges import mlp  # noqa: E402

import symmech  # noqa: E402
from symmech.errors import BindingError  # noqa: E402
from symmech.laws.names import LAWS  # noqa: E402
from symmech.runtime.error_scale import max_errors  # noqa: E402
from symmech.runtime.history import COLUMNS  # noqa: E402
from symmech.runtime.sinks import (  # noqa: E402
    layer_summaries,
    log_to_tensorboard,
    records_to_dataframe,
    tag_part,
    write_parquet,
    write_records,
)

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 20


@pytest.fixture(scope="module")
def tracker() -> symmech.Tracker:
    model = mlp(seed=0).double()
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(32, 8, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (32,), generator=g),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    tracker = symmech.track(model, opt, example_input=(x, y))
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return tracker


def _same(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b


def test_dataframe_equals_the_records(tracker) -> None:
    rows = tracker.records()
    frame = records_to_dataframe(rows)
    extra = [k for k in rows[0] if k not in COLUMNS]
    assert list(frame.columns) == list(COLUMNS) + extra
    assert len(frame) == len(rows) == (STEPS + 1) * sum(f.n_groups for f in tracker.families)
    assert frame["step"].dtype == np.int64 and frame["observed"].dtype == np.float64
    for i, (row, rec) in enumerate(zip(frame.to_dict("records"), rows)):
        for key in frame.columns:
            want = rec.get(key)
            assert _same(want, row[key]) or (want == "" and row[key] == ""), (
                i,
                key,
                want,
                row[key],
            )
    # a dict of columns (as History.columns() gives) makes the same frame
    by_column = {k: [r.get(k) for r in rows] for k in rows[0]}
    pd.testing.assert_frame_equal(records_to_dataframe(by_column), frame)


def test_parquet_round_trip_and_csv_by_suffix(tracker, tmp_path: Path) -> None:
    rows = tracker.records()
    frame = records_to_dataframe(rows)
    path = write_parquet(rows, tmp_path / "out" / "records.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), frame)
    assert write_records(rows, tmp_path / "r.parquet").stat().st_size == path.stat().st_size
    csv_path = write_records(rows, tmp_path / "r.csv")
    with csv_path.open() as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == COLUMNS and len(table) == len(rows) + 1
    assert [float(r[COLUMNS.index("observed")]) for r in table[1:]] == [r["observed"] for r in rows]
    print(f"records: csv {csv_path.stat().st_size} B, parquet {path.stat().st_size} B")
    assert path.stat().st_size < csv_path.stat().st_size
    with pytest.raises(
        BindingError, match=r"write_records\(rows, '.*r.json'\): unknown suffix '.json'"
    ):
        write_records(rows, tmp_path / "r.json")


def _expected_scalars(rows) -> dict[tuple[str, int], float]:
    """Per tag and step, by hand: sums over groups, and max_j |discrete − observed| / S."""
    by_family = defaultdict(list)
    for r in rows:
        by_family[(r["symmetry"], r["layer"])].append(r)
    out = {}
    for (symmetry, layer), recs in by_family.items():
        base = f"symmech/{tag_part(symmetry)}/{tag_part(layer)}"
        scale = max(abs(r["observed"]) for r in recs) or 1.0
        steps = sorted({r["step"] for r in recs})
        for step in steps:
            at = [r for r in recs if r["step"] == step]
            out[(f"{base}/observed", step)] = sum(r["observed"] for r in at)
            for law in LAWS:
                if all(r[law] is not None for r in at):
                    out[(f"{base}/{law}", step)] = sum(r[law] for r in at)
            errs = [
                abs(r["discrete"] - r["observed"]) / scale for r in at if r["discrete"] is not None
            ]
            if errs:
                out[(f"{base}/rel_error/discrete", step)] = max(errs)
    return out


def test_tensorboard_event_file_holds_the_per_layer_scalars(tracker, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    rows = tracker.records()
    writer = SummaryWriter(log_dir=str(tmp_path))
    n = log_to_tensorboard(rows, writer)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = _expected_scalars(rows)
    assert n == len(got) == len(want)
    assert set(got) == set(want)
    for key, value in want.items():  # TensorBoard keeps float32
        assert got[key] == float(np.float32(value)), (key, got[key], value)
    # one tag per layer and quantity, not per group
    layers = {(f.symmetry, f.layer) for f in tracker.families}
    assert len(events.Tags()["scalars"]) == len(layers) * (2 + len(LAWS))
    # the largest error equals the project's definition (symmech.runtime.error_scale)
    reference = max_errors(rows)
    for symmetry, layer in layers:
        tag = f"symmech/{tag_part(symmetry)}/{tag_part(layer)}/rel_error/discrete"
        worst = max(v for (t, _), v in want.items() if t == tag)
        assert worst == pytest.approx(
            reference[(symmetry, layer)]["discrete"], rel=1e-12, abs=1e-300
        )


def test_per_group_since_step_and_terms(tracker) -> None:
    rows = tracker.records()
    all_steps = layer_summaries(rows)
    later = layer_summaries(rows, since_step=15, per_group=True)
    assert sorted(later) == [16, 17, 18, 19, 20]
    for step, tags in later.items():
        assert {t: v for t, v in tags.items() if "/group" not in t} == all_steps[step]
    fam = next(f for f in tracker.families if f.symmetry == "rescale")
    base = f"symmech/rescale/{tag_part(fam.layer)}"
    at = [r for r in rows if r["step"] == 20 and r["layer"] == fam.layer]
    for r in at:
        assert later[20][f"{base}/group{r['group']}/observed"] == r["observed"]
    # a larger scale S (the size of Q's terms) divides the error
    plain = all_steps[20][f"{base}/rel_error/discrete"]
    scaled = layer_summaries(rows, terms={("rescale", fam.layer): 1e6})[20]
    assert scaled[f"{base}/rel_error/discrete"] == pytest.approx(
        plain * max(abs(r["observed"]) for r in rows if r["layer"] == fam.layer) / 1e6, rel=1e-12
    )


def test_missing_extras_and_bad_writers_are_named(tracker, monkeypatch, tmp_path: Path) -> None:
    rows = tracker.records()
    with pytest.raises(
        BindingError, match=r"log_to_tensorboard\(rows, list\): the writer has no add_scalar"
    ):
        log_to_tensorboard(rows, [])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(
        ImportError, match=r"write_parquet\(rows, .*\): it needs pyarrow.*symmech\[frames\]"
    ):
        write_parquet(rows, tmp_path / "r.parquet")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"records_to_dataframe\(rows\): it needs pandas"):
        records_to_dataframe(rows)
