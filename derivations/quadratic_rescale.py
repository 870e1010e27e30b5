"""Spec beyond the paper: a hidden unit with the quadratic activation x -> x², where
(αw·x)² = α²(w·x)², so the outgoing weights must shrink by α⁻².
"""

from symmech import Block, Symmetry, alpha

theta_1 = Block("theta_1")  # incoming row of the hidden unit
theta_2 = Block("theta_2")  # outgoing column

SYMMETRY = Symmetry(
    "quadratic_rescale",
    action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha**2},
    identity=1,
    description="Rescale of a hidden unit with a quadratic activation: incoming weights vs. outgoing weights.",
)
