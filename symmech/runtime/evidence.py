"""What the records themselves say about the laws: non-finite steps, a residual that is not
negligible (a symmetry the loss does not have), and a law that misses the observed charge
(something outside the modelled step changed θ), judged on the host when records are read.

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

from .family import APPROXIMATE, TRACKED, Family, TrackerWarning

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


def judge(rows: list[dict[str, Any]], families: Sequence[Family]) -> None:
    """Everything the records say, in order: non-finite values, then a residual that moves Q,
    then a law that misses the observed Q (a row judged by one is not judged again)."""
    mark_non_finite(rows)
    judge_residuals(rows, families)
    judge_laws(rows, families)


def _by_family(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The rows of each family, keyed as records name it: (symmetry, layer)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["symmetry"], r["layer"]), []).append(r)
    return out


def judge_residuals(rows: list[dict[str, Any]], families: Sequence[Family]) -> None:
    """Mark families whose measured residual visibly moves Q ``approximate: |r| = …``.

    The residual's effect is |discrete_residual − discrete| (the same law with and without the
    measured rₖ); it is negligible below √ε times the larger of max|Q| plus how far Q moved
    and the largest term size M of one group's Q. Rows still ``tracked`` take the family's new
    status.
    """
    mine = _by_family(rows)
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


def judge_laws(rows: list[dict[str, Any]], families: Sequence[Family]) -> None:
    """Mark rows whose exact law misses the observed Q ``approximate: the law misses …``.

    The exact law is ``discrete_residual`` when the family measures rₖ every step
    (``residuals=True``), else ``discrete``. It holds to round-off unless something outside the
    optimizer's step changed the parameters (an edit of θ between steps, a post-hook that
    projects the weights, a state the tracker did not see), or, without residuals, the loss
    breaks the symmetry. A miss is beyond round-off above √ε times the larger of the scale of
    :func:`judge_residuals`, the term size M and the path Q travelled between logged rows (the
    round-off of a law grows with the path it sums). Only rows still ``tracked`` are judged;
    the family's status becomes the first miss, measured.
    """
    mine = _by_family(rows)
    for f in families:
        fam_rows = [r for r in mine.get((f.symmetry, f.layer), []) if r["status"] == TRACKED]
        fed_r = bool(getattr(f, "residuals", True))
        pairs = [(r, _exact_law(r, fed_r)) for r in fam_rows]
        judged = [
            (r, v)
            for r, v in pairs
            if v is not None and math.isfinite(v) and math.isfinite(r["observed"])
        ]
        if not judged:
            continue
        observed = [r["observed"] for r, _ in judged]
        scale = max(
            max(abs(q) for q in observed) + (max(observed) - min(observed)),
            _path([r for r, _ in judged]),
        )
        eps = math.sqrt(_precision(f))
        misses = [(r, abs(v - r["observed"])) for r, v in judged]
        misses = [(r, m) for r, m in misses if m > eps * max(scale, 1e-300)]
        if misses:  # M only widens the tolerance: read it (one autograd pass) only when needed
            tol = eps * max(scale, _magnitude(f), 1e-300)
            misses = [(r, m) for r, m in misses if m > tol]
        if not misses:
            continue
        first = min(r["step"] for r, _ in misses)
        worst = max(m for _, m in misses)
        why = (
            f"the law misses the observed Q by up to {worst:.1e} ({worst / max(scale, 1e-300):.1e} "
            f"of its scale) from step {first}: something outside the optimizer's step changed "
            "the parameters (an edit between steps, a hook) or what the step used"
        )
        if not fed_r:
            measured = [abs(r["residual"]) for r in fam_rows if r["residual"] is not None]
            largest = f" (|r| up to {max(measured):.1e} on the logged steps)" if measured else ""
            why += (
                f", or the loss breaks the symmetry{largest}: residuals=True feeds the law the "
                "measured rₖ of every step"
            )
        f.approximate(why)
        for r, _ in misses:
            r["status"] = f"{APPROXIMATE}: {why}"


def _exact_law(row: dict[str, Any], fed_r: bool) -> float | None:
    """The row's exact law: the one fed the measured rₖ when the family measures it (the
    final row has no rₖ: its pure law carries the same steps)."""
    if fed_r and row["discrete_residual"] is not None:
        return row["discrete_residual"]
    return row["discrete"] if not fed_r or row["residual"] is None else None


def _path(rows: list[dict[str, Any]]) -> float:
    """The largest distance one group's observed Q travelled between consecutive logged rows."""
    by_group: dict[Any, list[tuple[int, float]]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append((r["step"], r["observed"]))
    out = 0.0
    for series in by_group.values():
        series.sort()
        out = max(out, sum(abs(b[1] - a[1]) for a, b in zip(series, series[1:])))
    return out
