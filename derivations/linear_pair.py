"""Spec beyond the paper: the GL(r) symmetry of a linear two-layer network f(x) = V Uᵀ x.

(U, V) -> (U e^{αE}, V e^{-αEᵀ}) leaves V Uᵀ unchanged for any r×r matrix E. Along a symmetric E the
Noether charge is ½⟨E, UᵀU − VᵀV⟩ for every E, so the whole matrix UᵀU − VᵀV is conserved
(balancedness); along an antisymmetric E, Dξ is antisymmetric and no charge exists.
"""

from symmech import Block, Constant, Symmetry, alpha, expm

U = Block("U", shape=("d", "r"))  # first layer, transposed: W1 = Uᵀ
V = Block("V", shape=("k", "r"))  # second layer: W2 = V

E_sym = Constant("E", shape=("r", "r"), structure="symmetric")

SYMMETRIES = [
    Symmetry(
        "linear_pair",
        action={U: U * expm(alpha * E_sym), V: V * expm(-alpha * E_sym.T)},
        identity=0,
        description="GL(r) action on a pair of linear layers, f(x) = V U^T x, along a symmetric direction E.",
    ),
]
