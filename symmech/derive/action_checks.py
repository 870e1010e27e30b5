"""Checks that a declared action is a one-parameter group action, differentiable at the
identity, and a symmetry of a given loss. Each failure raises an error that names the
block, the values tried and the residual measured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import sympy as sp

from symmech.core.expr_eval import evaluate_expr, random_array
from symmech.core.matrix_ops import clean, scalar_coefficients
from symmech.errors import NotASymmetryError, SpecError, explain
from symmech.spec.declare import Symmetry, alpha

from .geometry import instantiate, sample_sizes

LossLike = sp.Basic | Callable[..., object]


def concrete_sizes(
    symmetry: Symmetry, dims: Mapping[str, int] | None = None, base: int = 3
) -> dict:
    sizes = sample_sizes(symmetry, base)
    for sym in list(sizes):
        if dims and sym.name in dims:
            sizes[sym] = int(dims[sym.name])
    return sizes


def random_point(symmetry: Symmetry, sizes: dict, rng: np.random.Generator, extra=()) -> dict:
    """Random float64 values for every block and constant (and extra matrix symbols)."""
    env: dict = dict(sizes)
    for m in list(symmetry.blocks) + list(symmetry.constants) + list(extra):
        shape = tuple(int(sp.sympify(d).xreplace(sizes)) for d in m.shape)
        env[m] = random_array(shape, rng, getattr(m, "structure", "general"))
    return env


def random_alpha(symmetry: Symmetry, rng: np.random.Generator) -> float:
    if symmetry.is_multiplicative:
        return float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    return float(rng.uniform(-1.0, 1.0))


def apply_action(symmetry: Symmetry, env: dict, a: float) -> dict:
    """ψ(θ, a) evaluated numerically: a new environment with the moved blocks replaced."""
    out = dict(env)
    scope = dict(env)
    scope[alpha] = a
    for b in symmetry.action:
        out[b] = evaluate_expr(symmetry.action[b], scope)
    return out


def check_identity(symmetry: Symmetry, rng: np.random.Generator) -> None:
    e = symmetry.identity
    sizes = concrete_sizes(symmetry)
    env = random_point(symmetry, sizes, rng)
    moved = apply_action(symmetry, env, float(e))
    for b in symmetry.action:
        err = float(np.max(np.abs(moved[b] - env[b])))
        if err > 1e-10 * (1 + float(np.max(np.abs(env[b])))):
            at_e = clean(symmetry.action[b].xreplace({alpha: e}))
            raise SpecError(
                explain(
                    f"Symmetry({symmetry.name!r}, identity={e})",
                    f"ψ(θ, {e}) ≠ θ for block '{b.name}': at α = {e} the action gives {sp.sstr(at_e)}"
                    f" (expected {b.name}; max difference {err:.3g})",
                    "check the image or the identity (0 for additive, 1 for multiplicative actions)",
                )
            )


def check_differentiable(symmetry: Symmetry) -> None:
    e = symmetry.identity
    for b, image in symmetry.action.items():
        for f in scalar_coefficients(image, alpha):
            df = sp.diff(f, alpha)
            try:
                right = sp.limit(df, alpha, e, "+")
                left = sp.limit(df, alpha, e, "-")
            except Exception as err:  # pragma: no cover - sympy failure
                raise SpecError(
                    explain(
                        f"Symmetry({symmetry.name!r})", f"cannot take d/dα of {f} at α = {e}: {err}"
                    )
                ) from err
            finite = all(v.is_finite for v in (left, right))
            if not finite or sp.simplify(left - right) != 0:
                raise SpecError(
                    explain(
                        f"Symmetry({symmetry.name!r})",
                        f"the action is not differentiable at the identity α = {e}: in the image of "
                        f"'{b.name}' the coefficient {f} has d/dα → {right} from the right and {left} from the left",
                        "a generator ξ = ∂ψ/∂α|_(α=e) needs a smooth action near the identity",
                    )
                )


def check_group_law(symmetry: Symmetry, rng: np.random.Generator, trials: int = 3) -> None:
    sizes = concrete_sizes(symmetry)
    for _ in range(trials):
        env = random_point(symmetry, sizes, rng)
        a, c = random_alpha(symmetry, rng), random_alpha(symmetry, rng)
        both = a * c if symmetry.is_multiplicative else a + c
        twice = apply_action(symmetry, apply_action(symmetry, env, a), c)
        once = apply_action(symmetry, env, both)
        op = "a·b" if symmetry.is_multiplicative else "a + b"
        for b in symmetry.action:
            err = float(np.max(np.abs(twice[b] - once[b])))
            scale = 1 + float(np.max(np.abs(once[b])))
            if err > 1e-8 * scale:
                raise SpecError(
                    explain(
                        f"Symmetry({symmetry.name!r})",
                        f"not a group action: ψ(ψ(θ, a), b) ≠ ψ(θ, {op}) for block '{b.name}' at a = {a:.4g}, "
                        f"b = {c:.4g} (max difference {err:.3g})",
                        "a one-parameter group needs ψ(ψ(θ, a), b) = ψ(θ, a∘b)",
                    )
                )


def _loss_callable(loss: LossLike, symmetry: Symmetry) -> Callable[[dict], float]:
    if isinstance(loss, sp.Basic):
        if getattr(loss, "is_Matrix", False):
            raise NotASymmetryError(
                explain("derive(..., loss=...)", f"the loss {loss} is a matrix; give a scalar")
            )
        return lambda env: float(evaluate_expr(loss, env))
    import torch

    def call(env: dict) -> float:
        kwargs = {b.name: torch.as_tensor(env[b]) for b in symmetry.blocks}
        for c in symmetry.constants:
            kwargs[c.name] = torch.as_tensor(env[c])
        value = loss(**kwargs)
        return float(value.detach() if hasattr(value, "detach") else value)

    return call


def check_loss_invariance(
    symmetry: Symmetry,
    loss: LossLike,
    rng: np.random.Generator,
    dims: Mapping[str, int] | None = None,
    trials: int = 4,
    rtol: float = 1e-9,
) -> str:
    """Confirm L(ψ(θ, α)) = L(θ); returns "symbolic" or "numeric" (how it was confirmed)."""
    if isinstance(loss, sp.Basic) and not symmetry.uses_matrix_exponential:
        verdict = _symbolic_invariance(symmetry, loss)
        if verdict:
            return "symbolic"
    extra = []
    if isinstance(loss, sp.Basic):
        from sympy.matrices.expressions import MatrixSymbol

        known = set(symmetry.blocks) | set(symmetry.constants)
        extra = [m for m in loss.atoms(MatrixSymbol) if m not in known]
    f = _loss_callable(loss, symmetry)
    sizes = concrete_sizes(symmetry, dims)
    for _ in range(trials):
        env = random_point(symmetry, sizes, rng, extra)
        a = random_alpha(symmetry, rng)
        before, after = f(env), f(apply_action(symmetry, env, a))
        residual = abs(after - before)
        if not np.isfinite(after) or residual > rtol * (1.0 + abs(before)):
            raise NotASymmetryError(
                explain(
                    f"derive({symmetry.name!r}, loss=...)",
                    f"the loss is not invariant under '{symmetry.name}': |L(ψ(θ, α)) − L(θ)| = {residual:.3g} "
                    f"at α = {a:.4g} (L(θ) = {before:.6g}, relative {residual / (1e-300 + abs(before)):.3g})",
                    "check the action, or drop loss= to derive without confirming",
                )
            )
    return "numeric"


def _symbolic_invariance(symmetry: Symmetry, loss: sp.Basic) -> bool:
    """Exact check at small sizes: simplify L(ψ(θ, α)) − L(θ) on explicit matrices."""
    sizes = sample_sizes(symmetry, 2)
    from sympy.matrices.expressions import MatrixSymbol

    images = {}
    for b in symmetry.action:
        images[b], _ = instantiate(symmetry.action[b], symmetry, sizes)
    l0, env = (
        instantiate(loss, symmetry, sizes)
        if not (loss.atoms(MatrixSymbol) - set(symmetry.blocks) - set(symmetry.constants))
        else (None, None)
    )
    if l0 is None:
        return False
    flat_sub = {}
    for b, img in images.items():
        for x, y in zip(env[b], img):
            flat_sub[x] = y
    diff = sp.simplify(sp.expand(sp.sympify(l0).xreplace(flat_sub) - l0))
    return diff == 0
