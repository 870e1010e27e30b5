"""Tracking under torch.distributed on CPU: two gloo ranks spawned per kind (DDP, FSDP2, ZeRO).

Against a float64 run of the same model in one process on the same global batches
(``support.distributed_jobs.reference``), each kind must show: the records every rank returns
are identical and agree with the single-process records to 1e-12 of each family's scale; the
parameters after training with the tracker equal, bit for bit, those of the same run without
it; the tracker adds no collective between records() calls (every collective of the step is
counted, DTensor-internal ones included); and the laws move (the test is not vacuous).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from support import distributed_jobs as jobs

from symmech.runtime.distributed import SUMMED

pytestmark = pytest.mark.usefixtures("single_thread")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _family(row: dict[str, Any]) -> tuple[str, str]:
    return row["symmetry"], row["layer"]


def max_relative_difference(rows: list[dict], ref: list[dict]) -> float:
    """max |rows − ref| over the summed columns, relative to the family's scale (its largest
    |ref| value in any of them); None and NaN must sit in the same places."""
    assert [(_family(r), r["step"], r["group"]) for r in rows] == [
        (_family(r), r["step"], r["group"]) for r in ref
    ]
    scale: dict[tuple, float] = {}
    for r in ref:
        for k in SUMMED & r.keys():
            if r[k] is not None and math.isfinite(r[k]):
                key = _family(r)
                scale[key] = max(scale.get(key, 0.0), abs(r[k]))
    worst = 0.0
    for a, b in zip(rows, ref):
        for k in SUMMED & b.keys():
            if b[k] is None or a[k] is None:
                assert a[k] is None and b[k] is None, (k, a, b)
                continue
            if math.isnan(b[k]):
                assert math.isnan(a[k]), (k, a, b)
                continue
            s = scale[_family(b)]
            worst = max(worst, abs(a[k] - b[k]) / s if s > 0 else abs(a[k]))
    return worst


def check_kind(results: list[dict], kind: str, net: str) -> float:
    ref = jobs.reference(net, kind)
    mine = [r[net]["tracked"] for r in results]
    rows = mine[0]["records"]
    for other in mine[1:]:  # identical on every rank
        assert len(other["records"]) == len(rows)
        for a, b in zip(rows, other["records"]):
            assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    rel = max_relative_difference(rows, ref)
    assert rel <= 1e-12, (kind, net, rel)
    # the angle between θₖ₋₁ and θₖ of scale groups: rebuilt from sums over ranks when split
    angles = [(a["angular_update"], b["angular_update"]) for a, b in zip(rows, ref)]
    assert all((a is None) == (b is None) for a, b in angles), kind
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in angles if b is not None), kind
    assert all("angular_update" not in r["note"] for r in rows)
    assert [r["status"].split(":")[0] for r in rows] == [r["status"].split(":")[0] for r in ref]
    for r in results:  # training unchanged, bit for bit, on every rank
        tracked, plain = r[net]["tracked"]["params"], r[net]["plain"]["params"]
        assert all(torch.equal(a, b) for a, b in zip(tracked, plain))
        assert r[net]["tracked"]["step_bytes"] == r[net]["plain"]["step_bytes"]
    moved = max(abs(r["discrete"] - r["gradient_flow"]) for r in ref if r["discrete"] is not None)
    assert moved > 1e-4  # the laws are not constant: the comparison is not vacuous
    return rel


def check_split(kind: str, tmp_path) -> list[dict]:
    """Both nets under a split mode; the conv net's scale groups report their angle."""
    results = jobs.spawn(kind, ("mlp", "conv"), tmp_path)
    for net in ("mlp", "conv"):
        check_kind(results, kind, net)
        assert results[0][net]["tracked"]["mode"] == kind
    turning = [r for r in results[0]["conv"]["tracked"]["records"] if r["angular_update"]]
    assert turning and all(r["symmetry"] == "scale" for r in turning)  # not vacuous
    return results


def test_ddp_binds_the_inner_module_and_agrees_with_one_process(tmp_path):
    results = jobs.spawn("ddp", ("conv",), tmp_path)
    check_kind(results, "ddp", "conv")
    rows = results[0]["conv"]["tracked"]["records"]
    assert results[0]["conv"]["tracked"]["mode"] == "replicated"
    assert not any(r["layer"].startswith("module.") for r in rows)
    assert {r["symmetry"] for r in rows} >= {"translation", "scale", "rescale"}


def test_ddp_with_the_banks_read_at_once_agrees_with_one_process(tmp_path, monkeypatch):
    # the ranks' products from the C++ kernel (SYMMECH_REDUCTIONS=native, read by the spawned
    # processes): every rank holds the whole gradient, so the steady banks are read at once
    monkeypatch.setenv("SYMMECH_REDUCTIONS", "native")
    results = jobs.spawn("ddp", ("conv",), tmp_path)
    check_kind(results, "ddp", "conv")
    assert all(r["conv"]["tracked"]["read_at_once"] for r in results)


def test_fsdp2_shards_sum_to_one_process(tmp_path):
    results = check_split("fsdp", tmp_path)
    layers = {r["layer"] for r in results[0]["mlp"]["tracked"]["records"]}
    assert layers == {"columns", "columns_T", "hidden", "cut_rows", "pair"}
    for r in results:
        assert "couple entries that lie on different ranks" in r["refusal"]


def test_zero_owner_terms_sum_to_one_process(tmp_path):
    check_split("zero", tmp_path)
