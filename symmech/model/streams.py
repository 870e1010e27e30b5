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

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .actions import BlockSlice, Family
from .channel_flow import carried_axis, channel_cat, is_add, joined, source_axis
from .encoder_streams import LeafStream, encoder_ends, leaf_role
from .layout import in_axis, in_features, is_linear, is_rms_norm, out_axis, out_features
from .norms import layer_norm_args, norm_eps
from .trace import Trace, is_meta, is_scalar_scale, tensor_arg

__all__ = ["stream_families"]

_WRITER_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_NORMS = (
    _WRITER_NORMS
    + (nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
)


class _Stop(Exception):
    """The stream cannot be rescaled per channel: the message says which operation stops it.
    ``always`` says it even when no layer was reached (the rule itself failed)."""

    def __init__(self, message: str, always: bool = False) -> None:
        super().__init__(message)
        self.always = always


@dataclass
class _Stream:
    """The stream grown from one addition: its tensors, each with the axis holding the channels."""

    n: int
    axes: dict[fx.Node, int] = field(default_factory=dict)
    writers: dict[str, BlockSlice] = field(default_factory=dict)
    readers: dict[str, BlockSlice] = field(default_factory=dict)
    #: (what, why) for every operation that keeps the stream from being rescaled per channel
    stops: list[tuple[str, str]] = field(default_factory=list)
    #: normalisations that read the stream and undo α: name -> "channel", "group:G" or "all"
    absorbers: dict[str, str] = field(default_factory=dict)
    #: concatenations along the channel axis that read the stream (Swin's patch merging)
    channel_cats: set[fx.Node] = field(default_factory=set)

    @property
    def nodes(self) -> set[fx.Node]:
        return set(self.axes)


def _last(trace: Trace, node: fx.Node, axis: int) -> bool:
    return axis == (trace.rank(node) or 0) - 1


def _reader(trace: Trace, node: fx.Node, source: fx.Node, s: _Stream) -> BlockSlice | None:
    """The slice of ``node``'s parameters that reads channel i of the stream tensor ``source``."""
    axis = s.axes[source]
    if node.target is F.linear and node.args[:1] == (source,) and _last(trace, source, axis):
        weight = trace.parameter(node.args[1] if len(node.args) > 1 else None)
        ok = weight is not None and weight.ndim == 2 and weight.shape[1] == s.n
        return BlockSlice(str(node.args[1].target), 1) if ok else None
    module = trace.module(node)
    if module is None or node in trace.shared or trace.tied(node) or node.args[:1] != (source,):
        return None
    if is_linear(module) and _last(trace, source, axis) and in_features(module) == s.n:
        return BlockSlice(f"{node.target}.weight", in_axis(module))
    if isinstance(module, nn.modules.conv._ConvNd) and axis == 1 and module.in_channels == s.n:
        if module.groups == 1:
            return BlockSlice(f"{node.target}.weight", 1)
        if module.groups == module.in_channels == module.out_channels:  # depthwise: filter i
            return BlockSlice(f"{node.target}.weight", 0)
    if (
        isinstance(module, nn.MultiheadAttention)
        and _last(trace, source, axis)
        and module.embed_dim == s.n
    ):
        qkv = list(node.args[:3]) + [node.kwargs.get(k) for k in ("query", "key", "value")]
        if [a for a in qkv if a is not None] == [source] * 3 and module.in_proj_weight is not None:
            return BlockSlice(f"{node.target}.in_proj_weight", 1)
    return None


def _functional_writer(trace: Trace, node: fx.Node, axis: int, n: int) -> list[BlockSlice] | None:
    """A parameter added in (``get_attr``), γ ⊙ x with γ a per-channel parameter (layer scale),
    an ``nn.MultiheadAttention``'s output (its out_proj rows), or ``F.layer_norm``'s affine."""
    rank = trace.rank(node) or 0
    if (param := trace.parameter(node)) is not None:
        ok = param.ndim > 0 and param.shape[axis] == n
        return [BlockSlice(str(node.target), axis)] if ok else None
    if node.target in (operator.mul, torch.mul, "mul") and len(node.args) == 2 and not node.kwargs:
        params = [(a, trace.parameter(a)) for a in node.args if trace.parameter(a) is not None]
        if len(params) != 1 or len(params[0][0].users) != 1:
            return None
        ((name, gamma),) = params
        at = axis - (rank - gamma.ndim)
        ok = 0 <= at < gamma.ndim and gamma.shape[at] == n and gamma.numel() == n
        return [BlockSlice(str(name.target), at)] if ok else None
    if node.target is operator.getitem and node.args[1:] == (0,):
        module = trace.module(node.args[0])
        if isinstance(module, nn.MultiheadAttention) and axis == rank - 1:
            proj = module.out_proj
            pieces = [BlockSlice(f"{node.args[0].target}.out_proj.weight", 0)]
            if proj.bias is not None:
                pieces.append(BlockSlice(f"{node.args[0].target}.out_proj.bias", 0))
            return pieces if proj.out_features == n and node.args[0] not in trace.shared else None
    if node.target is F.linear and axis == rank - 1 and trace.parameter(node.args[1]) is not None:
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if trace.parameter(weight).shape[0] != n:
            return None
        pieces = [BlockSlice(str(weight.target), 0)]
        return pieces + (
            [BlockSlice(str(bias.target), 0)] if trace.parameter(bias) is not None else []
        )
    if node.target is F.layer_norm and axis == rank - 1:
        shape, weight, bias = layer_norm_args(node)
        params = [p for p in (weight, bias) if trace.parameter(p) is not None]
        if tuple(shape or ()) == (n,) and trace.parameter(weight) is not None:
            return [BlockSlice(str(p.target), 0) for p in params]
    return None


def _writer(trace: Trace, node: fx.Node, s: _Stream) -> list[BlockSlice] | None:
    """The slices of ``node``'s parameters that write channel i of the stream, or None."""
    axis = s.axes[node]
    module = trace.module(node)
    if module is None:
        return _functional_writer(trace, node, axis, s.n)
    if node in trace.shared or trace.tied(node):
        return None
    last = _last(trace, node, axis)
    if isinstance(module, nn.Embedding) and last and module.embedding_dim == s.n:
        return [BlockSlice(f"{node.target}.weight", 1)]
    if is_linear(module) and last:
        if out_features(module) != s.n:
            return None
        weight = BlockSlice(f"{node.target}.weight", out_axis(module))
    elif isinstance(module, nn.modules.conv._ConvNd) and axis == 1:
        if module.out_channels != s.n:
            return None
        weight = BlockSlice(f"{node.target}.weight", 0)
    elif isinstance(module, _WRITER_NORMS + (nn.LayerNorm,)):
        if isinstance(module, nn.LayerNorm):
            ok = last and tuple(module.normalized_shape) == (s.n,)
        else:
            count = getattr(module, "num_features", getattr(module, "num_channels", None))
            ok = axis == 1 and count == s.n
        if not ok or getattr(module, "weight", None) is None:
            return None
        weight = BlockSlice(f"{node.target}.weight", 0)
    else:
        return None
    bias = getattr(module, "bias", None)
    return [weight] + ([BlockSlice(f"{node.target}.bias", 0)] if isinstance(bias, Tensor) else [])


def _sources(trace: Trace, node: fx.Node, s: _Stream) -> list[tuple[fx.Node, int]]:
    """The stream tensors ``node`` is made of, with their channel axes (an addition's operands,
    a concatenation's pieces, a pass's input), or none when ``node`` is a writer (its slices
    recorded) or stops the stream (said in ``s.stops``)."""
    axis = s.axes[node]
    pieces = joined(trace, node, axis)
    if pieces is not None:
        rank = trace.rank(node) or 0
        return [(p, axis - (rank - (trace.rank(p) or rank))) for p in pieces]
    if node.op in ("call_function", "call_method", "call_module") and node.args:
        source = (
            tensor_arg(node, trace.values) if is_scalar_scale(node, trace.values) else node.args[0]
        )
        if isinstance(source, fx.Node) and (
            (at := source_axis(trace, node, source, axis, s.n)) is not None
        ):
            return [(source, at)]
    role = leaf_role(trace, node, axis, s.n)
    if role is not None:  # a whole-kept encoder: its input, or the norm that writes its output
        if role.passes:
            _enter(role, s)
            return [(node.args[0], axis)]  # type: ignore[list-item]
        s.writers.update({p.param: p for p in role.out_writers})
        return []
    found = _writer(trace, node, s)
    if found is None and trace.tied(node):
        s.stops.append((_what(trace, node), "write into the stream and are tied to another "
                        "parameter (the same tensor), which the symmetry does not move alike"))  # fmt: skip
    elif found is None:
        s.stops.append((_what(trace, node), "write into the stream and cannot scale their output "
                        "channels (not a conv, Linear, affine normalisation, embedding, parameter)"))  # fmt: skip
    for piece in found or ():
        s.writers[piece.param] = piece
    return []


def _enter(role: LeafStream, s: _Stream) -> None:
    """Record what a whole-kept encoder does to the stream that enters it."""
    s.writers.update({p.param: p for p in role.writers})
    s.readers.update({p.param: p for p in role.readers})
    s.absorbers.update(role.absorbers)


def _what(trace: Trace, node: fx.Node) -> str:
    module = trace.module(node)
    what = type(module).__name__ if module is not None else node.target
    return f"{node.name} ({getattr(what, '__name__', what)})"


def _absorber(trace: Trace, user: fx.Node, node: fx.Node, s: _Stream) -> str | None:
    """How a normalisation that reads the stream undoes α (up to its eps): ``"channel"`` for a
    BatchNorm, which normalises each channel on its own (a per-channel α), ``"group:G"`` for a
    GroupNorm of G groups (one α per group of channels), ``"all"`` for a
    LayerNorm or RMSNorm over the stream's channels (one α for all of them), None otherwise."""
    axis, last = s.axes[node], _last(trace, node, s.axes[node])
    if user.target is F.layer_norm and user.args[:1] == (node,) and last:
        # a LayerNorm that fx traces into (LayerNorm2d calls F.layer_norm): named by its weight
        shape, weight, _ = layer_norm_args(user)
        param = trace.parameter(weight)
        owner = str(weight.target).rsplit(".", 1)[0] if param is not None else ""
        # (the traced module keeps only the weight; confirmation hooks the model's own module)
        return "all" if tuple(shape or ()) == (s.n,) and owner else None
    module = trace.module(user)
    if module is None or user in trace.shared or user.args[:1] != (node,):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and axis == 1:
        return "channel" if module.num_features == s.n else None
    if isinstance(module, nn.GroupNorm) and axis == 1 and module.num_channels == s.n:
        return f"group:{module.num_groups}"  # one α per group of channels
    if isinstance(module, nn.LayerNorm) and last and tuple(module.normalized_shape) == (s.n,):
        return "all"
    if is_rms_norm(module) and last and module.weight.numel() == s.n:
        return "all"  # x · rsqrt(mean(x²) + eps) · w over the last axis
    return None


def _norm_name(trace: Trace, user: fx.Node) -> str:
    """The module a normalisation call belongs to (an ``F.layer_norm`` call: its weight's)."""
    if user.op == "call_module":
        return str(user.target)
    return str(layer_norm_args(user)[1].target).rsplit(".", 1)[0]  # type: ignore[union-attr]


def _join_user(trace: Trace, user: fx.Node, node: fx.Node, axis: int) -> int | None:
    """The channel axis of ``user`` when it joins ``node`` (an addition, a concatenation)."""
    rank, own = trace.rank(user) or 0, trace.rank(node) or 0
    out = axis + (rank - own)
    pieces = joined(trace, user, out)
    return out if pieces is not None and node in pieces else None


def _grow(trace: Trace, start: fx.Node, s: _Stream) -> None:
    """Collect the whole stream through ``start``, its writers and readers, and in ``s.stops``
    every operation that keeps it from being rescaled per channel."""
    frontier = [start]
    while frontier:
        node = frontier.pop()
        value = trace.values.get(node)
        if not isinstance(value, Tensor) or value.shape[s.axes[node]] != s.n:
            s.stops.append((node.name, f"do not carry the stream's {s.n} channels on that axis"))
            continue
        for source, at in _sources(trace, node, s):  # backwards: how this tensor was made
            if source not in s.axes:
                s.axes[source] = at
                frontier.append(source)
        for user in node.users:  # forwards: who reads it
            if is_meta(user) or user in s.axes:
                continue
            axis = s.axes[node]
            if user.op == "output":
                s.stops.append(("the model's output", "is the stream"))
            elif user.args[:1] == (node,) and (role := leaf_role(trace, user, axis, s.n)):
                if role.passes:
                    s.axes[user] = axis
                    frontier.append(user)
                else:
                    _enter(role, s)
            elif (at := _join_user(trace, user, node, axis)) is not None or (
                at := carried_axis(trace, user, node, axis, s.n)
            ) is not None:
                s.axes[user] = at
                frontier.append(user)
            elif channel_cat(trace, user, axis) is not None:
                s.channel_cats.add(user)  # checked once the stream is complete (_cat_absorbers)
            elif (piece := _reader(trace, user, node, s)) is None:
                if (kind := _absorber(trace, user, node, s)) is not None:
                    s.absorbers[_norm_name(trace, user)] = kind
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


def _cat_absorbers(trace: Trace, s: _Stream) -> None:
    """A concatenation of pieces of the stream along its channels (Swin's patch merging: four
    strided picks) scales by the stream's α when that α is common to all channels; a LayerNorm
    or RMSNorm over all the concatenated channels that alone reads it undoes that α."""
    for cat in s.channel_cats:
        pieces = channel_cat(trace, cat, (trace.rank(cat) or 1) - 1) or []
        users = [u for u in cat.users if not is_meta(u)]
        norm = trace.module(users[0]) if len(users) == 1 else None
        width = int(trace.values[cat].shape[-1])
        ok = (
            bool(pieces)
            and all(p in s.axes and _last(trace, p, s.axes[p]) for p in pieces)
            and users[0].args[:1] == (cat,)
            and (isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (width,)
                 or is_rms_norm(norm) and norm.weight.numel() == width)
        )  # fmt: skip
        if ok:
            s.absorbers[str(users[0].target)] = "all"
        else:
            s.stops.append((_what(trace, cat), "concatenate the stream along its channels with "
                            "other tensors, or not into a normalisation over all of them"))  # fmt: skip


def _try(trace: Trace, add: fx.Node, s: _Stream) -> None:
    """Grow ``s`` from ``add`` and check it is a family: writers, readers, no layer in both."""
    _grow(trace, add, s)
    _cat_absorbers(trace, s)
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


def _seeds(trace: Trace) -> dict[fx.Node, tuple[int, ...]]:
    """Where streams are looked for, with the channel axes to try: every addition, and the input
    and output of a whole-kept encoder (the additions inside it are not in the graph)."""
    out: dict[fx.Node, tuple[int, ...]] = {}
    for node in trace.gm.graph.nodes:
        rank = trace.rank(node) or 0
        if is_add(trace, node):
            out[node] = (1, rank - 1) if rank > 2 else (1,)
        for seed in encoder_ends(trace, node):
            out.setdefault(seed, ((trace.rank(seed) or 1) - 1,))
    return out


def _position(order: dict[str, int], param: str) -> int:
    """Where ``param`` runs in the graph: its module's node, or the node of the whole-kept
    module that holds it (``enc`` for ``enc.layers.0.linear2.weight``)."""
    name = param
    while name:
        if name in order:
            return order[name]
        name = name.rpartition(".")[0]
    return 0


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def stream_families(
    trace: Trace, note: Callable[[str], None] = lambda message: None
) -> list[Family]:
    """``stream_rescale`` for every residual stream whose writers and readers are all linear in
    its channels (one family per stream, one group per channel)."""
    fams, seen = [], set()
    order = {str(n.target): i for i, n in enumerate(trace.gm.graph.nodes)}
    shapes = {n: tuple(p.shape) for n, p in trace.gm.named_parameters()}
    seeds = _seeds(trace)
    for node, axes in seeds.items():
        if node in seen:
            continue
        attempts: list[tuple[_Stream, _Stop | None]] = []
        for axis in axes:
            s = _Stream(int(trace.values[node].shape[axis]), {node: axis})
            try:
                _try(trace, node, s)
            except _Stop as stop:
                attempts.append((s, stop))
                continue
            except Exception as exc:  # noqa: BLE001 - a rule's bug never breaks detection
                failed = f"the stream rule failed ({type(exc).__name__}: {exc})"
                attempts.append((s, _Stop(failed, always=True)))
                continue
            attempts.append((s, None))
            break
        found, failure = attempts[-1]
        if failure is not None:
            found, failure = max(attempts, key=lambda a: (
                a[1].always, bool(a[0].writers or a[0].readers), len(a[0].axes),
                -len(a[0].stops)))  # fmt: skip
            seen |= {n for n in found.nodes if n in seeds} | {node}  # the same stream: one note
            # a residual stream of layers (not x·cos + y·sin), or a failure of the rule itself
            if found.writers or found.readers or failure.always:
                note(f"no stream_rescale family through {node.name}: {failure}")
            continue
        seen |= found.nodes
        found.absorbers = dict(sorted(found.absorbers.items(), key=lambda kv: order.get(kv[0], 0)))
        for pieces in (found.writers, found.readers):  # in the order the model runs them
            ranked = sorted(pieces, key=lambda p: _position(order, p))
            pieces.update({p: pieces.pop(p) for p in ranked})
        writers = list(dict.fromkeys(_module_of(p) for p in found.writers))
        readers = list(dict.fromkeys(_module_of(p) for p in found.readers))
        fams.append(_family(found, writers, readers, shapes))
    return fams


def _family(
    s: _Stream, writers: list[str], readers: list[str], shapes: dict[str, tuple[int, ...]]
) -> Family:
    """The stream's family: ``stream_rescale`` per channel; when normalisations read the stream
    too, per channel if all of them are BatchNorms, per group of channels if GroupNorms of G
    groups are among them, else one group (a common α), and ``scale`` when they are its only
    readers."""
    label = f"stream {', '.join(writers)} → {', '.join(readers)}"
    if not s.absorbers:
        blocks = {"theta_1": list(s.writers.values()), "theta_2": list(s.readers.values())}
        return Family("stream_rescale", label, blocks, s.n)
    kinds = set(s.absorbers.values())
    counts = {int(k.split(":")[1]) for k in kinds if k.startswith("group:")}
    if kinds <= {"channel"}:
        groups = s.n
    elif "all" in kinds or len(counts) != 1:
        groups = 1  # an α common to all channels is undone by every normalisation
    else:
        groups = counts.pop()
    norms = tuple(s.absorbers)
    label = (
        label.rstrip(" →") + (" and " if readers else " ") + f"(normalised by {', '.join(norms)})"
    )

    def pieces(found: dict[str, BlockSlice]) -> list[BlockSlice]:
        if groups == s.n:
            return list(found.values())
        if groups == 1:
            return [BlockSlice(p, None) for p in found]
        return [_grouped(piece, shapes[piece.param], groups) for piece in found.values()]

    if not readers:
        return Family("scale", label, {"theta": pieces(s.writers)}, groups, absorbed_by=norms)
    blocks = {"theta_1": pieces(s.writers), "theta_2": pieces(s.readers)}
    return Family("stream_rescale", label, blocks, groups, absorbed_by=norms)


def _grouped(piece: BlockSlice, shape: tuple[int, ...], groups: int) -> BlockSlice:
    """The slice of channel c along ``piece.dim`` regrouped as G consecutive groups of channels:
    the tensor seen as (leading, G, rest) and cut along its middle axis."""
    dim = piece.dim if piece.dim is not None else 0
    lead = math.prod(shape[:dim])
    return BlockSlice(piece.param, 1, (lead, groups, math.prod(shape[dim:]) // groups))
