"""The traced graph the transformer rules read: every node's value on the example input, the
modules, and the index operations (view, transpose, split, ...) that can be replayed on tensors
of feature numbers to learn which features a head reads.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["DROPOUTS", "MATMULS", "SOFTMAXES", "Trace", "is_index", "is_meta",
           "is_scalar_scale", "is_transpose_last_two", "tensor_arg"]  # fmt: skip

_INDEX_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "split", "chunk",
                  "unflatten", "flatten", "swapaxes"}  # fmt: skip
_INDEX_FUNCS = {torch.transpose, torch.permute, torch.reshape, torch.split, torch.chunk,
                torch.flatten, torch.unflatten, operator.getitem}  # fmt: skip
_SCALE_OPS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"}
MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
SOFTMAXES = {F.softmax, torch.softmax, "softmax"}
DROPOUTS = {F.dropout, "dropout"}


def is_scalar_scale(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    """x * c or x / c with c a number (also one computed from shapes): E commutes with it."""
    if node.op not in ("call_function", "call_method") or node.target not in _SCALE_OPS:
        return False
    tensors = [a for a in node.args if isinstance(values.get(a), Tensor)]
    numbers = [a for a in node.args
               if isinstance(a, (int, float)) or isinstance(values.get(a), (int, float))]  # fmt: skip
    if node.target in (operator.truediv, torch.div, "div") and node.args[:1] != tuple(tensors):
        return False
    return len(tensors) == 1 and len(numbers) == 1 and not node.kwargs


def tensor_arg(node: fx.Node, values: dict[fx.Node, Any]) -> fx.Node:
    """The one argument of ``node`` whose value is a tensor."""
    return next(a for a in node.args if isinstance(values.get(a), Tensor))


def is_index(node: fx.Node) -> bool:
    """A view, reshape, transpose, split, getitem, ...: moves features without mixing them."""
    if node.op == "call_method":
        return node.target in _INDEX_METHODS
    return node.op == "call_function" and node.target in _INDEX_FUNCS


def is_transpose_last_two(node: fx.Node, rank: int | None) -> bool:
    """``x.mT`` or a transpose of the last two of ``rank`` axes."""
    if node.op == "call_method" and node.target == "mT":
        return True
    if node.target not in ("transpose", torch.transpose, "swapaxes"):
        return False
    dims = {d % rank if rank else d for d in node.args[1:3]} if len(node.args) >= 3 else set()
    return rank is not None and dims == {rank - 2, rank - 1}


class Trace:
    """The traced module, the value of every node on the example input, and the modules."""

    def __init__(
        self, gm: fx.GraphModule, values: dict[fx.Node, Any], tied_params: Iterable[str] = ()
    ) -> None:
        self.gm, self.values = gm, values
        self.modules = dict(gm.named_modules())
        calls: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                calls.setdefault(node.target, []).append(node)
        #: call_module nodes of a module that is called more than once
        self.shared = {n for nodes in calls.values() if len(nodes) > 1 for n in nodes}
        #: parameter names whose tensor has other names too (tied weights)
        self.tied_params = set(tied_params)

    def tied(self, node: fx.Node) -> bool:
        """The weight of ``node``'s module is tied to another parameter."""
        return node.op == "call_module" and f"{node.target}.weight" in self.tied_params

    def parameter(self, node: object) -> nn.Parameter | None:
        """The parameter a ``get_attr`` node reads, or None for anything else."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            value = self.values.get(node)
            return value if isinstance(value, nn.Parameter) else None
        return None

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def rank(self, node: fx.Node) -> int | None:
        value = self.values.get(node)
        return value.ndim if isinstance(value, Tensor) else None

    def replay(self, node: fx.Node, chain: set[fx.Node], seeds: dict[fx.Node, Tensor]) -> Any:
        """Re-run ``node`` with the chain's values replaced by index tensors (seeded at ``seeds``)."""
        if node in seeds:
            return seeds[node]
        if is_scalar_scale(node, self.values):
            return self.replay(tensor_arg(node, self.values), chain, seeds)

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


def is_meta(node: fx.Node) -> bool:
    return (
        node.op == "call_method"
        and node.target in ("size", "dim")
        or (node.op == "call_function" and node.target is getattr)
    )
