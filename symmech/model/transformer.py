"""Transformer modules that torch.fx keeps as leaves: ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``; their families (attention heads,
feed-forward rescale, pre-LN norm_rescale) are read from the modules' own parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import nn

from .actions import BlockSlice, Family, strided
from .attention import entry_families, transposed_rows
from .encoder_streams import inner_stream_families
from .trace import Trace

__all__ = ["encoder_layer_families", "leaf_families", "mha_families"]


# ----------------------------------------------------------------------------- leaf modules


def mha_families(
    name: str, mha: nn.MultiheadAttention, note: Callable[[str], None]
) -> list[Family]:
    """attention_qk / attention_vo of an ``nn.MultiheadAttention`` (rows of in_proj_weight: q, k, v)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        note(f"no attention families in {name}: add_bias_kv appends learned keys and values that "
             "the head symmetries would have to move too")  # fmt: skip
        return []
    if mha.in_proj_weight is None:
        note(f"no attention families in {name}: q, k, v have different input sizes (kdim/vdim); "
             "only the fused in_proj_weight layout is read")  # fmt: skip
        return []
    d, heads, r = mha.embed_dim, mha.num_heads, mha.head_dim
    bias = f"{name}.in_proj_bias" if mha.in_proj_bias is not None else None
    w = f"{name}.in_proj_weight"
    Q, K, V = (transposed_rows(w, bias, d, heads, r, part * d) for part in range(3))
    O = [BlockSlice(f"{name}.out_proj.weight", 0, strided((heads, d, r), (r, d, 1), 0))]
    return entry_families("attention_qk", name, {"Q": Q, "K": K}, heads, r) + entry_families(
        "attention_vo", name, {"V": V, "O": O}, heads, r
    )


def encoder_layer_families(name: str, layer: nn.TransformerEncoderLayer,
                           note: Callable[[str], None]) -> list[Family]:  # fmt: skip
    """Families inside one ``nn.TransformerEncoderLayer``: its attention, the feed-forward
    rescale (ReLU only) and, with ``norm_first=True``, the two norms against what they feed."""
    fams = mha_families(f"{name}.self_attn", layer.self_attn, note)
    act = layer.activation
    label = f"{name}.linear1 → {name}.linear2"
    if act is F.relu or isinstance(act, nn.ReLU):
        pieces = [BlockSlice(f"{name}.linear1.{p}", 0) for p in ("weight", "bias")
                  if getattr(layer.linear1, p, None) is not None]  # fmt: skip
        fams.append(Family("rescale", f"{label} (ReLU)",
                           {"theta_1": pieces, "theta_2": [BlockSlice(f"{name}.linear2.weight", 1)]},
                           layer.linear1.out_features))  # fmt: skip
    else:
        what = getattr(act, "__name__", type(act).__name__)
        note(f"no rescale across {label}: the activation {what} is not positively homogeneous")
    if layer.norm_first:
        for norm, reader in (("norm1", "self_attn.in_proj_weight"), ("norm2", "linear1.weight")):
            module = getattr(layer, norm)
            if module.weight is None or (
                reader.startswith("self") and layer.self_attn.in_proj_weight is None
            ):
                continue
            theta_1 = [BlockSlice(f"{name}.{norm}.{p}", 0) for p in ("weight", "bias")
                       if getattr(module, p, None) is not None]  # fmt: skip
            fams.append(Family("norm_rescale", f"{name}.{norm} → {name}.{reader.rsplit('.', 1)[0]}",
                               {"theta_1": theta_1, "theta_2": [BlockSlice(f"{name}.{reader}", 1)]},
                               module.weight.numel()))  # fmt: skip
    return fams


def leaf_families(trace: Trace, note: Callable[[str], None]) -> list[Family]:
    """Families inside the transformer modules torch.fx keeps as leaves."""
    fams: list[Family] = []
    for node in trace.gm.graph.nodes:
        module = trace.module(node)
        if module is None or node in trace.shared:
            continue
        if isinstance(module, nn.MultiheadAttention):
            fams += mha_families(node.target, module, note)
        elif isinstance(module, nn.TransformerEncoderLayer):
            fams += encoder_layer_families(node.target, module, note)
        elif isinstance(module, nn.TransformerEncoder):
            for i, layer in enumerate(module.layers):
                fams += encoder_layer_families(f"{node.target}.layers.{i}", layer, note)
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            fams += inner_stream_families(str(node.target), module)  # post-norm segments
    return fams
