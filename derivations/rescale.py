"""Spec: rescale. ReLU is positively homogeneous, relu(αx) = α relu(x) for α > 0, so a hidden unit's
incoming weights (and bias) can be multiplied by α and its outgoing weights divided by α.
"""

from symmech import Block, Symmetry, alpha

theta_1 = Block("theta_1")  # incoming row of the hidden unit, with its bias
theta_2 = Block("theta_2")  # outgoing column

SYMMETRY = Symmetry(
    "rescale",
    action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha},
    identity=1,
    description="Rescale of a hidden unit around a ReLU: incoming weights (and bias) vs. outgoing weights.",
)
