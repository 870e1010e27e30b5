"""Bad input to the engine gets an error of the right class whose message names the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch

import symmech
from symmech import (
    Block,
    Constant,
    NotASymmetryError,
    NotDerivableError,
    SpecError,
    Symmetry,
    alpha,
    derive,
    library,
    load_spec,
    ones,
)

theta = Block("theta")


# -- the action itself --------------------------------------------------------------------------
def test_action_that_is_not_the_identity_at_e() -> None:
    bad = Symmetry("bad", {theta: theta + (alpha + 1) * ones(theta)}, identity=0)
    with pytest.raises(SpecError, match=r"ψ\(θ, 0\) ≠ θ for block 'theta'.*theta \+ 1"):
        derive(bad)


def test_multiplicative_action_declared_additive() -> None:
    """αθ with identity 0 gives ψ(θ, 0) = 0: the message suggests checking the identity."""
    with pytest.raises(SpecError, match=r"ψ\(θ, 0\) ≠ θ.*identity \(0 for additive"):
        derive(Symmetry("scale0", {theta: alpha * theta}, identity=0))


@pytest.mark.parametrize(
    "coefficient",
    [alpha ** sp.Rational(1, 3), sp.Abs(alpha)],
    ids=["cube_root", "abs"],
)
def test_action_not_differentiable_at_the_identity(coefficient) -> None:
    # ψ(θ, 0) = θ holds, so this is caught by the differentiability check, not the identity one
    spec = Symmetry("kink", {theta: theta + coefficient * ones(theta)}, identity=0)
    with pytest.raises(SpecError, match=r"not differentiable at the identity α = 0.*'theta'"):
        derive(spec)


def test_abs_reports_both_one_sided_derivatives() -> None:
    spec = Symmetry("kink", {theta: theta + sp.Abs(alpha) * ones(theta)}, identity=0)
    with pytest.raises(SpecError, match=r"→ 1 from the right and -1 from the left"):
        derive(spec)


def test_not_a_group_action() -> None:
    """θ + α²𝟙 is smooth and ψ(θ, 0) = θ, but ψ(ψ(θ, a), b) = θ + (a² + b²)𝟙 ≠ θ + (a + b)²𝟙."""
    spec = Symmetry("square", {theta: theta + alpha**2 * ones(theta)}, identity=0)
    with pytest.raises(SpecError, match=r"not a group action: ψ\(ψ\(θ, a\), b\) ≠ ψ\(θ, a \+ b\)"):
        derive(spec)


def test_not_a_group_action_multiplicative() -> None:
    spec = Symmetry(
        "shift_mul", {theta: alpha * theta + (alpha - 1) ** 2 * ones(theta)}, identity=1
    )
    with pytest.raises(SpecError, match=r"not a group action: ψ\(ψ\(θ, a\), b\) ≠ ψ\(θ, a·b\)"):
        derive(spec)


def test_unknown_block_in_the_image() -> None:
    W = sp.MatrixSymbol("W", theta.shape[0], 1)  # a plain SymPy symbol, not a Block or Constant
    with pytest.raises(SpecError, match=r"unknown block 'W'.*symmech.Block or symmech.Constant"):
        Symmetry("leak", {theta: theta + alpha * W}, identity=0)


def test_action_key_that_is_not_a_block() -> None:
    W = sp.MatrixSymbol("W", 2, 1)
    with pytest.raises(SpecError, match=r"action key W is not a symmech.Block"):
        Symmetry("key", {W: alpha * W}, identity=1)


@pytest.mark.parametrize("identity", [2, -1, 0.5])
def test_identity_must_be_zero_or_one(identity) -> None:
    with pytest.raises(SpecError, match=rf"identity must be 0 or 1, got {identity}"):
        Symmetry("id", {theta: alpha * theta}, identity=identity)


def test_action_without_alpha_and_malformed_images() -> None:
    with pytest.raises(SpecError, match="does not depend on symmech.alpha"):
        Symmetry("still", {theta: 2 * theta}, identity=1)
    with pytest.raises(SpecError, match=r"image of block 'theta' is the scalar alpha"):
        Symmetry("scalar", {theta: alpha}, identity=1)
    with pytest.raises(SpecError, match=r"image of block 'theta' has shape \(n_w, 1\)"):
        Symmetry("shape", {theta: alpha * Block("w")}, identity=1)
    with pytest.raises(SpecError, match="moves no block"):
        Symmetry("empty", {}, identity=0)


def test_bad_blocks_and_constants() -> None:
    with pytest.raises(SpecError, match="must be a Python identifier"):
        Block("1x")
    with pytest.raises(SpecError, match="structure must be one of"):
        Constant("E", shape=(2, 2), structure="orthogonal")
    with pytest.raises(SpecError, match="a symmetric matrix must be square"):
        Constant("E", shape=(2, 3), structure="symmetric")
    with pytest.raises(SpecError, match=r"unknown block 'theta_3'.*\['theta_1', 'theta_2'\]"):
        library.rescale().block("theta_3")
    with pytest.raises(SpecError, match="expected a symmech.Symmetry"):
        derive("scale")  # type: ignore[arg-type]


# -- a loss that does not have the symmetry ------------------------------------------------------
RESIDUAL = r"not invariant under '{}': \|L\(ψ\(θ, α\)\) − L\(θ\)\| = (\d[\d.e+-]*) at α = "


def _residual(err: pytest.ExceptionInfo, name: str) -> float:
    import re

    m = re.search(RESIDUAL.format(name), str(err.value))
    assert m, str(err.value)
    return float(m.group(1))


def test_callable_loss_without_the_symmetry() -> None:
    with pytest.raises(NotASymmetryError, match=RESIDUAL.format("scale")) as err:
        derive(library.scale(), loss=lambda theta: theta.sum())
    assert _residual(err, "scale") > 1e-3  # Σθ changes by (α − 1)Σθ: far from round-off


def test_callable_loss_broken_only_by_a_small_term_is_refused() -> None:
    """A softmax-like loss plus 1e-3·|θ|² breaks translation slightly; it is still caught."""

    def loss(theta: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(theta, 0).sum() - theta[0, 0] + 1e-3 * (theta**2).sum()

    exact = derive(library.translation(), loss=lambda theta: loss(theta) - 1e-3 * (theta**2).sum())
    assert exact.loss_confirmed == "numeric"
    with pytest.raises(NotASymmetryError, match=RESIDUAL.format("translation")) as err:
        derive(library.translation(), loss=loss)
    assert 1e-8 < _residual(err, "translation") < 1.0


def test_sympy_loss_without_the_symmetry_on_an_expm_action() -> None:
    spec = library.linear_pair("symmetric")
    U = spec.block("U")
    with pytest.raises(NotASymmetryError, match=RESIDUAL.format("linear_pair")):
        derive(spec, loss=sp.Trace(U.T * U))


def test_sympy_loss_without_the_symmetry_on_scale() -> None:
    with pytest.raises(NotASymmetryError, match=RESIDUAL.format("scale")):
        derive(library.scale(), loss=sp.Trace(theta.T * theta))


def test_matrix_valued_loss_is_refused() -> None:
    spec = library.linear_pair()
    with pytest.raises(NotASymmetryError, match="is a matrix; give a scalar"):
        derive(spec, loss=spec.block("U"))


# -- spec files ----------------------------------------------------------------------------------
def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "myspec.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_load_spec_without_symmetry(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        from symmech import Block, Symmetry, alpha
        theta = Block("theta")
        SCALE = Symmetry("scale", action={theta: alpha * theta}, identity=1)  # wrong name
        """,
    )
    with pytest.raises(SpecError, match="defines neither SYMMETRY nor SYMMETRIES"):
        load_spec(path)


def test_load_spec_with_something_else_as_symmetry(tmp_path: Path) -> None:
    path = _write(tmp_path, "SYMMETRIES = ['scale']\n")
    with pytest.raises(SpecError, match="'scale' is not a symmech.Symmetry"):
        load_spec(path)


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.py")


def test_load_spec_good_file_derives(tmp_path: Path) -> None:
    """The positive case, so the error cases above are not the only path exercised."""
    path = _write(
        tmp_path,
        """
        from symmech import Block, Symmetry, alpha
        w = Block("w", shape=("m", "n"))
        SYMMETRY = Symmetry("cube", action={w: alpha**3 * w}, identity=1)
        """,
    )
    (spec,) = load_spec(path)
    d = derive(spec)
    W = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(d.evaluate("generator", w=W)["w"], 3 * W)  # d/dα α³ at 1 = 3
    np.testing.assert_allclose(d.evaluate("conserved", w=W), 1.5 * (W**2).sum())


# -- evaluate ------------------------------------------------------------------------------------
def test_evaluate_unknown_name() -> None:
    d = derive(library.scale())
    with pytest.raises(SpecError, match=r"unknown name 'phi'.*known names are .*'theta'"):
        d.evaluate("conserved", phi=np.ones(3))


def test_evaluate_missing_block_value() -> None:
    d = derive(library.rescale())
    with pytest.raises(SpecError, match=r"missing value for 'theta_2'.*needs \['theta_2'\]"):
        d.evaluate("conserved", theta_1=np.ones(3))


def test_evaluate_missing_gradient_and_constant() -> None:
    d = derive(library.linear_pair())
    with pytest.raises(SpecError, match="missing value for 'grad_V'"):
        d.evaluate(
            "gradient_constraint",
            U=np.ones((3, 2)),
            V=np.ones((4, 2)),
            E=np.eye(2),
            grad_U=np.ones((3, 2)),
        )
    with pytest.raises(SpecError, match="missing value for 'E'"):
        d.evaluate("conserved", U=np.ones((3, 2)), V=np.ones((4, 2)))


def test_evaluate_with_nothing_to_infer_a_size_from() -> None:
    """Translation's ξ = 𝟙 needs only a size; with no block bound the message names it."""
    d = derive(library.translation())
    with pytest.raises(SpecError, match="n_theta"):
        d.evaluate("generator")
    np.testing.assert_array_equal(d.evaluate("generator", theta=np.zeros(4))["theta"], np.ones(4))


def test_evaluate_unknown_quantity() -> None:
    d = derive(library.rescale())
    with pytest.raises(NotDerivableError, match=r"unknown quantity.*'conserved'.*'generator'"):
        d.evaluate("nonsense")


def test_evaluate_quantity_that_does_not_exist_for_this_symmetry() -> None:
    d = derive(library.linear_pair("antisymmetric"))
    (A,) = d.symmetry.constants
    with pytest.raises(NotDerivableError, match="has no conserved: Dξ is antisymmetric"):
        d.evaluate("conserved", U=np.ones((3, 2)), V=np.ones((4, 2)), **{A.name: np.zeros((2, 2))})


def test_evaluate_rejects_arrays_whose_sizes_disagree() -> None:
    d = derive(library.scale())
    with pytest.raises(SpecError, match="n_theta"):
        d.evaluate("gradient_constraint", theta=np.ones(3), grad_theta=np.ones(1))


def test_errors_share_a_base_class() -> None:
    for cls in (SpecError, NotASymmetryError, NotDerivableError, symmech.ClosureError):
        assert issubclass(cls, symmech.SymmechError)
    assert issubclass(SpecError, ValueError) and issubclass(NotASymmetryError, ValueError)
