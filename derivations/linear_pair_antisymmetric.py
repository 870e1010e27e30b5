"""Spec beyond the paper: the linear pair (U, V) -> (U e^{αA}, V e^{-αAᵀ}) along an antisymmetric
A (a rotation of the hidden space). Dξ is antisymmetric, so gradient flow conserves no charge and
symmech says so instead of deriving a law.
"""

from symmech import Block, Constant, Symmetry, alpha, expm

U = Block("U", shape=("d", "r"))
V = Block("V", shape=("k", "r"))
A = Constant("A", shape=("r", "r"), structure="antisymmetric")

SYMMETRY = Symmetry(
    "linear_pair_antisymmetric",
    action={U: U * expm(alpha * A), V: V * expm(-alpha * A.T)},
    identity=0,
    description="Rotation of the hidden space of a pair of linear layers, f(x) = V U^T x.",
)
