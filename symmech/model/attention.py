"""Attention heads: ``attention_qk`` / ``attention_vo`` families of every attention core.

An attention core is ``F.scaled_dot_product_attention``, or softmax(q kᵀ · s) v written out, whose
q, k, v come from Linear layers (``nn.Linear``, a Hugging Face ``Conv1D``, or ``F.linear`` of a
weight and bias parameter, as in torchvision's Swin) through index operations only (view, reshape,
transpose, permute, contiguous, split, chunk, getitem, and multiplication by a number), and whose
output reaches one such Linear (the output projection) the same way. Which output features of the projections form head
h is found by running those index operations on a tensor of feature numbers, so fused ``c_attn``
layouts and separate q/k/v layers read alike. One family per entry (i ≤ j) of the head's r×r
charge matrix (E = eᵢeⱼᵀ + eⱼeᵢᵀ, or eᵢeᵢᵀ), the heads as its groups: the runtime tracks one
constant E per family.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .actions import BlockSlice, Family, strided
from .layout import in_features, is_linear, is_transposed, out_features
from .trace import (
    DROPOUTS,
    MATMULS,
    SOFTMAXES,
    Trace,
    is_index,
    is_meta,
    is_scalar_scale,
    is_transpose_last_two,
    tensor_arg,
)

__all__ = ["MAX_FULL_HEAD_DIM", "attention_families", "entry_families", "transposed_rows"]

#: heads up to this size get a family for every entry (i ≤ j) of their charge matrix; larger
#: heads only the diagonal entries (r families instead of r(r+1)/2; a note says so)
MAX_FULL_HEAD_DIM = 8


# ----------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class _Proj:
    """A linear projection as attention reads it: an ``nn.Linear`` / ``Conv1D`` call, or
    ``F.linear(x, weight, bias)`` of parameters (torchvision's Swin attention)."""

    name: str  # the module path (the weight's owner)
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    transposed: bool  # a Conv1D: weight (in, out)
    shared: bool  # called more than once (its output is not one projection)
    tied: bool  # its weight is tied to another parameter


def _projection(trace: Trace, node: fx.Node | None) -> _Proj | None:
    """The projection ``node`` computes, or None."""
    if node is None:
        return None
    module = trace.module(node)
    if is_linear(module):
        assert module is not None
        return _Proj(str(node.target), f"{node.target}.weight",
                     f"{node.target}.bias" if module.bias is not None else None,
                     in_features(module), out_features(module), is_transposed(module),
                     node in trace.shared, trace.tied(node))  # fmt: skip
    if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2:
        return None
    weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    w = trace.parameter(weight)
    if w is None or w.ndim != 2 or (bias is not None and trace.parameter(bias) is None):
        return None
    assert isinstance(weight, fx.Node)
    name = str(weight.target)
    calls = [u for u in weight.users if u.target is F.linear]
    return _Proj(name.rsplit(".", 1)[0], name, None if bias is None else str(bias.target),
                 int(w.shape[1]), int(w.shape[0]), False, len(calls) > 1,
                 name in trace.tied_params)  # fmt: skip


def _back_to_linear(
    trace: Trace, start: fx.Node
) -> tuple[fx.Node | None, set[fx.Node], fx.Node | None]:
    """Walk from a core input back through index operations to a Linear: (linear, chain, blocker)."""
    chain: set[fx.Node] = set()
    node = start
    while True:
        if _projection(trace, node) is not None:
            return node, chain, None
        if is_scalar_scale(node, trace.values):
            chain.add(node)
            node = tensor_arg(node, trace.values)
            continue
        if not is_index(node) or not isinstance(node.args[0], fx.Node):
            return None, chain, node
        chain.add(node)
        node = node.args[0]


def _forward_to_linear(trace: Trace, start: fx.Node) -> tuple[fx.Node | None, set[fx.Node]]:
    """Walk from a core output through index operations to the one Linear that reads it."""
    chain: set[fx.Node] = set()
    node = start
    while True:
        users = [u for u in node.users if not is_meta(u)]
        if len(users) != 1 or users[0].all_input_nodes[:1] != [node]:
            return None, chain
        user = users[0]
        if _projection(trace, user) is not None:
            return user, chain
        if not is_index(user):
            return None, chain
        chain.add(user)
        node = user


def _cores(trace: Trace) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(q, k, v, output) of every attention core of the graph."""
    found = []
    for node in trace.gm.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            q, k, v = (node.args[i] if len(node.args) > i else node.kwargs.get(n)
                       for i, n in enumerate(("query", "key", "value")))  # fmt: skip
            found.append((q, k, v, node))
        elif node.target in SOFTMAXES and node.op != "call_module":
            core = _explicit_core(trace, node)
            if core is not None:
                found.append(core)
    return found


def _explicit_core(trace: Trace, softmax: fx.Node) -> tuple[fx.Node, ...] | None:
    rank = trace.rank(softmax)
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if rank is None or dim is None or dim % rank != rank - 1:
        return None
    node = softmax.args[0]
    while isinstance(node, fx.Node) and node.target not in MATMULS:
        if is_scalar_scale(node, trace.values):
            node = tensor_arg(node, trace.values)
        elif node.target in ("masked_fill", torch.masked_fill, "to"):
            node = node.args[0]  # a mask, or a dtype cast
        elif node.target in (operator.add, torch.add, "add") and isinstance(node.args[0], fx.Node):
            node = node.args[0]  # an additive mask
        else:
            return None
    if not isinstance(node, fx.Node) or len(node.args) != 2:
        return None
    q, kt = node.args
    if not isinstance(kt, fx.Node) or not is_transpose_last_two(kt, trace.rank(kt)):
        return None
    out = softmax
    while True:
        users = list(out.users)
        if len(users) != 1:
            return None
        out = users[0]
        if out.target in MATMULS and out.args[0] is not None and len(out.args) == 2:
            break
        dropout = out.target in DROPOUTS or isinstance(trace.module(out), nn.Dropout)
        if not dropout and out.target != "to":  # dropout, or a dtype cast
            return None
    return q, kt.args[0], out.args[1], out


def _rows_per_head(index: Tensor) -> list[tuple[int, ...]] | None:
    """The feature numbers of each position of a (..., T, r) index tensor; None if they vary in T."""
    if index.ndim < 2 or not torch.equal(index, index[..., :1, :].expand_as(index)):
        return None
    return [tuple(int(f) for f in row) for row in index[..., 0, :].reshape(-1, index.shape[-1])]


def _progression(rows: list[tuple[int, ...]]) -> tuple[int, int, int] | None:
    """(first, head step, column step) when row h column c is first + h·step_h + c·step_c."""
    first = rows[0][0]
    step_c = rows[0][1] - first if len(rows[0]) > 1 else 1
    step_h = rows[1][0] - first if len(rows) > 1 else len(rows[0]) * step_c
    for h, row in enumerate(rows):
        for c, f in enumerate(row):
            if f != first + h * step_h + c * step_c:
                return None
    return first, step_h, step_c


def _head_slices(proj: _Proj, rows: list[tuple[int, ...]]) -> list[BlockSlice] | None:
    """Head h's rows of a Linear, transposed, with its bias as a last row: (heads, n + 1, r).
    For a Conv1D, whose weight is (in, out), head h's output features are columns."""
    prog = _progression(rows)
    if prog is None:
        return None
    bias = proj.bias
    n, heads, r = proj.in_features, len(rows), len(rows[0])
    if not proj.transposed:
        return transposed_rows(proj.weight, bias, n, heads, r, *prog)
    first, step_h, step_c = prog
    m = proj.out_features
    pieces = [BlockSlice(proj.weight, 0, strided((heads, n, r), (step_h, m, step_c), first))]
    if bias is not None:
        pieces.append(BlockSlice(bias, 0, strided((heads, 1, r), (step_h, 1, step_c), first)))
    return pieces


def transposed_rows(weight: str, bias: str | None, n: int, heads: int, r: int, first: int,
                     step_h: int = 0, step_c: int = 1) -> list[BlockSlice]:  # fmt: skip
    step_h = step_h or r * step_c
    pieces = [BlockSlice(weight, 0, strided((heads, n, r), (step_h * n, 1, step_c * n), first * n))]
    if bias is not None:
        pieces.append(BlockSlice(bias, 0, strided((heads, 1, r), (step_h, 1, step_c), first)))
    return pieces


def _column_slices(proj: _Proj, cols: list[tuple[int, ...]]) -> list[BlockSlice] | None:
    """Head h's columns W_O[:, h] of the output projection: (heads, out, r) (for a Conv1D,
    whose weight is (in, out), the rows of head h's input features)."""
    prog = _progression(cols)
    if prog is None:
        return None
    first, step_h, step_c = prog
    heads, r, n, m = len(cols), len(cols[0]), proj.in_features, proj.out_features
    if proj.transposed:
        view = strided((heads, m, r), (step_h * m, 1, step_c * m), first * m)
    else:
        view = strided((heads, m, r), (step_h, n, step_c), first)
    return [BlockSlice(proj.weight, 0, view)]


def _entries(r: int) -> list[tuple[int, int]]:
    if r <= MAX_FULL_HEAD_DIM:
        return [(i, j) for i in range(r) for j in range(i, r)]
    return [(i, i) for i in range(r)]


def entry_families(symmetry: str, layer: str, blocks: dict[str, list[BlockSlice]], heads: int,
                    r: int) -> list[Family]:  # fmt: skip
    out = []
    for i, j in _entries(r):
        e = torch.zeros(r, r, dtype=torch.float64)
        e[i, j] = e[j, i] = 1.0
        labels = tuple(f"h{h}[{i},{j}]" for h in range(heads))
        out.append(Family(symmetry, layer, blocks, heads, constants={"E": e}, labels=labels))
    return out


def _layer_name(*names: str) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common) or names[0]


def attention_families(trace: Trace, note: Callable[[str], None]) -> list[Family]:
    """``attention_qk`` and ``attention_vo`` families of every attention core of the graph."""
    fams: list[Family] = []
    for q, k, v, out in _cores(trace):
        walked = {side: _back_to_linear(trace, node) for side, node in zip("qkv", (q, k, v))}
        ends = {side: w[0] for side, w in walked.items()}
        proj = {side: _projection(trace, e) for side, e in ends.items()}
        projections = [p for p in proj.values() if p is not None]
        if any(p.shared for p in projections):
            continue
        tied = [p.name for p in projections if p.tied]
        if tied:
            note(f"no attention families at {_layer_name(*tied)}: a projection weight is tied to "
                 "another parameter, which the head symmetries would move too")  # fmt: skip
            continue
        if not any(ends.values()):
            blockers = sorted({w[2].name for w in walked.values() if w[2] is not None})
            note(f"no attention families at the attention core {out.name}: q, k and v are made "
                 f"by {', '.join(blockers)}, not by a Linear or Conv1D module or an F.linear "
                 "of parameters")  # fmt: skip
            continue
        chains = set().union(*(w[1] for w in walked.values()))
        seeds = {}
        for side, node in ends.items():
            if node is None or node in seeds:
                continue
            width = proj[side].out_features  # type: ignore[union-attr]
            value = trace.values[node]
            seeds[node] = torch.arange(width, dtype=torch.float64).expand(value.shape).clone()
        index = {s: trace.replay(n, chains, seeds) if ends[s] is not None else None
                 for s, n in zip("qkv", (q, k, v))}  # fmt: skip
        rows = {s: _rows_per_head(t) if isinstance(t, Tensor) else None for s, t in index.items()}
        r = next((len(x[0]) for x in rows.values() if x), None)
        if r is None:
            continue
        known = [p.name for p in projections]
        # one projection known (rotary q/k): name the attention module, not the projection
        layer = _layer_name(*known) if len(known) > 1 else known[0].rsplit(".", 1)[0]
        for side in "qk":
            if ends[side] is None:
                blocker = walked[side][2]
                note(f"attention_qk not detected at {layer}: the {side} path has {blocker.name} "
                     f"({blocker.target if isinstance(blocker.target, str) else getattr(blocker.target, '__name__', blocker.target)}) between "
                     "the projection and the scores (a rotary position embedding, for instance, "
                     "keeps only the E that commute with the rotation); those heads are not tracked")  # fmt: skip
                break
        heads_q = _unique(rows["q"])
        if ends["q"] is not None and ends["k"] is not None and rows["k"]:
            pairs = dict(zip(rows["q"], rows["k"], strict=False))
            if len(pairs) == len(heads_q) and all(
                pairs[a] == b for a, b in zip(rows["q"], rows["k"], strict=False)
            ):
                Q = _head_slices(proj["q"], heads_q)  # type: ignore[arg-type]
                K = _head_slices(proj["k"], [pairs[h] for h in heads_q])  # type: ignore[arg-type]
                if Q and K:
                    fams += entry_families("attention_qk", layer, {"Q": Q, "K": K}, len(heads_q), r)
        fams += _vo_families(trace, out, proj["v"], rows["v"], chains, layer)
    return fams


def _unique(rows: list[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    return sorted(set(rows or ()))


def _vo_families(trace: Trace, out: fx.Node, v_proj: _Proj | None,
                 v_rows: list[tuple[int, ...]] | None, chains: set[fx.Node], layer: str) -> list[Family]:  # fmt: skip
    if v_proj is None or not v_rows:
        return []
    node, forward = _forward_to_linear(trace, out)
    proj = _projection(trace, node)
    if node is None or proj is None or proj.shared or proj.tied:
        return []
    heads = _unique(v_rows)
    head_of = {row: h for h, row in enumerate(heads)}
    r = len(heads[0])
    value = trace.values[out]
    codes = torch.tensor([head_of[row] * r for row in v_rows], dtype=torch.float64)
    seed = codes.reshape(value.shape[:-2] + (1, 1)) + torch.arange(r, dtype=torch.float64)
    seed = seed.expand(value.shape).clone()
    at_proj = trace.replay(node.args[0], forward, {out: seed})  # type: ignore[arg-type]
    flat = at_proj.reshape(-1, at_proj.shape[-1])
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        return []
    col_of = {int(code): j for j, code in enumerate(flat[0])}
    cols = [tuple(col_of[h * r + c] for c in range(r)) for h in range(len(heads))]
    V = _head_slices(v_proj, heads)
    O = _column_slices(proj, cols)
    if not V or not O:
        return []
    return entry_families("attention_vo", _layer_name(v_proj.name, proj.name),
                          {"V": V, "O": O}, len(heads), r)  # fmt: skip
