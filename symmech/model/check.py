"""The geometric identities G1 and G2 of each detected family, measured on a real model.

For a family with action ψ(θ, α) the generator ξ = ∂ψ/∂α at α = e comes from ``torch.func.jvp``
of the torch action evaluated from the spec (:func:`.actions.generator`), never from a formula. Then, in
float64 on one batch:

* G1, per group j: ⟨g, ξ_j⟩ = 0. Reported as max_j |⟨g, ξ_j⟩| / (|g_j| |ξ_j|), with g_j the
  gradient restricted to group j's entries (0 for a group whose gradient vanishes: |g_j| at
  round-off of the whole gradient, |g_j| ≤ 1e-12·|g|, where the angle is undefined: a bias
  before BatchNorm, on which the loss does not depend at all).
* G2: H ξ + Dξᵀ g = 0, for ξ = Σ_j c_j ξ_j with random c (a combination of all groups, one
  Hessian-vector product per family). H ξ is a forward-over-reverse product (jvp of grad, falling
  back to reverse-over-reverse), Dξᵀ g a vjp of θ ↦ ξ(θ) against g. Reported as
  |H ξ + Dξᵀ g| / (|H ξ| + |Dξᵀ g|); when Dξ = 0 (the spec's affine part J is 0, as for
  translation) the denominator is |H ξ̃| for a random ξ̃ of the same size on the same entries,
  since then both terms of the sum vanish; when the loss is flat on those entries (|H ξ̃|/|ξ̃| at
  most 1e-12 of |H v|/|v| for a random v on all entries) G2 is reported as 0.

H ξ differentiates the loss twice. ``F.scaled_dot_product_attention`` picks fused kernels whose
backward has no derivative (flash attention on CPU), so :func:`check` runs under the math
kernel, made of ordinary differentiable operations (:func:`math_attention`).

A normalisation layer's eps breaks scale symmetry by a known amount: for BatchNorm
⟨g, θ_c⟩ = Σ_u ε/(σ_u² + ε)·S_u exactly (see :mod:`.confirm`). ``eps_bound`` reports that
predicted G1 size, and ``g1_minus_eps`` what is left after subtracting the prediction, which is at
round-off when the eps mechanism is the only break. Likewise ``g2_minus_eps`` subtracts
∇_θ of that prediction (by double backward) from H ξ + Dξᵀ g. Such families have ``exact=False``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .actions import Family, family_params, generator, group_sum, spec_action, validate_family
from .confirm import norm_stats
from .evaluator import Evaluator, evaluation_mode

__all__ = ["check", "format_check", "hvp", "math_attention"]

_TINY = 1e-300


def hvp(f: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor],
        v: dict[str, Tensor]) -> dict[str, Tensor]:  # fmt: skip
    """H v for the scalar function ``f`` of a parameter dict (forward-over-reverse)."""
    try:
        return torch.func.jvp(torch.func.grad(f), (params,), (v,))[1]
    except (RuntimeError, NotImplementedError):  # an op without a forward-mode rule
        _, pullback = torch.func.vjp(torch.func.grad(f), params)
        return pullback(v)[0]


@contextmanager
def math_attention() -> Iterator[None]:
    """Run ``F.scaled_dot_product_attention`` with its math kernel (twice differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel selection, nothing to change
        context = nullcontext()
    else:
        context = sdpa_kernel(SDPBackend.MATH)
    with context:
        yield


def _norm(values: Mapping[str, Tensor]) -> Tensor:
    return torch.sqrt(sum((t.double() ** 2).sum() for t in values.values()))


def _ratio(num: Tensor, den: Tensor) -> float:
    den = den.abs()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return float(torch.where(den > 0, num.abs() / safe, torch.zeros_like(num)).max())


def _g2(
    ev: Evaluator,
    g: dict[str, Tensor],
    fam: Family,
    coeffs: Tensor,
    eps_part: dict[str, Tensor] | None,
    gen: torch.Generator,
    model_curvature: Callable[[], float],
) -> tuple[float, float, str]:
    """(G2 residual, G2 residual minus the eps prediction, name of the denominator);
    ``model_curvature()`` is |H v| for a random unit v on every entry (for flat families)."""
    names = family_params(fam)
    params = ev.params
    xi = generator(params, fam, coeffs)
    full = {n: xi[n] if n in xi else torch.zeros_like(p) for n, p in params.items()}
    h_xi = hvp(ev.loss, params, full)

    def xi_of(sub: dict[str, Tensor]) -> dict[str, Tensor]:
        return generator({**params, **sub}, fam, coeffs)

    _, pullback = torch.func.vjp(xi_of, {n: params[n] for n in names})
    dxi_g = pullback({n: g[n] for n in names})[0]
    total = {n: h_xi[n] + dxi_g[n] if n in dxi_g else h_xi[n] for n in h_xi}
    left = total if eps_part is None else {n: t - eps_part[n] for n, t in total.items()}
    if not spec_action(fam).constant_generator:
        den = max(float(_norm(h_xi) + _norm(dxi_g)), _TINY)
        return float(_norm(total)) / den, float(_norm(left)) / den, "|Hξ|+|Dξᵀg|"
    probe = {n: torch.randn(xi[n].shape, generator=gen, dtype=torch.float64) for n in names}
    scale = _norm(xi) / _norm(probe)
    probe_full = {n: probe[n] * scale if n in probe else torch.zeros_like(p)
                  for n, p in params.items()}  # fmt: skip
    curvature = float(_norm(hvp(ev.loss, params, probe_full)))
    if curvature <= _FLAT * _norm(xi) * model_curvature():
        return 0.0, 0.0, "flat: |Hξ̃| ≤ 1e-12·|Hv| (random v, all entries, same size)"
    den = max(curvature, _TINY)
    return float(_norm(total)) / den, float(_norm(left)) / den, "|Hξ̃| (random ξ̃, same entries)"


_FLAT = 1e-12


def _model_curvature(ev: Evaluator, gen: torch.Generator) -> float:
    """|H v| for a random unit v over every parameter."""
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in ev.params.items()}
    norm = _norm(v)
    return float(_norm(hvp(ev.loss, ev.params, {n: t / norm for n, t in v.items()})))


def _eps_gradient(pred: Tensor, coeffs: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """∇_θ Σ_j c_j pred_j(θ): the part of H ξ + Dξᵀ g that the eps prediction accounts for."""
    names = list(params)
    grads = torch.autograd.grad((coeffs * pred).sum(), [params[n] for n in names],
                                retain_graph=True, allow_unused=True)  # fmt: skip
    return {n: torch.zeros_like(params[n]) if d is None else d.detach()
            for n, d in zip(names, grads, strict=True)}  # fmt: skip


def check(
    model: nn.Module,
    batch: tuple[Any, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    families: list[Family] | None = None,
    *,
    mode: str = "train",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """G1/G2 residuals of every family of ``model`` (detected on ``batch[0]`` if not given).

    Returns one dict per family with keys ``layer``, ``symmetry``, ``groups``, ``confirmed``,
    ``g1``, ``eps_bound``, ``g1_minus_eps``, ``g2``, ``g2_minus_eps``, ``g2_denominator``,
    ``exact`` and ``eps``
    (the normalisation eps involved, 0.0 if none). ``mode`` is as in :func:`confirm`; the model
    is not changed.
    """
    if families is None:
        from .detect import detect

        families = detect(model, batch[0])
    if mode not in ("train", "as_is"):
        raise ValueError(f"check(mode={mode!r}): mode must be 'train' or 'as_is'")
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    with evaluation_mode(model, train=mode == "train"), math_attention():
        ev = Evaluator(model, batch, loss_fn, seed)
        live = {n: p.clone().requires_grad_(True) for n, p in ev.params.items()}
        _, stats = norm_stats(ev, families, params=live, create_graph=True)
        g = torch.func.grad(ev.loss)(ev.params)
        total_g = sum(float((t**2).sum()) for t in g.values()) ** 0.5
        model_curvature = functools.cache(lambda: _model_curvature(ev, gen))  # once, if asked
        for i, fam in enumerate(families):
            validate_family(fam, ev.params)
            xi = generator(ev.params, fam)
            names = family_params(fam)
            dots = group_sum({n: g[n] * xi[n] for n in names}, fam)
            g_norm = group_sum({n: g[n] ** 2 for n in names}, fam).sqrt()
            xi_norm = group_sum({n: xi[n] ** 2 for n in names}, fam).sqrt()
            den = torch.where(g_norm > _FLAT * total_g, g_norm * xi_norm, torch.zeros_like(g_norm))
            pred_live = stats[i].g1_prediction() if i in stats else None
            pred = pred_live.detach() if pred_live is not None else torch.zeros_like(dots)
            coeffs = torch.randn(fam.n_groups, generator=gen, dtype=torch.float64)
            eps_part = None if pred_live is None else _eps_gradient(pred_live, coeffs, live)
            g2, g2_left, g2_den = _g2(ev, g, fam, coeffs, eps_part, gen, model_curvature)
            rows.append(
                {
                    "layer": fam.layer,
                    "symmetry": fam.symmetry,
                    "groups": fam.n_groups,
                    "confirmed": fam.confirmed,
                    "g1": _ratio(dots, den),
                    "eps_bound": _ratio(pred, den),
                    "g1_minus_eps": _ratio(dots - pred, den),
                    "g2": g2,
                    "g2_minus_eps": g2_left,
                    "g2_denominator": g2_den,
                    "exact": i not in stats,
                    "eps": stats[i].eps if i in stats else 0.0,
                }
            )
    return rows


def format_check(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`check` rows."""
    head = (
        f"{'layer':<48} {'symmetry':<12} {'groups':>6} {'G1':>9} {'eps G1':>9} {'G1-eps':>9} "
        f"{'G2':>9} {'G2-eps':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer'][:48]:<48} {r['symmetry']:<12} {r['groups']:>6} {r['g1']:9.1e} "
            f"{r['eps_bound']:9.1e} {r['g1_minus_eps']:9.1e} {r['g2']:9.1e} {r['g2_minus_eps']:9.1e}"
            + ("" if r["exact"] else f"  (eps={r['eps']:g})")
        )
    return "\n".join(lines)
