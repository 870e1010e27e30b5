"""Detection rules on the data-flow graph: translation, scale, rescale (docs/theory.md,
"Where the symmetries live in a network"), and the transformer rules on the traced graph.

* translation: the ``nn.Linear`` whose output is the model output (logits, optionally through a
  softmax over features): its weight columns W[:, j] (one family) and its bias (another); and
  the bias of a Conv/Linear read only by a BatchNorm, per channel (the batch mean removes it);
* scale: a Conv/Linear whose output feeds only a BatchNorm / GroupNorm / LayerNorm that
  normalises over the layer's channels (through permutes: ConvNeXt's dwconv → Permute →
  LayerNorm): weight and bias slices per normalised channel (group);
* rescale: a producer (Conv/Linear, or the affine of a BatchNorm / GroupNorm / LayerNorm) whose
  output reaches exactly one consumer Conv/Linear through positively homogeneous, channel-wise
  operations (ReLU, LeakyReLU, PReLU, pools, dropout, flatten) containing at least one
  activation, with no branching: incoming rows vs. outgoing columns. With x ↦ x² in the chain
  the family is ``quadratic_rescale``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from . import attention, norms, products, streams, transformer
from .actions import BlockSlice, Family, SymmetryWarning
from .graph import Op
from .layout import in_axis, in_features, out_axis, out_features
from .trace import Trace

__all__ = ["families", "note"]


# ----------------------------------------------------------------------------- rules


def _next(op: Op) -> Op | None:
    """The one data consumer of ``op`` when ``op`` is its first argument, else None."""
    users = [u for u in op.users if u.kind != "meta"]
    if len(users) != 1 or not users[0].inputs or users[0].inputs[0] is not op:
        return None
    return users[0]


def _channels(op: Op) -> tuple[int, int] | None:
    """(channel axis of the output, number of channels) of a producer, or None."""
    if not op.shape or op.kind not in _CHANNEL_ATTR:
        return None
    axis, attr = _CHANNEL_ATTR[op.kind]
    count = out_features(op.module) if op.kind == "linear" else getattr(op.module, attr)
    return axis % len(op.shape), count[-1] if isinstance(count, tuple) else count


_CHANNEL_ATTR = {
    "linear": (-1, "out_features"),
    "conv": (1, "out_channels"),
    "bn": (1, "num_features"),
    "gn": (1, "num_channels"),
    "ln": (-1, "normalized_shape"),
}


def _weight_bias(op: Op, dim: int | None, view: Callable[[Tensor], Any] | None = None):
    """The weight and bias of ``op`` cut along ``dim`` (0: per output feature, whatever the
    weight's layout: a Conv1D weight is (in, out), so its output features are its columns)."""
    found = [(n, getattr(op.module, n, None)) for n in ("weight", "bias")]
    dims = {"weight": out_axis(op.module) if op.kind == "linear" and dim == 0 else dim}
    return [BlockSlice(f"{op.name}.{n}", dims.get(n, dim), view(p) if view else None)
            for n, p in found if isinstance(p, Tensor)]  # fmt: skip


def _tied(op: Op, notes: list[str], what: str) -> bool:
    """Note and return True when the module's weight is tied to another parameter."""
    tied = op.extra.get("tied")
    if tied:
        note(notes, f"no {what} family for {op.name}: {op.name}.weight is tied to "
                    f"{', '.join(tied)} (the same tensor), so moving it also moves "
                    f"{'them' if len(tied) > 1 else 'that'}, which the symmetry does not allow")  # fmt: skip
    return bool(tied)


def _translation(ops: list[Op], fams: list[Family], notes: list[str]) -> None:
    out = next((o for o in ops if o.kind == "output"), None)
    node = out.inputs[0] if out is not None and out.inputs else None
    while node is not None and node.kind in ("softmax", "pass") and node.inputs:
        rank, dim = len(node.shape or ()), node.extra.get("dim")
        if node.kind == "softmax" and (dim is None or dim % max(rank, 1) != rank - 1):
            return
        if node.kind == "pass" and not isinstance(node.module, nn.Identity):
            return
        node = node.inputs[0] if _next(node.inputs[0]) is node else None
    if node is None or node.kind != "linear" or node.shared or _next(node) is None:
        return
    if _tied(node, notes, "translation"):
        return
    m = node.module
    fams.append(Family("translation", f"{node.name} (output layer) weight columns",
                       {"theta": [BlockSlice(f"{node.name}.weight", in_axis(m))]},
                       in_features(m)))  # fmt: skip
    if m.bias is not None:
        fams.append(Family("translation", f"{node.name} (output layer) bias",
                           {"theta": [BlockSlice(f"{node.name}.bias", None)]}, 1))  # fmt: skip


def _to_norm(op: Op, axis: int) -> tuple[Op | None, int, tuple[int, ...], list[str]]:
    """Follow ``op``'s output through Identity and permutes to the one op that reads it:
    (that op, where the channel axis is then, the shape then, the permutes passed)."""
    shape, passed = op.shape, []
    node = _next(op)
    while node is not None and (
        node.kind == "permute" or (node.kind == "pass" and isinstance(node.module, nn.Identity))
    ):
        if node.kind == "permute":
            dims = node.extra["dims"]
            if not all(isinstance(d, int) for d in dims):
                return None, axis, shape, passed  # dims computed at run time
            dims = [d % len(shape) for d in dims]
            if sorted(dims) != list(range(len(shape))):
                return None, axis, shape, passed
            axis, shape = dims.index(axis), tuple(shape[d] for d in dims)
            passed.append(node.name)
        node = _next(node)
    return node, axis, shape, passed


def _scale(op: Op, fams: list[Family], notes: list[str]) -> None:
    info = _channels(op)
    if info is None:
        return
    norm, axis, shape, passed = _to_norm(op, info[0])
    if norm is None or norm.kind not in ("bn", "gn", "ln") or norm.shared:
        return
    if _tied(op, notes, "scale"):
        return
    n = info[1]
    rank, m = len(shape), norm.module
    label = " → ".join([op.name, *passed, f"{norm.name} ({type(m).__name__})"])
    if norm.kind == "bn" and axis == 1 and m.num_features == n:
        pieces = _weight_bias(op, 0)
        _bias_before_bn(op, norm, fams)
    elif norm.kind == "gn" and axis == 1 and m.num_channels == n:
        g = m.num_groups
        pieces, n = _weight_bias(op, 0, lambda p: (g, p.numel() // g)), g
    elif norm.kind == "ln" and tuple(m.normalized_shape) == shape[rank - len(m.normalized_shape) :]:
        if len(m.normalized_shape) < rank - axis:
            return
        pieces, n = _weight_bias(op, None), 1
    else:
        return
    fams.append(Family("scale", label, {"theta": pieces}, n))


def _bias_before_bn(op: Op, norm: Op, fams: list[Family]) -> None:
    """A conv / Linear bias read only by a BatchNorm over its channels: b_c ↦ b_c + α is removed
    by the batch mean (in training mode, or without running statistics), so each channel's bias
    is a ``translation`` group; its gradient is zero up to round-off."""
    bias = getattr(op.module, "bias", None)
    if isinstance(bias, Tensor):
        label = f"{op.name}.bias → {norm.name} (batch mean)"
        fams.append(Family("translation", label, {"theta": [BlockSlice(f"{op.name}.bias", 0)]},
                           bias.numel()))  # fmt: skip


def _rescale(op: Op, fams: list[Family], notes: list[str]) -> None:
    info = _channels(op)
    if info is None:
        return
    axis, n = info
    outer, inner, degree, path = 1, 1, 1, [op.name]
    node, cur = _next(op), op
    while node is not None and node.kind in ("act", "square", "pass", "pool", "flatten"):
        rank = len(cur.shape) if cur.shape else None
        if node.kind == "square":
            degree *= 2
        elif node.kind == "pool" and (axis != 1 or rank != node.extra["spatial"] + 2):
            return
        elif node.kind == "flatten":
            if rank is None:
                return
            start, end = node.extra["start"] % rank, node.extra["end"] % rank
            if axis > end:
                axis -= end - start
            elif axis >= start:
                outer *= math.prod(cur.shape[start:axis])
                inner *= math.prod(cur.shape[axis + 1 : end + 1])
                axis = start
        if node.kind in ("act", "square"):
            path.append(node.name)
        cur, node = node, _next(node)
    if node is None or node.shared or op.shared:
        return
    # Linear → (Dropout/Identity) → Linear with no activation: the identity is positively
    # homogeneous too, so each hidden unit is a rescale group (the diagonal of the pair's
    # GL(r) symmetry; see derivations/linear_pair.py for the whole balancedness matrix).
    linear_pair = (
        len(path) == 1 and op.kind == "linear" and node.kind == "linear" and outer == inner == 1
    )
    if len(path) < 2 and not linear_pair:
        return
    m, rank = node.module, len(cur.shape) if cur.shape else None
    if node.kind == "conv" and m.groups == 1 and axis == 1:
        fan_in = m.in_channels
    elif node.kind == "linear" and rank is not None and axis == rank - 1:
        fan_in = in_features(m)
        if in_axis(m) == 0 and (outer, inner) != (1, 1):
            return  # a flatten into a Conv1D: its (in, out) rows are not read as (out, C, HW)
    else:
        return
    if fan_in != outer * n * inner:
        return
    if _tied(op, notes, "rescale") or _tied(node, notes, "rescale"):
        return
    symmetry = {1: "rescale", 2: "quadratic_rescale"}.get(degree)
    label = " → ".join([*path, node.name]) + (" (linear pair)" if linear_pair else "")
    if op.kind in ("bn", "gn", "ln") and getattr(op.module, "weight", None) is None:
        note(notes, f"no rescale family across {label}: {type(op.module).__name__} has no "
                     "affine parameters (affine=False), and the layer before it is normalised")  # fmt: skip
        return
    if symmetry is None:
        return
    w = m.weight
    if outer == 1 and inner == 1:
        outgoing = BlockSlice(f"{node.name}.weight", in_axis(m) if node.kind == "linear" else 1)
    elif outer == 1:
        outgoing = BlockSlice(
            f"{node.name}.weight", 1, (w.shape[0], n, w.numel() // (w.shape[0] * n))
        )
    else:
        rest = w.numel() // (w.shape[0] * outer * n)
        outgoing = BlockSlice(f"{node.name}.weight", 2, (w.shape[0], outer, n, rest))
    dim = (op.module.weight.ndim - 1) if op.kind == "ln" else 0
    fams.append(
        Family(symmetry, label, {"theta_1": _weight_bias(op, dim), "theta_2": [outgoing]}, n)
    )


def _nonhomogeneous(ops: list[Op], notes: list[str]) -> None:
    """Say why a layer → GELU/SiLU/tanh → layer chain has no rescale family."""
    for op in ops:
        if op.kind != "nonhom" or not op.inputs or _next(op.inputs[0]) is not op:
            continue
        after = _next(op)
        while after is not None and after.kind == "pass":
            after = _next(after)
        if (
            op.inputs[0].kind in ("linear", "conv")
            and after is not None
            and after.kind in ("linear", "conv")
        ):
            what = type(op.module).__name__ if op.module is not None else op.name
            note(notes, f"no rescale across {op.inputs[0].name} → {op.name} → {after.name}: "
                         f"{what} is not positively homogeneous (f(αx) ≠ α f(x) for α > 0)")  # fmt: skip


def families(ops: list[Op], notes: list[str], trace: Trace | None = None) -> list[Family]:
    """Every family the rules find; ``trace`` (a traced graph) enables the transformer rules."""
    fams: list[Family] = []
    _translation(ops, fams, notes)
    for op in ops:
        if op.kind in ("linear", "conv") and not op.shared:
            _scale(op, fams, notes)
    for op in ops:
        if op.kind in ("linear", "conv", "bn", "gn", "ln") and not op.shared:
            _rescale(op, fams, notes)
    _nonhomogeneous(ops, notes)
    if trace is not None:

        def say(message: str) -> None:
            note(notes, message)

        fams += norms.norm_rescale_families(trace, say)
        fams += attention.attention_families(trace, say)
        fams += transformer.leaf_families(trace, say)
        fams += streams.stream_families(trace, say)
        fams += products.product_families(trace, say)
    return fams


def note(notes: list[str], message: str) -> None:
    """Record ``message`` in ``notes`` and warn it as a :class:`SymmetryWarning`."""
    notes.append(message)
    warnings.warn(message, SymmetryWarning, stacklevel=4)
