"""Built-in symmetries: the paper's three (translation, scale, rescale) and those that go past it
(the quadratic rescale, the linear pair, and the transformer's attention and normalisation symmetries).

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


def _rescale_named(name: str, description: str) -> Symmetry:
    """The rescale action ψ = (αθ₁, α⁻¹θ₂) under another name: a different place in a network."""
    theta_1, theta_2 = Block("theta_1"), Block("theta_2")
    return Symmetry(
        name,
        action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha},
        identity=1,
        description=description,
    )


def norm_rescale() -> Symmetry:
    """ψ = (αθ₁, α⁻¹θ₂): a normalisation's affine (γᵢ, βᵢ) against input column i of its readers.

    The rescale action under its own name: the normalised feature i enters the next layers only
    through (γᵢ x̂ᵢ + βᵢ) times their input column i, with nothing nonlinear in between.
    """
    return _rescale_named(
        "norm_rescale",
        "Rescale of a normalisation's affine (gamma_i, beta_i) against input column i of "
        "every linear layer that reads it.",
    )


def stream_rescale() -> Symmetry:
    """ψ = (αθ₁, α⁻¹θ₂): channel i of a residual stream, written by θ₁ and read by θ₂.

    The rescale action under its own name: every layer that writes into a stream of additions
    (through ReLU, pooling, dropout) has its output channel i scaled by α, every layer that reads
    the stream has its input channel i scaled by 1/α, so the stream's channel i is α times larger
    everywhere between them and the network's output is unchanged.
    """
    return _rescale_named(
        "stream_rescale",
        "Rescale of channel i of a residual stream: output channel i of every layer that "
        "writes into it against input channel i of every layer that reads it.",
    )


def _head_pair(name: str, first: str, second: str, structure: str, description: str) -> Symmetry:
    """(P, R) ↦ (P e^{αE}, R e^{−αEᵀ}) on one head: the linear pair with the head's names."""
    P = Block(first, shape=("n", "r"))
    R = Block(second, shape=("k", "r"))
    E = Constant("E" if structure == "symmetric" else "A", shape=("r", "r"), structure=structure)
    suffix = "" if structure == "symmetric" else f"_{structure}"
    return Symmetry(
        name + suffix,
        action={P: P * expm(alpha * E), R: R * expm(-alpha * E.T)},
        identity=0,
        description=description + (
            " along a symmetric direction E." if structure == "symmetric"
            else f" along a {structure} direction."
        ),
    )  # fmt: skip


def attention_qk(structure: str = "symmetric") -> Symmetry:
    """Per head: (W_Q, W_K) ↦ (e^{αE} W_Q, e^{−αEᵀ} W_K), which leaves every score qᵀk unchanged.

    The blocks are the head's weights transposed, biases appended as a last row:
    Q = [W_Q,h b_Q,h]ᵀ and K = [W_K,h b_K,h]ᵀ, so ψ is the linear pair's. With a symmetric E the
    charge is ½⟨E, QᵀQ − KᵀK⟩ = ½⟨E, C_h⟩, C_h = W_Q W_Qᵀ + b_Q b_Qᵀ − W_K W_Kᵀ − b_K b_Kᵀ.
    """
    return _head_pair(
        "attention_qk", "Q", "K", structure,
        "GL(r) action on one attention head's query and key weights (transposed, bias as the "
        "last row), Q -> Q e^(alpha E), K -> K e^(-alpha E^T), leaving q^T k unchanged,",
    )  # fmt: skip


def attention_vo(structure: str = "symmetric") -> Symmetry:
    """Per head: (W_V, W_O[:, h]) ↦ (e^{αE} W_V, W_O[:, h] e^{−αE}): the head's output is unchanged.

    The blocks are V = [W_V,h b_V,h]ᵀ and O = W_O[:, h]; with a symmetric E the charge is
    ½⟨E, VᵀV − OᵀO⟩, i.e. the matrix W_V W_Vᵀ + b_V b_Vᵀ − W_O[:, h]ᵀ W_O[:, h] is conserved.
    """
    return _head_pair(
        "attention_vo", "V", "O", structure,
        "GL(r) action on one attention head's value weights (transposed, bias as the last row) "
        "and its columns of the output projection, V -> V e^(alpha E), O -> O e^(-alpha E^T),",
    )  # fmt: skip


BUILTIN = {
    "translation": translation,
    "scale": scale,
    "rescale": rescale,
    "quadratic_rescale": quadratic_rescale,
    "linear_pair": linear_pair,
    "linear_pair_antisymmetric": lambda: linear_pair("antisymmetric"),
    "attention_qk": attention_qk,
    "attention_vo": attention_vo,
    "norm_rescale": norm_rescale,
    "stream_rescale": stream_rescale,
}
