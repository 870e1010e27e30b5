"""Group actions on slices of a model's parameters, evaluated from the symmetry's spec.

A detected (or hand-bound) symmetry is a :class:`Family` of one-parameter groups. Group ``j`` of a
family is slice ``j`` of every :class:`BlockSlice` of every block; the groups of one family act on
disjoint entries, so the whole family can be moved at once with one α per group.

No action is written here: a family carries its :class:`~symmech.spec.declare.Symmetry` (``spec``,
or a name in the registry :data:`symmech.spec.library.BUILTIN`) and the values of its constants
(``constants``, e.g. the matrix E of ``linear_pair``). :func:`apply_action` gathers each group's
slices into the spec's block matrices (a vector block is the group's entries as one column; the
slices of a matrix block are stacked as rows) and evaluates ψ(θ, α) with the torch backend of
:func:`symmech.core.expr_eval.evaluate_expr`, vectorised over the groups by ``torch.func.vmap``.
The generator ξ = ∂ψ/∂α at the identity is ``torch.func.jvp`` of that (:func:`generator`).

>>> import torch
>>> fam = Family("rescale", "a → relu → b",
...              {"theta_1": [BlockSlice("a", 0)], "theta_2": [BlockSlice("b", 1)]}, 2)
>>> p = {"a": torch.tensor([[1.0], [2.0]]), "b": torch.tensor([[3.0, 4.0]])}
>>> apply_action(p, fam, torch.tensor([2.0, 0.5]))["b"]
tensor([[1.5000, 8.0000]])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from symmech.core.expr_eval import evaluate_expr
from symmech.spec.declare import Block, Constant, Symmetry
from symmech.spec.declare import alpha as ALPHA
from symmech.spec.library import BUILTIN

__all__ = [
    "BlockSlice",
    "DetectionResult",
    "Family",
    "SpecAction",
    "Square",
    "SymmetryWarning",
    "apply_action",
    "family_params",
    "format_table",
    "generator",
    "group_sum",
    "identity",
    "slice_view",
    "spec_action",
    "spec_of",
    "strided",
    "validate_family",
]


@dataclass(frozen=True)
class BlockSlice:
    """One parameter tensor cut into groups: group ``j`` is slice ``j`` along ``dim``.

    ``view`` reshapes the tensor first (e.g. a Linear weight after a Flatten is seen as
    ``(out, C, H*W)`` with ``dim=1``), or ``"T"`` transposes a matrix (a Linear weight W = Uᵀ
    bound to a matrix block U), or :func:`strided` picks entries of the row-major tensor (one
    head's rows of a fused q/k/v weight, transposed); ``dim=None`` makes the whole tensor one group.
    """

    param: str
    dim: int | None
    view: tuple[Any, ...] | str | None = None


def strided(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> tuple[Any, ...]:
    """A view that reads entry ``offset + Σ_d i_d·stride_d`` of the flattened tensor at ``i``.

    It is ``tensor.as_strided(size, stride, offset)`` of a contiguous tensor: e.g. head h of a
    fused (3d, n) q/k/v weight, transposed, as (heads, n, r) is
    ``strided((H, n, r), (r*n, 1, n), offset)`` with ``offset`` the first row of q, k or v times n.

    >>> w = torch.arange(12.0).reshape(6, 2)  # rows 0-1: head 0, rows 2-3: head 1 (r = 2)
    >>> slice_view(w, BlockSlice("w", 0, strided((2, 2, 2), (4, 1, 2), 4)))[1]
    tensor([[ 8., 10.],
            [ 9., 11.]])
    """
    return ("strided", tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset))


def _is_strided(view: object) -> bool:
    return isinstance(view, tuple) and len(view) == 4 and view[0] == "strided"


def _strided_index(tensor: Tensor, view: tuple[Any, ...]) -> Tensor:
    """The flat positions a strided view reads, in the view's shape."""
    _, size, stride, offset = view
    flat = torch.arange(tensor.numel(), device=tensor.device)
    return flat.as_strided(size, stride, offset)


@dataclass
class Family:
    """One family of symmetry groups of the same kind on the same layer(s).

    ``symmetry`` is a name in :data:`symmech.spec.library.BUILTIN`, or a :class:`Symmetry` (then
    ``spec`` becomes it and ``symmetry`` its name). ``blocks`` maps each block name of the spec
    to its parameter slices, ``constants`` each constant name of the spec to its value.
    """

    symmetry: str
    layer: str
    blocks: dict[str, list[BlockSlice]]
    n_groups: int
    confirmed: bool | None = None
    reason: str = ""
    spec: Symmetry | None = field(default=None, compare=False)
    constants: dict[str, Tensor] = field(default_factory=dict, compare=False)
    #: a name per group (e.g. ``h0[1,2]``: head 0, entry (1, 2) of its charge matrix); may be empty
    labels: tuple[str, ...] = field(default=(), compare=False)
    #: the normalisation layers that undo the family's α (up to their eps) by reading what it
    #: scales, when that is not the output of the family's first layer (a residual stream)
    absorbed_by: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.symmetry, Symmetry):
            self.spec, self.symmetry = self.symmetry, self.symmetry.name
        elif self.spec is not None and self.spec.name != self.symmetry:
            raise ValueError(
                f"Family({self.symmetry!r}, spec={self.spec.name!r}): the name differs from "
                "the spec's name; pass the Symmetry as the first argument"
            )


class SymmetryWarning(UserWarning):
    """Something about symmetry detection or confirmation a user should know."""


class DetectionResult(list[Family]):
    """The detected families (a list), plus ``path`` ("fx", "export", "modules" or "none") and
    ``notes``."""

    def __init__(self, families: list[Family], path: str, notes: list[str]) -> None:
        super().__init__(families)
        self.path = path
        self.notes = notes


class Square(nn.Module):
    """x ↦ x², the activation of a quadratic network (positively homogeneous of degree 2)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.square(x)


# ----------------------------------------------------------------------------- the spec


class SpecAction:
    """What the torch side needs from a spec: blocks, images, identity, and facts read from it."""

    def __init__(self, spec: Symmetry) -> None:
        self.spec = spec
        self.identity = float(spec.identity)
        used = {s for im in spec.action.values() for s in im.atoms(Block)}
        #: the blocks a family must bind: moved ones and those an image reads
        self.blocks = {b.name: b for b in spec.blocks if b in spec.action or b in used}
        self.optional = {b.name for b in spec.blocks} - set(self.blocks)  # fixed, never read
        self.images = {b.name: im for b, im in spec.action.items()}
        self.constants: dict[str, Constant] = {c.name: c for c in spec.constants}

    @cached_property
    def multiplies_by_alpha(self) -> bool:
        """ψ(θ, α) = αθ on every block, so a layer output fed by the blocks scales by α."""
        return all(im == ALPHA * self.blocks[name] for name, im in self.images.items())

    @cached_property
    def constant_generator(self) -> bool:
        """ξ does not depend on θ (Dξ = 0, as for translation): the affine structure has J = 0."""
        from symmech.derivation import derive

        try:
            affine = derive(self.spec).affine
        except Exception:  # noqa: BLE001 - a spec the engine cannot read: assume Dξ ≠ 0
            return False
        return affine.is_affine and not affine.has_linear_part

    def is_vector(self, name: str) -> bool:
        return bool(self.blocks[name].shape[1] == 1)


_COMPILED: dict[tuple, SpecAction] = {}
_BY_NAME: dict[str, SpecAction] = {}
_BY_ID: dict[int, tuple[Symmetry, SpecAction]] = {}
#: the spec objects :data:`_BY_ID` keeps alive (its keys stay unique while they do), and the
#: distinct specs :data:`_COMPILED` keeps: the oldest are dropped beyond this many
MAX_KEPT = 256


def spec_of(family: Family) -> Symmetry:
    """The family's :class:`Symmetry`: its ``spec``, else the registry entry of its name."""
    if family.spec is not None:
        return family.spec
    if family.symmetry not in BUILTIN:
        valid = ", ".join(repr(k) for k in BUILTIN)
        raise ValueError(
            f"Family(symmetry={family.symmetry!r}): unknown symmetry; valid names are {valid}, "
            "or give the family a symmech.Symmetry"
        )
    return BUILTIN[family.symmetry]()


def spec_action(family: Family) -> SpecAction:
    """The :class:`SpecAction` of the family's spec (built once per distinct spec; a built-in
    named without a spec, or a spec object seen before, is found without rebuilding or printing
    it: confirmation asks for it once per family and group)."""
    if family.spec is None and family.symmetry in _BY_NAME:
        return _BY_NAME[family.symmetry]
    seen = _BY_ID.get(id(family.spec)) if family.spec is not None else None
    if seen is not None and seen[0] is family.spec:
        return seen[1]
    spec = spec_of(family)
    key = (repr(spec), tuple((c.name, c.structure) for c in spec.constants))
    if key not in _COMPILED:
        _bounded(_COMPILED)
        _COMPILED[key] = SpecAction(spec)
    action = _COMPILED[key]
    if family.spec is None:
        _BY_NAME[family.symmetry] = action
    else:
        _bounded(_BY_ID)
        _BY_ID[id(family.spec)] = (family.spec, action)  # keeps the spec alive: ids stay unique
    return action


def _bounded(cache: dict) -> None:
    """Drop the oldest entry of a full cache (a spec object made anew per detection would
    otherwise keep every earlier one alive)."""
    if len(cache) >= MAX_KEPT:
        cache.pop(next(iter(cache)))


# ----------------------------------------------------------------------------- slices


def slice_view(tensor: Tensor, piece: BlockSlice) -> Tensor:
    """``tensor`` reshaped (or transposed, ``view="T"``) by ``piece.view``."""
    if piece.view is None:
        return tensor
    if _is_strided(piece.view):
        return tensor.reshape(-1)[_strided_index(tensor, piece.view)]
    return tensor.mT if piece.view == "T" else tensor.reshape(piece.view)


def _count(tensor: Tensor, piece: BlockSlice) -> int:
    return 1 if piece.dim is None else slice_view(tensor, piece).shape[piece.dim]


def family_params(family: Family) -> list[str]:
    """Names of the parameters a family touches, in first-seen order, without repeats."""
    names: dict[str, None] = {}
    for pieces in family.blocks.values():
        for piece in pieces:
            names.setdefault(piece.param)
    return list(names)


def _check_constants(family: Family, action: SpecAction) -> None:
    where = f"Family({family.layer!r})"
    missing = sorted(set(action.constants) - set(family.constants))
    if missing:
        raise ValueError(
            f"{where}: the {action.spec.name} spec needs the constants {missing}; "
            f"give constants={{{missing[0]!r}: tensor, ...}}"
        )
    for name, c in action.constants.items():
        value = family.constants[name]
        if not isinstance(value, Tensor) or value.ndim != 2:
            raise ValueError(f"{where}: constant {name!r} must be a 2-D tensor, got {value!r}")
        sign = {"symmetric": 1.0, "antisymmetric": -1.0}.get(c.structure)
        if sign is not None:
            gap = float((value - sign * value.mT).abs().max()) if value.numel() else 0.0
            if value.shape[0] != value.shape[1] or gap > 1e-12 * max(float(value.abs().max()), 1):
                raise ValueError(
                    f"{where}: constant {name!r} must be {c.structure} (the spec says so), "
                    f"got shape {tuple(value.shape)} with |E - {sign:+g}·Eᵀ| = {gap:.1e}"
                )


def validate_family(family: Family, params: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` naming the problem when a family does not fit its spec or the model."""
    action = spec_action(family)
    given, needed = set(family.blocks), set(action.blocks)
    if not needed <= given or not given <= needed | action.optional:
        raise ValueError(
            f"Family({family.layer!r}): a {family.symmetry} family has blocks "
            f"{sorted(needed)}, got {sorted(family.blocks)}"
        )
    _check_constants(family, action)
    _check_disjoint(family, params)
    for block, pieces in family.blocks.items():
        for piece in pieces:
            tensor = params[piece.param]
            if piece.view == "T" and tensor.ndim != 2:
                raise ValueError(
                    f"Family({family.layer!r}): view 'T' needs a matrix, {piece.param} has "
                    f"shape {tuple(tensor.shape)}"
                )
            if (
                isinstance(piece.view, tuple)
                and not _is_strided(piece.view)
                and tensor.numel() != torch.Size(piece.view).numel()
            ):
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
            if not action.is_vector(block) and slice_view(tensor, piece).ndim != (
                2 if piece.dim is None else 3
            ):
                raise ValueError(
                    f"Family({family.layer!r}): block {block!r} is a matrix, but one group of "
                    f"{piece.param} (shape {tuple(tensor.shape)}, view={piece.view}, "
                    f"dim={piece.dim}) is not 2-D"
                )


def _check_disjoint(family: Family, params: Mapping[str, Tensor]) -> None:
    """Every parameter is named once, or only by strided views on disjoint entries."""
    where = f"Family({family.layer!r})"
    taken: dict[str, Tensor | None] = {}
    for block, pieces in family.blocks.items():
        for piece in pieces:
            if piece.param not in params:
                raise ValueError(
                    f"{where}: block {block!r} names parameter {piece.param!r}, "
                    "which the model does not have"
                )
            tensor = params[piece.param]
            index = None
            if _is_strided(piece.view):
                _, size, stride, offset = piece.view
                last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
                if (
                    len(size) != len(stride)
                    or min(size) < 1
                    or offset < 0
                    or last >= tensor.numel()
                ):
                    raise ValueError(
                        f"{where}: view {piece.view} does not fit {piece.param} of shape "
                        f"{tuple(tensor.shape)} ({tensor.numel()} entries)"
                    )
                index = _strided_index(tensor, piece.view).reshape(-1)
                if index.unique().numel() != index.numel():
                    raise ValueError(
                        f"{where}: view {piece.view} of {piece.param} reads an entry twice"
                    )
            if piece.param in taken:
                before = taken[piece.param]
                if before is None or index is None or torch.isin(index, before).any():
                    raise ValueError(
                        f"{where}: parameter {piece.param!r} appears in two slices that overlap; "
                        "a parameter may be named once per family, or by strided views of "
                        "disjoint entries"
                    )
                index = torch.cat([before, index])
            taken[piece.param] = index


def identity(family: Family, like: Tensor) -> Tensor:
    """The identity element e of the spec, one per group, with the dtype and device of ``like``."""
    value = spec_action(family).identity
    return torch.full((family.n_groups,), value, dtype=like.dtype, device=like.device)


# ----------------------------------------------------------------------------- ψ and ξ


def _groups(tensor: Tensor, piece: BlockSlice, vector: bool) -> Tensor:
    """The piece as (groups, rows, cols): each group's slice, flattened to a column if ``vector``."""
    viewed = slice_view(tensor, piece)
    per = viewed.unsqueeze(0) if piece.dim is None else viewed.movedim(piece.dim, 0)
    return per.reshape(per.shape[0], -1, 1) if vector else per


def _ungroup(moved: Tensor, tensor: Tensor, piece: BlockSlice) -> Tensor:
    """Inverse of :func:`_groups`: the moved groups back in the parameter's own shape (for a
    strided view, written into ``tensor``'s other entries, out of place)."""
    viewed = slice_view(tensor, piece)
    if _is_strided(piece.view):
        index = _strided_index(tensor, piece.view)
        per_index = index.unsqueeze(0) if piece.dim is None else index.movedim(piece.dim, 0)
        flat = tensor.reshape(-1).scatter(0, per_index.reshape(-1), moved.reshape(-1))
        return flat.reshape(tensor.shape)
    per = viewed.unsqueeze(0) if piece.dim is None else viewed.movedim(piece.dim, 0)
    back = moved.reshape(per.shape)
    back = back.squeeze(0) if piece.dim is None else back.movedim(0, piece.dim)
    if piece.view == "T":
        return back.mT
    return back.reshape(tensor.shape)


def apply_action(params: Mapping[str, Tensor], family: Family, alpha: Tensor) -> dict[str, Tensor]:
    """ψ(θ, α): a new dict where each group ``j`` of ``family`` is moved by ``alpha[j]``.

    Out of place and differentiable in both ``params`` and ``alpha``; entries the family does
    not move are passed through unchanged (the same tensor objects).
    """
    action = spec_action(family)
    like = params[family_params(family)[0]]
    consts = {action.constants[n]: family.constants[n].to(like) for n in action.constants}
    mats, rows = {}, {}
    for block, pieces in family.blocks.items():
        if block not in action.blocks:
            continue
        parts = [_groups(params[p.param], p, action.is_vector(block)) for p in pieces]
        rows[block] = [t.shape[1] for t in parts]
        mats[block] = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def one_group(blocks: dict[str, Tensor], a: Tensor) -> dict[str, Tensor]:
        env = {action.blocks[n]: t for n, t in blocks.items()} | consts | {ALPHA: a}
        return {n: evaluate_expr(im, env, "torch", like=a) for n, im in action.images.items()}

    images = torch.func.vmap(one_group)(mats, alpha.to(like))
    out = dict(params)
    for block, image in images.items():
        for piece, part in zip(family.blocks[block], image.split(rows[block], dim=1), strict=True):
            out[piece.param] = _ungroup(part, out[piece.param], piece)
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
