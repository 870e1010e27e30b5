"""Geometry of a symmetry: generator ξ, gradient constraint (G1), Hessian constraint (G2, G3),
equivariance (E1, E2) and the affine structure ξ = Jθ + c.

All results are SymPy matrix expressions in the blocks and their companions
(g for the gradient, g̃ for the gradient at ψ(θ, α), δ for a direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions import MatAdd, MatrixExpr, MatrixSymbol, ZeroMatrix

from symmech.core.expr_eval import evaluate_expr, explicit_matrix
from symmech.core.linear_maps import NotAffineError, adjoint_apply, linear_part
from symmech.core.matrix_ops import Inner, MatrixExp, clean, d_alpha, expand_inner
from symmech.errors import SpecError, explain
from symmech.spec.declare import Block, Symmetry, alpha, impose_structure

_COMPANION_LATEX: dict[str, str] = {}


class Companion(MatrixSymbol):
    """A matrix shaped like a block that stands for a related quantity (its gradient,
    a momentum buffer, a direction); printed in LaTeX as e.g. ``g_{\\theta_{1}}``."""

    def _latex(self, printer) -> str:
        return _COMPANION_LATEX.get(self.name, self.name)


def companion(block: Block, prefix: str, latex_head: str) -> Companion:
    """The companion of ``block`` named ``{prefix}_{block.name}``."""
    name = f"{prefix}_{block.name}"
    block_tex = sp.latex(block)
    _COMPANION_LATEX[name] = latex_head.replace("#", block_tex)
    return Companion(name, *block.shape)


def gradient_symbol(block: Block) -> Companion:
    return companion(block, "grad", "g_{#}")


def image_gradient_symbol(block: Block) -> Companion:
    return companion(block, "gradimage", r"\tilde{g}_{#}")


@dataclass(frozen=True)
class AffineStructure:
    """ξ(θ) = Jθ + c, read block by block: ``J_apply[B]`` is (Jθ)_B, ``offset[B]`` is c_B."""

    is_affine: bool
    is_symmetric: bool
    J_apply: dict[Block, MatrixExpr]
    offset: dict[Block, MatrixExpr]
    why: str = ""

    @property
    def has_linear_part(self) -> bool:
        return any(not isinstance(clean(v), ZeroMatrix) for v in self.J_apply.values())

    @property
    def has_offset(self) -> bool:
        return any(not isinstance(clean(v), ZeroMatrix) for v in self.offset.values())


def sample_sizes(symmetry: Symmetry, base: int = 2) -> dict[sp.Symbol, int]:
    """Distinct small sizes for every dimension symbol (exact checks at small sizes)."""
    dims: set[sp.Symbol] = set()
    for b in list(symmetry.blocks) + list(symmetry.constants):
        for d in b.shape:
            dims |= set(sp.sympify(d).free_symbols)
    return {d: base + i for i, d in enumerate(sorted(dims, key=str))}


def instantiate(expr, symmetry: Symmetry, sizes: dict[sp.Symbol, int]):
    """Evaluate ``expr`` on explicit SymPy matrices of scalar symbols at the given sizes.

    Matrix exponentials stay symbolic: each becomes a matrix of fresh symbols.
    """
    env: dict = dict(sizes)

    def concrete(shape):
        return tuple(int(sp.sympify(d).xreplace(sizes)) for d in shape)

    for b in symmetry.blocks:
        env[b] = explicit_matrix(b, *concrete(b.shape))
    for c in symmetry.constants:
        env[c] = explicit_matrix(c, *concrete(c.shape), structure=c.structure)
    for i, m in enumerate(sorted(expr.atoms(MatrixExp), key=sp.default_sort_key)):
        placeholder = MatrixSymbol(f"expm{i}", *m.shape)
        env[placeholder] = explicit_matrix(placeholder, *concrete(m.shape))
        expr = expr.xreplace({m: placeholder})
    return evaluate_expr(expr, env, backend="sympy"), env


def flat(matrices) -> sp.Matrix:
    return sp.Matrix([x for m in matrices for x in m])


class Geometry:
    """The geometric consequences of a symmetry (docs/theory.md, "Geometry")."""

    def __init__(self, symmetry: Symmetry) -> None:
        self.symmetry = symmetry
        self.blocks = symmetry.blocks
        self.grad = {b: gradient_symbol(b) for b in self.blocks}
        self.grad_image = {b: image_gradient_symbol(b) for b in self.blocks}
        self.generator = self._generator()
        self.gradient_constraint: sp.Expr = expand_inner(
            sp.Add(*[Inner(self.grad[b], xi) for b, xi in self.generator.items()])
        )
        self.dxi_t_g = self._dxi_transpose_g()
        self.hessian_constraint = {b: clean(-v) for b, v in self.dxi_t_g.items()}
        self.hessian_quadratic = expand_inner(
            sp.Add(*[-Inner(self.generator[b], self.dxi_t_g[b]) for b in self.blocks])
        )
        self.equivariance = self._equivariance()
        self.affine = self._affine_structure()

    # -- generator ---------------------------------------------------------------------
    def _generator(self) -> dict[Block, MatrixExpr]:
        e = self.symmetry.identity
        out: dict[Block, MatrixExpr] = {}
        for b in self.blocks:
            image = self.symmetry.image(b)
            try:
                derivative = d_alpha(image, alpha)
            except NotImplementedError as err:
                raise SpecError(
                    explain(
                        f"derive({self.symmetry.name!r})",
                        f"cannot differentiate the image of '{b.name}': {err}",
                    )
                ) from err
            xi = clean(derivative.xreplace({alpha: e}))
            out[b] = clean(impose_structure(clean(xi)))
        return out

    def _adjoints(
        self, maps: dict[Block, MatrixExpr], vectors: dict[Block, MatrixExpr]
    ) -> dict[Block, MatrixExpr | None]:
        """Σ_B' (∂maps_B'/∂θ_B)ᵀ vectors_B' per block B; None where a map is not affine in θ_B."""
        out: dict[Block, MatrixExpr | None] = {}
        for b in self.blocks:
            try:
                terms = [adjoint_apply(maps[b2], b, vectors[b2]) for b2 in maps]
            except NotAffineError:
                out[b] = None
                continue
            terms = [t for t in terms if not isinstance(t, ZeroMatrix)]
            total = (
                MatAdd(*terms) if len(terms) > 1 else (terms[0] if terms else ZeroMatrix(*b.shape))
            )
            out[b] = impose_structure(clean(total))
        return out

    # -- G2 ----------------------------------------------------------------------------
    def _dxi_transpose_g(self) -> dict[Block, MatrixExpr]:
        out = self._adjoints(self.generator, self.grad)
        if any(v is None for v in out.values()):
            raise SpecError(
                explain(
                    f"derive({self.symmetry.name!r})",
                    "the generator is not affine in the blocks, so Dξᵀg has no closed matrix form here",
                    "write the action so that ψ is linear or affine in each block",
                )
            )
        return out  # type: ignore[return-value]

    # -- E1/E2 -------------------------------------------------------------------------
    def _equivariance(self) -> dict[Block, MatrixExpr]:
        images = {b: self.symmetry.image(b) for b in self.blocks}
        return self._adjoints(images, self.grad_image)  # type: ignore[return-value]

    @property
    def action_linear_part(self) -> dict[Block, MatrixExpr]:
        """A_B(θ) = ψ_B(θ, α) − ψ_B(0, α): the linear map in E2 (H(θ) = Aᵀ H(ψ) A)."""
        return {b: linear_part(self.symmetry.image(b), self.blocks) for b in self.blocks}

    # -- affine structure ----------------------------------------------------------------
    def _affine_structure(self) -> AffineStructure:
        offset = {
            b: clean(xi.xreplace({x: ZeroMatrix(*x.shape) for x in self.blocks}))
            for b, xi in self.generator.items()
        }
        j_apply = {b: linear_part(xi, self.blocks) for b, xi in self.generator.items()}
        sym = self.symmetry
        for base in (2, 3):
            sizes = sample_sizes(sym, base)
            xis, _ = zip(*[instantiate(self.generator[b], sym, sizes) for b in self.blocks])
            thetas = [instantiate(b, sym, sizes)[0] for b in self.blocks]
            xi_vec, theta_vec = flat(xis), flat(thetas)
            jac = xi_vec.jacobian(theta_vec)
            if jac.free_symbols & set(theta_vec):
                return AffineStructure(
                    False,
                    False,
                    j_apply,
                    offset,
                    "the generator is not affine in θ (Dξ depends on θ)",
                )
            if not (jac - jac.T).applyfunc(sp.expand).is_zero_matrix:
                return AffineStructure(True, False, j_apply, offset, self._why_not_symmetric(jac))
        return AffineStructure(True, True, j_apply, offset)

    def _why_not_symmetric(self, jac: sp.Matrix) -> str:
        anti = (jac + jac.T).applyfunc(sp.expand).is_zero_matrix
        consts = ", ".join(f"{c.name} ({c.structure})" for c in self.symmetry.constants)
        detail = f" with the constants {consts}" if consts else ""
        if anti:
            return (
                "Dξ is antisymmetric (Dξᵀ = −Dξ)"
                + detail
                + ": ξ is a rotation field, not the gradient of any "
                "function, so gradient flow conserves no Noether charge for this symmetry"
            )
        return (
            "Dξ is not symmetric"
            + detail
            + ": ξ is not a gradient field, so no Noether charge Q with ∇Q = ξ exists"
        )
