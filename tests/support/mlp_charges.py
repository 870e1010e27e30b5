"""A two-layer ReLU classifier and its charges written by hand from the parameters, for the sink
and framework tests: the laws a tracker predicts are compared with these, not with its own Q.

Families of ``Linear(d, h) → ReLU → Linear(h, c)`` under cross-entropy (what detection finds):

* translation of the output layer's weight, group j = input column j: Q_j = Σ_i W₂[i, j],
  terms M_j = Σ_i |W₂[i, j]|; of its bias (one group): Q = Σ_i b₂[i], M = Σ_i |b₂[i]|;
* rescale of hidden unit j: Q_j = ½(‖W₁[j, :]‖² + b₁[j]²) − ½‖W₂[:, j]‖², M_j the same with +.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn


def mlp(seed: int = 0, d: int = 8, hidden: int = 16, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def kind(symmetry: str, layer: str) -> str:
    """Which hand charge a family of :func:`mlp` is (by its symmetry and layer label)."""
    if symmetry == "rescale":
        return "rescale"
    if symmetry == "translation":
        return "translation_bias" if layer.endswith("bias") else "translation_weight"
    raise AssertionError(f"unexpected family {symmetry} on {layer}")


def translation_charges(last: nn.Linear) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The output layer's translation families: (Q per group, M per group), float64 NumPy."""
    w2 = last.weight.detach().double().numpy()
    b2 = last.bias.detach().double().numpy()
    return {
        "translation_weight": (w2.sum(0), np.abs(w2).sum(0)),
        "translation_bias": (np.array([b2.sum()]), np.array([np.abs(b2).sum()])),
    }


def hand_charges(first: nn.Linear, last: nn.Linear) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per family kind: (Q per group, M per group) at the current parameters, float64 NumPy."""
    w1 = first.weight.detach().double().numpy()
    b1 = first.bias.detach().double().numpy()
    w2 = last.weight.detach().double().numpy()
    incoming = 0.5 * ((w1**2).sum(1) + b1**2)
    outgoing = 0.5 * (w2**2).sum(0)
    return {**translation_charges(last), "rescale": (incoming - outgoing, incoming + outgoing)}


def errors_against_hand(
    records: Iterable[Mapping[str, Any]],
    charges: Mapping[int, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    law: str = "discrete",
) -> dict[str, float]:
    """Per family kind, max over the steps in ``charges`` and groups of |Q_law − Q_hand| / S,
    S = max over those steps and groups of |Q_hand| and M (the family's scale)."""
    pred: dict[str, dict[int, dict[int, float]]] = {}
    for r in records:
        if r.get(law) is not None and int(r["step"]) in charges:
            k = kind(str(r["symmetry"]), str(r["layer"]))
            pred.setdefault(k, {}).setdefault(int(r["step"]), {})[int(r["group"])] = r[law]
    out: dict[str, float] = {}
    for k, by_step in pred.items():
        scale = max(max(np.abs(c[k][0]).max(), c[k][1].max()) for c in charges.values())
        err = 0.0
        for step, groups in by_step.items():
            q = charges[step][k][0]
            assert sorted(groups) == list(range(len(q))), (k, step, sorted(groups))
            got = np.array([groups[j] for j in range(len(q))])
            err = max(err, float(np.abs(got - q).max() / scale))
        out[k] = err
    return out
