"""Spec beyond the paper: the GL(r) symmetry of one attention head's values and output columns.

Head h adds W_O[:, h] Σ_t a_t (W_V,h x_t + b_V,h) to the output (the attention weights a_t sum to
one), unchanged by (W_V,h, W_O[:, h]) -> (e^{αE} W_V,h, W_O[:, h] e^{-αE}). The blocks are
V = [W_V,h b_V,h]ᵀ (torch's rows of the head, transposed, bias as a last row) and O = W_O[:, h],
so the action is the linear pair's. Along a symmetric E the charge is ½⟨E, VᵀV − OᵀO⟩: the matrix
W_V W_Vᵀ + b_V b_Vᵀ − W_O[:, h]ᵀ W_O[:, h] is conserved under gradient flow.
"""

from symmech import Block, Constant, Symmetry, alpha, expm

V = Block("V", shape=("n", "r"))  # [W_V,h  b_V,h]ᵀ: the head's value weights, transposed
O = Block("O", shape=("k", "r"))  # W_O[:, h]: the head's columns of the output projection

E = Constant("E", shape=("r", "r"), structure="symmetric")

SYMMETRY = Symmetry(
    "attention_vo",
    action={V: V * expm(alpha * E), O: O * expm(-alpha * E.T)},
    identity=0,
    description=(
        "GL(r) action on one attention head's value weights (transposed, bias as the last row) "
        "and its columns of the output projection, V -> V e^(alpha E), O -> O e^(-alpha E^T), "
        "along a symmetric direction E."
    ),
)
