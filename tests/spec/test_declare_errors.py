"""Malformed declarations and spec files are refused with one clear line naming the culprit."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import sympy as sp

from symmech import Block, Constant, SpecError, Symmetry, alpha, load_spec, ones

theta = Block("theta")
U = Block("U", shape=("d", "r"))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# -- Symmetry(...) -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image", [alpha * sp.Symbol("beta") * theta, theta + sp.Symbol("c") * alpha * ones(theta)]
)
def test_free_symbol_other_than_alpha_is_refused_at_construction(image) -> None:
    with pytest.raises(
        SpecError,
        match=r"Symmetry\('s', \.\.\.\): the image of block 'theta' has the free symbol '(beta|c)' besides α",
    ):
        Symmetry("s", {theta: image}, identity=1)


def test_a_symbol_called_alpha_that_is_not_symmech_alpha() -> None:
    own = sp.Symbol("alpha")  # no real=True: a different symbol from symmech.alpha
    with pytest.raises(SpecError, match=r"uses a Symbol 'alpha' of its own.*use symmech\.alpha"):
        Symmetry("s", {theta: own * theta}, identity=1)


def test_sizes_of_the_blocks_are_not_stray_symbols() -> None:
    """A size symbol (the rows of θ) may appear in an image: α^(n_θ)·θ is accepted."""
    (n,) = theta.shape[0].free_symbols
    spec = Symmetry("sized", {theta: alpha**n * theta}, identity=1)
    assert spec.action[theta].has(n)


@pytest.mark.parametrize(
    "make, shown",
    [
        (lambda: theta + alpha, r"theta \+ alpha"),
        (lambda: alpha + theta, r"theta \+ alpha"),
        (lambda: theta - 1, r"theta - 1"),
        (lambda: 2 - theta, r"theta - 2"),
        (lambda: U + alpha, r"U \+ alpha"),
    ],
)
def test_scalar_added_to_a_block_names_the_block(make, shown) -> None:
    with pytest.raises(
        SpecError,
        match=rf"^{shown}: a scalar added to the matrix block '(theta|U)'.*ones\((theta|U)\)",
    ) as err:
        make()
    assert isinstance(err.value, TypeError)  # still the TypeError SymPy raised for this


def test_matrix_plus_matrix_still_works() -> None:
    assert (theta + alpha * ones(theta)).shape == theta.shape
    assert (theta - theta).shape == theta.shape


@pytest.mark.parametrize("name", ["../x", "a/b", "my-sym", "", "class", "x.py", 3])
def test_unsafe_symmetry_names_are_refused(name) -> None:
    with pytest.raises(
        SpecError,
        match=r"the name .* is not a Python identifier.*generated file",
    ):
        Symmetry(name, {theta: alpha * theta}, identity=1)  # type: ignore[arg-type]


def test_two_blocks_of_one_name_are_refused() -> None:
    other = Block("theta", shape=(2, 3))
    with pytest.raises(
        SpecError,
        match=r"two different matrices are both called 'theta': a Block of shape \(n_theta, 1\) and a Block of shape \(2, 3\)",
    ):
        Symmetry("twins", {theta: alpha * theta, other: alpha * other}, identity=1)


def test_a_block_and_a_constant_of_one_name_are_refused() -> None:
    E = Constant("U", shape=("r", "r"))
    with pytest.raises(SpecError, match=r"both called 'U': a Block .* and a general Constant"):
        Symmetry("clash", {U: U + alpha * U * E}, identity=0)


def test_constants_of_one_name_and_different_structure_are_refused() -> None:
    S = Constant("E", shape=("r", "r"), structure="symmetric")
    A = Constant("E", shape=("r", "r"), structure="antisymmetric")
    with pytest.raises(
        SpecError, match=r"both called 'E': an antisymmetric Constant .* and a symmetric Constant"
    ):
        Symmetry("clash", {U: U + alpha * U * (S + A)}, identity=0)


def test_the_same_block_object_twice_is_one_block() -> None:
    spec = Symmetry("same", {theta: alpha * theta}, fixed=[Block("theta")], identity=1)
    assert spec.blocks == (theta,)


def test_fixed_must_hold_blocks() -> None:
    with pytest.raises(SpecError, match=r"fixed block 'w' is not a symmech.Block"):
        Symmetry("s", {theta: alpha * theta}, identity=1, fixed=["w"])  # type: ignore[list-item]


# -- spec files ----------------------------------------------------------------------------------
def _spec(tmp_path: Path, body: str, name: str = "myspec.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


HEADER = """
from symmech import Block, Symmetry, alpha, ones
theta = Block("theta")
"""


def test_syntax_error_shows_file_and_line(tmp_path: Path) -> None:
    path = _spec(tmp_path, HEADER + "SYMMETRY = Symmetry('s', action={theta: alpha * theta)\n")
    with pytest.raises(SpecError, match=rf"{path}:3: SyntaxError: closing parenthesis"):
        load_spec(path)


def test_name_error_shows_file_line_and_source(tmp_path: Path) -> None:
    path = _spec(tmp_path, HEADER + "SYMMETRY = Symmetry('s', action={theta: beta * theta})\n")
    with pytest.raises(
        SpecError,
        match=rf"{path}:3 \(SYMMETRY = Symmetry\('s', .*\): NameError: name 'beta' is not defined",
    ) as err:
        load_spec(path)
    _one_line(err)


def test_missing_import(tmp_path: Path) -> None:
    path = _spec(tmp_path, "from symmech import Blok\n")
    with pytest.raises(SpecError, match=rf"{path}:1 .*ImportError: cannot import name 'Blok'"):
        load_spec(path)


def test_any_exception_while_running_the_file(tmp_path: Path) -> None:
    path = _spec(tmp_path, HEADER + "def f():\n    return 1 / 0\nx = f()\n")
    with pytest.raises(
        SpecError, match=rf"{path}:4 \(return 1 / 0\): ZeroDivisionError: division by zero"
    ):
        load_spec(path)
    exits = _spec(tmp_path, "raise SystemExit(3)\n", "exits.py")
    with pytest.raises(SpecError, match=r"exits.py:1 .*SystemExit: 3"):
        load_spec(exits)


def test_a_declaration_error_inside_a_file_names_the_line(tmp_path: Path) -> None:
    path = _spec(
        tmp_path, HEADER + "SYMMETRY = Symmetry('s', action={theta: theta + alpha}, identity=0)\n"
    )
    with pytest.raises(
        SpecError, match=rf"{path}:3 .*theta \+ alpha: a scalar added to the matrix block 'theta'"
    ):
        load_spec(path)
    nested = _spec(
        tmp_path, HEADER + "X = Symmetry('s', action={theta: 2 * theta + alpha})\n", "n.py"
    )
    with pytest.raises(
        SpecError, match=r"n.py:3 .*Mix of Matrix and Scalar.*alpha \* ones\(theta\)"
    ):
        load_spec(nested)


@pytest.mark.parametrize(
    "body, message",
    [
        ("SYMMETRIES = []\n", "SYMMETRIES is empty"),
        ("SYMMETRIES = ()\n", "SYMMETRIES is empty"),
        ("SYMMETRIES = 5\n", "SYMMETRIES is a int, not a list"),
        ("SYMMETRIES = 'scale'\n", "SYMMETRIES is a str, not a list"),
        ("SYMMETRY = 3\n", "3 is not a symmech.Symmetry"),
        ("SYMMETRY = [SCALE]\n", r"\[Symmetry\('scale'.* is not a symmech.Symmetry"),
        ("SYMMETRY = SCALE\nSYMMETRIES = [SCALE]\n", "defines both SYMMETRY and SYMMETRIES"),
        ("S = SCALE\n", "defines neither SYMMETRY nor SYMMETRIES"),
        ("SYMMETRIES = [SCALE, SCALE]\n", "two symmetries are named 'scale'"),
    ],
)
def test_what_the_file_defines(tmp_path: Path, body: str, message: str) -> None:
    path = _spec(
        tmp_path,
        HEADER + "SCALE = Symmetry('scale', action={theta: alpha * theta}, identity=1)\n" + body,
    )
    with pytest.raises(SpecError, match=message) as err:
        load_spec(path)
    assert str(err.value).startswith(f"load_spec({str(path)!r}): ")
    _one_line(err)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.py"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(SpecError, match="not UTF-8 text"):
        load_spec(path)


def test_a_good_file_still_loads_and_leaves_no_bytecode(tmp_path: Path) -> None:
    path = _spec(
        tmp_path,
        HEADER + "SYMMETRIES = [Symmetry('t', action={theta: theta + alpha * ones(theta)})]\n",
    )
    (spec,) = load_spec(path)
    assert spec.name == "t" and spec.blocks == (theta,)
    assert not (tmp_path / "__pycache__").exists()
