"""Spec: scale. A channel followed by BatchNorm is unchanged when its weights and bias are
multiplied by α > 0 (exactly so as BatchNorm's eps → 0).
"""

from symmech import Block, Symmetry, alpha

theta = Block("theta")

SYMMETRY = Symmetry(
    "scale",
    action={theta: alpha * theta},
    identity=1,
    description="Scale of the weights (and bias) of a channel followed by BatchNorm.",
)
