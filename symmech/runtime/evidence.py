"""What the records themselves say about the laws: non-finite steps, and a residual that is not
negligible (a symmetry the loss does not have), judged on the host when records are read.

A family is ``tracked`` only while its measured rₖ = ⟨ξ, gₖ⟩ moves Q by less than
√ε (of the parameters' precision) of Q's scale (see :func:`judge_residuals`); otherwise its status becomes
``approximate: |r| = …`` with the measured effect, and ``discrete_residual`` (the law fed the
measured rₖ) is the exact one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from symmech.laws.names import PREDICTIONS

from .family import TRACKED, Family, TrackerWarning

_NUMERIC = ("observed", "residual", *(n for n in PREDICTIONS if n != "gradient_flow"))


def mark_non_finite(rows: list[dict[str, Any]]) -> None:
    """Note every row with a NaN/inf value, and warn once with what was non-finite first."""
    first: tuple[dict[str, Any], str] | None = None
    for r in rows:
        bad = [k for k in _NUMERIC if r[k] is not None and not math.isfinite(r[k])]
        if not bad:
            continue
        if math.isfinite(r["observed"]):
            why = (
                f"the gradients were non-finite (rₖ = {r['residual']})"
                if "residual" in bad
                else f"the laws' values overflowed ({', '.join(bad)})"
            )
        elif math.isnan(r["observed"]):
            why = "the parameters were NaN"
        else:
            why = "the charge Q overflowed (the parameters were inf or too large to reduce)"
        note = f"non-finite at this step: {why}; the laws restart after a checkpoint is loaded"
        r["note"] = f"{r['note']}; {note}" if r["note"] else note
        if first is None or r["step"] < first[0]["step"]:
            first = (r, why)
    if first is not None:
        r, why = first
        warnings.warn(
            f"symmech: non-finite values from step {r['step']} on ({r['symmetry']} on "
            f"{r['layer']}): {why}; predictions are not meaningful until the laws restart "
            "(they do when model or optimizer state is loaded)",
            TrackerWarning,
            stacklevel=3,
        )


def _precision(family: Family) -> float:
    return max(torch.finfo(t.dtype).eps for t in family.binding.tensors if t.is_floating_point())


def _magnitude(family: Family) -> float:
    """The largest size M of the terms that make up one group's Q (``error_scale``): what
    round-off in Q is measured against (Q itself may be near zero; one host read, when records
    are read). Per group, not the family's total: a residual that moves one channel's charge
    by 1e-5 of its size is not hidden by the size of the whole layer."""
    from .error_scale import charge_terms

    with torch.no_grad():
        return float(charge_terms(family.binding).max())


def judge_residuals(rows: list[dict[str, Any]], families: Sequence[Family]) -> None:
    """Mark families whose measured residual visibly moves Q ``approximate: |r| = …``.

    The residual's effect is |discrete_residual − discrete| (the same law with and without the
    measured rₖ); it is negligible below √ε times the larger of max|Q| plus how far Q moved
    and the largest term size M of one group's Q. Rows still ``tracked`` take the family's new
    status.
    """
    mine: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        mine.setdefault((r["symmetry"], r["layer"]), []).append(r)
    for f in families:
        fam_rows = mine.get((f.symmetry, f.layer), [])
        if f.status != TRACKED or not fam_rows:
            continue
        pairs = [
            (r["discrete"], r["discrete_residual"], r["observed"], r["residual"])
            for r in fam_rows
            if r["discrete"] is not None and r["discrete_residual"] is not None
        ]
        pairs = [p for p in pairs if all(v is None or math.isfinite(v) for v in p)]
        if not pairs:
            continue
        effect = max(abs(d - dr) for d, dr, _, _ in pairs)
        observed = [q for _, _, q, _ in pairs]
        scale = max(abs(q) for q in observed) + (max(observed) - min(observed))
        tol = math.sqrt(_precision(f))
        if effect <= tol * max(scale, _magnitude(f), 1e-300):
            continue
        worst_r = max(abs(r) for *_, r in pairs if r is not None)
        f.approximate(
            f"|r| = {worst_r:.1e} (the loss does not have this symmetry exactly): the residual moves Q by "
            f"{effect:.1e}, {effect / max(scale, 1e-300):.1e} of its scale; discrete_residual, "
            "fed the measured rₖ, is the exact law"
        )
        for r in fam_rows:
            if r["status"] == TRACKED:
                r["status"] = f.status
