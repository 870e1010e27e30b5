"""Numerical confirmation of detected symmetry families on a real batch, in float64.

For each family a few random groups are moved, one at a time, by ψ with a random α
(multiplicative α ∈ [0.5, 0.84] ∪ [1.19, 2], additive α ∈ ±[0.25, 1]) on a float64 copy of the
parameters, through ``torch.func.functional_call``: the model itself is never changed (its
buffers, mode and RNG state are restored), and dropout draws the same mask in every evaluation.

Tolerance. An exact symmetry changes the loss only by round-off: ``|ΔL| ≤ rtol·|L|``. A scale
symmetry through a normalisation layer is broken by its eps: scaling the layer's output z by α
turns the normalised ŷ = (z − μ)/√(σ² + ε) into s·ŷ with

    s(α) = √((σ² + ε) / (σ² + ε/α²)),   |s − 1| ≤ ε|α⁻² − 1| / (2σ²),

per normalisation unit u (a BatchNorm channel over the batch, a GroupNorm (sample, group), a
LayerNorm row), with σ² the unit's measured activation variance. The loss then moves by
ΔL = Σ_u (s_u − 1) S_u + O((s − 1)²), where S_u = ⟨∂L/∂out_u, out_u − β_u⟩ is measured by one
backward pass. The tolerance is ``rtol·|L| + 2·Σ_u |s_u − 1|·|S_u|`` (the factor 2 covers the
second-order term, which is smaller than the first by a factor |s − 1| ≲ 10⁻³ for σ² ≫ ε).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .actions import (
    Family,
    SymmetryWarning,
    apply_action,
    family_params,
    group_sum,
    identity,
    spec_action,
    validate_family,
)

__all__ = ["Evaluator", "NormStats", "confirm", "evaluation_mode", "norm_stats"]

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


@contextmanager
def evaluation_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train mode (``train=True``) or leave its mode; restore everything after.

    BatchNorm layers that run on batch statistics get ``track_running_stats=False`` meanwhile, so
    no evaluation updates running statistics (and torch.func transforms see no in-place update).
    """
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        if train:
            model.train()
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.training:
                m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


class Evaluator:
    """The loss as a function of a parameter dict, in float64, with a fixed dropout seed."""

    def __init__(
        self,
        model: nn.Module,
        batch: tuple[Any, Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        seed: int = 0,
    ) -> None:
        x, y = batch
        self.model, self.loss_fn, self.seed = model, loss_fn or F.cross_entropy, seed
        self.params = {n: p.detach().to(torch.float64) for n, p in model.named_parameters()}
        self.buffers = {
            n: b.detach().to(torch.float64) if b.is_floating_point() else b.detach()
            for n, b in model.named_buffers()
        }
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        self.inputs = tuple(
            t.detach().to(torch.float64) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in inputs
        )
        self.target = y.detach().to(torch.float64) if y.is_floating_point() else y
        self.devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})

    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """L(θ) for the given parameters (any subset replaced; the rest from the model)."""
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            out = torch.func.functional_call(self.model, ({**self.params, **params}, self.buffers),
                                             self.inputs)  # fmt: skip
            return self.loss_fn(out, self.target)


@dataclass
class NormStats:
    """Per-group normalisation statistics of a scale family: ``var``/``S`` are (groups, units)."""

    norm: str
    eps: float
    var: Tensor
    sens: Tensor

    def s_minus_one(self, alpha: Tensor) -> Tensor:
        """s − 1 per (group, unit) when group j's layer output is scaled by alpha[j]."""
        a2 = alpha.reshape(-1, 1) ** 2
        return torch.sqrt((self.var + self.eps) / (self.var + self.eps / a2)) - 1

    def g1_prediction(self) -> Tensor:
        """The eps-induced ⟨g, θ_j⟩ = Σ_u ε/(σ_u² + ε)·S_u, per group."""
        return (self.eps / (self.var + self.eps) * self.sens).sum(dim=1)


def _unit_stats(
    norm: nn.Module, z: Tensor, out: Tensor, beta: Tensor | None, grad: Tensor
) -> tuple[Tensor, Tensor]:
    if isinstance(norm, nn.LayerNorm):
        k = math.prod(norm.normalized_shape)
        shifted = out if beta is None else out - beta
        var = z.reshape(-1, k).var(dim=1, unbiased=False).reshape(1, -1)
        return var, (grad * shifted).reshape(-1, k).sum(dim=1).reshape(1, -1)
    c = z.shape[1]
    shape = (1, c) + (1,) * (z.ndim - 2)
    shifted = out if beta is None else out - beta.reshape(shape)
    prod = grad * shifted
    if isinstance(norm, nn.GroupNorm):
        n, g = z.shape[0], norm.num_groups
        var = z.reshape(n, g, -1).var(dim=2, unbiased=False).T
        return var, prod.reshape(n, g, -1).sum(dim=2).T
    var = z.transpose(0, 1).reshape(c, -1).var(dim=1, unbiased=False).reshape(c, 1)
    return var, prod.transpose(0, 1).reshape(c, -1).sum(dim=1).reshape(c, 1)


def _scales_output(family: Family) -> bool:
    """The spec multiplies every block by α (ψ = αθ), so a layer it covers has its output
    scaled by α: what a following normalisation's eps turns into a small, predictable break."""
    try:
        return spec_action(family).multiplies_by_alpha
    except ValueError:  # an unknown symmetry: validate_family reports it per family
        return False


def norm_stats(
    ev: Evaluator,
    families: list[Family],
    params: dict[str, Tensor] | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, dict[int, NormStats]]:
    """The base loss and, for every scale family that feeds a normalisation layer, its stats.

    A family qualifies when its spec multiplies every block by α. One forward/backward pass with
    hooks: a family's producer module (that of its first parameter) is matched to the norm layer
    whose input is the producer's output tensor. Keys of the dict are indices into ``families``.
    With ``create_graph=True`` and ``params`` requiring grad, the stats stay differentiable in
    ``params`` (for the eps part of G2).
    """
    producers = {}
    for i, fam in enumerate(families):
        if _scales_output(fam):
            weight = next(iter(fam.blocks.values()))[0].param
            producers.setdefault(weight.rsplit(".", 1)[0], []).append(i)
    modules = dict(ev.model.named_modules())
    outputs: dict[str, Tensor] = {}
    seen: list[tuple[str, nn.Module, Tensor, Tensor, Tensor | None, Tensor]] = []

    def on_producer(name: str) -> Callable[..., None]:
        return lambda mod, args, out: outputs.__setitem__(name, out)

    def on_norm(name: str) -> Callable[..., Tensor]:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            beta = getattr(mod, "bias", None)  # the float64 copy, while functional_call runs
            beta = beta if isinstance(beta, Tensor) else None
            seen.append((name, mod, args[0], args[0].clone(), beta, out))
            return out.clone()  # later in-place ops (ReLU(inplace=True)) must not touch `out`

        return hook

    handles = [modules[n].register_forward_hook(on_producer(n)) for n in producers if n in modules]
    handles += [m.register_forward_hook(on_norm(n)) for n, m in modules.items()
                if isinstance(m, _NORMS)]  # fmt: skip
    if params is None:
        params = {n: p.clone().requires_grad_(True) for n, p in ev.params.items()}
    try:
        loss = ev.loss(params)
    finally:
        for h in handles:
            h.remove()
    outs = [s[5] for s in seen]
    grads = (
        torch.autograd.grad(loss, outs, allow_unused=True, create_graph=create_graph)
        if outs
        else []
    )
    stats: dict[int, NormStats] = {}
    for name, indices in producers.items():
        for (norm_name, norm, z_obj, z, beta, out), grad in zip(seen, grads, strict=True):
            if name in outputs and z_obj is outputs[name] and grad is not None:
                var, sens = _unit_stats(norm, z, out, beta, grad)
                if not create_graph:
                    var, sens = var.detach(), sens.detach()
                for i in indices:
                    stats[i] = NormStats(norm_name, float(norm.eps), var, sens)
                break
    return loss.detach(), stats


def _random_alpha(family: Family, gen: torch.Generator) -> float:
    magnitude = 0.25 + 0.75 * float(torch.rand((), generator=gen, dtype=torch.float64))
    sign = 1.0 if float(torch.rand((), generator=gen)) < 0.5 else -1.0
    additive = spec_action(family).identity == 0  # α = 0 is the identity: α ∈ ±[0.25, 1]
    return sign * magnitude if additive else 2.0 ** (sign * magnitude)


def _pick_groups(
    fam: Family, grad: Mapping[str, Tensor], n: int, gen: torch.Generator
) -> list[int]:
    """Up to ``n`` random groups, live ones first: a group whose gradient is zero on this batch
    (a dead ReLU unit) leaves the loss unchanged whether or not the symmetry holds."""
    live = group_sum({k: grad[k] ** 2 for k in family_params(fam)}, fam) > 0
    order = torch.randperm(fam.n_groups, generator=gen)
    order = torch.cat([order[live[order]], order[~live[order]]])
    return order[: max(1, n)].tolist()


def confirm(
    model: nn.Module,
    families: list[Family],
    batch: tuple[Any, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    n_trials: int = 3,
    rtol: float = 1e-9,
    *,
    mode: str = "train",
    seed: int = 0,
) -> list[Family]:
    """Mark each family ``confirmed`` True/False by moving single groups and re-evaluating L.

    ``mode="train"`` (default) evaluates with training-mode behaviour (BatchNorm on batch
    statistics, as during training), warning when the model was found in eval mode;
    ``mode="as_is"`` keeps the model's mode, so in eval mode BatchNorm uses running statistics
    and scale families fail (the reason says so). The families are updated in place and the
    same list is returned; ``reason`` holds the measured change when a family fails, and the
    eps allowance when a normalisation eps was accounted for. Groups with a nonzero gradient on
    the batch are tried first.
    """
    if mode not in ("train", "as_is"):
        raise ValueError(f"confirm(mode={mode!r}): mode must be 'train' or 'as_is'")
    if mode == "train" and not model.training:
        warnings.warn(
            f"confirm({type(model).__name__}): the model is in eval mode; confirming with "
            "training-mode behaviour (BatchNorm batch statistics, under which scale symmetry "
            "holds); the eval mode is restored afterwards",
            SymmetryWarning,
            stacklevel=2,
        )
    eval_bn = mode == "as_is" and any(
        isinstance(m, _BatchNorm) and not m.training and m.track_running_stats
        for m in model.modules()
    )
    gen = torch.Generator().manual_seed(seed)
    with evaluation_mode(model, train=mode == "train"):
        ev = Evaluator(model, batch, loss_fn, seed)
        base, stats = norm_stats(ev, families)
        grad = torch.func.grad(ev.loss)(ev.params)
        scale_of_loss = max(abs(float(base)), 1e-300)
        for i, fam in enumerate(families):
            try:
                validate_family(fam, ev.params)
            except ValueError as exc:
                fam.confirmed, fam.reason = False, str(exc)
                continue
            picks = _pick_groups(fam, grad, n_trials, gen)
            worst, failure, allowance = 0.0, "", 0.0
            for j in picks:
                alpha = identity(fam, base)
                alpha[j] = _random_alpha(fam, gen)
                with torch.no_grad():
                    change = abs(float(ev.loss(apply_action(ev.params, fam, alpha)) - base))
                bound = 0.0
                if i in stats:
                    st = stats[i]
                    bound = 2 * float((st.s_minus_one(alpha)[j].abs() * st.sens[j].abs()).sum())
                allowance = max(allowance, bound / scale_of_loss)
                worst = max(worst, change / scale_of_loss)
                if change > rtol * scale_of_loss + bound and not failure:
                    failure = (
                        f"loss changed by {change / scale_of_loss:.2e} (relative) when group {j} "
                        f"was moved by α={float(alpha[j]):.3f}; tolerance "
                        f"{rtol + bound / scale_of_loss:.1e}"
                    )
            fam.confirmed = not failure
            if failure:
                fam.reason = failure
                if eval_bn and i in stats:
                    fam.reason += (
                        "; the model is in eval mode, where BatchNorm uses running statistics "
                        "and scale symmetry does not hold (confirm in train mode)"
                    )
            elif i in stats:
                st = stats[i]
                fam.reason = (
                    f"approximate: {st.norm} eps={st.eps:g} moves the loss by {worst:.1e} "
                    f"(relative, ≤ allowance {allowance + rtol:.1e})"
                )
    return families
