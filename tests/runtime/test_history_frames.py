"""The history's frames against a plain model of what it keeps, on random runs.

Random snapshots (group counts, residuals present or not, laws mappings shared by several
families, families appearing, disappearing or sending no value, settings changing, values that do
not fit) go to a :class:`History` and to :class:`Kept`, a list per family built straight from the
snapshot values with the documented rules (a family whose values do not fit stops; under
``max_history`` a latest row off the stride is replaced by the next, and thinning keeps the rows on
the stride and each family's latest). Every row must match exactly, with None where it should be.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import tempfile
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import symmech
from symmech.laws.names import ANATOMY, PREDICTIONS, ROTATION, ROTATION_PARTS
from symmech.runtime.history import History, Snapshot

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = (*PREDICTIONS, *ANATOMY, *ROTATION, *ROTATION_PARTS)
STATUSES = ("tracked", "approximate: float32 sums", "observed only", "stopped: gone")


def _fit(values: list[float], groups: int) -> list[float] | None:
    """What a family of ``groups`` groups keeps of ``values``: one each, or one for all."""
    if len(values) == groups:
        return values
    return values * groups if len(values) == 1 else None


def expected_rows(s: Snapshot, groups: int, labels: tuple[str, ...]) -> list[dict] | None:
    """The records of one snapshot of a family of ``groups`` groups (None: they do not fit)."""
    observed = _fit(s.observed.to(torch.float64).reshape(-1).tolist(), groups)
    residual = None
    if s.residual is not None:
        residual = _fit(s.residual.to(torch.float64).reshape(-1).tolist(), groups)
    laws = None
    if s.laws is not None:
        laws = {n: _fit(s.laws[n].tolist()[s.segment], groups) for n in NAMES}
    if observed is None or (s.residual is not None and residual is None):
        return None
    if laws is not None and any(v is None for v in laws.values()):
        return None
    shown = laws is not None and (s.status == "tracked" or s.status.startswith("approximate"))
    split = shown and not (residual is None and not s.residuals)
    rows = []
    for j in range(groups):
        row: dict[str, Any] = {
            "step": s.step, "t": s.t, "symmetry": s.symmetry, "layer": s.layer, "group": j,
            "label": labels[j] if len(labels) == groups else str(j), "observed": observed[j],
            "residual": None if residual is None else residual[j], "status": s.status,
            "note": s.note,
        }  # fmt: skip
        for name in NAMES:
            row[name] = laws[name][j] if shown else None  # type: ignore[index]
        for name in ("discrete_residual", *ANATOMY):
            row[name] = row[name] if split else None
        for name in ("first_order", "second_order"):
            row[name] = row[name] if s.continuous else None
        model = row["first_order"] if s.momentum == 0.0 else row["second_order"]
        row["continuous"] = None if s.nesterov else model
        for name in (*ROTATION, *ROTATION_PARTS):
            row[name] = row[name] if s.rotation else None
        for name in ROTATION:
            row[name] = None if row[name] is not None and math.isnan(row[name]) else row[name]
        rows.append(row)
    return rows


class Kept:
    """What a history keeps, as plain lists per family (position, symmetry, layer)."""

    def __init__(self, max_history: int | None = None) -> None:
        self.max_history = max_history
        self.count, self.stride = 0, 1
        self.kept: dict[tuple, list[tuple[int, int, list[dict]]]] = {}
        self.groups: dict[tuple, tuple[int, tuple[str, ...]]] = {}
        self.broken: set[tuple] = set()
        self.stopped: list[tuple[str, str, int]] = []

    def add(self, snapshots: list[Snapshot]) -> None:
        index, self.count = self.count, self.count + 1
        for position, s in enumerate(snapshots):
            key = (position, s.symmetry, s.layer)
            if s.observed is None or key in self.broken:
                continue
            groups, labels = self.groups.setdefault(key, (s.observed.numel(), s.labels))
            kept = self.kept.setdefault(key, [])
            if self.stride > 1 and kept and kept[-1][0] % self.stride:
                kept.pop()  # a provisional latest row, replaced by this one
            rows = expected_rows(s, groups, labels)
            if rows is None:
                self.broken.add(key)
                self.stopped.append((s.symmetry, s.layer, s.step))
            else:
                kept.append((index, position, rows))
        if self.max_history is not None and index // self.stride + 1 > self.max_history:
            self.stride *= 2
            for kept in self.kept.values():
                last = kept[-1] if kept else None
                kept[:] = [e for e in kept if e[0] % self.stride == 0]
                if last is not None and (not kept or kept[-1] is not last):
                    kept.append(last)

    def rows(self) -> list[dict]:
        entries = sorted((e for kept in self.kept.values() for e in kept), key=lambda e: e[:2])
        out = [dict(r) for e in entries for r in e[2]]
        if self.stride > 1:
            extra = (
                f"history thinned: every {self.stride}th logged step kept, and the latest "
                f"(max_history={self.max_history})"
            )
            for r in out:
                r["note"] = f"{r['note']}; {extra}" if r["note"] else extra
        return out

    def __len__(self) -> int:
        return sum(len(kept) for kept in self.kept.values())


def _same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert set(a) == set(b)
        for k, va in a.items():
            vb = b[k]
            if isinstance(vb, float) and math.isnan(vb):
                assert isinstance(va, float) and math.isnan(va), (k, a, b)
            else:
                assert va == vb and type(va) is type(vb), (k, va, vb, a, b)


FAMILY = st.fixed_dictionaries(
    {
        "symmetry": st.sampled_from(["scale", "translation", "rescale"]),
        "groups": st.integers(1, 4),
        "bank": st.sampled_from([None, 0, 1]),
        "labels": st.booleans(),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "column": st.sampled_from([False] * 5 + [True]),  # (G, 1): written family by family
    }
)
STATE = st.fixed_dictionaries(
    {
        "observed": st.sampled_from([True] * 8 + [False]),
        "residual": st.booleans(),
        "laws": st.sampled_from([True] * 4 + [False]),
        "status": st.sampled_from(STATUSES),
        "note": st.sampled_from(["", "a note"]),
        "t": st.sampled_from([None, 0.5]),
        "momentum": st.sampled_from([0.0, 0.9]),
        "flags": st.tuples(*[st.booleans()] * 4),  # nesterov, residuals, continuous, rotation
        "bad": st.sampled_from([False] * 15 + [True]),  # one value more than the groups
    }
)


@st.composite
def runs(draw) -> tuple[list[dict], list[tuple[int, list[dict]]], int]:
    """Families and calls; a family's state mostly stays as it was (so that layouts last and
    rows are written at once), and changes now and then."""
    families = draw(st.lists(FAMILY, min_size=1, max_size=5))
    n = len(families)
    visible, states = draw(st.integers(1, n)), draw(st.lists(STATE, min_size=n, max_size=n))
    calls = []
    for _ in range(draw(st.integers(1, 30))):
        change = draw(st.lists(st.sampled_from([False] * 5 + [True]), min_size=n, max_size=n))
        states = [draw(STATE) if c else s for c, s in zip(change, states)]
        if draw(st.sampled_from([False] * 7 + [True])):
            visible = draw(st.integers(1, n))
        calls.append((visible, states))
    return families, calls, draw(st.integers(0, 2**31))


def snapshots(families: list[dict], visible: int, states: list[dict], step: int, gen):
    """One call's snapshots: the first ``visible`` families, values drawn from ``gen``."""
    banks = []
    for b in (0, 1):
        length = sum(f["groups"] for f in families if f["bank"] == b) + 1  # one group unused
        laws = {n: torch.randn(length, generator=gen, dtype=torch.float64) for n in NAMES}
        laws["angular_update"][torch.rand(length, generator=gen) < 0.3] = math.nan
        banks.append(laws)
    offsets = [0, 0]
    out = []
    for i, (f, s) in enumerate(zip(families[:visible], states)):
        g = f["groups"]
        segment = None
        if f["bank"] is not None:
            segment = slice(offsets[f["bank"]], offsets[f["bank"]] + g)
            offsets[f["bank"]] += g
        size = g + 1 if s["bad"] else g
        base = torch.randn(2 * size + 3, generator=gen, dtype=f["dtype"])  # a view, as live
        observed = base[1 : 1 + size]
        if f["column"]:
            observed = observed.reshape(size, 1)
        nesterov, residuals, continuous, rotation = s["flags"]
        out.append(
            Snapshot(
                step=step, t=s["t"], symmetry=f["symmetry"], layer=f"layer{i}",
                observed=observed if s["observed"] else None,
                residual=base[2 + size : 2 + 2 * size][:g] if s["residual"] else None,
                laws=banks[f["bank"]] if f["bank"] is not None and s["laws"] else None,
                segment=segment, momentum=s["momentum"], nesterov=nesterov,
                status=s["status"], note=s["note"], residuals=residuals,
                continuous=continuous, rotation=rotation,
                labels=tuple(f"g{j}" for j in range(g)) if f["labels"] else (),
            )
        )  # fmt: skip
    return out


def _run(history: History, kept: Kept, families, calls, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    messages = []
    for step, (visible, states) in enumerate(calls):
        snaps = snapshots(families, visible, states, 3 * step, gen)
        kept.add(snaps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            history.add(snaps)
        messages += [str(w.message) for w in caught if w.category is symmech.TrackerWarning]
        for s in snaps:  # the tensors are live: the history copied them at once
            for t in (s.observed, s.residual, *(s.laws or {}).values()):
                if t is not None:
                    t.fill_(-7777.0)
    return messages


def _check(history: History, kept: Kept, messages: list[str]) -> None:
    _same(history.rows(parts=True), kept.rows())
    assert len(history) == len(kept)
    assert history.thinned == (kept.stride > 1)
    assert [m.split(" (")[0] for m in messages] == [
        f"symmech: history of {sym} on {layer} stopped at step {step}"
        for sym, layer, step in kept.stopped
    ]


@settings(max_examples=60)
@given(
    run=runs(),
    how=st.sampled_from(["plain", "small chunks", "max_history", "spill"]),
    cap=st.integers(2, 6),
)
def test_random_runs_keep_what_the_snapshots_said(run, how: str, cap: int) -> None:
    families, calls, seed = run
    with tempfile.TemporaryDirectory() as tmp:
        history = {
            "plain": lambda: History(),
            "small chunks": lambda: History(chunk_bytes=1),
            "max_history": lambda: History(max_history=cap, chunk_bytes=1),
            "spill": lambda: History(spill_dir=tmp, chunk_bytes=1),
        }[how]()
        kept = Kept(cap if how == "max_history" else None)
        messages = _run(history, kept, families, calls, seed)
        _check(history, kept, messages)
        again = copy.deepcopy(history)
        _same(again.rows(parts=True), kept.rows())
        if how != "spill":  # a spilled history reads its files: saved with them
            buffer = io.BytesIO()
            torch.save(history, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            _same(loaded.rows(parts=True), kept.rows())
            more = copy.deepcopy(kept)  # a copy goes on as the original would
            more.stopped = []
            _check(again, more, _run(again, more, families, calls[-3:], seed + 1))


def _family(i: int, g: int, bank: int | None = 0) -> dict:
    return {"symmetry": "scale", "groups": g, "bank": bank, "labels": i % 2 == 0,
            "dtype": torch.float32, "column": False}  # fmt: skip


def _state(**change) -> dict:
    state = {"observed": True, "residual": True, "laws": True, "status": "tracked", "note": "",
             "t": 0.5, "momentum": 0.9, "flags": (False, True, True, True), "bad": False}  # fmt: skip
    return {**state, **change}


@pytest.mark.parametrize("how", ["max_history", "spill"])
def test_a_layout_change_mid_run_under_thinning_and_spill(how: str, tmp_path) -> None:
    """Three families write 40 steps, then one sends no value for 40, then it comes back
    without laws for a step, then the third goes and the others lose rₖ for 40: the rows stay
    right across the changes, the thinning and the chunks written to disk."""
    families = [_family(0, 3), _family(1, 2), _family(2, 4, bank=1)]
    calls = [(3, [_state()] * 3)] * 40
    calls += [(3, [_state(), _state(observed=False), _state(note="x")])] * 40
    calls += [(3, [_state(), _state(laws=False), _state()])]
    calls += [(2, [_state(residual=False)] * 3)] * 40
    if how == "max_history":
        history, kept = History(max_history=6, chunk_bytes=1), Kept(6)
    else:
        history, kept = History(spill_dir=tmp_path, chunk_bytes=1), Kept()
    _check(history, kept, _run(history, kept, families, calls, 0))
    assert len(history._frames) == 4
    if how == "spill":
        assert len(list(tmp_path.glob("*.npy"))) == 5  # six full chunks, the last not yet
    else:
        assert history.thinned


def test_steady_rows_are_written_at_once_and_a_failing_write_goes_family_by_family(
    monkeypatch,
) -> None:
    families = [_family(0, 3), _family(1, 2), _family(2, 4, bank=1)]
    history, kept = History(), Kept()
    _run(history, kept, families, [(3, [_state()] * 3)] * 3, 1)
    (frame,) = history._frames
    assert frame.fast is True  # the first row went family by family, the next at once

    def broken(*args):
        raise RuntimeError("no concatenation here")

    monkeypatch.setattr(type(frame), "write", broken)
    messages = _run(history, kept, families, [(3, [_state()] * 3)] * 3, 2)
    assert frame.fast is False and not messages
    _check(history, kept, messages)


def test_a_single_value_fills_every_group_as_a_copy_would() -> None:
    """A family of three groups later sending one value keeps it for every group (a copy
    broadcasts it); one sending two stops."""
    h = History()
    one = Snapshot(0, None, "scale", "c", torch.tensor([1.0, 2.0, 3.0]), None, None, None, 0.0,
                   False, "observed only", "", True)  # fmt: skip
    for snaps in ([one], [dataclasses.replace(one, step=1, observed=torch.tensor([7.0]))]):
        h.add(snaps)
    with pytest.warns(symmech.TrackerWarning, match="history of scale on c stopped at step 2"):
        h.add([dataclasses.replace(one, step=2, observed=torch.tensor([1.0, 2.0]))])
    assert [r["observed"] for r in h.rows()] == [1.0, 2.0, 3.0, 7.0, 7.0, 7.0]
    assert len(h) == 2
