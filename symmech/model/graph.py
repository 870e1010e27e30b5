"""The data-flow graph of a model as a list of :class:`Op`, for the detection rules.

Two readers: :func:`fx_graph` traces the model with ``torch.fx`` (every operation seen, every
node's value kept for the transformer rules), and :func:`module_graph` records leaf-module calls
with forward hooks and links them by tensor identity (it cannot see functional operations between
modules). Each operation gets a ``kind`` the rules read (linear, conv, bn, act, pool, ...).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .actions import Square
from .export_graph import export_module_graph
from .layout import is_rms_norm, is_transposed
from .trace import Trace

__all__ = ["Op", "as_tuple", "export_graph", "fx_graph", "module_graph", "side_effect_free"]


@dataclass(eq=False)
class Op:
    """One operation of the data-flow graph, whichever way the graph was obtained."""

    name: str
    kind: str  # input output linear conv bn gn ln act square pool pass flatten permute softmax
    #            meta other
    module: nn.Module | None = None
    shape: tuple[int, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    inputs: list[Op] = field(default_factory=list)
    users: list[Op] = field(default_factory=list)
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


#: activations of ``transformers.activations`` that are not positively homogeneous, by name
_HF_NONHOM = ("GELU", "SiLU", "Swish", "Mish", "Tanh", "Sigmoid")


def _module_kind(module: nn.Module) -> tuple[str, dict[str, Any]]:
    if is_transposed(module):
        return "linear", {"transposed": True}
    cls = type(module)
    if cls.__module__ == "transformers.activations" and any(k in cls.__name__ for k in _HF_NONHOM):
        return "nonhom", {}
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


_CLAMPS = {torch.clamp, torch.clip, torch.clamp_min, "clamp", "clip", "clamp_min", "clamp_",
           "clip_", "clamp_min_"}  # fmt: skip


def _clamps_at_zero(fn: Any, node: fx.Node) -> bool:
    """``clamp(min=0)`` (any spelling, no upper bound) is a ReLU: positively homogeneous."""
    if not isinstance(fn, str) and not callable(fn) or fn not in _CLAMPS:
        return False
    low = _arg(node, 1, "min", None)
    high = (
        None if fn in (torch.clamp_min, "clamp_min", "clamp_min_") else _arg(node, 2, "max", None)
    )
    return isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0 and high is None


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
        if node.target == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            return "permute", {"dims": tuple(dims)}
    if fn is getattr and len(args) > 1 and args[1] in ("shape", "ndim", "dtype", "device"):
        return "meta", {}
    if fn in _ACT_FUNCS or _clamps_at_zero(fn, node):
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
    if fn is torch.permute:
        return "permute", {"dims": tuple(_arg(node, 1, "dims", ()))}
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
def side_effect_free(model: nn.Module) -> Iterator[None]:
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


def as_tuple(example_input: Any) -> tuple[Any, ...]:
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


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with Hugging Face's ``Conv1D`` a leaf like ``nn.Linear`` and a custom
    RMSNorm (``LlamaRMSNorm``, see :func:`.layout.is_rms_norm`) a leaf like ``nn.LayerNorm``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaf = is_transposed(m) or is_rms_norm(m)
        return leaf or super().is_leaf_module(m, module_qualified_name)


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name → the other names of the same tensor (tied weights), where it has any."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: [m for m in ns if m != n] for ns in names.values() if len(ns) > 1 for n in ns}


def _tie(op: Op, aliases: dict[str, list[str]]) -> None:
    """Note in ``op.extra["tied"]`` the other names of the module's weight, if it is tied."""
    tied = aliases.get(f"{op.name}.weight")
    if op.module is not None and tied:
        op.extra["tied"] = tied


def fx_graph(model: nn.Module, example_input: Any) -> tuple[list[Op], Trace]:
    """The graph by ``torch.fx`` symbolic tracing (``Conv1D`` kept as a leaf)."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    return _read(gm, model, as_tuple(example_input))


def export_graph(model: nn.Module, example_input: Any) -> tuple[list[Op], Trace]:
    """The graph by ``torch.export`` (non-strict), mapped back to modules (see export_graph)."""
    with side_effect_free(model):
        gm, inputs = export_module_graph(model, as_tuple(example_input))
    return _read(gm, model, inputs)


def _read(gm: fx.GraphModule, model: nn.Module, inputs: tuple[Any, ...]) -> tuple[list[Op], Trace]:
    """Run ``gm`` on the inputs (values and shapes of every node) and classify its nodes."""
    recorder = _Recorder(gm)
    with side_effect_free(model):
        recorder.propagate(*inputs)
    aliases = _aliases(model)
    ops: dict[fx.Node, Op] = {}
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
        op = Op(name, kind, module, _shape(meta), extra)
        op.inputs = [ops[n] for n in node.all_input_nodes]
        if node.op == "output" and not isinstance(node.args[0], fx.Node):
            op.inputs = []  # several outputs: no logits layer to translate
        for source in op.inputs:
            source.users.append(op)
        _tie(op, aliases)
        ops[node] = op
    for op in ops.values():
        op.shared = op.module is not None and calls.get(op.name, 0) > 1
        if op.kind == "reshape":
            _as_flatten(op)
    return list(ops.values()), Trace(gm, recorder.values, aliases)


def _as_flatten(op: Op) -> None:
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


def module_graph(model: nn.Module, example_input: Any) -> list[Op]:
    """Record leaf-module calls with forward hooks and link them by tensor identity."""
    records: list[tuple[str, nn.Module, Any, Any]] = []
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    handles = [
        m.register_forward_hook(lambda mod, args, out, n=n: records.append((n, mod, args, out)))
        for n, m in leaves
    ]
    inputs = as_tuple(example_input)
    try:
        with side_effect_free(model):
            result = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    source = Op("input", "input", shape=_shape(inputs[0]))
    ops, producer = [source], {id(inputs[0]): source}
    calls = {n: sum(1 for r in records if r[0] == n) for n, _ in leaves}
    aliases = _aliases(model)

    def link(value: Any, previous: Op | None) -> Op:
        if id(value) in producer:
            return producer[id(value)]
        prev_out = previous.extra.get("value") if previous is not None else None
        op = Op(f"<op before {len(ops)}>", "other", shape=_shape(value))
        if (
            isinstance(value, Tensor) and isinstance(prev_out, Tensor)
            and value.data_ptr() == prev_out.data_ptr() and value.numel() == prev_out.numel()
        ):  # fmt: skip
            op.inputs, op.kind = [previous], "reshape"
            previous.users.append(op)
            _as_flatten(op)
        ops.append(op)
        return op

    previous: Op | None = source
    source.extra["value"] = inputs[0]
    for name, module, args, out in records:
        kind, extra = _module_kind(module)
        op = Op(name, kind, module, _shape(out), extra, shared=calls[name] > 1)
        _tie(op, aliases)
        data = [a for a in args if isinstance(a, Tensor)]
        op.inputs = [link(data[0], previous)] if data else []
        for s in op.inputs:
            s.users.append(op)
        op.extra["value"] = out
        producer[id(out)] = op
        ops.append(op)
        previous = op
    out_op = Op("output", "output", inputs=[producer[id(result)]] if id(result) in producer else [])
    for s in out_op.inputs:
        s.users.append(out_op)
    ops.append(out_op)
    for op in ops:
        op.extra.pop("value", None)
    return ops
