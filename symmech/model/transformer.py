"""Detection rules for transformers: attention heads, normalisation affines, leaf modules.

* ``attention_qk`` / ``attention_vo``: an attention core (``F.scaled_dot_product_attention``, or
  softmax(q kᵀ · s) v written out) whose q, k, v come from Linear layers through index operations
  only (view, reshape, transpose, permute, contiguous, split, chunk, getitem, and multiplication
  by a number), and whose output reaches one Linear (the output projection) the same way. Which
  output features of the projections form head h is found by running those index operations on
  a tensor of feature numbers, so fused ``c_attn`` layouts and separate q/k/v layers read alike.
  One family per entry (i ≤ j) of the head's r×r charge matrix (E = eᵢeⱼᵀ + eⱼeᵢᵀ, or eᵢeᵢᵀ),
  the heads as its groups: the runtime tracks one constant E per family.
* ``norm_rescale``: a LayerNorm / BatchNorm / GroupNorm / RMSNorm with an affine whose output
  reaches only Linear / conv layers (or a self-attention's input projection) through dropout,
  identity or a mean over other axes.
* ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are leaves
  to torch.fx; their families are read from the modules' own parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .actions import BlockSlice, Family, strided

__all__ = ["MAX_FULL_HEAD_DIM", "attention_families", "leaf_families", "norm_rescale_families"]

#: heads up to this size get a family for every entry (i ≤ j) of their charge matrix; larger
#: heads only the diagonal entries (r families instead of r(r+1)/2; a note says so)
MAX_FULL_HEAD_DIM = 8

_INDEX_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "split", "chunk",
                  "unflatten", "flatten", "swapaxes"}  # fmt: skip
_INDEX_FUNCS = {torch.transpose, torch.permute, torch.reshape, torch.split, torch.chunk,
                torch.flatten, torch.unflatten, operator.getitem}  # fmt: skip
_SCALE_OPS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SOFTMAXES = {F.softmax, torch.softmax, "softmax"}
_DROPOUTS = {F.dropout, "dropout"}
_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def _target(node: fx.Node) -> Any:
    return node.target


def _is_scalar_scale(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """x * c or x / c with c a number (also one computed from shapes): E commutes with it."""
    if node.op not in ("call_function", "call_method") or node.target not in _SCALE_OPS:
        return False
    tensors = [a for a in node.args if isinstance(values.get(a), Tensor)]
    numbers = [a for a in node.args
               if isinstance(a, (int, float)) or isinstance(values.get(a), (int, float))]  # fmt: skip
    if node.target in (operator.truediv, torch.div, "div") and node.args[:1] != tuple(tensors):
        return False
    return len(tensors) == 1 and len(numbers) == 1 and not node.kwargs


def _tensor_arg(node: fx.Node, values: dict[fx.Node, Any]) -> fx.Node:
    return next(a for a in node.args if isinstance(values.get(a), Tensor))


def _is_index(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _INDEX_METHODS
    return node.op == "call_function" and node.target in _INDEX_FUNCS


def _is_transpose_last_two(node: fx.Node, rank: int | None) -> bool:
    if node.op == "call_method" and node.target == "mT":
        return True
    if node.target not in ("transpose", torch.transpose, "swapaxes"):
        return False
    dims = {d % rank if rank else d for d in node.args[1:3]} if len(node.args) >= 3 else set()
    return rank is not None and dims == {rank - 2, rank - 1}


class Trace:
    """The traced module, the value of every node on the example input, and the modules."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
        self.gm, self.values = gm, values
        self.modules = dict(gm.named_modules())
        calls: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        #: call_module nodes of a module that is called more than once
        self.shared = {n for nodes in calls.values() if len(nodes) > 1 for n in nodes}

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def rank(self, node: fx.Node) -> int | None:
        value = self.values.get(node)
        return value.ndim if isinstance(value, Tensor) else None

    def replay(self, node: fx.Node, chain: set[fx.Node], seeds: dict[fx.Node, Tensor]) -> Any:
        """Re-run ``node`` with the chain's values replaced by index tensors (seeded at ``seeds``)."""
        if node in seeds:
            return seeds[node]
        if _is_scalar_scale(node, self.values):
            return self.replay(_tensor_arg(node, self.values), chain, seeds)

        def value(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return self.replay(a, chain, seeds) if a in chain or a in seeds else self.values[a]
            if isinstance(a, (list, tuple)):
                return type(a)(value(b) for b in a)
            return a

        args, kwargs = value(tuple(node.args)), {k: value(v) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)


# ----------------------------------------------------------------------------- attention


def _back_to_linear(
    trace: Trace, start: fx.Node
) -> tuple[fx.Node | None, set[fx.Node], fx.Node | None]:
    """Walk from a core input back through index operations to a Linear: (linear, chain, blocker)."""
    chain: set[fx.Node] = set()
    node = start
    while True:
        module = trace.module(node)
        if isinstance(module, nn.Linear):
            return node, chain, None
        if _is_scalar_scale(node, trace.values):
            chain.add(node)
            node = _tensor_arg(node, trace.values)
            continue
        if not _is_index(node) or not isinstance(node.args[0], fx.Node):
            return None, chain, node
        chain.add(node)
        node = node.args[0]


def _forward_to_linear(trace: Trace, start: fx.Node) -> tuple[fx.Node | None, set[fx.Node]]:
    """Walk from a core output through index operations to the one Linear that reads it."""
    chain: set[fx.Node] = set()
    node = start
    while True:
        users = [u for u in node.users if not _is_meta(u)]
        if len(users) != 1 or users[0].all_input_nodes[:1] != [node]:
            return None, chain
        user = users[0]
        if isinstance(trace.module(user), nn.Linear):
            return user, chain
        if not _is_index(user):
            return None, chain
        chain.add(user)
        node = user


def _is_meta(node: fx.Node) -> bool:
    return (
        node.op == "call_method"
        and node.target in ("size", "dim")
        or (node.op == "call_function" and node.target is getattr)
    )


def _cores(trace: Trace) -> list[tuple[fx.Node, fx.Node, fx.Node, fx.Node]]:
    """(q, k, v, output) of every attention core of the graph."""
    found = []
    for node in trace.gm.graph.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            q, k, v = (node.args[i] if len(node.args) > i else node.kwargs.get(n)
                       for i, n in enumerate(("query", "key", "value")))  # fmt: skip
            found.append((q, k, v, node))
        elif node.target in _SOFTMAXES and node.op != "call_module":
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
    while isinstance(node, fx.Node) and node.target not in _MATMULS:
        if _is_scalar_scale(node, trace.values):
            node = _tensor_arg(node, trace.values)
        elif node.target in ("masked_fill", torch.masked_fill):
            node = node.args[0]
        elif node.target in (operator.add, torch.add, "add") and isinstance(node.args[0], fx.Node):
            node = node.args[0]  # an additive mask
        else:
            return None
    if not isinstance(node, fx.Node) or len(node.args) != 2:
        return None
    q, kt = node.args
    if not isinstance(kt, fx.Node) or not _is_transpose_last_two(kt, trace.rank(kt)):
        return None
    out = softmax
    while True:
        users = list(out.users)
        if len(users) != 1:
            return None
        out = users[0]
        if out.target in _MATMULS and out.args[0] is not None and len(out.args) == 2:
            break
        if out.target not in _DROPOUTS and not isinstance(trace.module(out), nn.Dropout):
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


def _head_slices(
    linear: nn.Linear, name: str, rows: list[tuple[int, ...]]
) -> list[BlockSlice] | None:
    """Head h's rows of a Linear, transposed, with its bias as a last row: (heads, n + 1, r)."""
    prog = _progression(rows)
    if prog is None:
        return None
    bias = f"{name}.bias" if linear.bias is not None else None
    return _transposed_rows(
        f"{name}.weight", bias, linear.in_features, len(rows), len(rows[0]), *prog
    )


def _transposed_rows(weight: str, bias: str | None, n: int, heads: int, r: int, first: int,
                     step_h: int = 0, step_c: int = 1) -> list[BlockSlice]:  # fmt: skip
    step_h = step_h or r * step_c
    pieces = [BlockSlice(weight, 0, strided((heads, n, r), (step_h * n, 1, step_c * n), first * n))]
    if bias is not None:
        pieces.append(BlockSlice(bias, 0, strided((heads, 1, r), (step_h, 1, step_c), first)))
    return pieces


def _column_slices(
    linear: nn.Linear, name: str, cols: list[tuple[int, ...]]
) -> list[BlockSlice] | None:
    """Head h's columns W_O[:, h] of the output projection: (heads, out, r)."""
    prog = _progression(cols)
    if prog is None:
        return None
    first, step_h, step_c = prog
    heads, r, n = len(cols), len(cols[0]), linear.in_features
    view = strided((heads, linear.out_features, r), (step_h, n, step_c), first)
    return [BlockSlice(f"{name}.weight", 0, view)]


def _entries(r: int) -> list[tuple[int, int]]:
    if r <= MAX_FULL_HEAD_DIM:
        return [(i, j) for i in range(r) for j in range(i, r)]
    return [(i, i) for i in range(r)]


def _entry_families(symmetry: str, layer: str, blocks: dict[str, list[BlockSlice]], heads: int,
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
        if any(
            isinstance(trace.module(e), nn.Linear) and e in trace.shared for e in ends.values() if e
        ):
            continue
        chains = set().union(*(w[1] for w in walked.values()))
        seeds = {}
        for node in {e for e in ends.values() if e is not None}:
            width = trace.module(node).out_features
            value = trace.values[node]
            seeds[node] = torch.arange(width, dtype=torch.float64).expand(value.shape).clone()
        index = {s: trace.replay(n, chains, seeds) if ends[s] is not None else None
                 for s, n in zip("qkv", (q, k, v))}  # fmt: skip
        rows = {s: _rows_per_head(t) if isinstance(t, Tensor) else None for s, t in index.items()}
        r = next((len(x[0]) for x in rows.values() if x), None)
        if r is None:
            continue
        layer = _layer_name(*[e.target for e in ends.values() if e is not None])
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
                Q = _head_slices(trace.module(ends["q"]), ends["q"].target, heads_q)
                K = _head_slices(
                    trace.module(ends["k"]), ends["k"].target, [pairs[h] for h in heads_q]
                )
                if Q and K:
                    fams += _entry_families(
                        "attention_qk", layer, {"Q": Q, "K": K}, len(heads_q), r
                    )
        fams += _vo_families(trace, out, ends["v"], rows["v"], chains, layer)
    return fams


def _unique(rows: list[tuple[int, ...]] | None) -> list[tuple[int, ...]]:
    return sorted(set(rows or ()))


def _vo_families(trace: Trace, out: fx.Node, v_end: fx.Node | None,
                 v_rows: list[tuple[int, ...]] | None, chains: set[fx.Node], layer: str) -> list[Family]:  # fmt: skip
    if v_end is None or not v_rows:
        return []
    proj, forward = _forward_to_linear(trace, out)
    if proj is None or proj in trace.shared:
        return []
    heads = _unique(v_rows)
    head_of = {row: h for h, row in enumerate(heads)}
    r = len(heads[0])
    value = trace.values[out]
    codes = torch.tensor([head_of[row] * r for row in v_rows], dtype=torch.float64)
    seed = codes.reshape(value.shape[:-2] + (1, 1)) + torch.arange(r, dtype=torch.float64)
    seed = seed.expand(value.shape).clone()
    at_proj = trace.replay(proj.args[0], forward, {out: seed})
    flat = at_proj.reshape(-1, at_proj.shape[-1])
    if not torch.equal(flat, flat[:1].expand_as(flat)):
        return []
    col_of = {int(code): j for j, code in enumerate(flat[0])}
    cols = [tuple(col_of[h * r + c] for c in range(r)) for h in range(len(heads))]
    V = _head_slices(trace.module(v_end), v_end.target, heads)
    O = _column_slices(trace.module(proj), proj.target, cols)
    if not V or not O:
        return []
    return _entry_families("attention_vo", _layer_name(v_end.target, proj.target), {"V": V, "O": O},
                           len(heads), r)  # fmt: skip


# ----------------------------------------------------------------------------- normalisation


def _reads_channels(
    trace: Trace, user: fx.Node, node: fx.Node, axis_last: bool, n: int
) -> str | None:
    """The parameter whose input column i reads channel i of ``node``'s output, or None."""
    module = trace.module(user)
    if user in trace.shared or module is None:
        return None
    if isinstance(module, nn.Linear) and axis_last and module.in_features == n:
        return f"{user.target}.weight" if user.args[:1] == (node,) else None
    if isinstance(module, nn.modules.conv._ConvNd) and not axis_last:
        ok = module.groups == 1 and module.in_channels == n and user.args[:1] == (node,)
        return f"{user.target}.weight" if ok else None
    if isinstance(module, nn.MultiheadAttention) and axis_last and module.embed_dim == n:
        qkv = list(user.args[:3]) + [user.kwargs.get(k) for k in ("query", "key", "value")]
        ok = [a for a in qkv if a is not None] == [node] * 3 and module.in_proj_weight is not None
        return f"{user.target}.in_proj_weight" if ok else None
    return None


def _passes_channels(trace: Trace, user: fx.Node, axis_last: bool) -> bool:
    """Dropout, identity, or (channels last) a mean over other axes."""
    if isinstance(trace.module(user), (nn.Dropout, nn.Identity)) or user.target in _DROPOUTS:
        return True
    if axis_last and user.target in ("mean", torch.mean):
        rank = trace.rank(user.args[0])
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = dims if isinstance(dims, (list, tuple)) else (dims,)
        return rank is not None and None not in dims and all(d % rank != rank - 1 for d in dims)
    return False


def norm_rescale_families(trace: Trace) -> list[Family]:
    """``norm_rescale`` for every affine normalisation read only by linear layers."""
    fams = []
    for node in trace.gm.graph.nodes:
        norm = trace.module(node)
        if (
            not isinstance(norm, _NORMS)
            or node in trace.shared
            or getattr(norm, "weight", None) is None
        ):
            continue
        if isinstance(norm, (nn.LayerNorm,)) or type(norm).__name__ == "RMSNorm":
            shape = tuple(norm.normalized_shape)
            if len(shape) != 1:
                continue
            n, axis_last = shape[0], True
        else:
            n, axis_last = norm.weight.numel(), False
        readers, frontier, ok = [], [node], True
        while frontier and ok:
            current = frontier.pop()
            for user in current.users:
                if _is_meta(user):
                    continue
                param = _reads_channels(trace, user, current, axis_last, n)
                if param is not None:
                    readers.append((user.target, param))
                elif _passes_channels(trace, user, axis_last):
                    frontier.append(user)
                else:
                    ok = False
        if not ok or not readers or len({p for _, p in readers}) != len(readers):
            continue
        theta_1 = [BlockSlice(f"{node.target}.{w}", 0) for w in ("weight", "bias")
                   if isinstance(getattr(norm, w, None), Tensor)]  # fmt: skip
        label = f"{node.target} → " + ", ".join(t for t, _ in readers)
        theta_2 = [BlockSlice(p, 1) for _, p in readers]
        fams.append(Family("norm_rescale", label, {"theta_1": theta_1, "theta_2": theta_2}, n))
    return fams


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
    Q, K, V = (_transposed_rows(w, bias, d, heads, r, part * d) for part in range(3))
    O = [BlockSlice(f"{name}.out_proj.weight", 0, strided((heads, d, r), (r, d, 1), 0))]
    return _entry_families("attention_qk", name, {"Q": Q, "K": K}, heads, r) + _entry_families(
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
    return fams
