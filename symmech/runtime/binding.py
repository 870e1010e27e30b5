"""Binding the blocks of a spec to slices of real parameters.

Each block is a list of ``(tensor, dim)`` pairs: group j of the family is slice j along
``dim`` of every listed tensor (``dim=None``: the whole tensor is one group). A third item
may reshape the tensor first (a shape tuple, e.g. a Linear weight after Flatten viewed as
``(out, C, H*W)``), or transpose it (``"T"``), or pick entries of the row-major tensor with a
strided view ``("strided", size, stride, offset)`` (:func:`symmech.model.actions.strided`: one
attention head's rows of a q/k/v weight, transposed), read as
``t.as_strided(size, stride, t.storage_offset() + offset)`` of the contiguous tensor.

>>> import torch, symmech
>>> conv = torch.nn.Conv2d(1, 4, 3)
>>> b = symmech.bind("scale", theta=[(conv.weight, 0), (conv.bias, 0)])
>>> b.n_groups
4
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from symmech.derivation import Derivation, derive
from symmech.errors import BindingError, explain
from symmech.spec.declare import Symmetry
from symmech.spec.library import BUILTIN

from .modules import generated_module
from .shards import probe

View = tuple[Any, ...] | str | None


def is_strided(view: object) -> bool:
    """A view ``("strided", size, stride, offset)`` of the row-major tensor."""
    return isinstance(view, tuple) and len(view) == 4 and view[0] == "strided"


def _check_strided(view: tuple[Any, ...], numel: int) -> None:
    """A strided view must stay inside the tensor (as_strided does not check it)."""
    _, size, stride, offset = view
    if len(size) != len(stride) or any(n < 0 for n in (*size, *stride, offset)):
        raise RuntimeError(f"size {size} and stride {stride} do not match")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
    if last >= numel:
        raise RuntimeError(f"it reads entry {last} of a tensor of {numel} entries")


@dataclass(frozen=True)
class BoundSlice:
    """One tensor of a block, with the dimension that indexes the groups."""

    tensor: torch.Tensor
    dim: int | None
    view: View = None
    name: str = ""

    def shaped(self, t: torch.Tensor) -> torch.Tensor:
        """Apply the view to θ, its gradient or its momentum buffer alike."""
        if self.view is None:
            return t
        if self.view == "T":
            return t.mT
        if is_strided(self.view):
            _, size, stride, offset = self.view
            c = t if t.is_contiguous() else t.contiguous()
            return c.as_strided(size, stride, c.storage_offset() + offset)
        return t.reshape(self.view)

    def reduce_dims(self, ndim: int) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(range(ndim))
        dim = self.dim % ndim
        return tuple(i for i in range(ndim) if i != dim)

    def prepare(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        x = self.shaped(t)
        return x, self.reduce_dims(x.ndim)

    @property
    def n_groups(self) -> int:
        x = self.shaped(probe(self.tensor))  # the global shape, also of a sharded DTensor
        return 1 if self.dim is None else int(x.shape[self.dim])


@dataclass
class Binding:
    """A spec bound to parameters: one family of G groups."""

    derivation: Derivation
    blocks: dict[str, list[BoundSlice]]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    layer: str = ""
    #: found by :func:`symmech.detect` (a family on a frozen tensor is then observed, not refused)
    detected: bool = False
    #: a name per group (e.g. ``h0[1,2]``: head 0, entry (1, 2) of its charge matrix), or empty
    labels: tuple[str, ...] = ()

    def label(self, group: int) -> str:
        """The name of group ``group``: its label, else its number."""
        return self.labels[group] if self.labels else str(group)

    @property
    def symmetry(self) -> Symmetry:
        return self.derivation.symmetry

    @property
    def name(self) -> str:
        return self.derivation.name

    @property
    def n_groups(self) -> int:
        return next(iter(self.blocks.values()))[0].n_groups

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [s.tensor for slices in self.blocks.values() for s in slices]

    @property
    def module(self) -> types.ModuleType:
        """The generated module of this spec (the committed one when it matches)."""
        return generated_module(self.derivation)


@functools.cache
def _derive_builtin(name: str) -> Derivation:
    return derive(BUILTIN[name]())


def as_derivation(symmetry: Symmetry | Derivation | str) -> Derivation:
    """Accept a spec, a derivation or a built-in name."""
    if isinstance(symmetry, Derivation):
        return symmetry
    if isinstance(symmetry, Symmetry):
        if symmetry.name in BUILTIN and repr(symmetry) == repr(BUILTIN[symmetry.name]()):
            return _derive_builtin(symmetry.name)
        return derive(symmetry)
    if isinstance(symmetry, str):
        if symmetry not in BUILTIN:
            raise BindingError(
                explain(
                    f"bind({symmetry!r}, ...)",
                    "unknown symmetry name",
                    f"choose one of {sorted(BUILTIN)}",
                )
            )
        return _derive_builtin(symmetry)
    raise BindingError(
        explain(f"bind({symmetry!r}, ...)", "expected a Symmetry, a Derivation or a built-in name")
    )


def _slice(call: str, block: str, item: Any, position: int) -> BoundSlice:
    if isinstance(item, BoundSlice):
        return item
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise BindingError(
            explain(
                call,
                f"block '{block}' item {position} is {item!r}",
                "give (tensor, dim) or (tensor, dim, view)",
            )
        )
    tensor, dim = item[0], item[1]
    view = item[2] if len(item) == 3 else None
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise BindingError(
            explain(
                call,
                f"block '{block}' item {position}: dim={dim!r} ({type(dim).__name__})",
                "give the group dimension as an int (or None for one group)",
            )
        )
    if not isinstance(tensor, torch.Tensor):
        raise BindingError(
            explain(
                call, f"block '{block}' item {position}: {type(tensor).__name__} is not a tensor"
            )
        )
    bound = BoundSlice(
        tensor,
        dim,
        tuple(view) if isinstance(view, list) else view,
        getattr(tensor, "_symmech_name", ""),
    )
    try:
        if is_strided(bound.view):
            _check_strided(bound.view, tensor.numel())
        shaped = bound.shaped(probe(tensor))
    except RuntimeError as err:
        raise BindingError(
            explain(
                call,
                f"block '{block}' item {position}: view {view} does not fit shape {tuple(tensor.shape)}: {err}",
            )
        ) from None
    if dim is not None and not (-shaped.ndim <= dim < shaped.ndim):
        raise BindingError(
            explain(
                call,
                f"block '{block}' item {position}: dim={dim} is out of range for shape {tuple(shaped.shape)}",
            )
        )
    return bound


def bind(
    symmetry: Symmetry | Derivation | str,
    layer: str = "",
    constants: Mapping[str, torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
    **blocks: Sequence[Any],
) -> Binding:
    """Bind every block of a spec to parameter slices (see the module docstring).

    ``labels`` names the groups (one string per group, e.g. ``h0[1,2]``), kept on the binding."""
    d = as_derivation(symmetry)
    call = f"bind({d.name!r}, {', '.join(f'{k}=...' for k in blocks)})"
    names = [b.name for b in d.blocks]
    unknown = [k for k in blocks if k not in names]
    if unknown:
        raise BindingError(
            explain(call, f"unknown block(s) {unknown}", f"the blocks of {d.name} are {names}")
        )
    missing = [n for n in names if n not in blocks]
    if missing:
        raise BindingError(explain(call, f"no slices given for block(s) {missing}"))
    bound: dict[str, list[BoundSlice]] = {}
    for name in names:
        items = blocks[name]
        if isinstance(items, torch.Tensor):
            raise BindingError(
                explain(
                    call,
                    f"block '{name}' is a bare tensor of shape {tuple(items.shape)}",
                    f"give a list of (tensor, dim) pairs, e.g. {name}=[(tensor, 0)]",
                )
            )
        if not isinstance(items, (list, tuple, BoundSlice)):
            raise BindingError(
                explain(
                    call,
                    f"block '{name}' is {type(items).__name__}",
                    "give a list of (tensor, dim) pairs",
                )
            )
        if isinstance(items, BoundSlice):
            items = [items]
        if isinstance(items, tuple) and len(items) in (2, 3) and isinstance(items[0], torch.Tensor):
            items = [items]
        if not items:
            raise BindingError(explain(call, f"block '{name}' has no slices"))
        bound[name] = [_slice(call, name, it, i) for i, it in enumerate(items)]
    counts = {
        f"{n}[{i}] (shape {tuple(s.shaped(probe(s.tensor)).shape)}, dim={s.dim})": s.n_groups
        for n, sl in bound.items()
        for i, s in enumerate(sl)
    }
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise BindingError(
            explain(
                call,
                f"the slices disagree in group count ({listing})",
                "every slice must index the same groups",
            )
        )
    consts = dict(constants or {})
    needed = [c.name for c in d.symmetry.constants]
    if sorted(consts) != sorted(needed):
        raise BindingError(
            explain(
                call,
                f"constants {sorted(consts)} given, {needed} needed",
                "pass constants={name: tensor}",
            )
        )
    bad = {k: type(v).__name__ for k, v in consts.items() if not isinstance(v, torch.Tensor)}
    if bad:
        raise BindingError(explain(call, f"constants {bad} are not tensors"))
    group_labels = tuple(str(x) for x in labels) if labels is not None else ()
    n_groups = next(iter(counts.values()))
    if labels is not None and (isinstance(labels, str) or len(group_labels) != n_groups):
        raise BindingError(
            explain(
                call,
                f"labels={labels!r} for {n_groups} groups",
                "give one label per group, or none",
            )
        )
    binding = Binding(d, bound, consts, layer or d.name, labels=group_labels)
    _dry_run(call, binding)
    return binding


def _dry_run(call: str, binding: Binding) -> None:
    """Evaluate the generated Q and forms once on θ, so that a constant or a slice that does
    not fit fails here, at the call, and not in the middle of training (on meta tensors of
    the global shape when a slice is a sharded DTensor: no communication)."""
    module = binding.module
    probes = {
        id(s.tensor): probe(s.tensor) for s in (x for v in binding.blocks.values() for x in v)
    }
    on_meta = any(t.device.type == "meta" for t in probes.values())
    if on_meta:  # one meta evaluation for the whole family
        probes = {k: v.to("meta") for k, v in probes.items()}
    views = {
        block: [s.prepare(probes[id(s.tensor)]) for s in slices]
        for block, slices in binding.blocks.items()
    }
    constants = binding.constants
    if on_meta:
        constants = {k: v.to("meta") for k, v in constants.items()}
    const = (constants,) if module.CONSTANTS else ()
    try:
        with torch.no_grad():
            module.charge(views, *const)
            module.forms(views, views, views, *const)
    except (RuntimeError, ValueError, IndexError) as err:
        shapes = {k: tuple(v.shape) for k, v in binding.constants.items()}
        raise BindingError(
            explain(
                call,
                f"the slices{f' and constants {shapes}' if shapes else ''} do not fit "
                f"{binding.name}'s formulas: {err}",
            )
        ) from None
