"""Declaring a symmetry: parameter blocks, constants, the group parameter, the action.

A spec is ψ(θ, α) given as the image of each moved parameter block.

>>> from symmech import Block, Symmetry, alpha
>>> theta = Block("theta")
>>> scale = Symmetry("scale", action={theta: alpha * theta}, identity=1)
>>> scale.blocks
(theta,)
"""

from __future__ import annotations

import keyword
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

import sympy as sp
from sympy.matrices.expressions import MatrixExpr, MatrixSymbol

from symmech.core.matrix_ops import MatrixExp, replace_exp_of_matrices
from symmech.errors import SpecError, SymmechError, explain

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

    # θ + α (a scalar added to a matrix) fails deep in SymPy with "Mix of Matrix and Scalar
    # symbols"; these name the block and say what to write instead.
    def __add__(self, other):
        return self._add(other, lambda: super(Block, self).__add__(other), "+")

    def __radd__(self, other):
        return self._add(other, lambda: super(Block, self).__radd__(other), "+")

    def __sub__(self, other):
        return self._add(other, lambda: super(Block, self).__sub__(other), "-")

    def __rsub__(self, other):
        return self._add(other, lambda: super(Block, self).__rsub__(other), "-")

    def _add(self, other, combine, op: str):
        try:
            return combine()
        except TypeError as err:
            if getattr(other, "is_Matrix", False):
                raise
            raise _ScalarPlusBlockError(
                explain(
                    f"{self.name} {op} {other}",
                    f"a scalar added to the matrix block '{self.name}'",
                    f"to move every entry write {self.name} {op} ({other})*ones({self.name})",
                )
            ) from err


class _ScalarPlusBlockError(SpecError, TypeError):
    """A scalar added to a block: a :class:`SpecError` that is still the TypeError SymPy raised."""


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


def is_safe_name(name: object) -> bool:
    """A symmetry name usable as a file and module name: a Python identifier, not a keyword.

    >>> is_safe_name("quadratic_rescale"), is_safe_name("../x"), is_safe_name("class")
    (True, False, False)
    """
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def _stray_symbols(image: sp.Basic) -> list[sp.Symbol]:
    """The scalar symbols of ``image`` other than α and the sizes of its matrices."""
    matrices = image.atoms(MatrixExpr)
    sizes = {s for m in matrices for d in m.shape for s in sp.sympify(d).free_symbols}
    scalars = {s for s in image.free_symbols if not isinstance(s, MatrixSymbol)}
    return sorted(scalars - sizes - {alpha}, key=str)


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
        if not is_safe_name(name):
            raise SpecError(
                explain(
                    call,
                    f"the name {name!r} is not a Python identifier",
                    "it names the generated file <name>.py; use letters, digits and _, "
                    "e.g. 'my_rescale'",
                )
            )
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
            if not isinstance(b, Block):
                raise SpecError(
                    explain(
                        call,
                        f"fixed block {b!r} is not a symmech.Block",
                        "declare it with Block(name)",
                    )
                )
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
            sorted(
                {c for im in cleaned.values() for c in im.atoms(Constant)},
                key=lambda c: (str(c), c.structure),  # one order for two constants of one name
            )
        )
        self._check_names_distinct(call)
        self._check_no_stray_symbols(call)
        self._check_alpha_appears(call)

    def _check_names_distinct(self, call: str) -> None:
        seen: dict[str, MatrixSymbol] = {}
        for m in (*self.blocks, *self.constants):
            other = seen.setdefault(m.name, m)
            if other is not m and other != m:
                raise SpecError(
                    explain(
                        call,
                        f"two different matrices are both called '{m.name}': "
                        f"{_describe(other)} and {_describe(m)}",
                        "give each block and constant its own name, or reuse the same object",
                    )
                )

    def _check_no_stray_symbols(self, call: str) -> None:
        for block, image in self.action.items():
            stray = _stray_symbols(image)
            if not stray:
                continue
            names = ", ".join(f"'{s}'" for s in stray)
            problem = f"the image of block '{block.name}' has the free symbol {names} besides α"
            fix = "the action may use only symmech.alpha, blocks and declared constants"
            if any(s.name == "alpha" for s in stray):
                problem = f"the image of block '{block.name}' uses a Symbol 'alpha' of its own"
                fix = "use symmech.alpha (from symmech import alpha), not a new Symbol('alpha')"
            raise SpecError(explain(call, f"{problem}: {sp.sstr(image)}", fix))

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


def _describe(m: MatrixSymbol) -> str:
    kind = "Block" if isinstance(m, Block) else f"{getattr(m, 'structure', 'general')} Constant"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind} of shape {m.shape}"


def load_spec(path: str | Path) -> list[Symmetry]:
    """Load a spec file: a Python file that defines ``SYMMETRY`` or ``SYMMETRIES``.

    Every failure, including an exception while running the file, is a :class:`SpecError` that
    names the file (and the line, when the file raised).
    """
    path = Path(path)
    call = f"load_spec({str(path)!r})"
    if not path.is_file():
        raise SpecError(explain(call, "no such file"))
    module = _run_spec_file(path, call)
    has_many, has_one = hasattr(module, "SYMMETRIES"), hasattr(module, "SYMMETRY")
    if has_many and has_one:
        raise SpecError(
            explain(call, "the file defines both SYMMETRY and SYMMETRIES", "keep one of them")
        )
    if has_many:
        found = module.SYMMETRIES
        if not isinstance(found, (list, tuple)):
            raise SpecError(
                explain(
                    call,
                    f"SYMMETRIES is a {type(found).__name__}, not a list",
                    "write SYMMETRIES = [Symmetry(...), ...]",
                )
            )
        if not found:
            raise SpecError(
                explain(call, "SYMMETRIES is empty", "put at least one Symmetry(...) in it")
            )
        found = list(found)
    elif has_one:
        found = [module.SYMMETRY]
    else:
        raise SpecError(
            explain(
                call,
                "the file defines neither SYMMETRY nor SYMMETRIES",
                "add e.g. SYMMETRY = Symmetry('name', action={...}) at module level",
            )
        )
    for s in found:
        if not isinstance(s, Symmetry):
            raise SpecError(
                explain(
                    call,
                    f"{_short(s)} is not a symmech.Symmetry",
                    "SYMMETRY (or each entry of SYMMETRIES) must be Symmetry(...)",
                )
            )
    check_unique_names(found, call)
    return found


def check_unique_names(symmetries: Sequence[Symmetry], call: str) -> None:
    """Refuse two symmetries of one name: their generated files would overwrite each other."""
    seen: set[str] = set()
    for s in symmetries:
        if s.name in seen:
            raise SpecError(
                explain(
                    call,
                    f"two symmetries are named {s.name!r}",
                    "their generated files would overwrite each other; give each its own name",
                )
            )
        seen.add(s.name)


def _short(value: object, width: int = 60) -> str:
    return _clip(repr(value), width)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _run_spec_file(path: Path, call: str) -> types.ModuleType:
    """Execute a spec file as a fresh module; any failure becomes one line naming file:line."""
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SpecError(
            explain(call, "the file is not UTF-8 text", "a spec file is Python source")
        ) from None
    except OSError as err:
        raise SpecError(explain(call, f"cannot read the file: {err.strerror}")) from None
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as err:
        line = f"{path}:{err.lineno}" if err.lineno else str(path)
        raise SpecError(
            explain(call, f"{line}: SyntaxError: {err.msg}", "fix the Python syntax of the spec")
        ) from None
    except ValueError as err:  # null bytes in older Pythons
        raise SpecError(explain(call, f"{path}: not Python source ({err})")) from None
    module = types.ModuleType(f"symmech_spec_{path.stem}")
    module.__file__ = str(path)
    try:
        exec(code, module.__dict__)
    except (Exception, SystemExit) as err:
        where = _line_in(err, str(path), source)
        if isinstance(err, SymmechError):  # already says what is wrong and what to do
            raise SpecError(f"{call}: {where}: {_one_line(err)}.") from err
        fix = "fix the spec file"
        if isinstance(err, TypeError) and "Mix of Matrix and Scalar" in str(err):
            fix = "a scalar cannot be added to a matrix; write theta + alpha * ones(theta)"
        problem = f"{where}: {type(err).__name__}: {_one_line(err)}"
        raise SpecError(explain(call, problem, fix)) from err
    return module


def _line_in(err: BaseException, filename: str, source: str) -> str:
    """``file:line (the source line)`` of the deepest frame of ``err`` inside the spec file."""
    lineno = None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if lineno is None:
        return filename
    lines = source.splitlines()
    text = _clip(lines[lineno - 1], 80) if 0 < lineno <= len(lines) else ""
    return f"{filename}:{lineno}" + (f" ({text})" if text else "")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.rstrip(".") or "(no message)"
