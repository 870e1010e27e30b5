"""``stream_rescale``: a residual stream's channels, written by many layers and read by many.

A residual network joins layers through additions: ``out = relu(bn2(conv2(...)) + x)``. Detection
by chains (:mod:`.rules`) stops at every addition; this rule follows them. Starting at an addition,
it collects the *stream*: every tensor whose channel i is multiplied by α when the output channel i
of every layer that writes into the stream is. It grows through

* additions (both operands belong to the stream), positively homogeneous channel-wise operations
  (ReLU, LeakyReLU, PReLU, ``clamp(min=0)``, max/avg pooling, dropout, identity, a product with a
  number), and reshapes, means and sums that keep the channel axis whole;

and ends at

* **writers**, whose output channel i is scaled by α: a conv or Linear (weight row i and bias i), a
  BatchNorm / GroupNorm / LayerNorm affine (γᵢ, βᵢ), an embedding (column i), a parameter added in
  (position embeddings);
* **readers**, whose input channel i is scaled by 1/α: a conv (input channel i; a depthwise conv's
  filter i), a Linear (input column i), a self-attention's input projection.

A normalisation that reads the stream undoes α up to its eps (``Family.absorbed_by`` names it,
and confirmation and the G1 check account for its eps): a BatchNorm normalises each channel, so the
family stays per channel; a LayerNorm over the stream's channels undoes only an α common to all
of them, so the family becomes one group of whole tensors. When such normalisations are the only
readers (a pre-norm transformer: embeddings, attention and MLP outputs written, LayerNorms
reading) the family is ``scale`` of the writers; otherwise ``stream_rescale`` (a post-norm
transformer: the previous LayerNorm and the attention output against q, k, v).

Anything else that touches the stream (a GroupNorm, the model's output, a concatenation, a
product of two tensors, a GELU, a tied embedding) means no family, and a note says which operation
stopped it. A ResNet gives one family per stage, a MobileNetV2 one per stage with residual blocks.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from .actions import BlockSlice, Family
from .graph import _function_kind, _module_kind
from .layout import in_axis, in_features, is_linear, out_axis, out_features
from .norms import is_rms_norm, norm_eps
from .trace import DROPOUTS, Trace, is_meta, is_scalar_scale, tensor_arg

__all__ = ["stream_families"]

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_WRITER_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_NORMS = (
    _WRITER_NORMS
    + (nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
)
_REDUCTIONS = {"mean", "sum", torch.mean, torch.sum}


class _Stop(Exception):
    """The stream cannot be rescaled per channel: the message says which operation stops it."""


@dataclass
class _Stream:
    """The stream grown from one addition along one channel axis."""

    axis: int  # the channel axis of every tensor in the stream: 1 (NC...) or -1 (... C)
    n: int
    nodes: set[fx.Node] = field(default_factory=set)
    writers: dict[str, BlockSlice] = field(default_factory=dict)
    readers: dict[str, BlockSlice] = field(default_factory=dict)
    #: (what, why) for every operation that keeps the stream from being rescaled per channel
    stops: list[tuple[str, str]] = field(default_factory=list)
    #: normalisations that read the stream and undo α: name -> "channel" or "all" (see _absorber)
    absorbers: dict[str, str] = field(default_factory=dict)

    def channel_count(self, value: object) -> int | None:
        if not isinstance(value, Tensor) or value.ndim < 2:
            return None
        return int(value.shape[self.axis])


def _is_add(trace: Trace, node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or node.target not in _ADDS:
        return False
    tensors = [a for a in node.args[:2] if isinstance(trace.values.get(a), Tensor)]
    return len(node.args) == 2 and len(tensors) == 2 and not node.kwargs


def _passes(trace: Trace, node: fx.Node, source: fx.Node, s: _Stream) -> bool:
    """``node`` maps the stream tensor ``source`` to a tensor of the stream (channel i to i)."""
    if is_scalar_scale(node, trace.values):
        return tensor_arg(node, trace.values) is source
    if node.args[:1] != (source,):
        return False
    module = trace.module(node)
    if module is not None:
        kind, extra = _module_kind(module)
        if node in trace.shared and kind not in ("act", "pass", "pool"):
            return False
        if isinstance(module, nn.PReLU) and module.num_parameters not in (1, s.n):
            return False
    else:
        kind, extra = _function_kind(node)
        if node.target in DROPOUTS:
            kind = "pass"
    before, after = trace.values.get(source), trace.values.get(node)
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        return False
    if kind in ("act", "pass") or _is_copy(node):
        return after.shape == before.shape and after.dtype == before.dtype
    if kind == "pool":
        return s.axis == 1 and before.ndim == extra["spatial"] + 2
    if kind in ("flatten", "reshape") or node.target in ("view", "reshape", "flatten"):
        if s.axis == 1:
            return after.ndim >= 2 and after.shape[:2] == before.shape[:2]
        return after.shape[-1:] == before.shape[-1:]
    if node.target in _REDUCTIONS and node.op != "call_module":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        axis = s.axis % before.ndim
        ok = None not in dims and all(d % before.ndim != axis for d in dims)
        return ok and s.channel_count(after) == s.n
    return False


_COPIES = {"to", "clone", "contiguous", "type_as"}
_ATEN_COPIES = {"aten.to.dtype_layout", "aten.to.dtype", "aten.to.device", "aten._to_copy.default",
                "aten.clone.default", "aten.alias.default", "aten.contiguous.default"}  # fmt: skip


def _is_copy(node: fx.Node) -> bool:
    """A copy or a conversion (``x.to(device)``, ``clone``): the identity on the stream's values
    when the dtype does not change (checked by the caller)."""
    if node.op == "call_method":
        return node.target in _COPIES
    return node.op == "call_function" and str(node.target) in _ATEN_COPIES


def _reader(trace: Trace, node: fx.Node, source: fx.Node, s: _Stream) -> BlockSlice | None:
    """The slice of ``node``'s parameters that reads channel i of the stream tensor ``source``."""
    module = trace.module(node)
    if module is None or node in trace.shared or trace.tied(node) or node.args[:1] != (source,):
        return None
    rank = trace.rank(source)
    if is_linear(module) and (s.axis == -1 or rank == 2) and in_features(module) == s.n:
        return BlockSlice(f"{node.target}.weight", in_axis(module))
    if isinstance(module, nn.modules.conv._ConvNd) and s.axis == 1 and module.in_channels == s.n:
        if module.groups == 1:
            return BlockSlice(f"{node.target}.weight", 1)
        if module.groups == module.in_channels == module.out_channels:  # depthwise: filter i
            return BlockSlice(f"{node.target}.weight", 0)
    if isinstance(module, nn.MultiheadAttention) and s.axis == -1 and module.embed_dim == s.n:
        qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
        if [a for a in qkv if a is not None] == [source] * 3 and module.in_proj_weight is not None:
            return BlockSlice(f"{node.target}.in_proj_weight", 1)
    return None


def _writer(trace: Trace, node: fx.Node, s: _Stream) -> list[BlockSlice] | None:
    """The slices of ``node``'s parameters that write channel i of the stream, or None."""
    if node.op == "get_attr":
        value = trace.values.get(node)
        if not isinstance(value, nn.Parameter) or value.ndim == 0:
            return None
        rank = max(trace.rank(u) or 0 for u in node.users)
        axis = value.ndim - 1 if s.axis == -1 else value.ndim - (rank - 1)
        ok = 0 <= axis < value.ndim and value.shape[axis] == s.n
        return [BlockSlice(str(node.target), axis)] if ok else None
    module = trace.module(node)
    if module is None or node in trace.shared or trace.tied(node):
        return None
    if isinstance(module, nn.Embedding) and s.axis == -1 and module.embedding_dim == s.n:
        return [BlockSlice(f"{node.target}.weight", 1)]
    if is_linear(module) and s.axis == -1 or (trace.rank(node) == 2 and is_linear(module)):
        if out_features(module) != s.n:
            return None
        weight = BlockSlice(f"{node.target}.weight", out_axis(module))
    elif isinstance(module, nn.modules.conv._ConvNd) and s.axis == 1:
        if module.out_channels != s.n:
            return None
        weight = BlockSlice(f"{node.target}.weight", 0)
    elif isinstance(module, _WRITER_NORMS + (nn.LayerNorm,)):
        if isinstance(module, nn.LayerNorm):
            last = s.axis == -1 or trace.rank(node) == 2
            ok = last and tuple(module.normalized_shape) == (s.n,)
        else:
            count = getattr(module, "num_features", getattr(module, "num_channels", None))
            ok = s.axis == 1 and count == s.n
        if not ok or getattr(module, "weight", None) is None:
            return None
        weight = BlockSlice(f"{node.target}.weight", 0)
    else:
        return None
    bias = getattr(module, "bias", None)
    return [weight] + ([BlockSlice(f"{node.target}.bias", 0)] if isinstance(bias, Tensor) else [])


def _sources(trace: Trace, node: fx.Node, s: _Stream) -> list[fx.Node]:
    """The stream tensors ``node`` is made of (an addition's operands, a pass's input), or none
    when ``node`` is a writer (its slices recorded) or stops the stream (said in ``s.stops``)."""
    if _is_add(trace, node):
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if node.op in ("call_function", "call_method", "call_module") and node.args:
        source = (
            tensor_arg(node, trace.values) if is_scalar_scale(node, trace.values) else node.args[0]
        )
        if isinstance(source, fx.Node) and _passes(trace, node, source, s):
            return [source]
    pieces = _writer(trace, node, s)
    if pieces is None and trace.tied(node):
        s.stops.append((_what(trace, node), "write into the stream and are tied to another "
                        "parameter (the same tensor), which the symmetry does not move alike"))  # fmt: skip
    elif pieces is None:
        s.stops.append((_what(trace, node), "write into the stream and cannot scale their output "
                        "channels (not a conv, Linear, affine normalisation, embedding, parameter)"))  # fmt: skip
    for piece in pieces or ():
        s.writers[piece.param] = piece
    return []


def _what(trace: Trace, node: fx.Node) -> str:
    module = trace.module(node)
    what = type(module).__name__ if module is not None else node.target
    return f"{node.name} ({getattr(what, '__name__', what)})"


def _absorber(trace: Trace, user: fx.Node, node: fx.Node, s: _Stream) -> str | None:
    """How a normalisation that reads the stream undoes α (up to its eps): ``"channel"`` for a
    BatchNorm, which normalises each channel on its own (a per-channel α), ``"all"`` for a
    LayerNorm over the stream's channels (one α for all of them), None otherwise."""
    module = trace.module(user)
    if module is None or user in trace.shared or user.args[:1] != (node,):
        return None
    last = s.axis == -1 or trace.rank(node) == 2
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (s.axis == -1 and not last):
        return "channel" if module.num_features == s.n else None
    if isinstance(module, nn.LayerNorm) and last and tuple(module.normalized_shape) == (s.n,):
        return "all"
    if is_rms_norm(module) and last and module.weight.numel() == s.n:
        return "all"  # x · rsqrt(mean(x²) + eps) · w over the last axis
    return None


def _grow(trace: Trace, start: fx.Node, s: _Stream) -> None:
    """Collect the whole stream through ``start``, its writers and readers, and in ``s.stops``
    every operation that keeps it from being rescaled per channel."""
    frontier = [start]
    s.nodes.add(start)
    while frontier:
        node = frontier.pop()
        if s.channel_count(trace.values.get(node)) != s.n:
            s.stops.append((node.name, f"do not carry the stream's {s.n} channels on that axis"))
            continue
        for source in _sources(trace, node, s):  # backwards: how this tensor was made
            if source not in s.nodes:
                s.nodes.add(source)
                frontier.append(source)
        for user in node.users:  # forwards: who reads it
            if is_meta(user) or user in s.nodes:
                continue
            if user.op == "output":
                s.stops.append(("the model's output", "is the stream"))
            elif _is_add(trace, user) or _passes(trace, user, node, s):
                s.nodes.add(user)
                frontier.append(user)
            elif (piece := _reader(trace, user, node, s)) is None:
                if (kind := _absorber(trace, user, node, s)) is not None:
                    s.absorbers[str(user.target)] = kind
                    continue
                norm = isinstance(trace.module(user), _NORMS)
                s.stops.append((_what(trace, user), "read the stream and " + (
                    "normalise across its channels: a per-channel α changes their output"
                    if norm else "are neither linear readers (conv, Linear) nor channel-wise "
                    "positively homogeneous")))  # fmt: skip
            elif piece.param in s.readers:
                s.stops.append((user.name, "read the stream twice"))
            else:
                s.readers[piece.param] = piece


def _try(trace: Trace, add: fx.Node, s: _Stream) -> None:
    """Grow ``s`` from ``add`` and check it is a family: writers, readers, no layer in both."""
    _grow(trace, add, s)
    if s.stops:
        by_reason: dict[str, list[str]] = {}
        for what, why in s.stops:
            by_reason.setdefault(why, []).append(what)
        raise _Stop(
            "; ".join(f"{', '.join(dict.fromkeys(w))} {why}" for why, w in by_reason.items())
        )
    both = set(s.writers) & set(s.readers)
    if both:
        raise _Stop(f"{', '.join(sorted(both))} both writes into and reads the stream")
    if not s.writers or not (s.readers or s.absorbers):
        raise _Stop("the stream has no " + ("writer" if not s.writers else "reader"))
    eps = {norm_eps(trace.modules[n]) for n in s.absorbers}
    if len(eps) > 1:
        raise _Stop(f"the normalisations that read it ({', '.join(s.absorbers)}) have different "
                    f"eps ({', '.join(f'{e:g}' for e in sorted(eps))})")  # fmt: skip


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def stream_families(
    trace: Trace, note: Callable[[str], None] = lambda message: None
) -> list[Family]:
    """``stream_rescale`` for every residual stream whose writers and readers are all linear in
    its channels (one family per stream, one group per channel)."""
    fams, seen = [], set()
    for node in trace.gm.graph.nodes:
        if node in seen or not _is_add(trace, node):
            continue
        rank = trace.rank(node) or 0
        attempts: list[tuple[_Stream, _Stop | None]] = []
        for axis in (1, -1) if rank > 2 else (1,):
            s = _Stream(axis, int(trace.values[node].shape[axis]))
            try:
                _try(trace, node, s)
            except _Stop as stop:
                attempts.append((s, stop))
                continue
            attempts.append((s, None))
            break
        found, failure = attempts[-1]
        if failure is not None:
            found, failure = max(attempts, key=lambda a: (len(a[0].nodes), -len(a[0].stops)))
            seen |= {n for n in found.nodes if _is_add(trace, n)} | {node}
            if found.writers or found.readers:  # a residual stream of layers, not x·cos + y·sin
                note(f"no stream_rescale family through {node.name}: {failure}")
            continue
        seen |= found.nodes
        order = {str(n.target): i for i, n in enumerate(trace.gm.graph.nodes)}
        found.absorbers = dict(sorted(found.absorbers.items(), key=lambda kv: order.get(kv[0], 0)))
        for pieces in (found.writers, found.readers):  # in the order the model runs them
            ranked = sorted(pieces, key=lambda p: order.get(_module_of(p), order.get(p, 0)))
            pieces.update({p: pieces.pop(p) for p in ranked})
        writers = list(dict.fromkeys(_module_of(p) for p in found.writers))
        readers = list(dict.fromkeys(_module_of(p) for p in found.readers))
        fams.append(_family(found, writers, readers))
    return fams


def _family(s: _Stream, writers: list[str], readers: list[str]) -> Family:
    """The stream's family: ``stream_rescale`` per channel; when normalisations read the stream
    too, per channel if all of them are BatchNorms, else one group (a common α), and ``scale``
    when they are its only readers."""
    label = f"stream {', '.join(writers)} → {', '.join(readers)}"
    if not s.absorbers:
        blocks = {"theta_1": list(s.writers.values()), "theta_2": list(s.readers.values())}
        return Family("stream_rescale", label, blocks, s.n)
    per_channel = all(kind == "channel" for kind in s.absorbers.values())
    norms = tuple(s.absorbers)
    label = (
        label.rstrip(" →") + (" and " if readers else " ") + f"(normalised by {', '.join(norms)})"
    )

    def pieces(found: dict[str, BlockSlice]) -> list[BlockSlice]:
        return list(found.values()) if per_channel else [BlockSlice(p, None) for p in found]

    groups = s.n if per_channel else 1
    if not readers:
        return Family("scale", label, {"theta": pieces(s.writers)}, groups, absorbed_by=norms)
    blocks = {"theta_1": pieces(s.writers), "theta_2": pieces(s.readers)}
    return Family("stream_rescale", label, blocks, groups, absorbed_by=norms)
