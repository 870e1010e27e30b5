"""The compact history: rows equal to the obvious per-snapshot construction, chunks, spill, cap.

The reference below builds each record straight from the snapshots the tracker hands to the
history (one dict per group, host floats), the slow obvious way; the history stores them as
float64 chunks and rebuilds columns with NumPy. Training runs a real network with momentum,
weight decay and a cosine schedule, so every law column is filled.
"""

from __future__ import annotations

import csv
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import symmech
from symmech.errors import BindingError
from symmech.runtime.history import COLUMNS, History, Snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


def _host(t: torch.Tensor | None) -> list[float] | None:
    return None if t is None else t.detach().to("cpu", torch.float64).reshape(-1).tolist()


def reference_rows(snapshots: list[Snapshot]) -> list[dict[str, Any]]:
    """Records from snapshots one by one (what a record means, without any storage)."""
    rows = []
    for s in snapshots:
        if s.observed is None:
            continue
        observed, residual = _host(s.observed), _host(s.residual)
        laws = None if s.laws is None else {n: _host(v)[s.segment] for n, v in s.laws.items()}
        predicted = laws is not None and s.status == "tracked"
        for j, value in enumerate(observed):
            row = {"step": s.step, "t": s.t, "symmetry": s.symmetry, "layer": s.layer,
                   "group": j, "label": s.labels[j] if s.labels else str(j), "observed": value,
                   "residual": None if residual is None else residual[j],
                   "status": s.status, "note": s.note}  # fmt: skip
            for name in ("gradient_flow", "discrete", "discrete_residual", "first_order",
                         "second_order"):  # fmt: skip
                row[name] = laws[name][j] if predicted else None
            if predicted and residual is None and not s.residuals:
                row["discrete_residual"] = None
            model = "first_order" if s.momentum == 0.0 else "second_order"
            row["continuous"] = None if s.nesterov else row[model]
            if not s.continuous:
                row["first_order"] = row["second_order"] = row["continuous"] = None
            for name in ("dQ_decay", "dQ_breaking", "dQ_step", "dQ_history"):
                row[name] = laws[name][j] if row["discrete_residual"] is not None else None
            for name in ("angular_update", "angular_equilibrium", "equilibrium"):
                value = laws[name][j] if predicted and s.rotation else None
                row[name] = None if value is None or math.isnan(value) else value
            rows.append(row)
    return rows


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and math.isnan(va):
                assert isinstance(vb, float) and math.isnan(vb), k
            else:
                assert va == vb and type(va) is type(vb), (k, va, vb)


def _train(steps: int, history: History | None = None, log_every: int = 1, nesterov=False,
           residuals: bool = True):  # fmt: skip
    """A small classifier under SGD with a cosine schedule; every snapshot the history got."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                          nesterov=nesterov)  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    tracker = symmech.track(model, opt, example_input=(x, y), log_every=log_every,
                            residuals=residuals)  # fmt: skip
    if history is not None:
        tracker.history = history
    seen: list[Snapshot] = []
    add = tracker.history.add

    def spy(snapshots):
        seen.extend(snapshots)
        add(snapshots)

    tracker.history.add = spy  # type: ignore[method-assign]
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return tracker, seen


@pytest.mark.parametrize("nesterov", [False, True])
def test_rows_equal_the_snapshots_one_by_one(nesterov: bool) -> None:
    tracker, seen = _train(40, History(chunk_bytes=1), nesterov=nesterov)  # 16-row chunks
    rows = tracker.history.rows()
    _same(rows, reference_rows(seen))
    assert {r["step"] for r in rows} == set(range(40))
    assert any(r["discrete"] is not None for r in rows) and any(r["t"] for r in rows)


def test_rows_without_residuals_and_with_log_every() -> None:
    tracker, seen = _train(30, History(chunk_bytes=1), log_every=7, residuals=False)
    _same(tracker.history.rows(), reference_rows(seen))
    assert {r["step"] for r in tracker.history.rows()} == {0, 7, 14, 21, 28}


def test_spill_to_disk_reads_back_every_row(tmp_path) -> None:
    tracker, seen = _train(70, History(spill_dir=tmp_path, chunk_bytes=1))
    files = sorted(tmp_path.glob("*.npy"))
    assert files, "full chunks are written to disk"
    frames = tracker.history._frames
    kept = [c for f in frames for c in f.chunks if c.path is None]
    assert all(c.host is None or c is f.chunks[-2] or c is f.chunks[-1]
               for f in frames for c in f.chunks if c.path is None)  # fmt: skip
    assert len(kept) <= 2 * len(frames)
    _same(tracker.history.rows(), reference_rows(seen))


def _snap(step: int, value: float, groups: int = 2) -> Snapshot:
    return Snapshot(step, float(step), "scale", "c", torch.full((groups,), value), None, None,
                    None, 0.9, False, "observed only", "", True)  # fmt: skip


@settings(max_examples=40)
@given(cap=st.integers(2, 40), n=st.integers(1, 400))
def test_max_history_thins_evenly_and_keeps_first_and_latest(cap: int, n: int) -> None:
    h = History(max_history=cap, chunk_bytes=1)
    for k in range(n):
        h.add([_snap(k, float(k))])
    steps = sorted({r["step"] for r in h.rows()})
    assert steps[0] == 0 and steps[-1] == n - 1
    assert len(steps) <= cap + 1
    stride = h.stride
    assert all(s % stride == 0 for s in steps[:-1])
    assert steps[:-1] == list(range(0, n - 1, stride))[: len(steps) - 1] or steps == [0]
    assert [r["observed"] for r in h.rows()][::2] == [float(s) for s in steps]
    if n > cap:
        assert stride > 1 and len(steps) > cap // 2
        assert all("history thinned: every" in r["note"] for r in h.rows())
    else:
        assert stride == 1 and steps == list(range(n)) and not h.rows()[0]["note"]


def test_max_history_on_a_real_run_keeps_rows_right() -> None:
    tracker, seen = _train(100, History(max_history=10, chunk_bytes=1))
    rows = tracker.history.rows()
    steps = sorted({r["step"] for r in rows})
    assert len(steps) <= 11 and steps[0] == 0 and steps[-1] == 99
    expected = [r for r in reference_rows(seen) if r["step"] in steps]
    for r in expected:
        r["note"] = (r["note"] + "; " if r["note"] else "") + (
            f"history thinned: every {tracker.history.stride}th logged step kept, and the "
            "latest (max_history=10)"
        )
    _same(rows, expected)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(BindingError, match=r"History\(max_history=1, .*integer ≥ 2, got 1"):
        History(max_history=1)
    with pytest.raises(BindingError, match="max_history and spill_dir exclude each other"):
        History(max_history=5, spill_dir="x")


@pytest.mark.parametrize(
    "history", [lambda: History(chunk_bytes=1), lambda: History(max_history=8, chunk_bytes=1)]
)
def test_no_device_to_host_copy_while_training(monkeypatch, history) -> None:
    """The hooks queue device work only: no .cpu(), .item(), .tolist() or .numpy() per step
    (chunks fill and are offloaded, or thinned, during the run)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 4, (32,))
    tracker = symmech.track(model, opt, example_input=(x, y))
    tracker.history = history()
    losses = []
    for _ in range(2):  # the first step builds the banks
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    calls: list[str] = []
    for name in ("cpu", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert calls == []
    monkeypatch.undo()
    assert len(tracker.history.rows()) == len(tracker.records(final=False)) > 0


def test_csv_has_the_columns_and_empty_cells_for_none(tmp_path) -> None:
    tracker, _ = _train(5)
    rows = tracker.records()
    path = tracker.history.to_csv(rows, tmp_path / "r.csv")
    with path.open() as f:
        read = list(csv.reader(f))
    assert tuple(read[0]) == COLUMNS
    assert len(read) == len(rows) + 1
    for row, cells in zip(rows, read[1:]):
        for k, cell in zip(COLUMNS, cells):
            v = row[k]
            assert cell == ("" if v is None else str(v))


def test_float32_parameters_are_stored_exactly() -> None:
    h = History()
    q = torch.tensor([0.1, -3.0e-20, 7.0], dtype=torch.float32)
    h.add([Snapshot(3, None, "translation", "b", q, q * 2, None, None, 0.0, False,
                    "observed only", "why", True)])  # fmt: skip
    rows = h.rows()
    assert [r["observed"] for r in rows] == np.asarray(q, dtype=np.float64).tolist()
    assert [r["residual"] for r in rows] == np.asarray(q * 2, dtype=np.float64).tolist()
    assert all(r["t"] is None and r["discrete"] is None and r["note"] == "why" for r in rows)


def test_a_row_that_cannot_be_stored_warns_and_never_raises() -> None:
    h = History()
    h.add([_snap(0, 1.0), _snap(0, 2.0)])
    bad = Snapshot(1, 1.0, "scale", "c", torch.ones(5), None, None, None, 0.9, False,
                   "observed only", "", True)  # fmt: skip
    with pytest.warns(symmech.TrackerWarning, match=r"history of scale on c stopped at step 1"):
        h.add([bad, _snap(1, 3.0)])
    h.add([bad, _snap(2, 4.0)])
    rows = h.rows()
    assert [(r["step"], r["observed"]) for r in rows] == [
        (0, 1.0), (0, 1.0), (0, 2.0), (0, 2.0), (1, 3.0), (1, 3.0), (2, 4.0), (2, 4.0)
    ]  # fmt: skip
