"""Spec: stream_rescale. In a residual network the additions x + f(x) join many layers into one
stream: every layer that writes into it (the BatchNorm or conv at the end of each residual branch,
the shortcut's projection, the stem) and every layer that reads it (the first conv of each branch,
the next stage's projection, the head). Passing through ReLU, pooling and dropout, which are
positively homogeneous per channel, the stream's channel i scales with its writers' output channel
i. Multiplying output channel i of every writer by α and input channel i of every reader by 1/α
leaves the network unchanged: the rescale action on other blocks.
"""

from symmech import Block, Symmetry, alpha

theta_1 = Block("theta_1")  # output channel i (weight row and bias, or affine) of every writer
theta_2 = Block("theta_2")  # input channel i of every layer that reads the stream

SYMMETRY = Symmetry(
    "stream_rescale",
    action={theta_1: alpha * theta_1, theta_2: theta_2 / alpha},
    identity=1,
    description=(
        "Rescale of channel i of a residual stream: output channel i of every layer that "
        "writes into it against input channel i of every layer that reads it."
    ),
)
