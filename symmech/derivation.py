"""The derive verb and the derivation it returns (declare → derive → read properties).

>>> import symmech
>>> d = symmech.derive(symmech.library.scale())
>>> d.conserved
<theta, theta>/2
>>> import numpy as np
>>> float(d.evaluate("conserved", theta=np.array([3.0, 4.0])))
12.5
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import sympy as sp
from sympy.matrices.expressions import MatrixExpr, MatrixSymbol

from symmech.core.expr_eval import evaluate_expr
from symmech.derive.action_checks import (
    LossLike,
    check_differentiable,
    check_group_law,
    check_identity,
    check_loss_invariance,
)
from symmech.derive.geometry import AffineStructure, Geometry
from symmech.derive.noether import NoetherResult, noether_charge
from symmech.spec.declare import Block, Constant, Symmetry, alpha

from .errors import NotDerivableError, SpecError, explain


class Derivation:
    """Everything symmech derives for one symmetry; read the results as properties."""

    def __init__(
        self,
        symmetry: Symmetry,
        loss: LossLike | None = None,
        dims: Mapping[str, int] | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(symmetry, Symmetry):
            raise SpecError(explain(f"derive({symmetry!r})", "expected a symmech.Symmetry"))
        rng = np.random.default_rng(seed)
        check_identity(symmetry, rng)
        check_differentiable(symmetry)
        check_group_law(symmetry, rng)
        self.symmetry = symmetry
        self.loss_confirmed: str | None = None
        if loss is not None:
            self.loss_confirmed = check_loss_invariance(symmetry, loss, rng, dims)
        self._geometry = Geometry(symmetry)
        self._noether: NoetherResult = noether_charge(self._geometry)
        self._dynamics = None

    # -- results -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.symmetry.name

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.symmetry.blocks

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def generator(self) -> dict[Block, MatrixExpr]:
        """ξ_B = ∂ψ_B/∂α at the identity, per block."""
        return dict(self._geometry.generator)

    @property
    def gradient_constraint(self) -> sp.Expr:
        """G1: the expression ⟨g, ξ⟩, which vanishes at every θ."""
        return self._geometry.gradient_constraint

    @property
    def hessian_constraint(self) -> dict[Block, MatrixExpr]:
        """G2: what (Hξ)_B equals, namely −(Dξᵀ g)_B, per block."""
        return dict(self._geometry.hessian_constraint)

    @property
    def hessian_quadratic_form(self) -> sp.Expr:
        """G3: what ξᵀHξ equals, namely −ξᵀDξᵀg."""
        return self._geometry.hessian_quadratic

    @property
    def equivariance(self) -> dict[Block, MatrixExpr]:
        """E1: g_B(θ) = [(∂ψ/∂θ)ᵀ g̃]_B with g̃ = ∇L(ψ(θ, α)); E2 uses :attr:`action_linear_part`."""
        out = self._geometry.equivariance
        missing = [b.name for b, v in out.items() if v is None]
        if missing:
            raise NotDerivableError(
                explain(
                    f"{self.name}.equivariance", f"the action is not affine in the blocks {missing}"
                )
            )
        return dict(out)

    @property
    def action_linear_part(self) -> dict[Block, MatrixExpr]:
        """A_B(θ) = ψ_B(θ, α) − ψ_B(0, α); E2 reads H(θ) = Aᵀ H(ψ(θ, α)) A."""
        return self._geometry.action_linear_part

    @property
    def affine(self) -> AffineStructure:
        """ξ = Jθ + c read per block, with the verdicts affine / J symmetric."""
        return self._geometry.affine

    @property
    def conserved(self) -> sp.Expr | None:
        """The Noether charge Q (∇Q = ξ) conserved by gradient flow, or None (see why_no_conserved)."""
        return self._noether.charge

    @property
    def why_no_conserved(self) -> str:
        """Why there is no conserved quantity ('' when there is one)."""
        return self._noether.why_none

    @property
    def conserved_matrices(self) -> dict[Constant, MatrixExpr]:
        """For a generator linear in a symmetric constant E: M with Q = ⟨M, E⟩ for every E,
        so the whole symmetric matrix M is conserved (e.g. balancedness UᵀU − VᵀV)."""
        return dict(self._noether.conserved_matrices)

    @property
    def dynamics(self):
        """The learning-dynamics laws (see :mod:`symmech.laws.continuous`), derived on first access."""
        if self._dynamics is None:
            from symmech.laws.continuous import derive_dynamics

            self._dynamics = derive_dynamics(self)
        return self._dynamics

    # -- numeric evaluation ------------------------------------------------------------
    def _quantity(self, quantity: str):
        g = self._geometry
        table: dict[str, Any] = {
            "generator": g.generator,
            "gradient_constraint": g.gradient_constraint,
            "hessian_constraint": g.hessian_constraint,
            "hessian_quadratic_form": g.hessian_quadratic,
            "equivariance": g.equivariance,
            "action": {b: self.symmetry.image(b) for b in self.blocks},
            "action_linear_part": g.action_linear_part,
            "conserved": self.conserved,
            "conserved_matrix": next(iter(self.conserved_matrices.values()), None),
        }
        if self._dynamics is not None or quantity.startswith("data:"):
            table.update(self.dynamics.evaluable())
        if quantity not in table:
            raise NotDerivableError(
                explain(
                    f"evaluate({quantity!r})", "unknown quantity", f"choose one of {sorted(table)}"
                )
            )
        value = table[quantity]
        if value is None:
            why = self.why_no_conserved or "it could not be derived for this symmetry"
            raise NotDerivableError(
                explain(f"evaluate({quantity!r})", f"{self.name} has no {quantity}: {why}")
            )
        return value

    def _symbols_by_name(self) -> dict[str, sp.Basic]:
        g = self._geometry
        names: dict[str, sp.Basic] = {b.name: b for b in self.blocks}
        names.update({c.name: c for c in self.symmetry.constants})
        names.update({s.name: s for s in g.grad.values()})
        names.update({s.name: s for s in g.grad_image.values()})
        names["alpha"] = alpha
        if self._dynamics is not None:
            names.update(self._dynamics.symbols_by_name())
        return names

    def evaluate(self, quantity: str, **arrays: Any):
        """Evaluate a derived quantity on concrete NumPy or torch arrays bound by name.

        Blocks bind by their names (``theta_1=w1``), gradients as ``grad_<block>``, the
        gradient at ψ(θ, α) as ``gradimage_<block>``, constants by name, and ``alpha``.
        Vector blocks may be 1-D. Per-block results come back as ``{block name: array}``.
        """
        value = self._quantity(quantity)
        names = self._symbols_by_name()
        env: dict[sp.Basic, Any] = {}
        vector_input = False
        for key, arr in arrays.items():
            if key not in names:
                raise SpecError(
                    explain(
                        f"evaluate({quantity!r}, {key}=...)",
                        f"unknown name '{key}'",
                        f"known names are {sorted(names)}",
                    )
                )
            sym = names[key]
            if isinstance(sym, MatrixSymbol) and getattr(arr, "ndim", 2) == 1:
                arr = arr.reshape(-1, 1)
                vector_input = True
            env[sym] = arr
        backend = (
            "torch"
            if any(type(a).__module__.startswith("torch") for a in arrays.values())
            else "numpy"
        )

        def one(expr):
            try:
                out = evaluate_expr(expr, env, backend=backend)
            except ValueError as err:
                raise SpecError(explain(f"evaluate({quantity!r})", str(err))) from None
            except KeyError as err:
                needed = sorted(
                    s.name
                    for s in expr.free_symbols
                    if isinstance(s, (MatrixSymbol, sp.Symbol)) and s not in env
                )
                raise SpecError(
                    explain(
                        f"evaluate({quantity!r})",
                        f"missing value for {err}",
                        f"this quantity needs {needed}",
                    )
                ) from None
            if (
                getattr(out, "ndim", 0) == 2
                and out.shape == (1, 1)
                and not isinstance(expr, MatrixExpr)
            ):
                out = out[0, 0]
            if vector_input and getattr(out, "ndim", 0) == 2 and out.shape[1] == 1:
                out = out.reshape(-1)
            return out

        if isinstance(value, dict):
            return {b.name: one(expr) for b, expr in value.items()}
        return one(value)

    # -- export ------------------------------------------------------------------------
    def to_latex(self, standalone: bool = True) -> str:
        """A LaTeX document (or body) showing the derivation step by step."""
        from symmech.export.latex import derivation_to_latex

        return derivation_to_latex(self, standalone=standalone)

    def summary(self) -> str:
        """Readable plain-text summary (used by ``symmech derive``)."""
        from symmech.export.text import derivation_summary

        return derivation_summary(self)

    def __repr__(self) -> str:
        return f"<Derivation of {self.name}: Q = {self.conserved}>"


def derive(
    symmetry: Symmetry,
    loss: LossLike | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
) -> Derivation:
    """Check ψ and derive its geometry and conservation law.

    ``loss`` (a SymPy scalar in the blocks, or a callable on torch tensors taking the
    blocks by name) is first confirmed to be invariant under ψ. ``dims`` fixes the
    sizes used for numeric checks, e.g. ``{"n_theta": 5}``.
    """
    return Derivation(symmetry, loss=loss, dims=dims, seed=seed)
