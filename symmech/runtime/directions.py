"""The update direction of an optimizer step, computed before the step without touching its state.

Every step of the optimizers modelled here is θₖ₊₁ = sₖθₖ − ηₖaₖ: ``shrink`` sₖ = 1 − lr·λ for a
decoupled weight decay (AdamW), else 1 (a coupled decay sits inside aₖ); ``eta`` ηₖ the step size
that multiplies aₖ (Adam: lr/(1 − β₁ᵏ), Adagrad: lr/(1 + (k−1)·lr_decay), else lr); ``a`` aₖ on the
parameter's device. With these, the change of any affine charge over the step is exact (the
one-step law of ``docs/theory.md``).

:func:`direction` reads the optimizer's state before ``optimizer.step()`` and replays torch's
arithmetic on copies (same operations, same order, same dtypes, including the float32 step counter
of ``capturable`` Adam), so sθ − ηa is torch's θₖ₊₁ to float round-off. Once symmech's C++ kernel
is loaded (:mod:`.native`), Adam's aₖ of a contiguous CPU tensor comes from one pass of its own
(the same element-wise operations; vectorised, so a rounding may differ). It never writes: the state
after the call is bit-identical to the state before. Modelled: ``torch.optim`` SGD (momentum,
dampening, Nesterov, the first step with no buffer), Adam and AdamW (amsgrad; Adam with
``decoupled_weight_decay=True`` is AdamW), RMSprop (momentum, centered) and Adagrad (lr_decay,
initial_accumulator_value), each with weight decay, ``maximize``, eps, and the for-loop, foreach
and fused variants (same mathematics, round-off aside). Refused with a clear error:
``differentiable=True``, a tensor ``lr``, ``betas`` or ``weight_decay``, complex parameters, sparse
gradients, and subclasses of these optimizers (their ``step`` may differ).

Not covered by design: a GradScaler with a fused optimizer unscales the gradients inside
``step`` (call ``scaler.unscale_(optimizer)`` before :func:`direction`), and step pre-hooks that
change gradients after :func:`direction` was called.

For any other optimizer (Lion, a user's own) :class:`MeasuredDirection` recovers aₖ from the step
itself, at the cost of one copy of the tracked parameters.

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
>>> opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.5)
>>> w.grad = torch.tensor([0.3, 0.0], dtype=torch.float64)
>>> d = direction(opt, 0, w)
>>> predicted = d.shrink * w.detach() - d.eta * d.a
>>> opt.step()
>>> bool(torch.allclose(predicted, w.detach(), rtol=1e-15, atol=0))
True
>>> d.shrink, round(d.eta, 6)     # 1 - 0.1*0.5, 0.1 / (1 - 0.9)
(0.95, 1.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from symmech.errors import SymmechError, explain

from . import fused, native
from .coming_step import AdamPass, Direction, MeasuredDirection, _value

__all__ = [
    "Direction",
    "MeasuredDirection",
    "UnsupportedOptimizerError",
    "direction",
    "directions",
    "directions_of",
    "modelled",
    "not_modelled_reason",
]

Group = Mapping[str, Any]


class UnsupportedOptimizerError(SymmechError, ValueError):
    """The optimizer, or one of its settings, is not modelled: its direction would be guessed."""


def _unsupported(call: str, problem: str) -> UnsupportedOptimizerError:
    fix = "Use MeasuredDirection, which recovers the direction from the step itself"
    return UnsupportedOptimizerError(explain(call, problem, fix))


def _find_group(optimizer: torch.optim.Optimizer, group: int | Group, call: str) -> Group:
    if isinstance(group, int):
        if not 0 <= group < len(optimizer.param_groups):
            raise IndexError(
                explain(call, f"group {group} out of range: {len(optimizer.param_groups)} groups")
            )
        return optimizer.param_groups[group]
    if not any(group is g for g in optimizer.param_groups):
        raise ValueError(explain(call, "the group given is not one of optimizer.param_groups"))
    return group


def _check(group: Group, param: torch.Tensor, call: str, scalars: tuple[str, ...]) -> None:
    if group.get("differentiable", False):
        raise _unsupported(call, "differentiable=True is not modelled")
    for key in scalars:
        values = group[key] if isinstance(group[key], tuple) else (group[key],)
        if any(isinstance(v, torch.Tensor) for v in values):
            raise _unsupported(call, f"{key} as a tensor is not modelled, got {group[key]!r}")
    if torch.is_complex(param):
        raise _unsupported(call, f"complex parameters are not modelled, got {param.dtype}")
    if param.grad is not None and param.grad.is_sparse:
        raise _unsupported(call, "sparse gradients are not modelled")


def _grad(group: Group, param: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    g = param.grad if grad is None else grad
    g = g.detach() if g.requires_grad else g  # a plain gradient as it is (no alias op)
    return -g if group["maximize"] else g


def _state_tensor(
    state: Mapping[str, Any], key: str, param: torch.Tensor, call: str, fill: float = 0.0
) -> torch.Tensor:
    if not state:
        return torch.full_like(param, fill, memory_format=torch.preserve_format)
    if key not in state:
        raise _unsupported(
            call, f"the state has no {key!r} (a setting was changed after the first step)"
        )
    return state[key]


def _sgd(
    opt: torch.optim.Optimizer,
    group: Group,
    p: torch.Tensor,
    call: str,
    grad: torch.Tensor | None,
    defer: bool = False,
) -> Direction:
    _check(group, p, call, ("lr", "weight_decay"))
    grad = _grad(group, p, grad)
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        old = opt.state.get(p, {}).get("momentum_buffer")
        if old is None:
            buf = grad.clone()
        else:
            buf = old.mul(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    return Direction(1.0, float(group["lr"]), grad)


def _adam_foreach(group: Group, params: list[torch.Tensor]) -> bool:
    if group["fused"] is None and group["foreach"] is None:
        return bool(_default_to_fused_or_foreach(params, False, use_fused=False)[1])
    return bool(group["foreach"]) and not group["fused"]


def _adam(
    opt: torch.optim.Optimizer,
    group: Group,
    p: torch.Tensor,
    call: str,
    grad: torch.Tensor | None,
    defer: bool = False,
) -> Direction:
    _check(group, p, call, ("lr", "betas", "weight_decay"))
    state = opt.state.get(p, {})
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    grad, shrink = _grad(group, p, grad), 1.0
    if wd != 0:
        if group.get("decoupled_weight_decay", False):
            shrink = 1 - lr * wd
        else:
            grad = grad.add(p, alpha=wd)
    exp_avg, exp_avg_sq = (_state_tensor(state, k, p, call) for k in ("exp_avg", "exp_avg_sq"))
    vmax = _state_tensor(state, "max_exp_avg_sq", p, call) if group["amsgrad"] else None
    step_t = _step_after(state, group, p)
    host_counter = not group["capturable"] or group["fused"]  # bias corrections as floats
    if host_counter:
        step = _value(step_t)
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        if _one_pass_applies(group, grad, exp_avg, exp_avg_sq, vmax, _largest_batched(defer)):
            one_pass = AdamPass(grad, exp_avg, exp_avg_sq, vmax, (beta1, beta2), bc2**0.5, eps)
            if defer:  # made when first read, or inside the sweep of the banks read at once
                return Direction(shrink, lr / bc1, pending=one_pass)
            return Direction(shrink, lr / bc1, one_pass.make())
    m = exp_avg.lerp(grad, 1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
    if vmax is not None:
        v = torch.maximum(vmax, v)
    if host_counter:
        # in place on this hook's own m and v: the same values as Adam's, without new memory
        denom = v.sqrt_().div_(bc2**0.5).add_(eps)
        return Direction(shrink, lr / bc1, m.div_(denom))
    # capturable: the bias corrections are tensors in the step counter's dtype (float32 usually)
    with_grads = [q for q in group["params"] if q.grad is not None]
    if _adam_foreach(group, with_grads):
        neg_size = torch.pow(beta1, step_t).sub_(1).div_(lr).reciprocal_()  # −lr/(1 − β₁ᵏ)
        bc2_sqrt = torch.pow(beta2, step_t).sub_(1).neg_().sqrt_()
        denom = (v.sqrt() / bc2_sqrt).add_(eps).div_(neg_size)
    else:
        neg_size = (lr / (1 - beta1**step_t)).neg()
        bc2_sqrt = (1 - beta2**step_t).sqrt()
        denom = (v.sqrt() / (bc2_sqrt * neg_size)).add_(eps / neg_size)
    eta = -_value(neg_size)
    return Direction(shrink, eta, (m / denom).div_(-eta))


def _step_after(state: dict, group: Group, p: torch.Tensor) -> torch.Tensor:
    """The step counter as Adam will have it after this step (its own dtype and device)."""
    if "step" in state:
        step_t = state["step"]
        step_t = step_t if isinstance(step_t, torch.Tensor) else torch.tensor(float(step_t))
    else:
        on_device = group["capturable"] or group["fused"]
        dtype = torch.float32 if group["fused"] else torch.get_default_dtype()
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        step_t = torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")
    return step_t + 1


def _one_pass_applies(
    group: Group,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    vmax: torch.Tensor | None,
    smallest: int,
) -> bool:
    """Whether symmech's C++ kernel makes aₖ in one pass: loaded, the products not kept eager
    (:data:`.fused.MODE`), contiguous CPU float32/float64 tensors larger than ``smallest``
    (:func:`_largest_batched`; smaller ones go through one foreach pass together,
    :func:`directions_of`, with the values of torch's ops). Then aₖ can also be left pending (:class:`~.coming_step.AdamPass`), for the banks
    read at once to make it in their sweep."""
    if fused.MODE == "eager" or not native.ready() or group["differentiable"]:
        return False
    tensors = [grad, exp_avg, exp_avg_sq] + ([vmax] if vmax is not None else [])
    return (
        grad.numel() > smallest
        and native.eligible(tensors)
        and not any(t.requires_grad for t in tensors)
    )


def _rmsprop(
    opt: torch.optim.Optimizer,
    group: Group,
    p: torch.Tensor,
    call: str,
    grad: torch.Tensor | None,
    defer: bool = False,
) -> Direction:
    _check(group, p, call, ("lr", "weight_decay"))
    state = opt.state.get(p, {})
    alpha = group["alpha"]
    grad = _grad(group, p, grad)
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    sq = (
        _state_tensor(state, "square_avg", p, call).mul(alpha).addcmul_(grad, grad, value=1 - alpha)
    )
    if group["centered"]:
        avg_g = _state_tensor(state, "grad_avg", p, call).lerp(grad, 1 - alpha)
        avg = sq.addcmul(avg_g, avg_g, value=-1).sqrt_()
    else:
        avg = sq.sqrt_()  # this hook's own copy: in place, the same values
    avg = avg.add_(group["eps"])
    if group["momentum"] > 0:
        buf = _state_tensor(state, "momentum_buffer", p, call)
        return Direction(1.0, float(group["lr"]), buf.mul(group["momentum"]).addcdiv_(grad, avg))
    return Direction(1.0, float(group["lr"]), grad / avg)


def _adagrad(
    opt: torch.optim.Optimizer,
    group: Group,
    p: torch.Tensor,
    call: str,
    grad: torch.Tensor | None,
    defer: bool = False,
) -> Direction:
    _check(group, p, call, ("lr", "weight_decay"))
    state = opt.state.get(p, {})
    grad = _grad(group, p, grad)
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    # A state created lazily by torch takes the optimizer's default, not the group's, value.
    init = opt.defaults["initial_accumulator_value"]
    total = _state_tensor(state, "sum", p, call, fill=init).addcmul(grad, grad, value=1)
    step = _value(state["step"]) + 1 if "step" in state else 1.0
    eta = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    return Direction(1.0, float(eta), grad / total.sqrt_().add_(group["eps"]))


_MODELS = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Adagrad: _adagrad,
}


@torch.no_grad()
def direction(
    optimizer: torch.optim.Optimizer,
    group: int | Group,
    param: torch.Tensor,
    grad: torch.Tensor | None = None,
    defer: bool = False,
) -> Direction:
    """The (sₖ, ηₖ, aₖ) that ``optimizer.step()`` will apply to ``param``; reads, never writes.

    ``group`` is the index of the parameter's group in ``optimizer.param_groups`` or the group
    itself. Call it after the gradients are final and before the step. A parameter without a
    gradient is not moved by torch: its direction is zero (shrink 1, eta the group's lr).
    ``grad`` replaces ``param.grad`` (e.g. the unscaled gradient a fused step will use under a
    GradScaler). ``defer``: Adam's aₖ may be left pending (:class:`~.coming_step.Direction`:
    made when first read, before the step).
    """
    call = f"direction({type(optimizer).__name__}, group={group if isinstance(group, int) else '{...}'}, param)"
    model = _MODELS.get(type(optimizer))
    if model is None:
        raise _unsupported(
            call,
            f"{type(optimizer).__module__}.{type(optimizer).__qualname__} is not modelled "
            f"(modelled: {', '.join(sorted(c.__name__ for c in _MODELS))})",
        )
    found = _find_group(optimizer, group, call)
    if not any(param is p for p in found["params"]):
        raise ValueError(explain(call, f"parameter of shape {tuple(param.shape)} is not in group"))
    if param.grad is None:
        return Direction(1.0, _value(found["lr"]), torch.zeros_like(param))
    return model(optimizer, found, param, call, grad, defer)


#: the largest tensor whose direction :func:`directions_of` computes in a batch
SMALL = 1 << 16
#: the same for directions that may be left pending (``defer``): a larger tensor's aₖ is made
#: inside the sweep of the banks read at once, which reads g, m and v once and writes nothing,
#: where the batch makes and stores it in about ten passes. A transformer block (d_model 256,
#: its projections of 65 536 entries) under AdamW, tracker work / optimizer.step() logging
#: every step: 1.29–1.65 against 1.94–1.99 with the batch up to SMALL (two runs each).
SMALL_PENDING = 1 << 12


def _largest_batched(defer: bool) -> int:
    """The largest tensor whose aₖ the foreach batch makes: :data:`SMALL_PENDING` when the
    step may be left pending for the kernel's sweep (loaded, products not kept eager), else
    :data:`SMALL`."""
    return SMALL_PENDING if defer and native.ready() and fused.MODE != "eager" else SMALL


@torch.no_grad()
def directions_of(
    optimizer: torch.optim.Optimizer,
    group: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None] | None = None,
    defer: bool = False,
) -> list[Direction]:
    """:func:`direction` of several parameters of one group, with Adam's and AdamW's element-wise
    work done by one ``torch._foreach_*`` call per operation for all of them with at most
    :data:`SMALL` elements (the same operations in the same order: the values of
    :func:`direction`, round-off of a fused kernel aside). Larger tensors go one by one: each
    operation then finds the previous one's output in cache, which on a CPU outweighs the
    dispatch saved (measured: all 2.4 M entries of a VGG through foreach, 1.1-1.3× slower).

    Other optimizers, ``capturable`` Adam, parameters without a gradient or state, and step
    counters that are not CPU tensors of one dtype take :func:`direction` per parameter.
    ``grads`` replace the parameters' ``.grad`` where not None.
    """
    grads = list(grads) if grads is not None else [None] * len(params)
    out: list[Direction | None] = [None] * len(params)
    small = [i for i, p in enumerate(params) if p.numel() <= _largest_batched(defer)]
    if 0 <= group < len(optimizer.param_groups) and len(small) > 1:
        found = optimizer.param_groups[group]
        fast = _adam_batch(optimizer, found, [params[i] for i in small], [grads[i] for i in small])
        for i, d in zip(small, fast or ()):
            out[i] = d
    return [
        d if d is not None else direction(optimizer, group, p, grad=g, defer=defer)
        for d, p, g in zip(out, params, grads)
    ]


def _adam_batch(
    opt: torch.optim.Optimizer,
    group: Group,
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
) -> list[Direction] | None:
    """:func:`_adam`'s non-capturable path for many parameters at once (None: not applicable)."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW) or len(params) < 2:
        return None
    if group["capturable"] or group["differentiable"]:
        return None
    call = f"directions_of({type(opt).__name__}, [{len(params)} params])"
    names = ("exp_avg", "exp_avg_sq", "step") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
    states = [opt.state.get(p, {}) for p in params]
    members = {id(p) for p in group["params"]}
    if any(
        p.grad is None or id(p) not in members or any(k not in s for k in names)
        for p, s in zip(params, states)
    ):
        return None
    steps = [s["step"] for s in states]
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in steps):
        return None
    if len({t.dtype for t in steps}) != 1:
        return None
    for p in params:
        _check(group, p, call, ("lr", "betas", "weight_decay"))
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    g = [_grad(group, p, gr) for p, gr in zip(params, grads)]
    shrink = 1.0
    if wd != 0:
        if group.get("decoupled_weight_decay", False):
            shrink = 1 - lr * wd
        else:
            g = torch._foreach_add(g, [p.detach() for p in params], alpha=wd)
    m = torch._foreach_lerp([s["exp_avg"] for s in states], g, 1 - beta1)
    v = torch._foreach_mul([s["exp_avg_sq"] for s in states], beta2)
    torch._foreach_addcmul_(v, g, g, value=1 - beta2)
    if group["amsgrad"]:
        v = torch._foreach_maximum([s["max_exp_avg_sq"] for s in states], v)
    # each counter + 1 in its own dtype (torch's step_t += 1), read in one transfer
    counts = torch.stack(steps).add_(1).tolist()
    bc1 = [1 - beta1**k for k in counts]
    torch._foreach_sqrt_(v)
    torch._foreach_div_(v, [(1 - beta2**k) ** 0.5 for k in counts])
    torch._foreach_add_(v, eps)
    torch._foreach_div_(m, v)
    return [Direction(shrink, lr / b, a) for b, a in zip(bc1, m)]


def modelled(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :func:`direction` models this optimizer's class (subclasses are not)."""
    return type(optimizer) in _MODELS


def not_modelled_reason(optimizer: torch.optim.Optimizer) -> str:
    """Why the charges of a run with this optimizer are observed only."""
    cls = type(optimizer)
    return (
        f"{cls.__module__}.{cls.__qualname__} is not modelled (modelled: "
        f"{', '.join(sorted(c.__name__ for c in _MODELS))}), so its update direction is unknown "
        "before the step; MeasuredDirection (symmech.runtime.directions) recovers it from the "
        "step at the cost of one copy of the tracked parameters"
    )


def directions(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, Direction]:
    """:func:`direction` of every parameter of every group, keyed by the parameter."""
    return {
        p: direction(optimizer, i, p)
        for i, group in enumerate(optimizer.param_groups)
        for p in group["params"]
    }
