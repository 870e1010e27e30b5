"""Spec: translation. Softmax is unchanged when the same constant is added to every logit, so the
weights feeding it (each input column across classes, and the bias) can move along 𝟙.
"""

from symmech import Block, Symmetry, alpha, ones

theta = Block("theta")

SYMMETRY = Symmetry(
    "translation",
    action={theta: theta + alpha * ones(theta)},
    identity=0,
    description="Translation of the weights feeding a softmax (each input column across classes, and the bias).",
)
