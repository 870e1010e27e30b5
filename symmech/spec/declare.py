"""Declaring a symmetry: parameter blocks, constants, the group parameter, the action.

A spec is ψ(θ, α) given as the image of each moved parameter block.

>>> from symmech import Block, Symmetry, alpha
>>> theta = Block("theta")
>>> scale = Symmetry("scale", action={theta: alpha * theta}, identity=1)
>>> scale.blocks
(theta,)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path

import sympy as sp
from sympy.matrices.expressions import MatrixExpr, MatrixSymbol

from symmech.core.matrix_ops import MatrixExp, replace_exp_of_matrices
from symmech.errors import SpecError, explain

#: The group parameter α of every spec.
alpha = sp.Symbol("alpha", real=True)


def _dimension(size: str | int | sp.Expr) -> sp.Expr:
    if isinstance(size, int):
        if size <= 0:
            raise SpecError(f"Block shape: sizes must be positive, got {size}")
        return sp.Integer(size)
    if isinstance(size, str):
        return sp.Symbol(size, integer=True, positive=True)
    return sp.sympify(size)


class Block(MatrixSymbol):
    """A parameter block θ_A: a column vector by default, or a matrix ``shape=("n", "r")``.

    >>> Block("theta_1").shape[1]
    1
    >>> Block("U", shape=("n", "r")).shape
    (n, r)
    """

    def __new__(cls, name: str, shape=None, cols=None):
        if cols is not None:  # SymPy rebuilding the node from its args
            return super().__new__(cls, name, shape, cols)
        if not isinstance(name, str) or not name.isidentifier():
            raise SpecError(
                explain(
                    f"Block({name!r})", "the name must be a Python identifier", "e.g. 'theta_1'"
                )
            )
        if shape is None:
            rows = sp.Symbol(f"n_{name}", integer=True, positive=True)
            return super().__new__(cls, name, rows, sp.Integer(1))
        if len(shape) != 2:
            raise SpecError(explain(f"Block({name!r}, shape={shape!r})", "shape must have 2 sizes"))
        return super().__new__(cls, name, _dimension(shape[0]), _dimension(shape[1]))

    @property
    def is_vector(self) -> bool:
        return self.shape[1] == 1


_STRUCTURES = ("general", "symmetric", "antisymmetric")


class Constant(MatrixSymbol):
    """A constant matrix of a spec (such as E in (U, V) ↦ (U e^{αE}, V e^{−αEᵀ})).

    ``structure`` is ``"general"``, ``"symmetric"`` (Eᵀ = E) or ``"antisymmetric"`` (Eᵀ = −E);
    it is carried by the class of the returned symbol, so two constants of the same name but
    different structure are different symbols.
    """

    structure = "general"

    def __new__(cls, name: str, shape=None, cols=None, structure: str = "general"):
        if cols is not None:
            return super().__new__(cls, name, shape, cols)
        if structure not in _STRUCTURES:
            raise SpecError(
                explain(
                    f"Constant({name!r}, structure={structure!r})",
                    f"structure must be one of {_STRUCTURES}",
                )
            )
        if shape is None or len(shape) != 2:
            raise SpecError(explain(f"Constant({name!r})", "give shape=(rows, cols)"))
        rows, cols_ = _dimension(shape[0]), _dimension(shape[1])
        if structure != "general" and rows != cols_:
            raise SpecError(explain(f"Constant({name!r})", f"a {structure} matrix must be square"))
        target = {
            "general": Constant,
            "symmetric": SymmetricConstant,
            "antisymmetric": AntisymmetricConstant,
        }
        return MatrixSymbol.__new__(target[structure], name, rows, cols_)


class SymmetricConstant(Constant):
    """A constant with Eᵀ = E."""

    structure = "symmetric"


class AntisymmetricConstant(Constant):
    """A constant with Eᵀ = −E."""

    structure = "antisymmetric"


def impose_structure(expr):
    """Replace Eᵀ by E (symmetric) or −E (antisymmetric) for every structured constant."""
    if not isinstance(expr, sp.Basic):
        return expr
    rules = {}
    for c in expr.atoms(Constant):
        if c.structure == "symmetric":
            rules[c.T] = c
        elif c.structure == "antisymmetric":
            rules[c.T] = -c
    return expr.xreplace(rules) if rules else expr


def ones(block: MatrixExpr) -> MatrixExpr:
    """The all-ones matrix 𝟙 of a block's shape: ``theta + alpha * ones(theta)``."""
    return sp.OneMatrix(*block.shape)


def _matrix_symbols(expr) -> set[MatrixSymbol]:
    return set(expr.atoms(MatrixSymbol)) if isinstance(expr, sp.Basic) else set()


class Symmetry:
    """A one-parameter group action ψ(θ, α) on parameter blocks.

    Parameters
    ----------
    name: a short identifier ("scale").
    action: ``{block: image}``: the image of each moved block, an expression in the
        blocks, declared constants and :data:`alpha`. Blocks left out are fixed.
    identity: 0 for additive actions (α = 0 is the identity), 1 for multiplicative.
    fixed: further blocks that the loss depends on but the action does not move.
    description: one line shown in listings and LaTeX.
    """

    def __init__(
        self,
        name: str,
        action: Mapping[Block, sp.Basic],
        identity: int = 0,
        fixed: Sequence[Block] = (),
        description: str = "",
    ) -> None:
        call = f"Symmetry({name!r}, ...)"
        if identity not in (0, 1):
            raise SpecError(explain(call, f"identity must be 0 or 1, got {identity!r}"))
        if not action:
            raise SpecError(
                explain(call, "the action moves no block", "give action={block: image}")
            )
        cleaned: dict[Block, MatrixExpr] = {}
        for block, image in action.items():
            if not isinstance(block, Block):
                raise SpecError(
                    explain(
                        call,
                        f"action key {block!r} is not a symmech.Block",
                        "declare it with Block(name)",
                    )
                )
            image = replace_exp_of_matrices(sp.sympify(image))
            if not getattr(image, "is_Matrix", False):
                raise SpecError(
                    explain(
                        call,
                        f"the image of block '{block.name}' is the scalar {image}",
                        "it must be a matrix expression of the block's shape",
                    )
                )
            if image.shape != block.shape:
                raise SpecError(
                    explain(
                        call,
                        f"the image of block '{block.name}' has shape {image.shape}, the block has {block.shape}",
                    )
                )
            cleaned[block] = image
        self.name = name
        self.identity = sp.Integer(identity)
        self.description = description
        self.action: dict[Block, MatrixExpr] = cleaned
        blocks = list(cleaned)
        for b in fixed:
            if b not in blocks:
                blocks.append(b)
        for image in cleaned.values():
            for sym in sorted(_matrix_symbols(image), key=str):
                if isinstance(sym, Block):
                    if sym not in blocks:
                        blocks.append(sym)
                elif not isinstance(sym, Constant):
                    raise SpecError(
                        explain(
                            call,
                            f"unknown block '{sym.name}' in the image {image}",
                            "declare it with symmech.Block or symmech.Constant",
                        )
                    )
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.constants: tuple[Constant, ...] = tuple(
            sorted({c for im in cleaned.values() for c in im.atoms(Constant)}, key=str)
        )
        self._check_alpha_appears(call)

    def _check_alpha_appears(self, call: str) -> None:
        if not any(im.has(alpha) for im in self.action.values()):
            raise SpecError(explain(call, "the action does not depend on symmech.alpha"))

    @property
    def is_multiplicative(self) -> bool:
        return self.identity == 1

    @property
    def uses_matrix_exponential(self) -> bool:
        return any(im.atoms(MatrixExp) for im in self.action.values())

    def block(self, name: str) -> Block:
        """The block called ``name``; the error lists the known names."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise SpecError(
            explain(
                f"{self.name}.block({name!r})",
                f"unknown block '{name}'",
                f"the blocks are {[b.name for b in self.blocks]}",
            )
        )

    def image(self, block: Block) -> MatrixExpr:
        """ψ restricted to one block (the block itself when it is fixed)."""
        return self.action.get(block, block)

    def __repr__(self) -> str:
        parts = ", ".join(f"{b.name} -> {sp.sstr(im)}" for b, im in self.action.items())
        return f"Symmetry({self.name!r}: {parts}; identity={self.identity})"


def load_spec(path: str | Path) -> list[Symmetry]:
    """Load a spec file: a Python file that defines ``SYMMETRY`` or ``SYMMETRIES``."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(explain(f"load_spec({str(path)!r})", "no such file"))
    module_name = f"symmech_spec_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if hasattr(module, "SYMMETRIES"):
        found = list(module.SYMMETRIES)
    elif hasattr(module, "SYMMETRY"):
        found = [module.SYMMETRY]
    else:
        raise SpecError(
            explain(
                f"load_spec({str(path)!r})",
                "the file defines neither SYMMETRY nor SYMMETRIES",
                "add e.g. SYMMETRY = Symmetry('name', action={...}) at module level",
            )
        )
    for s in found:
        if not isinstance(s, Symmetry):
            raise SpecError(
                explain(f"load_spec({str(path)!r})", f"{s!r} is not a symmech.Symmetry")
            )
    return found
