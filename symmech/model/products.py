"""``rescale`` across an elementwise product: a layer scale, and a gated (SwiGLU) MLP.

* **Layer scale** (ConvNeXt's ``γ ⊙ block(x)``, CaiT's, ...): a Linear / conv whose output reaches
  ``γ * ·`` through index operations only (permute, view, transpose, ...), with γ a parameter
  used nowhere else that broadcasts along one axis of the product. Output channel c of the layer
  (weight row c and bias c) scaled by α_c and γ_c by 1/α_c leave the product unchanged: a
  ``rescale`` family with ``theta_1`` the layer's rows and ``theta_2`` γ per channel. Which axis
  of the product carries channel c is found by replaying the index operations on a tensor of
  channel numbers, so γ of shape (C, 1, 1) after a permute back to NCHW and γ of shape (C,)
  before it read alike.
* **Gated product** ``down(act(gate(x)) ⊙ up(x))``: the product is linear in ``up``'s output, so
  up's row c × α_c and down's input column c × 1/α_c is a ``rescale`` family, when up's output
  feeds only the product, the other factor does not depend on up, and the product feeds only
  ``down``. The gate side has none: act = SiLU / GELU is not positively homogeneous (a note
  says so).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor, fx, nn

from .actions import BlockSlice, Family
from .graph import _function_kind, _module_kind
from .layout import in_axis, in_features, is_linear, out_axis, out_features
from .trace import Trace, is_index, is_meta

__all__ = ["product_families"]

_MULS = {operator.mul, torch.mul, "mul"}


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_meta(u)]


def _producer(trace: Trace, start: fx.Node) -> tuple[fx.Node | None, set[fx.Node]]:
    """Back from ``start`` through single-use index operations to a Linear / conv whose output
    is used only on that way: (producer, the index operations), or (None, ...)."""
    chain: set[fx.Node] = set()
    node = start
    while True:
        if len(_users(node)) != 1:
            return None, chain
        module = trace.module(node)
        if is_linear(module) or isinstance(module, nn.modules.conv._ConvNd):
            ok = node not in trace.shared and not trace.tied(node)
            return (node, chain) if ok else (None, chain)
        if not is_index(node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None, chain
        chain.add(node)
        node = node.args[0]


def _channel_count(trace: Trace, producer: fx.Node) -> tuple[int, int]:
    """(channel axis of the producer's output, number of channels)."""
    module = trace.module(producer)
    if is_linear(module):
        return -1, out_features(module)
    return 1, int(module.out_channels)


def _rows(trace: Trace, producer: fx.Node) -> list[BlockSlice]:
    """The producer's weight rows (output features) and bias entries."""
    module = trace.module(producer)
    axis = out_axis(module) if is_linear(module) else 0
    pieces = [BlockSlice(f"{producer.target}.weight", axis)]
    if isinstance(getattr(module, "bias", None), Tensor):
        pieces.append(BlockSlice(f"{producer.target}.bias", 0))
    return pieces


def _gamma_axis(gamma: Tensor, product: Tensor, n: int) -> tuple[int, int] | None:
    """(axis of the product, axis of γ) along which γ's n entries lie, γ being 1 elsewhere."""
    if gamma.ndim > product.ndim or gamma.numel() != n or n < 2:
        return None
    big = [a for a in range(gamma.ndim) if gamma.shape[a] != 1]
    if len(big) != 1:
        return None
    axis = product.ndim - gamma.ndim + big[0]
    return (axis, big[0]) if product.shape[axis] == n else None


def _layer_scale(trace: Trace, mul: fx.Node, gamma: fx.Node, other: fx.Node) -> Family | None:
    if gamma.op != "get_attr" or not isinstance(other, fx.Node):
        return None
    name = gamma.target
    params = dict(trace.gm.named_parameters())
    if name not in params or name in trace.tied_params:
        return None
    uses = [u for n in trace.gm.graph.nodes if n.op == "get_attr" and n.target == name
            for u in n.users]  # fmt: skip
    if uses != [mul]:
        return None
    values = [trace.values.get(n) for n in (gamma, other, mul)]
    if not all(isinstance(v, Tensor) for v in values) or values[1].shape != values[2].shape:
        return None
    producer, chain = _producer(trace, other)
    if producer is None:
        return None
    axis, n = _channel_count(trace, producer)
    where = _gamma_axis(values[0], values[2], n)
    if where is None:
        return None
    value = trace.values[producer]
    shape = [1] * value.ndim
    shape[axis] = n
    seed = torch.arange(n, dtype=torch.float64).reshape(shape).expand(value.shape).clone()
    at_mul = trace.replay(other, chain, {producer: seed})
    shape = [1] * at_mul.ndim
    shape[where[0]] = n
    expect = torch.arange(n, dtype=torch.float64).reshape(shape).expand(at_mul.shape)
    if not isinstance(at_mul, Tensor) or not torch.equal(at_mul, expect):
        return None
    label = f"{producer.target} → {name} (layer scale)"
    blocks = {"theta_1": _rows(trace, producer), "theta_2": [BlockSlice(name, where[1])]}
    return Family("rescale", label, blocks, n)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        for a in cur.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen | {node}


def _describe(trace: Trace, node: fx.Node) -> tuple[str, str] | None:
    """(name, what) of a non-homogeneous activation node, else None."""
    module = trace.module(node)
    if module is not None:
        kind = _module_kind(module)[0]
        what = type(module).__name__
    else:
        kind = _function_kind(node)[0]
        what = getattr(node.target, "__name__", str(node.target))
    return (
        (str(node.target if module is not None else node.name), what) if kind == "nonhom" else None
    )


def _gated(trace: Trace, mul: fx.Node, up: fx.Node, other: fx.Node,
           note: Callable[[str], None]) -> Family | None:  # fmt: skip
    module = trace.module(up)
    if not is_linear(module) or up in trace.shared or trace.tied(up) or _users(up) != [mul]:
        return None
    if not isinstance(other, fx.Node) or up in _ancestors(other):
        return None
    product, factor = trace.values.get(mul), trace.values.get(up)
    if not isinstance(product, Tensor) or not isinstance(factor, Tensor):
        return None
    readers = _users(mul)
    if product.shape != factor.shape or len(readers) != 1:
        return None
    down, reader = readers[0], trace.module(readers[0])
    n = out_features(module)
    if (
        not is_linear(reader) or down.args[:1] != (mul,) or down in trace.shared
        or trace.tied(down) or in_features(reader) != n
    ):  # fmt: skip
        return None
    act = _describe(trace, other)
    if act is not None:
        gate = next((a for a in other.all_input_nodes), None)
        source = gate.target if gate is not None and gate.op == "call_module" else act[0]
        note(f"no rescale across {source} → {act[0]} → {down.target}: {act[1]} is not positively "
             f"homogeneous; {up.target} ↔ {down.target} is one (the product {act[0]}(·) · "
             f"{up.target}(x) is linear in {up.target}'s output)")  # fmt: skip
    label = f"{up.target} → {mul.name} → {down.target} (gated product)"
    blocks = {"theta_1": _rows(trace, up),
              "theta_2": [BlockSlice(f"{down.target}.weight", in_axis(reader))]}  # fmt: skip
    return Family("rescale", label, blocks, n)


def product_families(trace: Trace, note: Callable[[str], None] = lambda m: None) -> list[Family]:
    """``rescale`` families of every layer scale and gated product of the traced graph."""
    fams: list[Family] = []
    for node in trace.gm.graph.nodes:
        if (
            node.op not in ("call_function", "call_method") or node.target not in _MULS
            or len(node.args) != 2 or node.kwargs or node.args[0] is node.args[1]
        ):  # fmt: skip
            continue
        a, b = node.args
        for first, second in ((a, b), (b, a)):
            if not isinstance(first, fx.Node):
                continue
            fam = _layer_scale(trace, node, first, second)
            if fam is None and first.op == "call_module":
                fam = _gated(trace, node, first, second, note)
            if fam is not None:
                fams.append(fam)
    return fams
