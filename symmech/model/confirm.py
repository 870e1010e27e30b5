"""Numerical confirmation of detected symmetry families on a real batch, in float64.

The passes run on the batch's first :data:`~.evaluator.CONFIRM_SAMPLES` samples (8; ``samples``
of :func:`confirm`): a symmetry of the loss holds on any batch, and the time of the float64
passes, the whole cost, then stays bounded whatever the training batch size.

For each family a few random groups are picked and moved by ψ with a random α (multiplicative
α ∈ [0.5, 0.84] ∪ [1.19, 2], additive α ∈ ±[0.25, 1]) on a float64 copy of the parameters, through
``torch.func.functional_call``: the model itself is never changed (its buffers, mode and RNG state
are restored), and dropout draws the same mask in every evaluation. The loss is ``loss_fn`` (the
user's, as given to ``detect`` or ``track``) of the output, or of its ``logits`` when the model
returns a ``ModelOutput``. When none is given: a model whose forward takes ``labels`` (Hugging
Face) is given them and its own ``.loss`` is used (a causal LM's shifted cross-entropy, a
classifier's cross-entropy or MSE, as in training); otherwise cross-entropy, with the classes on
the last axis of a sequence output (logits (..., T, V) against labels (..., T)).

Few passes. Symmetries compose: if every family is one, moving all of them at once (each its
picked groups, each by its own α) leaves the loss unchanged to round-off. So one forward pass
checks every family whose tolerance is round-off; when it moves the loss, the families are split
in halves and each half re-checked, down to single families, which are then tried group by group
exactly as one at a time (the reason quotes that trial's change). A model whose families all hold
is confirmed with one forward pass after the forward/backward pass that measures the gradient and
the normalisation statistics, instead of three passes per family.

Normalisation eps. A scale symmetry through a normalisation layer is broken by its eps: scaling
the layer's output z by α turns the normalised ŷ = (z − μ)/√(σ² + ε) into s·ŷ with

    s(α) = √((σ² + ε) / (σ² + ε/α²)),   exactly, per normalisation unit u,

(a BatchNorm channel over the batch, a GroupNorm (sample, group), a LayerNorm row), with σ² the
unit's measured activation variance. For a BatchNorm in training mode with an affine weight γ the
unit is the channel, so the eps break is undone exactly by γ → γ/s: the family's move together with
that compensation must leave the loss unchanged to round-off, the same tolerance as any exact
symmetry, however small the channel's variance (a first-order allowance was too tight for
depthwise convs with σ² ≈ ε and too loose elsewhere). The eps effect itself is reported from the
first-order prediction ΔL ≈ Σ_u (s_u − 1) S_u, with S_u = ⟨∂L/∂out_u, out_u − β_u⟩ from one
backward pass. Where no compensation exists (GroupNorm, LayerNorm, BatchNorm without γ or on
running statistics) each group is tried alone with the tolerance ``rtol·|L| + 2·Σ_u |s_u − 1|·|S_u|
+ 2·Σ_u (s_u − 1)²·|S_u|`` (first order, its second-order companion, both doubled).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
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
from .evaluator import CONFIRM_SAMPLES, Evaluator, evaluation_mode, first_samples
from .layout import is_rms_norm
from .norms import norm_eps

__all__ = ["NormStats", "confirm", "norm_stats"]

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class NormStats:
    """Per-group normalisation statistics of a scale family: ``var``/``S`` are (groups, units)."""

    norm: str
    eps: float
    var: Tensor
    sens: Tensor
    #: the parameter name of a training-mode BatchNorm's γ, which can undo the eps break exactly
    weight: str | None = None

    def compensate(self, params: dict[str, Tensor], alpha: Tensor) -> None:
        """γ → γ/s in ``params`` (in place of the dict): undoes the eps break of moving by alpha."""
        assert self.weight is not None
        s = 1 + self.s_minus_one(alpha).reshape(-1)
        params[self.weight] = params[self.weight] / s.to(params[self.weight])

    def allowance(self, alpha: Tensor, j: int) -> float:
        """The tolerance on |ΔL| from eps when group j moves (no compensation): first order and
        its second-order companion, both doubled."""
        sm1, sens = self.s_minus_one(alpha)[j].abs(), self.sens[j].abs()
        return 2 * float((sm1 * sens).sum() + (sm1 * sm1 * sens).sum())

    def predicted(self, alpha: Tensor) -> float:
        """|Σ_u (s_u − 1) S_u|: the first-order change of the loss eps causes (all groups)."""
        return abs(float((self.s_minus_one(alpha) * self.sens).sum()))

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
    if is_rms_norm(norm):  # no centring: the mean square plays the variance's part
        k = norm.weight.numel()
        var = z.reshape(-1, k).square().mean(dim=1).reshape(1, -1)
        return var, (grad * out).reshape(-1, k).sum(dim=1).reshape(1, -1)
    if isinstance(norm, nn.LayerNorm):
        k = math.prod(norm.normalized_shape)
        if len(norm.normalized_shape) == 1 and z.shape[-1] != k and z.shape[1] == k:
            # LayerNorm2d: a LayerNorm over the channels of NCHW; its units are the positions
            z, out, grad = (t.movedim(1, -1) for t in (z, out, grad))
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
    param_grads: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[int, NormStats]]:
    """The base loss and, for every scale family that feeds a normalisation layer, its stats.

    A family qualifies when its spec multiplies every block by α. One forward/backward pass with
    hooks: a family's producer module (that of its first parameter) is matched to the norm layer
    whose input is the producer's output tensor. Keys of the dict are indices into ``families``.
    With ``create_graph=True`` and ``params`` requiring grad, the stats stay differentiable in
    ``params`` (for the eps part of G2). A ``param_grads`` dict is filled with ∂L/∂θ from the same
    backward pass.
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
                if isinstance(m, _NORMS) or is_rms_norm(m)]  # fmt: skip
    if params is None:
        params = {n: p.clone().requires_grad_(True) for n, p in ev.params.items()}
    try:
        loss = ev.loss(params)
    finally:
        for h in handles:
            h.remove()
    outs = [s[5] for s in seen]
    names = list(params) if param_grads is not None else []
    wrt = outs + [params[n] for n in names]
    grads = (
        list(torch.autograd.grad(loss, wrt, allow_unused=True, create_graph=create_graph))
        if wrt
        else []
    )
    for n, g in zip(names, grads[len(outs) :]):
        param_grads[n] = torch.zeros_like(params[n]) if g is None else g.detach()  # type: ignore[index]
    grads = grads[: len(outs)]
    stats: dict[int, NormStats] = {}
    for name, indices in producers.items():
        for (norm_name, norm, z_obj, z, beta, out), grad in zip(seen, grads, strict=True):
            # the norm reads the producer's output itself or a view of it (a permute to
            # channels-last before a LayerNorm, as in ConvNeXt)
            reads = name in outputs and (z_obj is outputs[name] or z_obj._base is outputs[name])
            if reads and grad is not None:
                var, sens = _unit_stats(norm, z, out, beta, grad)
                if not create_graph:
                    var, sens = var.detach(), sens.detach()
                weight = f"{norm_name}.weight"
                batch_stats = norm.training or getattr(norm, "running_mean", None) is None
                if not (isinstance(norm, _BatchNorm) and batch_stats and weight in params):
                    weight = None  # no γ, or running statistics: nothing undoes the eps break
                for i in indices:
                    stats[i] = NormStats(norm_name, norm_eps(norm), var, sens, weight)
                break
    stats.update(_absorbed_stats(families, seen, grads, create_graph))
    return loss.detach(), stats


def _absorbed_stats(
    families: list[Family], seen: list[tuple[Any, ...]], grads: list[Tensor | None], keep: bool
) -> dict[int, NormStats]:
    """Stats of the families whose α is undone by normalisations that read a residual stream
    (``Family.absorbed_by``): the units of every such normalisation side by side, per channel
    (a BatchNorm's (channels, 1)) or all in one group (a LayerNorm's rows)."""
    calls: dict[str, list[tuple[tuple[Any, ...], Tensor]]] = {}
    for record, grad in zip(seen, grads, strict=True):
        if grad is not None:
            calls.setdefault(record[0], []).append((record, grad))
    stats: dict[int, NormStats] = {}
    for i, fam in enumerate(families):
        parts = [
            _unit_stats(norm, z, out, beta, grad)
            for name in fam.absorbed_by
            for (_, norm, _, z, beta, out), grad in calls.get(name, [])
        ]
        if not fam.absorbed_by or len(parts) != len(fam.absorbed_by):
            continue  # a normalisation did not run (or not once): no allowance, the trial decides
        shape = (fam.n_groups, -1)
        var = torch.cat([v.reshape(shape) for v, _ in parts], dim=1)
        sens = torch.cat([s.reshape(shape) for _, s in parts], dim=1)
        eps = norm_eps(calls[fam.absorbed_by[0]][0][0][1])
        if not keep:
            var, sens = var.detach(), sens.detach()
        stats[i] = NormStats(", ".join(fam.absorbed_by), eps, var, sens, None)
    return stats


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
    samples: int | None = CONFIRM_SAMPLES,
) -> list[Family]:
    """Mark each family ``confirmed`` True/False by moving random groups and re-evaluating L.

    Every family whose tolerance is round-off is moved at once in one pass (then halves, down
    to single families, where the loss moved); a family that fails there, or whose eps cannot be
    compensated, is tried one group at a time (see the module docstring).

    ``mode="train"`` (default) evaluates with training-mode behaviour (BatchNorm on batch
    statistics, as during training), warning when the model was found in eval mode;
    ``mode="as_is"`` keeps the model's mode, so in eval mode BatchNorm uses running statistics
    and scale families fail (the reason says so). The families are updated in place and the
    same list is returned; ``reason`` holds the measured change when a family fails, and the
    eps allowance when a normalisation eps was accounted for. Groups with a nonzero gradient on
    the batch are tried first.

    The passes evaluate the first ``samples`` samples of ``batch`` (default
    :data:`~.evaluator.CONFIRM_SAMPLES`; None: all), which bounds the time whatever the batch
    size (see :func:`~.evaluator.first_samples`); when the cut batch cannot be evaluated (inputs
    that are not batch-first, say) the whole batch is.
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
    few = first_samples(batch, samples)
    if few is not batch:
        try:
            return _confirm(model, families, few, loss_fn, n_trials, rtol, mode, seed)
        except Exception:  # noqa: BLE001 - the whole batch decides, as without ``samples``
            pass
    return _confirm(model, families, batch, loss_fn, n_trials, rtol, mode, seed)


def _confirm(
    model: nn.Module,
    families: list[Family],
    batch: tuple[Any, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    n_trials: int,
    rtol: float,
    mode: str,
    seed: int,
) -> list[Family]:
    eval_bn = mode == "as_is" and any(
        isinstance(m, _BatchNorm) and not m.training and m.track_running_stats
        for m in model.modules()
    )
    gen = torch.Generator().manual_seed(seed)
    # autograd on whatever the caller's mode (a Trainer callback may run under no_grad)
    with evaluation_mode(model, train=mode == "train"), torch.enable_grad():
        ev = Evaluator(model, batch, loss_fn, seed)
        grad: dict[str, Tensor] = {}
        base, stats = norm_stats(ev, families, param_grads=grad)
        scale_of_loss = max(abs(float(base)), 1e-300)
        trials: dict[int, list[tuple[int, Tensor]]] = {}  # family → (group, α over all groups)
        for i, fam in enumerate(families):  # the random draws in the order of one-by-one trials
            try:
                validate_family(fam, ev.params)
            except ValueError as exc:
                fam.confirmed, fam.reason = False, str(exc)
                continue
            trials[i] = []
            for j in _pick_groups(fam, grad, n_trials, gen):
                alpha = identity(fam, base)
                alpha[j] = _random_alpha(fam, gen)
                trials[i].append((j, alpha))
        run = _Trials(ev, families, stats, base, rtol)
        exact = [i for i in trials if i not in stats or stats[i].weight is not None]
        failed = run.search(exact, {i: _joint(trials[i]) for i in exact})
        for i, alphas in trials.items():
            fam = families[i]
            if i in exact and i not in failed:
                fam.confirmed = True
                if i in stats:
                    st, joint = stats[i], _joint(alphas)
                    fam.reason = (
                        f"approximate: {st.norm} eps={st.eps:g} moves the loss by "
                        f"{st.predicted(joint) / scale_of_loss:.1e} (relative, first order); moved "
                        f"with {st.norm}'s γ rescaled by 1/s it changed by at most "
                        f"{run.joint_change / scale_of_loss:.1e} (≤ {rtol:.0e})"
                    )
                continue
            failure = run.one_by_one(i, alphas)
            fam.confirmed = not failure
            if failure:
                fam.reason = failure
                if eval_bn and (i in stats or "(batch mean)" in fam.layer):
                    what = "scale symmetry" if i in stats else "the shift a batch mean removes"
                    fam.reason += (
                        "; the model is in eval mode, where BatchNorm uses running statistics "
                        f"and {what} does not hold (confirm in train mode)"
                    )
            elif i in stats:
                st = stats[i]
                fam.reason = (
                    f"approximate: {st.norm} eps={st.eps:g} moves the loss by "
                    f"{run.worst / scale_of_loss:.1e} (relative, ≤ allowance "
                    f"{run.allowance / scale_of_loss + rtol:.1e})"
                )
    return families


def _joint(trials: list[tuple[int, Tensor]]) -> Tensor:
    """One α moving every picked group of a family at once, each by its own α."""
    alpha = trials[0][1].clone()
    for j, a in trials:
        alpha[j] = a[j]
    return alpha


class _Trials:
    """Loss evaluations of moved parameters: many families at once, or one group at a time."""

    def __init__(
        self,
        ev: Evaluator,
        families: list[Family],
        stats: dict[int, NormStats],
        base: Tensor,
        rtol: float,
    ) -> None:
        self.ev, self.families, self.stats, self.base, self.rtol = ev, families, stats, base, rtol
        self.scale = max(abs(float(base)), 1e-300)
        self.passes = 0  # forward passes run
        self.joint_change = 0.0  # the largest change of a passing joint move
        self.worst = self.allowance = 0.0  # of the last one_by_one

    def change(self, moves: dict[int, Tensor]) -> float:
        """|L(ψ(θ)) − L(θ)| with every family in ``moves`` moved by its α (and, where a
        training-mode BatchNorm follows, its γ compensated for the eps break)."""
        params = dict(self.ev.params)
        for i, alpha in moves.items():
            params = apply_action(params, self.families[i], alpha)
            st = self.stats.get(i)
            if st is not None and st.weight is not None:
                st.compensate(params, alpha)
        self.passes += 1
        with torch.no_grad():
            return abs(float(self.ev.loss(params) - self.base))

    def search(self, members: list[int], moves: dict[int, Tensor]) -> set[int]:
        """The families whose moves change the loss beyond round-off: all at once, then halves."""
        if not members:
            return set()
        change = self.change({i: moves[i] for i in members})
        if change <= self.rtol * self.scale:
            self.joint_change = max(self.joint_change, change)
            return set()
        if len(members) == 1:
            return set(members)
        half = len(members) // 2
        return self.search(members[:half], moves) | self.search(members[half:], moves)

    def one_by_one(self, i: int, trials: list[tuple[int, Tensor]]) -> str:
        """Each picked group of family i moved alone; the first failure's message ('' if none)."""
        st = self.stats.get(i)
        compensated = st is not None and st.weight is not None
        self.worst = self.allowance = 0.0
        failure = ""
        for j, alpha in trials:
            change = self.change({i: alpha})
            bound = st.allowance(alpha, j) if st is not None and not compensated else 0.0
            self.allowance = max(self.allowance, bound)
            self.worst = max(self.worst, change)
            if change > self.rtol * self.scale + bound and not failure:
                failure = (
                    f"loss changed by {change / self.scale:.2e} (relative) when group {j} "
                    f"was moved by α={float(alpha[j]):.3f}"
                    + (f" ({st.norm}'s γ rescaled by 1/s for its eps)" if compensated else "")
                    + f"; tolerance {self.rtol + bound / self.scale:.1e}"
                )
        return failure
