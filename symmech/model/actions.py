"""Torch implementations of the built-in group actions on slices of a model's parameters.

A detected symmetry is a :class:`Family` of one-parameter groups. Group ``j`` of a family is
slice ``j`` of every :class:`BlockSlice` of every block; the groups of one family act on disjoint
entries, so the whole family can be moved at once with one α per group:

* ``translation``: θ_A ↦ θ_A + α (identity 0);
* ``scale``: θ_A ↦ α θ_A (identity 1);
* ``rescale``: (θ_1, θ_2) ↦ (α θ_1, α⁻¹ θ_2) (identity 1);
* ``quadratic_rescale``: (θ_1, θ_2) ↦ (α θ_1, α⁻² θ_2) (identity 1), around x ↦ x².

:func:`apply_action` is ψ(θ, α) written with differentiable torch operations, so the generator
ξ = ∂ψ/∂α at the identity comes from ``torch.func.jvp`` (see :func:`generator`) and is never
hand-coded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIONS",
    "BlockSlice",
    "DetectionResult",
    "Family",
    "Square",
    "SymmetryWarning",
    "apply_action",
    "family_params",
    "format_table",
    "generator",
    "group_sum",
    "identity",
    "slice_view",
    "validate_family",
]


@dataclass(frozen=True)
class BlockSlice:
    """One parameter tensor cut into groups: group ``j`` is slice ``j`` along ``dim``.

    ``view`` reshapes the tensor first (e.g. a Linear weight after a Flatten is seen as
    ``(out, C, H*W)`` with ``dim=1``); ``dim=None`` makes the whole tensor one group.
    """

    param: str
    dim: int | None
    view: tuple[int, ...] | None = None


@dataclass
class Family:
    """One detected family of symmetry groups of the same kind on the same layer(s)."""

    symmetry: str
    layer: str
    blocks: dict[str, list[BlockSlice]]
    n_groups: int
    confirmed: bool | None = None
    reason: str = ""


class SymmetryWarning(UserWarning):
    """Something about symmetry detection or confirmation a user should know."""


class DetectionResult(list[Family]):
    """The detected families (a list), plus ``path`` ("fx" or "modules") and ``notes``."""

    def __init__(self, families: list[Family], path: str, notes: list[str]) -> None:
        super().__init__(families)
        self.path = path
        self.notes = notes


@dataclass(frozen=True)
class _Action:
    """How a symmetry moves each of its blocks: additive, or multiplicative by α**power."""

    identity: float
    powers: Mapping[str, int | None]  # block -> power of α (None: additive)


#: The built-in actions, by the ``Family.symmetry`` name.
ACTIONS: dict[str, _Action] = {
    "translation": _Action(0.0, {"theta": None}),
    "scale": _Action(1.0, {"theta": 1}),
    "rescale": _Action(1.0, {"theta_1": 1, "theta_2": -1}),
    "quadratic_rescale": _Action(1.0, {"theta_1": 1, "theta_2": -2}),
}


class Square(nn.Module):
    """x ↦ x², the activation of a quadratic network (positively homogeneous of degree 2)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.square(x)


def _action(family: Family) -> _Action:
    try:
        return ACTIONS[family.symmetry]
    except KeyError:
        valid = ", ".join(repr(k) for k in ACTIONS)
        raise ValueError(
            f"Family(symmetry={family.symmetry!r}): unknown symmetry; valid names are {valid}"
        ) from None


def slice_view(tensor: Tensor, piece: BlockSlice) -> Tensor:
    """``tensor`` reshaped by ``piece.view`` (a view, not a copy, for contiguous tensors)."""
    return tensor.reshape(piece.view) if piece.view is not None else tensor


def _count(tensor: Tensor, piece: BlockSlice) -> int:
    return 1 if piece.dim is None else slice_view(tensor, piece).shape[piece.dim]


def family_params(family: Family) -> list[str]:
    """Names of the parameters a family touches, in first-seen order, without repeats."""
    names: dict[str, None] = {}
    for pieces in family.blocks.values():
        for piece in pieces:
            names.setdefault(piece.param)
    return list(names)


def validate_family(family: Family, params: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the problem when a family does not fit the parameters."""
    action = _action(family)
    if set(family.blocks) != set(action.powers):
        raise ValueError(
            f"Family({family.layer!r}): a {family.symmetry} family has blocks "
            f"{sorted(action.powers)}, got {sorted(family.blocks)}"
        )
    for block, pieces in family.blocks.items():
        for piece in pieces:
            if piece.param not in params:
                raise ValueError(
                    f"Family({family.layer!r}): block {block!r} names parameter {piece.param!r}, "
                    "which the model does not have"
                )
            tensor = params[piece.param]
            if piece.view is not None and tensor.numel() != torch.Size(piece.view).numel():
                raise ValueError(
                    f"Family({family.layer!r}): view {piece.view} does not fit "
                    f"{piece.param} of shape {tuple(tensor.shape)}"
                )
            n = _count(tensor, piece)
            if n != family.n_groups:
                raise ValueError(
                    f"Family({family.layer!r}): {piece.param} (dim={piece.dim}) gives {n} "
                    f"groups, but the family has n_groups={family.n_groups}"
                )


def identity(family: Family, like: Tensor) -> Tensor:
    """The identity element e, one per group, with the dtype and device of ``like``."""
    value = _action(family).identity
    return torch.full((family.n_groups,), value, dtype=like.dtype, device=like.device)


def _broadcast(alpha: Tensor, ndim: int, dim: int | None) -> Tensor:
    if dim is None:
        return alpha.reshape(())
    shape = [1] * ndim
    shape[dim] = -1
    return alpha.reshape(shape)


def apply_action(params: Mapping[str, Tensor], family: Family, alpha: Tensor) -> dict[str, Tensor]:
    """ψ(θ, α): a new dict where each group ``j`` of ``family`` is moved by ``alpha[j]``.

    Out of place and differentiable in both ``params`` and ``alpha``; entries the family does not
    touch are passed through unchanged (the same tensor objects).
    """
    action = _action(family)
    out = dict(params)
    for block, pieces in family.blocks.items():
        power = action.powers[block]
        for piece in pieces:
            tensor = out[piece.param]
            viewed = slice_view(tensor, piece)
            a = _broadcast(alpha, viewed.ndim, piece.dim)
            moved = viewed + a if power is None else viewed * a**power
            out[piece.param] = moved.reshape(tensor.shape)
    return out


def generator(
    params: Mapping[str, Tensor], family: Family, coeffs: Tensor | None = None
) -> dict[str, Tensor]:
    """ξ = Σ_j c_j ∂ψ/∂α_j at α = e, by ``torch.func.jvp`` of :func:`apply_action`.

    With ``coeffs=None`` every c_j = 1; since the groups are disjoint, the result restricted to
    group ``j``'s entries is that group's own generator ξ_j. Only the family's parameters are
    returned.
    """
    names = family_params(family)
    sub = {n: params[n] for n in names}
    e = identity(family, next(iter(sub.values())))
    c = torch.ones_like(e) if coeffs is None else coeffs.to(e)

    def psi(a: Tensor) -> dict[str, Tensor]:
        return apply_action(sub, family, a)

    _, xi = torch.func.jvp(psi, (e,), (c,))
    return {n: xi[n] for n in names}


def group_sum(values: Mapping[str, Tensor], family: Family, blocks: tuple[str, ...] = ()) -> Tensor:
    """Per-group sums Σ over each group's entries of ``values`` (shape ``(n_groups,)``).

    ``values`` maps parameter names to tensors shaped like the parameters (e.g. g ⊙ ξ gives the
    per-group inner products ⟨g, ξ_j⟩). ``blocks`` restricts the sum to some blocks (default all).
    A parameter named in several slices of one family is summed once.
    """
    total: Tensor | None = None
    seen: set[tuple[str, int | None, tuple[int, ...] | None]] = set()
    for block, pieces in family.blocks.items():
        if blocks and block not in blocks:
            continue
        for piece in pieces:
            key = (piece.param, piece.dim, piece.view)
            if key in seen:
                continue
            seen.add(key)
            viewed = slice_view(values[piece.param], piece)
            if piece.dim is None:
                part = viewed.sum().reshape(1)
            else:
                dims = [d for d in range(viewed.ndim) if d != piece.dim % viewed.ndim]
                part = viewed.sum(dim=dims) if dims else viewed
            total = part if total is None else total + part
    if total is None:
        raise ValueError(f"Family({family.layer!r}) has no parameter slices")
    return total


def format_table(families: list[Family]) -> str:
    """A plain-text table: layer | symmetry | groups | confirmed (and notes, if any)."""
    rows = [("layer", "symmetry", "groups", "confirmed")]
    for f in families:
        status = {None: "-", True: "yes", False: "NO"}[f.confirmed]
        if f.reason:
            status += f" ({f.reason})"
        rows.append((f.layer, f.symmetry, str(f.n_groups), status))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + " | " + r[3]
             for r in rows]  # fmt: skip
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 9)
    lines.append(f"{len(families)} families, {sum(f.n_groups for f in families)} groups")
    lines += [f"note: {note}" for note in getattr(families, "notes", [])]
    return "\n".join(lines)
