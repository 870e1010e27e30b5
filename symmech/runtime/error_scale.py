"""The scale a law's error is measured against: the family's, so that it means something at Q = 0.

A group's Q can stay at zero for a whole run (a zero-initialised classifier head: Q = Σ of a
bias over the classes, which cross-entropy never moves): measured against |Q| itself, an
error of 1e-17 reads as 100 %. The error of a law is therefore measured against the scale of
its **family**,

    S = max over the logged steps k and the family's groups j of  max(|Q_obs,j(k)|, M_j(θₖ)),

where M is the magnitude of the terms that make up Q,

    M(θ) = (1/κ) Σᵢ |θᵢ ∂Q/∂θᵢ|      (per group; Σᵢ θᵢ ∂Q/∂θᵢ = κQ by ⟨ξ, θ⟩ = κQ),

so |Q| ≤ M: ``translation`` gives Σ|θᵢ|, ``scale`` ½‖θ‖², ``rescale`` ½(‖θ_in‖² + ‖θ_out‖²).
The error of law L at step k is ``max_j |Q_L,j(k) − Q_obs,j(k)| / S`` (the absolute error
when S = 0, i.e. all of the family's parameters are zero throughout). Records alone carry
no M: without it, S is the family's largest |Q_obs|.

>>> import torch, symmech
>>> head = torch.nn.Linear(3, 4)
>>> _ = torch.nn.init.zeros_(head.bias)
>>> b = symmech.bind("translation", theta=[(head.bias, None)])
>>> float(charge_terms(b)[0]) == 0.0                       # Q ≡ 0 and so is its scale...
True
>>> with torch.no_grad():
...     _ = head.bias.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0]))
>>> float(b.module.charge({"theta": [(head.bias.detach(), (0,))]})[0]), float(charge_terms(b)[0])
(0.0, 6.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from symmech.laws.names import LAWS

from .binding import Binding

if TYPE_CHECKING:  # matplotlib is imported only when errors are computed
    from symmech.viz.plots import GroupHistory

#: (symmetry, layer): a family, as records name it.
Key = tuple[str, str]

#: One line that says what the reported errors are.
ERROR_DEFINITION = (
    "error: max over logged steps and groups of |Q_law - Q_obs| / S, S the family's scale: "
    "max over the run and its groups of |Q_obs| and of the size of Q's terms (1/kappa) "
    "sum_i |theta_i dQ/dtheta_i|"
)


def charge_terms(binding: Binding) -> torch.Tensor:
    """M(θ) per group at the current parameters: float64 on their device, nothing synced.

    One autograd pass through the spec's generated charge on detached copies of the bound
    tensors; training state (values, gradients, graph) is untouched.
    """
    module = binding.module
    leaves = {id(t): t.detach().clone().requires_grad_(True) for t in binding.tensors}
    const = (binding.constants,) if module.CONSTANTS else ()
    with torch.enable_grad():
        views = {
            block: [
                (s.shaped(leaves[id(s.tensor)]), s.reduce_dims(s.shaped(s.tensor).ndim))
                for s in slices
            ]
            for block, slices in binding.blocks.items()
        }
        q = module.charge(views, *const)
        grads = torch.autograd.grad(
            q.sum(), list(leaves.values()), allow_unused=True, materialize_grads=True
        )
    grad_of = dict(zip(leaves, grads))
    total: torch.Tensor | Any = 0.0
    seen: set[int] = set()
    for slices in binding.blocks.values():
        for s in slices:
            if id(s.tensor) in seen:  # a tensor in two blocks: its gradient holds both parts
                continue
            seen.add(id(s.tensor))
            term = (leaves[id(s.tensor)].detach() * grad_of[id(s.tensor)]).abs()
            x = s.shaped(term).to(torch.float64)
            dims = s.reduce_dims(x.ndim)
            total = total + (x.sum(dim=dims) if dims else x).reshape(-1)
    return total / float(module.KAPPA)


def term_scales(families: Iterable[Any]) -> dict[Key, float]:
    """max_j M_j(θ) now for each family (objects with ``binding``; host floats, one sync)."""
    out: dict[Key, float] = {}
    for f in families:
        binding = getattr(f, "binding", f)
        try:
            m = float(charge_terms(binding).max())
        except Exception:  # a scale is a report, never a failure of training or of the demo
            continue
        key = (str(binding.name), str(getattr(f, "layer", binding.layer)))
        out[key] = max(out.get(key, 0.0), m)
    return out


def merge_scales(*scales: Mapping[Key, float] | None) -> dict[Key, float]:
    """The largest value per family over several samples (e.g. at the start and the end)."""
    out: dict[Key, float] = {}
    for sample in scales:
        for key, value in (sample or {}).items():
            out[key] = max(out.get(key, 0.0), float(value))
    return out


def error_scales(
    records: Iterable[Mapping[str, Any]] | Sequence[GroupHistory],
    terms: Mapping[Key, float] | None = None,
) -> dict[Key, float]:
    """S per family: the largest |Q_obs| over the run and groups, and ``terms`` (M) when given."""
    from symmech.viz.plots import group_histories

    out: dict[Key, float] = {}
    for h in group_histories(records):
        observed = np.abs(h.observed[np.isfinite(h.observed)])
        largest = float(observed.max()) if observed.size else 0.0
        key = (h.symmetry, h.layer)
        out[key] = max(out.get(key, 0.0), largest, float((terms or {}).get(key, 0.0)))
    return out


def max_errors(
    records: Iterable[Mapping[str, Any]] | Sequence[GroupHistory],
    terms: Mapping[Key, float] | None = None,
) -> dict[Key, dict[str, float | None]]:
    """Per family, each law's largest error over the run (see the module docstring); None
    where the law has no value. For a tracker: ``max_errors(tracker.records(),
    term_scales(tracker.families))``."""
    from symmech.viz.plots import group_histories, relative_error_curves

    histories = group_histories(records)
    scales = error_scales(histories, terms)
    out: dict[Key, dict[str, float | None]] = {}
    for h in histories:
        curves = relative_error_curves([h], scales=scales)
        per_law = curves.get(h.symmetry, {})
        row: dict[str, float | None] = {}
        for law in LAWS:
            err = per_law[law][1] if law in per_law else np.array([])
            err = err[np.isfinite(err)]
            row[law] = float(err.max()) if err.size else None
        out[(h.symmetry, h.layer)] = row
    return out
