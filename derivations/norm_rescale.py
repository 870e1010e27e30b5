"""Spec: norm_rescale. A normalisation layer (LayerNorm, BatchNorm, GroupNorm, RMSNorm) ends in an
affine map γᵢ x̂ᵢ + βᵢ per feature i; when its output reaches only linear layers (Linear, conv, with
nothing nonlinear in between), multiplying (γᵢ, βᵢ) by α and input column i of every such layer by
1/α leaves the network unchanged: the rescale action on other blocks.
"""

from symmech import Block, Symmetry, alpha

theta_1 = Block("theta_1")  # (γ_i, β_i): the affine of normalised feature i
theta_2 = Block("theta_2")  # input column i of every layer that reads the normalised output

SYMMETRY = Symmetry(
    "norm_rescale",
    action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha},
    identity=1,
    description=(
        "Rescale of a normalisation's affine (gamma_i, beta_i) against input column i of "
        "every linear layer that reads it."
    ),
)
