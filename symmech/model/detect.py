"""Find the symmetry groups of a PyTorch model from its graph (torch.fx), then confirm them.

Rules (docs/theory.md, "Where the symmetries live in a network"):

* translation: the ``nn.Linear`` whose output is the model output (logits, optionally through a
  softmax over features): its weight columns W[:, j] (one family) and its bias (another);
* scale: a Conv/Linear whose output feeds only a BatchNorm / GroupNorm / LayerNorm that
  normalises over the layer's channels: weight and bias slices per normalised channel (group);
* rescale: a producer (Conv/Linear, or the affine of a BatchNorm / GroupNorm / LayerNorm) whose
  output reaches exactly one consumer Conv/Linear through positively homogeneous, channel-wise
  operations (ReLU, LeakyReLU, PReLU, pools, dropout, flatten) containing at least one
  activation, with no branching: incoming rows vs. outgoing columns. With x ↦ x² in the chain
  the family is ``quadratic_rescale``.

When ``torch.fx.symbolic_trace`` fails (data-dependent control flow) the module calls are
recorded with forward hooks and linked by tensor identity instead; that path cannot see functional
operations between modules, so :func:`detect` warns and asks for confirmation.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import transformer
from .actions import (
    BlockSlice,
    DetectionResult,
    Family,
    Square,
    SymmetryWarning,
    format_table,
)

__all__ = ["DetectionResult", "SymmetryWarning", "detect", "format_table"]


@dataclass(eq=False)
class _Op:
    """One operation of the data-flow graph, whichever way the graph was obtained."""

    name: str
    kind: str  # input output linear conv bn gn ln act square pool pass flatten softmax meta other
    module: nn.Module | None = None
    shape: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    inputs: list[_Op] = field(default_factory=list)
    users: list[_Op] = field(default_factory=list)
    shared: bool = False  # the module is called more than once


# ----------------------------------------------------------------------------- classification

_MODULE_KINDS: list[tuple[tuple[type[nn.Module], ...], str]] = [
    ((nn.Linear,), "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.modules.batchnorm._BatchNorm,), "bn"),
    ((nn.GroupNorm,), "gn"),
    ((nn.LayerNorm,), "ln"),
    ((nn.ReLU, nn.LeakyReLU, nn.PReLU), "act"),
    ((Square,), "square"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity), "pass"),
    ((nn.Flatten,), "flatten"),
    ((nn.Softmax, nn.LogSoftmax), "softmax"),
    ((nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.ELU, nn.Softplus), "nonhom"),
]
_NONHOM_FUNCS = {F.gelu, F.silu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.mish, F.elu}
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_ACT_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_, F.prelu}
_POOL_FUNCS = {
    getattr(F, f"{kind}_pool{d}d") for kind in ("max", "avg", "adaptive_max", "adaptive_avg")
    for d in (1, 2, 3)
}  # fmt: skip
_PASS_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}


def _module_kind(module: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(module, _POOLS + _ADAPTIVE):
        if getattr(module, "return_indices", False):
            return "other", {}
        return "pool", {"spatial": int(type(module).__name__[-2])}
    for types, kind in _MODULE_KINDS:
        if isinstance(module, types):
            if kind == "flatten":
                return kind, {"start": module.start_dim, "end": module.end_dim}
            if kind == "softmax":
                return kind, {"dim": module.dim}
            return kind, {}
    return "other", {}


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _function_kind(node: fx.Node) -> tuple[str, dict[str, Any]]:
    fn, args = node.target, node.args
    if node.op == "call_method":
        fn = {"relu": F.relu, "relu_": F.relu, "square": torch.square, "pow": torch.pow,
              "mul": torch.mul, "flatten": torch.flatten, "softmax": F.softmax,
              "log_softmax": F.log_softmax}.get(fn, fn)  # fmt: skip
        if node.target in ("size", "dim"):
            return "meta", {}
        if node.target in ("view", "reshape"):
            return "reshape", {}
        if node.target == "contiguous":
            return "pass", {}
    if fn is getattr and len(args) > 1 and args[1] in ("shape", "ndim", "dtype", "device"):
        return "meta", {}
    if fn in _ACT_FUNCS:
        return "act", {}
    if fn in _NONHOM_FUNCS or (node.op == "call_method" and fn in ("tanh", "sigmoid")):
        return "nonhom", {}
    if fn in _POOL_FUNCS:
        return "pool", {"spatial": int(fn.__name__[-2])}
    if fn in _PASS_FUNCS:
        return "pass", {}
    if (
        fn is torch.square
        or (fn in (operator.mul, torch.mul) and len(args) == 2 and args[0] is args[1])
        or (fn in (operator.pow, torch.pow) and len(args) == 2 and args[1] == 2)
    ):
        return "square", {}
    if fn is torch.flatten:
        return "flatten", {
            "start": _arg(node, 1, "start_dim", 0),
            "end": _arg(node, 2, "end_dim", -1),
        }
    if fn in _SOFTMAX_FUNCS:
        return "softmax", {"dim": _arg(node, 1, "dim", None)}
    return "other", {}


# ----------------------------------------------------------------------------- graph building


@contextmanager
def _side_effect_free(model: nn.Module) -> Iterator[None]:
    """Run the model without changing it: buffers restored, RNG forked, no autograd."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])


def _as_tuple(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


class _Recorder(ShapeProp):
    """ShapeProp that keeps every node's value (the transformer rules replay index operations)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = result
        return result


def _fx_graph(model: nn.Module, example_input: Any) -> tuple[list[_Op], transformer.Trace]:
    gm = fx.symbolic_trace(model)
    recorder = _Recorder(gm)
    with _side_effect_free(model):
        recorder.propagate(*_as_tuple(example_input))
    ops: dict[fx.Node, _Op] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        module = None
        kind, extra = {"placeholder": "input", "output": "output"}.get(node.op, "other"), {}
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind, extra = _module_kind(module)
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op in ("call_function", "call_method"):
            kind, extra = _function_kind(node)
        meta = node.meta.get("tensor_meta")
        name = node.target if node.op == "call_module" else node.name
        op = _Op(name, kind, module, _shape(meta), extra)
        op.inputs = [ops[n] for n in node.all_input_nodes]
        if node.op == "output" and not isinstance(node.args[0], fx.Node):
            op.inputs = []  # several outputs: no logits layer to translate
        for source in op.inputs:
            source.users.append(op)
        ops[node] = op
    for op in ops.values():
        op.shared = op.module is not None and calls.get(op.name, 0) > 1
        if op.kind == "reshape":
            _as_flatten(op)
    return list(ops.values()), transformer.Trace(gm, recorder.values)


def _as_flatten(op: _Op) -> None:
    """Turn a view/reshape that merges adjacent dims (a flatten) into a ``flatten`` op."""
    src = op.inputs[0].shape if op.inputs else None
    out = op.shape
    op.kind = "other"
    if src is None or out is None:
        return
    for start in range(len(src)):
        for end in range(start, len(src)):
            merged = src[:start] + (math.prod(src[start : end + 1]),) + src[end + 1 :]
            if merged == out and end > start:
                op.kind, op.extra = "flatten", {"start": start, "end": end}
                return


def _module_graph(model: nn.Module, example_input: Any) -> list[_Op]:
    """Record leaf-module calls with forward hooks and link them by tensor identity."""
    records: list[tuple[str, nn.Module, Any, Any]] = []
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: records.append((n, mod, args, out)))
        for n, m in leaves
    ]
    inputs = _as_tuple(example_input)
    try:
        with _side_effect_free(model):
            result = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    source = _Op("input", "input", shape=_shape(inputs[0]))
    ops, producer = [source], {id(inputs[0]): source}
    calls = {n: sum(1 for r in records if r[0] == n) for n, _ in leaves}

    def link(value: Any, previous: _Op | None) -> _Op:
        if id(value) in producer:
            return producer[id(value)]
        prev_out = previous.extra.get("value") if previous is not None else None
        op = _Op(f"<op before {len(ops)}>", "other", shape=_shape(value))
        if (
            isinstance(value, Tensor) and isinstance(prev_out, Tensor)
            and value.data_ptr() == prev_out.data_ptr() and value.numel() == prev_out.numel()
        ):  # fmt: skip
            op.inputs, op.kind = [previous], "reshape"
            previous.users.append(op)
            _as_flatten(op)
        ops.append(op)
        return op

    previous: _Op | None = source
    source.extra["value"] = inputs[0]
    for name, module, args, out in records:
        kind, extra = _module_kind(module)
        op = _Op(name, kind, module, _shape(out), extra, shared=calls[name] > 1)
        data = [a for a in args if isinstance(a, Tensor)]
        op.inputs = [link(data[0], previous)] if data else []
        for s in op.inputs:
            s.users.append(op)
        op.extra["value"] = out
        producer[id(out)] = op
        ops.append(op)
        previous = op
    out_op = _Op(
        "output", "output", inputs=[producer[id(result)]] if id(result) in producer else []
    )
    for s in out_op.inputs:
        s.users.append(out_op)
    ops.append(out_op)
    for op in ops:
        op.extra.pop("value", None)
    return ops


# ----------------------------------------------------------------------------- rules


def _next(op: _Op) -> _Op | None:
    """The one data consumer of ``op`` when ``op`` is its first argument, else None."""
    users = [u for u in op.users if u.kind != "meta"]
    if len(users) != 1 or not users[0].inputs or users[0].inputs[0] is not op:
        return None
    return users[0]


def _channels(op: _Op) -> tuple[int, int] | None:
    """(channel axis of the output, number of channels) of a producer, or None."""
    if not op.shape or op.kind not in _CHANNEL_ATTR:
        return None
    axis, attr = _CHANNEL_ATTR[op.kind]
    count = getattr(op.module, attr)
    return axis % len(op.shape), count[-1] if isinstance(count, tuple) else count


_CHANNEL_ATTR = {
    "linear": (-1, "out_features"),
    "conv": (1, "out_channels"),
    "bn": (1, "num_features"),
    "gn": (1, "num_channels"),
    "ln": (-1, "normalized_shape"),
}


def _weight_bias(op: _Op, dim: int | None, view: Callable[[Tensor], Any] | None = None):
    found = [(n, getattr(op.module, n, None)) for n in ("weight", "bias")]
    return [BlockSlice(f"{op.name}.{n}", dim, view(p) if view else None)
            for n, p in found if isinstance(p, Tensor)]  # fmt: skip


def _translation(ops: list[_Op], fams: list[Family]) -> None:
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
    m = node.module
    fams.append(Family("translation", f"{node.name} (output layer) weight columns",
                       {"theta": [BlockSlice(f"{node.name}.weight", 1)]}, m.in_features))  # fmt: skip
    if m.bias is not None:
        fams.append(Family("translation", f"{node.name} (output layer) bias",
                           {"theta": [BlockSlice(f"{node.name}.bias", None)]}, 1))  # fmt: skip


def _scale(op: _Op, fams: list[Family], notes: list[str]) -> None:
    norm = _next(op)
    while norm is not None and norm.kind == "pass" and isinstance(norm.module, nn.Identity):
        norm = _next(norm)
    info = _channels(op)
    if norm is None or info is None or norm.kind not in ("bn", "gn", "ln") or norm.shared:
        return
    axis, n = info
    rank, m = len(op.shape), norm.module
    label = f"{op.name} → {norm.name} ({type(m).__name__})"
    if norm.kind == "bn" and axis == 1 and m.num_features == n:
        pieces = _weight_bias(op, 0)
    elif norm.kind == "gn" and axis == 1 and m.num_channels == n:
        g = m.num_groups
        pieces, n = _weight_bias(op, 0, lambda p: (g, p.numel() // g)), g
    elif (
        norm.kind == "ln"
        and tuple(m.normalized_shape) == op.shape[rank - len(m.normalized_shape) :]
    ):
        if len(m.normalized_shape) < rank - axis:
            return
        pieces, n = _weight_bias(op, None), 1
    else:
        return
    fams.append(Family("scale", label, {"theta": pieces}, n))


def _rescale(op: _Op, fams: list[Family], notes: list[str]) -> None:
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
        fan_in = m.in_features
    else:
        return
    if fan_in != outer * n * inner:
        return
    symmetry = {1: "rescale", 2: "quadratic_rescale"}.get(degree)
    label = " → ".join([*path, node.name]) + (" (linear pair)" if linear_pair else "")
    if op.kind in ("bn", "gn", "ln") and getattr(op.module, "weight", None) is None:
        _note(notes, f"no rescale family across {label}: {type(op.module).__name__} has no "
                     "affine parameters (affine=False), and the layer before it is normalised")  # fmt: skip
        return
    if symmetry is None:
        return
    w = m.weight
    if outer == 1 and inner == 1:
        outgoing = BlockSlice(f"{node.name}.weight", 1)
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


def _nonhomogeneous(ops: list[_Op], notes: list[str]) -> None:
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
            _note(notes, f"no rescale across {op.inputs[0].name} → {op.name} → {after.name}: "
                         f"{what} is not positively homogeneous (f(αx) ≠ α f(x) for α > 0)")  # fmt: skip


def _families(
    ops: list[_Op], notes: list[str], trace: transformer.Trace | None = None
) -> list[Family]:
    fams: list[Family] = []
    _translation(ops, fams)
    for op in ops:
        if op.kind in ("linear", "conv") and not op.shared:
            _scale(op, fams, notes)
    for op in ops:
        if op.kind in ("linear", "conv", "bn", "gn", "ln") and not op.shared:
            _rescale(op, fams, notes)
    _nonhomogeneous(ops, notes)
    if trace is not None:

        def note(message: str) -> None:
            _note(notes, message)

        fams += transformer.norm_rescale_families(trace)
        fams += transformer.attention_families(trace, note)
        fams += transformer.leaf_families(trace, note)
    return fams


# ----------------------------------------------------------------------------- entry points


def _note(notes: list[str], message: str) -> None:
    notes.append(message)
    warnings.warn(message, SymmetryWarning, stacklevel=4)


def _read_graph(
    model: nn.Module, example_input: Any, notes: list[str]
) -> tuple[list[_Op] | None, str, transformer.Trace | None]:
    """The graph by torch.fx, else by recorded module calls (with a warning), else None."""
    name = type(model).__name__
    try:
        ops, trace = _fx_graph(model, example_input)
        return ops, "fx", trace
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    try:
        ops = _module_graph(model, example_input)
    except Exception as exc:  # noqa: BLE001 - never raise from detection
        _note(
            notes,
            f"detect({name}): the model could not be run on example_input "
            f"({type(exc).__name__}: {exc}); no symmetry detected",
        )
        return None, "none", None
    _note(
        notes,
        f"detect({name}): torch.fx.symbolic_trace failed ({reason}); fell back to recording "
        "module calls in execution order. This path cannot see functional operations between "
        "modules (residual additions, torch.* calls), so confirm the families on a batch "
        "(confirm_batch=...)",
    )
    return ops, "modules", None


def detect(
    model: nn.Module,
    example_input: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    confirm_batch: tuple[Any, Tensor] | None = None,
    *,
    n_trials: int = 3,
) -> DetectionResult:
    """Find the translation / scale / rescale families of ``model``; confirm them on a batch.

    ``example_input`` is one input the model accepts (a tensor or a tuple of positional
    arguments); it is run once to learn shapes, without changing the model. With
    ``confirm_batch=(x, y)`` each family is checked numerically (see :func:`confirm`) with
    ``loss_fn`` (default cross-entropy). Problems are reported as :class:`SymmetryWarning`, never
    raised: the result's ``path`` says how the graph was read and ``notes`` what was left out.
    """
    notes: list[str] = []
    ops, path, trace = _read_graph(model, example_input, notes)
    if ops is None:
        return DetectionResult([], path, notes)
    families = _families(ops, notes, trace)
    if not families:
        _note(
            notes,
            f"detect({type(model).__name__}): no symmetry found: the output is not produced by "
            "an nn.Linear, no Conv/Linear feeds a normalisation layer alone, and no "
            "layer → homogeneous activation → layer chain without branching exists",
        )
    result = DetectionResult(families, path, notes)
    if confirm_batch is not None and families:
        from .confirm import confirm

        try:
            confirm(model, result, confirm_batch, loss_fn, n_trials=n_trials)
        except Exception as exc:  # noqa: BLE001 - detection never breaks training
            _note(notes, f"confirmation failed ({type(exc).__name__}: {exc}); left unconfirmed")
    return result
