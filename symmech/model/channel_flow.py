"""How an operation carries the channels of a tensor: the axis that holds channel c after it.

The residual-stream rule (:mod:`.streams`) follows tensors whose channel c is multiplied by α_c.
An operation keeps that true when it is positively homogeneous and acts on each channel alone:
ReLU, LeakyReLU, PReLU, ``clamp(min=0)``, pooling over other axes, dropout, identity, a product
with a number, a copy; and index operations that move the channel axis without mixing channels
(permute, transpose, a reshape or flatten that keeps the axis whole, expand, a mean / sum / pick
over other axes). :func:`carried_axis` says where the channel axis goes (or None), and
:func:`joined` which tensors an addition or a concatenation along another axis joins.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx, nn

from .graph import _function_kind, _module_kind
from .trace import DROPOUTS, Trace, is_scalar_scale, tensor_arg

__all__ = ["carried_axis", "channel_cat", "is_add", "joined", "source_axis"]

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_REDUCTIONS = {"mean", "sum", torch.mean, torch.sum}
_PERMUTES = {"permute", torch.permute}
_TRANSPOSES = {"transpose", torch.transpose, "swapaxes"}
_COPIES = {"to", "clone", "contiguous", "type_as"}
_ATEN_COPIES = {"aten.to.dtype_layout", "aten.to.dtype", "aten.to.device", "aten._to_copy.default",
                "aten.clone.default", "aten.alias.default", "aten.contiguous.default"}  # fmt: skip


def is_add(trace: Trace, node: fx.Node) -> bool:
    """``a + b`` (any spelling) of two tensors, no ``alpha``."""
    if node.op not in ("call_function", "call_method") or node.target not in _ADDS:
        return False
    tensors = [a for a in node.args[:2] if isinstance(trace.values.get(a), Tensor)]
    return len(node.args) == 2 and len(tensors) == 2 and not node.kwargs


def channel_cat(trace: Trace, node: fx.Node, axis: int) -> list[fx.Node] | None:
    """The pieces of a concatenation along the channel axis ``axis`` (Swin's patch merging), or
    None."""
    dim, value = _cat_dim(node), trace.values.get(node)
    if dim is None or not isinstance(value, Tensor) or dim % value.ndim != axis:
        return None
    pieces = node.args[0]
    ok = isinstance(pieces, (list, tuple)) and all(isinstance(p, fx.Node) for p in pieces)
    return list(pieces) if ok else None


def _cat_dim(node: fx.Node) -> int | None:
    if node.op != "call_function" or node.target not in _CATS or not node.args:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


def joined(trace: Trace, node: fx.Node, axis: int) -> list[fx.Node] | None:
    """The tensors ``node`` joins with channel axis ``axis`` kept: an addition's operands, or the
    pieces of a concatenation along another axis (a class token before the patches); else None."""
    if is_add(trace, node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    dim = _cat_dim(node)
    value = trace.values.get(node)
    if dim is None or not isinstance(value, Tensor) or dim % value.ndim == axis:
        return None
    pieces = node.args[0]
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
        return None
    return list(pieces)


def _is_copy(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _COPIES
    return node.op == "call_function" and str(node.target) in _ATEN_COPIES


def _dims(node: fx.Node, start: int) -> list[Any]:
    """The dims of a permute / mean, given as one sequence or as separate arguments."""
    rest = list(node.args[start:]) or [node.kwargs.get("dims", node.kwargs.get("dim"))]
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest


def _index_axis(node: fx.Node, before: Tensor, after: Tensor, axis: int) -> int | None:
    """Where ``axis`` goes through a permute, transpose, reshape, expand, reduction or pick."""
    target = node.target
    if target in _PERMUTES:
        dims = [d % before.ndim for d in _dims(node, 1) if isinstance(d, int)]
        return dims.index(axis) if len(dims) == before.ndim else None
    if target in _TRANSPOSES and len(node.args) >= 3:
        d0, d1 = (d % before.ndim for d in node.args[1:3])
        return {d0: d1, d1: d0}.get(axis, axis)
    if target in ("view", "reshape", "flatten", torch.reshape, torch.flatten, "unflatten"):
        return _reshaped_axis(before, after, axis)
    if target == "expand":
        shift = after.ndim - before.ndim
        return axis + shift if after.shape[axis + shift] == before.shape[axis] else None
    if target in _REDUCTIONS and node.op != "call_module":
        dims = _dims(node, 1)
        keep = bool(node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]))
        if None in dims or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % before.ndim for d in dims]
        if axis in dims:
            return None
        return axis if keep else axis - sum(d < axis for d in dims)
    if target in ("roll", torch.roll):
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        ok = None not in dims and all(isinstance(d, int) and d % before.ndim != axis for d in dims)
        return axis if ok else None  # a cyclic shift of other axes (Swin's shifted windows)
    if target is operator.getitem:
        return _picked_axis(node.args[1], before, axis)
    if target is torch.select and len(node.args) == 3:
        dim = node.args[1] % before.ndim
        return None if dim == axis else axis - (dim < axis)
    return None


def _reshaped_axis(before: Tensor, after: Tensor, axis: int) -> int | None:
    if after.ndim > axis and after.shape[: axis + 1] == before.shape[: axis + 1]:
        return axis  # the axes up to the channels untouched: only later axes merged or split
    if axis == before.ndim - 1 and after.shape[-1] == before.shape[-1]:
        return after.ndim - 1  # channels last, earlier axes merged or split
    return None


def _picked_axis(index: Any, before: Tensor, axis: int) -> int | None:
    """``x[:, 0]``-style picks: integers and whole slices before or after the channel axis."""
    index = index if isinstance(index, tuple) else (index,)
    if index.count(Ellipsis) == 1:  # x[..., 0::2, :]: the ellipsis stands for whole axes
        at = index.index(Ellipsis)
        fill = (slice(None),) * (before.ndim - len(index) + 1)
        index = index[:at] + fill + index[at + 1 :]
    if any(i is None or i is Ellipsis or isinstance(i, (Tensor, list)) for i in index):
        return None
    if len(index) > axis:
        at = index[axis]
        if not (isinstance(at, slice) and at == slice(None)):
            return None  # the channel axis itself is indexed
    return axis - sum(isinstance(i, int) for i in index[:axis])


def carried_axis(trace: Trace, node: fx.Node, source: fx.Node, axis: int, n: int) -> int | None:
    """The axis of ``node``'s output that holds channel c of ``source`` (channel axis ``axis``,
    ``n`` channels) multiplied by the same α_c, or None when ``node`` does not carry them so."""
    before, after = trace.values.get(source), trace.values.get(node)
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        return None
    if is_scalar_scale(node, trace.values):
        return axis if tensor_arg(node, trace.values) is source else None
    if node.args[:1] != (source,):
        return None
    module = trace.module(node)
    if module is not None:
        kind, extra = _module_kind(module)
        if node in trace.shared and kind not in ("act", "pass", "pool"):
            return None
        if isinstance(module, nn.PReLU) and module.num_parameters not in (1, n):
            return None
        if kind == "other" and type(module).__name__ == "Permute":  # torchvision.ops.Permute
            dims = [d % before.ndim for d in getattr(module, "dims", [])]
            return dims.index(axis) if len(dims) == before.ndim else None
    else:
        kind, extra = _function_kind(node)
        if node.target in DROPOUTS:
            kind = "pass"
    if kind in ("act", "pass") or _is_copy(node):
        same = after.shape == before.shape and after.dtype == before.dtype
        return axis if same else None
    if kind == "pool":
        return axis if axis == 1 and before.ndim == extra["spatial"] + 2 else None
    if kind == "flatten" and node.op == "call_module":
        found = _reshaped_axis(before, after, axis)
    else:
        found = _index_axis(node, before, after, axis) if node.op != "call_module" else None
    return found if found is not None and after.shape[found] == n else None


def source_axis(trace: Trace, node: fx.Node, source: fx.Node, axis: int, n: int) -> int | None:
    """The channel axis of ``source`` that ``node`` carries to its own ``axis`` (the inverse of
    :func:`carried_axis`, by trying each axis of size ``n``)."""
    value = trace.values.get(source)
    if not isinstance(value, Tensor):
        return None
    for candidate in range(value.ndim):
        if value.shape[candidate] == n and carried_axis(trace, node, source, candidate, n) == axis:
            return candidate
    return None
