"""``norm_rescale``: a LayerNorm / BatchNorm / GroupNorm / RMSNorm with an affine whose output
reaches only Linear / conv layers (or a self-attention's input projection) through dropout,
identity or a mean over other axes: its affine scaled by α per channel, the readers' input
columns by 1/α.

RMSNorm is ``nn.RMSNorm`` or a model's own module written like Hugging Face's ``LlamaRMSNorm``
(:func:`.layout.is_rms_norm`: a class name ending in "RMSNorm", a ``weight`` vector, an eps attribute);
the tracers keep such a module whole, and its output is checked to be proportional to its weight
per channel on the example input before a family is claimed (Gemma's ``x̂ · (1 + w)`` is not).
A SwiGLU MLP ``down(silu(gate(x)) · up(x))`` reads the norm output through ``gate`` and ``up``,
both linear in it: one family moves both input columns.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .actions import BlockSlice, Family
from .channel_flow import carried_axis
from .layout import in_axis, in_features, is_linear, is_rms_norm
from .trace import DROPOUTS, Trace, is_meta

__all__ = ["is_rms_norm", "layer_norm_args", "norm_eps", "norm_rescale_families"]

_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


# ----------------------------------------------------------------------------- normalisation


def norm_eps(module: nn.Module, dtype: torch.dtype = torch.float64) -> float:
    """The eps a normalisation adds to its variance (``eps`` or ``variance_epsilon``; ``None``,
    as ``nn.RMSNorm`` allows, means the machine epsilon of ``dtype``)."""
    eps = next(
        (getattr(module, a) for a in ("eps", "variance_epsilon") if hasattr(module, a)), None
    )
    return float(torch.finfo(dtype).eps if eps is None else eps)


def _affine_acts_along(trace: Trace, node: fx.Node, norm: nn.Module, axis: int) -> bool:
    """The norm's output channel i (along ``axis``) is multiplied by d_i when its weight and bias
    are, on the example input: x̂ · w + b, not Gemma's x̂ · (1 + w), and along that axis (a
    LayerNorm2d subclass normalises NCHW's axis 1). Checked with a random positive d."""
    x, out = (trace.values.get(n) for n in (node.args[0] if node.args else None, node))
    if not isinstance(x, Tensor) or not isinstance(out, Tensor) or out.ndim < 2:
        return False
    weight = norm.weight.detach()
    d = 0.5 + 1.5 * torch.rand(weight.shape, generator=torch.Generator().manual_seed(0))
    d = d.to(weight)
    moved = {"weight": weight * d}
    if isinstance(getattr(norm, "bias", None), Tensor):
        moved["bias"] = norm.bias.detach() * d
    shape = [1] * out.ndim
    shape[axis] = -1
    with torch.no_grad():
        result = torch.func.functional_call(norm, moved, (x,))
        if result.shape != out.shape or out.shape[axis] != d.numel():
            return False
        expect = out * d.reshape(shape)
    tol = 1e-10 if out.dtype == torch.float64 else 1e-4
    return torch.allclose(result, expect, rtol=tol, atol=tol)


def _reads_channels(
    trace: Trace, user: fx.Node, node: fx.Node, axis_last: bool, n: int
) -> tuple[str, int] | None:
    """(parameter, axis) whose slice i reads channel i of ``node``'s output, or None: the
    input columns of a Linear (the rows of a Conv1D, whose weight is (in, out)) or a conv, or
    of the weight an ``F.linear`` call is given (Swin's windowed attention)."""
    if user.target is F.linear and axis_last and user.args[:1] == (node,) and len(user.args) > 1:
        value = trace.parameter(user.args[1])
        ok = value is not None and value.ndim == 2 and value.shape[1] == n
        return (str(user.args[1].target), 1) if ok else None
    module = trace.module(user)
    if user in trace.shared or module is None or trace.tied(user):
        return None
    if is_linear(module) and axis_last and in_features(module) == n:
        return (f"{user.target}.weight", in_axis(module)) if user.args[:1] == (node,) else None
    if isinstance(module, nn.modules.conv._ConvNd) and not axis_last:
        ok = module.groups == 1 and module.in_channels == n and user.args[:1] == (node,)
        return (f"{user.target}.weight", 1) if ok else None
    if isinstance(module, nn.MultiheadAttention) and axis_last and module.embed_dim == n:
        qkv = list(user.args[:3]) + [user.kwargs.get(k) for k in ("query", "key", "value")]
        ok = [a for a in qkv if a is not None] == [node] * 3 and module.in_proj_weight is not None
        return (f"{user.target}.in_proj_weight", 1) if ok else None
    return None


_MOVES = {"permute", torch.permute, "roll", torch.roll, "transpose", torch.transpose,
          operator.getitem}  # fmt: skip


def _passes_channels(trace: Trace, user: fx.Node, axis_last: bool) -> bool:
    """Dropout, identity, or (channels last) a mean or a pick (``select``) over other axes, or a
    view / reshape / contiguous copy that keeps the last axis whole, or a permute / transpose /
    roll / pick (``x[:, 0]``) that leaves it last."""
    if isinstance(trace.module(user), (nn.Dropout, nn.Identity)) or user.target in DROPOUTS:
        return True
    if not axis_last or not user.args or not isinstance(user.args[0], fx.Node):
        return False
    rank = trace.rank(user.args[0])
    if user.target == "contiguous" and len(user.args) == 1 and not user.kwargs:
        return True
    if user.target in ("view", "reshape"):
        before, after = trace.values.get(user.args[0]), trace.values.get(user)
        ok = isinstance(after, Tensor) and isinstance(before, Tensor)
        return ok and before.shape[-1:] == after.shape[-1:]
    if user.target is torch.select and rank is not None and len(user.args) == 3:
        return user.args[1] % rank != rank - 1
    if user.target in _MOVES and rank is not None:  # Swin's windows, ViT's x[:, 0]: still last
        value = trace.values.get(user)
        n = int(trace.values[user.args[0]].shape[-1])
        moved = carried_axis(trace, user, user.args[0], rank - 1, n)
        return isinstance(value, Tensor) and moved == value.ndim - 1
    if user.target in ("mean", torch.mean):
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        return rank is not None and None not in dims and all(d % rank != rank - 1 for d in dims)
    return False


def _reader_name(user: fx.Node, param: str) -> str:
    """The module that reads: the call's, or (``F.linear``) the owner of the weight it is given."""
    return str(user.target) if user.op == "call_module" else param.rsplit(".", 1)[0]


def norm_rescale_families(
    trace: Trace, note: Callable[[str], None] = lambda message: None
) -> list[Family]:
    """``norm_rescale`` for every affine normalisation read only by linear layers."""
    fams = []
    for node in trace.gm.graph.nodes:
        norm = trace.module(node)
        rms = is_rms_norm(norm)
        if (
            not (isinstance(norm, _NORMS) or rms)
            or node in trace.shared
            or getattr(norm, "weight", None) is None
        ):
            continue
        if type(norm) not in _NORMS and (rms or isinstance(norm, nn.LayerNorm)):
            # a model's own RMSNorm, or a LayerNorm subclass (LayerNorm2d): which axis?
            axis = next((a for a in (-1, 1) if _affine_acts_along(trace, node, norm, a)), None)
            if axis is None:
                note(f"no norm_rescale family for {node.target}: {type(norm).__name__}'s output "
                     "is not its weight (and bias) times a weight-free function of the input, "
                     "channel by channel along the last axis or axis 1 (checked on the example "
                     "input; e.g. x̂ · (1 + w))")  # fmt: skip
                continue
            n, axis_last = norm.weight.numel(), axis == -1
        elif isinstance(norm, nn.LayerNorm) or rms:
            shape = tuple(norm.normalized_shape)
            if len(shape) != 1:
                continue
            n, axis_last = shape[0], True
        else:
            n, axis_last = norm.weight.numel(), False
        readers = _readers(trace, node, n, axis_last, note)
        affine = [f"{node.target}.{w}" for w in ("weight", "bias")
                  if isinstance(getattr(norm, w, None), Tensor)]  # fmt: skip
        fams += _family(str(node.target), affine, readers, n)
    for node, n, affine in _functional_layer_norms(trace):
        fams += _family(
            affine[0].rsplit(".", 1)[0], affine, _readers(trace, node, n, True, note), n
        )
    return fams


def _family(name: str, affine: list[str], readers: list | None, n: int) -> list[Family]:
    if not readers or len({p for _, (p, _) in readers}) != len(readers):
        return []
    theta_1 = [BlockSlice(p, 0) for p in affine]
    label = f"{name} → " + ", ".join(t for t, _ in readers)
    theta_2 = [BlockSlice(p, axis) for _, (p, axis) in readers]
    return [Family("norm_rescale", label, {"theta_1": theta_1, "theta_2": theta_2}, n)]


def layer_norm_args(node: fx.Node) -> tuple[Any, Any, Any]:
    """(normalized_shape, weight, bias) of an ``F.layer_norm`` call, by position or keyword."""
    args = list(node.args[1:4]) + [None] * 3
    names = ("normalized_shape", "weight", "bias")
    return tuple(node.kwargs.get(k, a) for k, a in zip(names, args[:3], strict=True))  # type: ignore[return-value]


def _functional_layer_norms(trace: Trace) -> list[tuple[fx.Node, int, list[str]]]:
    """``F.layer_norm`` calls with a weight parameter over one axis (a LayerNorm that fx traces
    into, such as torchvision's LayerNorm2d): (node, features, affine parameter names)."""
    found = []
    for node in trace.gm.graph.nodes:
        if node.target is not F.layer_norm:
            continue
        shape, weight, bias = layer_norm_args(node)
        params = [p for p in (weight, bias) if trace.parameter(p) is not None]
        if params[:1] and params[0] is weight and len(tuple(shape or ())) == 1:
            found.append((node, int(tuple(shape)[0]), [str(p.target) for p in params]))
    return found


def _readers(
    trace: Trace, node: fx.Node, n: int, axis_last: bool, note: Callable[[str], None]
) -> list[tuple[str, tuple[str, int]]] | None:
    """Every layer that reads the normalised features of ``node`` linearly, or None when
    something else does. Index operations are followed; a permute that moves the features
    between the last axis and axis 1 (LayerNorm2d's permute back) changes where they are."""
    readers, frontier = [], [(node, axis_last)]
    while frontier:
        current, last = frontier.pop()
        for user in current.users:
            if is_meta(user):
                continue
            param = _reads_channels(trace, user, current, last, n)
            if param is not None:
                readers.append((_reader_name(user, param[0]), param))
            elif _passes_channels(trace, user, last):
                frontier.append((user, last))
            elif (moved := _permuted(trace, user, current, last)) is not None:
                frontier.append((user, moved))
            else:
                if trace.tied(user):
                    note(f"no norm_rescale family for {node.target} → {user.target}: "
                         f"{user.target}.weight is tied to another parameter (the same "
                         "tensor), which the symmetry does not move alike")  # fmt: skip
                return None
    return readers


def _permuted(trace: Trace, user: fx.Node, source: fx.Node, last: bool) -> bool | None:
    """Whether the features are last after a permute that moves them between the last axis
    and axis 1 (NHWC ↔ NCHW), or None for anything else."""
    if user.target not in ("permute", torch.permute) or user.args[:1] != (source,):
        return None
    rank, value = trace.rank(source), trace.values.get(source)
    if rank is None or rank < 3 or not isinstance(value, Tensor):
        return None
    axis = rank - 1 if last else 1
    moved = carried_axis(trace, user, source, axis, int(value.shape[axis]))
    return {rank - 1: True, 1: False}.get(moved) if moved is not None else None
