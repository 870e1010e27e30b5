"""A module-level torch.fx graph of a model that ``torch.fx.symbolic_trace`` cannot trace.

Hugging Face models (GPT-2, BERT, ...) branch on input shapes and build caches and masks in
Python, which symbolic tracing refuses. ``torch.export.export(strict=False)`` runs that Python on
fake tensors and records the aten operations, each with the stack of modules it ran in
(``nn_module_stack``). This module turns that graph back into the kind of graph the rules read:

* the operations of one call of a leaf module (a module without children: ``nn.Linear``,
  ``Conv1D``, ``nn.LayerNorm``, an activation, dropout, an embedding) become one ``call_module``
  node of the model's own module, when the call has one data input and one output (a module
  that only permutes or reshapes, like torchvision's ``Permute``, stays its operations);
* the aten operations between modules become the torch functions and Tensor methods they
  implement (``aten.transpose.int`` → ``torch.transpose``, ``aten.view.default`` → ``.view``,
  ``aten.scaled_dot_product_attention`` → ``F.scaled_dot_product_attention``, ...), the same
  arguments; operations without such a counterpart stay aten operations, which no rule reads;
* parameters, buffers and constants become ``get_attr`` nodes; the output is the model's
  ``logits`` when it returns a ``ModelOutput`` (or a dict) with one, else what it returns.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn

__all__ = ["export_module_graph"]

_ATEN = torch.ops.aten

#: aten overload → (fx op, the torch target the rules know, how many positional args to keep)
_AS_TORCH: dict[Any, tuple[str, Any, int | None]] = {
    _ATEN.view.default: ("call_method", "view", None),
    _ATEN._unsafe_view.default: ("call_method", "view", None),
    _ATEN.reshape.default: ("call_method", "reshape", None),
    _ATEN.contiguous.default: ("call_method", "contiguous", 1),
    _ATEN.alias.default: ("call_method", "contiguous", 1),
    _ATEN.transpose.int: ("call_function", torch.transpose, None),
    _ATEN.permute.default: ("call_method", "permute", None),
    _ATEN.split.Tensor: ("call_function", torch.split, None),
    _ATEN.split_with_sizes.default: ("call_function", torch.split, None),
    _ATEN.chunk.default: ("call_function", torch.chunk, None),
    _ATEN.flatten.using_ints: ("call_function", torch.flatten, None),
    _ATEN.unflatten.int: ("call_function", torch.unflatten, None),
    _ATEN.mul.Tensor: ("call_function", operator.mul, None),
    _ATEN.mul.Scalar: ("call_function", operator.mul, None),
    _ATEN.div.Tensor: ("call_function", operator.truediv, None),
    _ATEN.div.Scalar: ("call_function", operator.truediv, None),
    _ATEN.add.Tensor: ("call_function", operator.add, None),
    _ATEN.matmul.default: ("call_function", operator.matmul, None),
    _ATEN.bmm.default: ("call_function", torch.bmm, None),
    _ATEN.masked_fill.Scalar: ("call_function", torch.masked_fill, None),
    _ATEN.masked_fill.Tensor: ("call_function", torch.masked_fill, None),
    _ATEN.softmax.int: ("call_function", F.softmax, 2),
    _ATEN._softmax.default: ("call_function", F.softmax, 2),
    _ATEN.log_softmax.int: ("call_function", F.log_softmax, 2),
    _ATEN._log_softmax.default: ("call_function", F.log_softmax, 2),
    _ATEN.scaled_dot_product_attention.default: (
        "call_function", F.scaled_dot_product_attention, None,
    ),
    _ATEN.dropout.default: ("call_function", F.dropout, None),
    _ATEN.relu.default: ("call_function", F.relu, None),
    _ATEN.gelu.default: ("call_function", F.gelu, None),
    _ATEN.silu.default: ("call_function", F.silu, None),
    _ATEN.tanh.default: ("call_function", torch.tanh, None),
    _ATEN.sigmoid.default: ("call_function", torch.sigmoid, None),
    _ATEN.mean.dim: ("call_function", torch.mean, None),
    _ATEN.select.int: ("call_function", torch.select, None),
    _ATEN.to.dtype: ("call_method", "to", None),
}  # fmt: skip
#: operations that only move entries: a leaf module made of these alone is not collapsed, so
#: the rules see the permute itself
_INDEX_ONLY = {_ATEN.permute.default, _ATEN.view.default, _ATEN._unsafe_view.default,
               _ATEN.reshape.default, _ATEN.transpose.int, _ATEN.contiguous.default,
               _ATEN.alias.default}  # fmt: skip
#: checks export inserts that compute nothing (they would count as readers of their input)
_DROPPED = {_ATEN._assert_tensor_metadata.default}


def _export_kwargs(model: nn.Module) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it (a cache object is no tensor output)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _leaf_calls(ep: Any, model: nn.Module) -> dict[fx.Node, tuple[str, str]]:
    """node → (call key, module path) for the nodes that run inside a leaf module's call."""
    modules = dict(model.named_modules())
    out = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op != "call_function" or not stack:
            continue
        key, (path, _) = list(stack.items())[-1]
        module = modules.get(path)
        if path and module is not None and next(module.children(), None) is None:
            out[node] = (key, path)
    return out


def _logits_index(spec: Any) -> int | None:
    """Which flat output is ``logits`` in a ModelOutput / dict output spec, else None."""
    context = getattr(spec, "context", None)
    if not isinstance(context, (list, tuple)) or "logits" not in context:
        return None
    children = list(spec.children()) if hasattr(spec, "children") else spec.children_specs
    start = 0
    for name, child in zip(context, children, strict=True):
        if name == "logits":
            return start if child.num_leaves == 1 else None
        start += child.num_leaves
    return None


def export_module_graph(
    model: nn.Module, example_input: tuple[Any, ...]
) -> tuple[fx.GraphModule, tuple[Any, ...]]:
    """The module-level graph of ``model`` from ``torch.export`` and the flat inputs it takes."""
    kwargs = _export_kwargs(model)
    ep = torch.export.export(model, example_input, kwargs, strict=False)
    flat, _ = pytree.tree_flatten((example_input, kwargs))
    sig = ep.graph_signature
    attrs = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **sig.inputs_to_lifted_tensor_constants}  # fmt: skip
    state = {**dict(model.named_parameters(remove_duplicate=False)),
             **dict(model.named_buffers(remove_duplicate=False)), **ep.constants}  # fmt: skip
    leaf = _leaf_calls(ep, model)
    groups: dict[str, list[fx.Node]] = {}
    for node, (key, _) in leaf.items():
        groups.setdefault(key, []).append(node)
    is_data = {n for n in ep.graph.nodes if n.op == "placeholder" and n.name not in attrs}
    collapsed: dict[fx.Node, tuple[str, fx.Node]] = {}  # output node → (path, data input)
    members: set[fx.Node] = set()
    for nodes in groups.values():
        if all(n.target in _INDEX_ONLY for n in nodes):
            continue  # a module that only permutes or reshapes (torchvision's Permute): keep it
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
        data = [a for a in inputs if a.op != "placeholder" or a in is_data]
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(data) == 1 and len(outs) == 1:
            collapsed[outs[0]] = (leaf[nodes[0]][1], data[0])
            members |= inside
    graph, env, root = fx.Graph(), {}, {}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in attrs:
                target = attrs[node.name]
                root[target] = state[target]
                env[node] = graph.get_attr(target)
            else:
                env[node] = graph.placeholder(node.name)
        elif node in collapsed:
            path, data = collapsed[node]
            root[path] = model.get_submodule(path)
            env[node] = graph.call_module(path, (env[data],))
        elif node in members or (node.target in _DROPPED and not node.users):
            continue
        elif node.op == "output":
            outputs = node.args[0]
            index = _logits_index(ep.call_spec.out_spec)
            if index is not None:
                outputs = outputs[index]
            elif isinstance(outputs, (list, tuple)) and len(outputs) == 1:
                outputs = outputs[0]
            graph.output(fx.map_arg(outputs, lambda n: env[n]))
        else:
            op, target, keep = _AS_TORCH.get(node.target, ("call_function", node.target, None))
            args = fx.map_arg(node.args, lambda n: env[n])
            args = args if keep is None else args[:keep]
            kwargs_ = fx.map_arg(node.kwargs, lambda n: env[n])
            env[node] = graph.create_node(op, target, tuple(args), dict(kwargs_), node.name)
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    used = {n.target for n in graph.nodes if n.op in ("get_attr", "call_module")}
    root = {k: v for k, v in root.items() if k in used}
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    return gm, tuple(flat)
