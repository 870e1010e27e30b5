"""Families that differ only in their constants, evaluated as one per hook call.

A symmetry with a constant generator matrix per family (attention heads: one family per entry
of the head's generator basis, 32 of them for a head of 32 features) binds many families to the
same tensors, slices and groups. Their data terms ⟨x M_f, y⟩ are Σ_ab (M_f)_ab Gram_ab with one
per-group Gram matrix, so all F of them come from one matrix product of the stacked, flattened
constants (F, a·b) with the Gram matrices (G, a·b)ᵀ. :class:`Batch` evaluates a generated
function once for every member at the first member's request in a hook call (the
:class:`~.reductions.ReductionCache` keeps the result until the call ends) and hands each member
its row, so the Python cost per step no longer grows with the number of such families.

A function whose terms need the constant multiplied out (no Gram path: sharded or absent
slices, a spec with ⟨x M, y M⟩ terms) raises :class:`~.kernels.NotBatched`; the batch is then
off for good and every member evaluates its own function, as without batching. The rows equal
the per-family values to round-off (the sums of one product are ordered differently).
"""

from __future__ import annotations

from typing import Any

import torch

from .kernels import Forms, NotBatched, stacked

Views = dict[str, list[Any]]


def signature(binding: Any, module: Any, groups: tuple[int, ...]) -> tuple | None:
    """What members of one batch share: the generated module, every block's tensors, group
    dimensions and views, the optimizer's param groups, and the constants' names, shapes and
    dtypes (None: the family has no constants, or a view that cannot be compared)."""
    if not module.CONSTANTS or not binding.constants:
        return None
    blocks = tuple(
        (name, tuple((id(s.tensor), s.dim, s.view) for s in slices))
        for name, slices in binding.blocks.items()
    )
    consts = tuple(
        (k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(binding.constants.items())
    )
    key = (id(module), blocks, groups, consts)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class Batch:
    """Members sharing a :func:`signature`; each generated function evaluated once for all."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.members: list[Any] = []
        self.off = False  # a function could not be stacked: every member evaluates its own
        self._const: tuple[dict[str, torch.Tensor], ...] | None = None

    def join(self, family: Any) -> int:
        """Add a member; returns its row."""
        self.members.append(family)
        self._const = None
        return len(self.members) - 1

    def const(self) -> tuple[dict[str, torch.Tensor], ...]:
        """Every member's constants stacked along a leading axis (F, a, b)."""
        if self._const is None:
            names = self.members[0].binding.constants
            self._const = (
                {k: torch.stack([f.binding.constants[k] for f in self.members]) for k in names},
            )
        return self._const

    def evaluate(
        self, family: Any, name: str, args: tuple[Views | None, ...], roles: tuple[str, ...]
    ) -> Any:
        """``module.<name>(*args, const)`` of ``family`` (one of the members) from the batch's
        evaluation in this hook call; None when the batch cannot give it. ``roles`` name what
        the views hold (the same tensors for every member: members bind the same slices)."""
        if self.off or len(self.members) < 2:
            return None
        grids = family.cache.grids
        key = (
            "batch",
            id(self),
            name,
            tuple(r if a is not None else "" for r, a in zip(roles, args)),
        )
        got = grids.get(key)
        if got is None:
            try:
                with stacked(len(self.members)):
                    got = getattr(self.module, name)(*args, *self.const())
                got = _rows(got, len(self.members), family.n_groups)
            except (NotBatched, RuntimeError, ValueError, TypeError) as err:
                self.off = True  # any failure: per family from now on (the same errors, if any)
                self.why = f"{type(err).__name__}: {err}"
                return None
            grids[key] = got
        return got[family.batch_row]


def _rows(value: Any, count: int, groups: int) -> list[Any]:
    """One value per member from a stacked result: (F, G) split by rows, (G,) shared."""
    if isinstance(value, Forms):
        fields = ("tt", "tg", "gg", "tb", "gb", "bb")
        parts = {f: _rows(getattr(value, f), count, groups) for f in fields}
        return [Forms(**{f: parts[f][i] for f in fields}) for i in range(count)]
    if value is None:
        return [None] * count
    if not isinstance(value, torch.Tensor):
        raise NotBatched(f"a {type(value).__name__} result")
    if value.shape == (count, groups):
        return list(value.unbind(0))
    if value.shape == (groups,):
        return [value] * count
    raise NotBatched(f"a result of shape {tuple(value.shape)} for {count} × {groups}")
