"""Built-in symmetries: the paper's three (translation, scale, rescale) and two that go past it.

>>> from symmech import library, derive
>>> derive(library.rescale()).conserved
<theta_1, theta_1>/2 - <theta_2, theta_2>/2
"""

from __future__ import annotations

from symmech.core.matrix_ops import expm

from .declare import Block, Constant, Symmetry, alpha, ones


def translation() -> Symmetry:
    """ψ(θ, α) = θ + α𝟙: softmax is unchanged when a constant is added to every logit."""
    theta = Block("theta")
    return Symmetry(
        "translation",
        action={theta: theta + alpha * ones(theta)},
        identity=0,
        description="Translation of the weights feeding a softmax (each input column across classes, and the bias).",
    )


def scale() -> Symmetry:
    """ψ(θ, α) = αθ: a layer followed by a normalisation is unchanged by rescaling its weights."""
    theta = Block("theta")
    return Symmetry(
        "scale",
        action={theta: alpha * theta},
        identity=1,
        description="Scale of the weights (and bias) of a channel followed by BatchNorm.",
    )


def rescale() -> Symmetry:
    """ψ = (αθ₁, α⁻¹θ₂): a positively homogeneous activation between two layers."""
    theta_1, theta_2 = Block("theta_1"), Block("theta_2")
    return Symmetry(
        "rescale",
        action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha},
        identity=1,
        description="Rescale of a hidden unit around a ReLU: incoming weights (and bias) vs. outgoing weights.",
    )


def quadratic_rescale() -> Symmetry:
    """ψ = (αθ₁, α⁻²θ₂): a hidden unit with the quadratic activation x ↦ x²."""
    theta_1, theta_2 = Block("theta_1"), Block("theta_2")
    return Symmetry(
        "quadratic_rescale",
        action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha**2},
        identity=1,
        description="Rescale of a hidden unit with a quadratic activation: incoming weights vs. outgoing weights.",
    )


def linear_pair(structure: str = "symmetric") -> Symmetry:
    """(U, V) ↦ (U e^{αE}, V e^{−αEᵀ}) for a linear two-layer network f(x) = V Uᵀ x.

    With a symmetric E the charge is ½⟨E, UᵀU − VᵀV⟩ for every E, so the matrix
    UᵀU − VᵀV (balancedness) is conserved; with an antisymmetric E there is no charge.
    """
    U = Block("U", shape=("d", "r"))
    V = Block("V", shape=("k", "r"))
    E = Constant("E" if structure == "symmetric" else "A", shape=("r", "r"), structure=structure)
    name = "linear_pair" if structure == "symmetric" else f"linear_pair_{structure}"
    return Symmetry(
        name,
        action={U: U * expm(alpha * E), V: V * expm(-alpha * E.T)},
        identity=0,
        description=_LINEAR_PAIR_DESCRIPTIONS.get(
            structure,
            f"GL(r) action on a pair of linear layers, f(x) = V U^T x, along a {structure} direction.",
        ),
    )


_LINEAR_PAIR_DESCRIPTIONS = {
    "symmetric": "GL(r) action on a pair of linear layers, f(x) = V U^T x, along a symmetric direction E.",
    "antisymmetric": "Rotation of the hidden space of a pair of linear layers, f(x) = V U^T x.",
}


BUILTIN = {
    "translation": translation,
    "scale": scale,
    "rescale": rescale,
    "quadratic_rescale": quadratic_rescale,
    "linear_pair": linear_pair,
    "linear_pair_antisymmetric": lambda: linear_pair("antisymmetric"),
}
