"""The residual stream through ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``, which
torch.fx keeps whole: what each such module does to a stream that enters it, and the stream
segments that lie entirely inside it.

A **pre-norm** layer (``norm_first=True``) computes ``x + SA(norm1(x))`` and then
``+ FF(norm2(·))``: the stream passes through it; the attention's ``out_proj`` and the second
feed-forward Linear write into it (their rows times α) and the two LayerNorms read it, undoing
an α common to all channels up to their eps. A **post-norm** layer computes
``y = norm1(x + SA(x))`` and ``norm2(y + FF(y))``: the entering stream is read by the attention's
``in_proj`` (its columns times 1/α), written by its ``out_proj`` and normalised by ``norm1``; the
segment ``y + FF(y)`` lies inside the layer (``norm1``'s affine and ``linear2`` write it,
``linear1`` reads it, ``norm2`` normalises it), and ``norm2``'s affine writes the stream that
leaves. An encoder chains its layers; its final ``norm``, when present, closes the stream.

>>> import torch
>>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=True)
>>> role = leaf_stream("enc", layer, 8)
>>> role.passes, sorted(role.absorbers)
(True, ['enc.norm1', 'enc.norm2'])
>>> [w.param for w in role.writers]
['enc.self_attn.out_proj.weight', 'enc.self_attn.out_proj.bias', 'enc.linear2.weight', 'enc.linear2.bias']
>>> post = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
>>> [f.layer for f in inner_stream_families("enc", post)]
['stream enc.norm1, enc.linear2 → enc.linear1 (normalised by enc.norm2)']
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, fx, nn

from .actions import BlockSlice, Family
from .norms import norm_eps
from .trace import Trace

__all__ = [
    "ENCODERS",
    "LeafStream",
    "encoder_ends",
    "inner_stream_families",
    "leaf_role",
    "leaf_stream",
]

#: The modules torch.fx keeps whole whose residual streams this module reads.
ENCODERS = (nn.TransformerEncoderLayer, nn.TransformerEncoder)


@dataclass
class LeafStream:
    """What one whole-kept module does to a stream of its ``d_model`` channels that enters it."""

    #: the module's output carries the entering stream (pre-norm, no final norm)
    passes: bool
    #: slices that write into the entering stream (rows of out_proj, linear2; whole tensors)
    writers: list[BlockSlice] = field(default_factory=list)
    #: slices that read the entering stream (a post-norm layer's in_proj columns)
    readers: list[BlockSlice] = field(default_factory=list)
    #: the normalisations that read the entering stream, each undoing one α for all channels
    absorbers: dict[str, str] = field(default_factory=dict)
    #: slices that write the stream leaving the module when it does not pass (a norm's affine)
    out_writers: list[BlockSlice] = field(default_factory=list)


def _layers(module: nn.Module) -> list[nn.TransformerEncoderLayer] | None:
    if isinstance(module, nn.TransformerEncoderLayer):
        return [module]
    if isinstance(module, nn.TransformerEncoder) and all(
        isinstance(layer, nn.TransformerEncoderLayer) for layer in module.layers
    ):
        return list(module.layers)
    return None


def _names(name: str, module: nn.Module) -> list[str]:
    if isinstance(module, nn.TransformerEncoderLayer):
        return [name]
    return [f"{name}.layers.{i}" for i in range(len(module.layers))]  # type: ignore[arg-type]


def _affine(name: str, module: nn.Module) -> list[BlockSlice]:
    """The parameters of a linear map or normalisation whose output channel i is scaled by α."""
    return [
        BlockSlice(f"{name}.{p}", 0)
        for p in ("weight", "bias")
        if isinstance(getattr(module, p, None), Tensor)
    ]


def _final_norm(module: nn.Module) -> nn.LayerNorm | None:
    norm = getattr(module, "norm", None) if isinstance(module, nn.TransformerEncoder) else None
    return norm if isinstance(norm, nn.LayerNorm) else None


def _usable(layers: list[nn.TransformerEncoderLayer], n: int) -> bool:
    """Every layer alike (pre- or post-norm), over ``n`` channels, with affine LayerNorms of one
    eps and self-attention on one fused projection."""
    first = layers[0]
    return all(
        layer.norm_first == first.norm_first
        and layer.self_attn.embed_dim == n
        and layer.self_attn.in_proj_weight is not None
        and layer.self_attn.bias_k is None
        and all(
            isinstance(norm, nn.LayerNorm)
            and tuple(norm.normalized_shape) == (n,)
            and norm.weight is not None
            and norm_eps(norm) == norm_eps(first.norm1)
            for norm in (layer.norm1, layer.norm2)
        )
        for layer in layers
    )


def leaf_stream(name: str, module: nn.Module, n: int) -> LeafStream | None:
    """The role of ``module`` (called ``name``) for a stream of ``n`` channels on the last axis
    that it reads as its input; None when it is no encoder layer or stack that symmech reads."""
    layers = _layers(module)
    if not layers or not _usable(layers, n):
        return None
    names = _names(name, module)
    final = _final_norm(module)
    if final is not None and (
        tuple(final.normalized_shape) != (n,) or norm_eps(final) != norm_eps(layers[0].norm1)
    ):
        return None
    if layers[0].norm_first:
        role = LeafStream(passes=final is None)
        for lname, layer in zip(names, layers):
            role.writers += _affine(f"{lname}.self_attn.out_proj", layer.self_attn.out_proj)
            role.writers += _affine(f"{lname}.linear2", layer.linear2)
            role.absorbers.update({f"{lname}.norm1": "all", f"{lname}.norm2": "all"})
        if final is not None:
            role.absorbers[f"{name}.norm"] = "all"
            role.out_writers = _affine(f"{name}.norm", final)
        return role
    first = names[0]
    role = LeafStream(
        passes=False,
        writers=_affine(f"{first}.self_attn.out_proj", layers[0].self_attn.out_proj),
        readers=[BlockSlice(f"{first}.self_attn.in_proj_weight", 1)],
        absorbers={f"{first}.norm1": "all"},
    )
    role.out_writers = (
        _affine(f"{name}.norm", final)
        if final is not None
        else _affine(f"{names[-1]}.norm2", layers[-1].norm2)
    )
    return role


def _whole(pieces: list[BlockSlice]) -> list[BlockSlice]:
    """One group of whole tensors: a LayerNorm undoes only an α common to all channels."""
    return [BlockSlice(p.param, None) for p in pieces]


def _segment(writers: list[BlockSlice], readers: list[BlockSlice], norm: str) -> Family:
    """A stream segment inside the module: written, read, and normalised by ``norm``."""

    def modules(pieces: list[BlockSlice]) -> str:
        return ", ".join(dict.fromkeys(p.param.rsplit(".", 1)[0] for p in pieces))

    label = f"stream {modules(writers)} → " + (f"{modules(readers)} " if readers else "")
    label += f"(normalised by {norm})"
    if not readers:
        return Family("scale", label, {"theta": _whole(writers)}, 1, absorbed_by=(norm,))
    blocks = {"theta_1": _whole(writers), "theta_2": _whole(readers)}
    return Family("stream_rescale", label, blocks, 1, absorbed_by=(norm,))


def inner_stream_families(name: str, module: nn.Module) -> list[Family]:
    """The post-norm stream segments that lie entirely inside ``module``: each layer's
    ``norm1 → FF`` segment, each ``norm2 → next layer's attention`` one, and the last ``norm2``
    against a final norm (``scale``: read by that norm alone)."""
    layers = _layers(module)
    if not layers or layers[0].norm_first or not _usable(layers, layers[0].self_attn.embed_dim):
        return []
    names = _names(name, module)
    fams = []
    for i, (lname, layer) in enumerate(zip(names, layers)):
        if i > 0:
            prev = f"{names[i - 1]}.norm2"
            writers = _affine(prev, layers[i - 1].norm2) + _affine(
                f"{lname}.self_attn.out_proj", layer.self_attn.out_proj
            )
            reader = [BlockSlice(f"{lname}.self_attn.in_proj_weight", 1)]
            fams.append(_segment(writers, reader, f"{lname}.norm1"))
        writers = _affine(f"{lname}.norm1", layer.norm1) + _affine(
            f"{lname}.linear2", layer.linear2
        )
        fams.append(_segment(writers, [BlockSlice(f"{lname}.linear1.weight", 1)], f"{lname}.norm2"))
    final = _final_norm(module)
    if final is not None:
        fams.append(_segment(_affine(f"{names[-1]}.norm2", layers[-1].norm2), [], f"{name}.norm"))
    return fams


def leaf_role(trace: Trace, node: fx.Node, axis: int, n: int) -> LeafStream | None:
    """:func:`leaf_stream` of a graph node for a stream of ``n`` channels on ``axis`` of its
    input, when that axis is the last one (None otherwise, or for any other node)."""
    module = trace.module(node)
    if module is None or node in trace.shared or not node.args:
        return None
    if not isinstance(node.args[0], fx.Node) or axis != (trace.rank(node) or 0) - 1:
        return None
    return leaf_stream(str(node.target), module, n)


def encoder_ends(trace: Trace, node: fx.Node) -> list[fx.Node]:
    """The input and output of a whole-kept encoder node (where its streams are looked for:
    the additions inside it are not in the graph); [] for any other node."""
    if not isinstance(trace.module(node), ENCODERS) or not node.args:
        return []
    ends = [node.args[0], node]
    return [e for e in ends if isinstance(e, fx.Node) and (trace.rank(e) or 0) >= 2]
