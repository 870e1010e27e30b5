"""Spec beyond the paper: the GL(r) symmetry of one attention head's queries and keys.

A head's scores are qᵀk = xᵀ W_Qᵀ W_K x' (biases as an extra input 1), unchanged by
(W_Q, W_K) -> (e^{αE} W_Q, e^{-αEᵀ} W_K) for any r×r matrix E. The blocks are the head's rows of
torch's weights transposed, bias appended as a last row: Q = [W_Q,h b_Q,h]ᵀ, K = [W_K,h b_K,h]ᵀ,
so the action is the linear pair's (Q, K) -> (Q e^{αE}, K e^{-αEᵀ}). Along a symmetric E the
charge is ½⟨E, QᵀQ − KᵀK⟩: the matrix C_h = W_Q W_Qᵀ + b_Q b_Qᵀ − W_K W_Kᵀ − b_K b_Kᵀ is
conserved under gradient flow. (A rotary embedding between the projections and the scores breaks
this symmetry for every E that does not commute with the rotation.)
"""

from symmech import Block, Constant, Symmetry, alpha, expm

Q = Block("Q", shape=("n", "r"))  # [W_Q,h  b_Q,h]ᵀ: the head's query weights, transposed
K = Block("K", shape=("k", "r"))  # [W_K,h  b_K,h]ᵀ: the head's key weights, transposed

E = Constant("E", shape=("r", "r"), structure="symmetric")

SYMMETRY = Symmetry(
    "attention_qk",
    action={Q: Q * expm(alpha * E), K: K * expm(-alpha * E.T)},
    identity=0,
    description=(
        "GL(r) action on one attention head's query and key weights (transposed, bias as the "
        "last row), Q -> Q e^(alpha E), K -> K e^(-alpha E^T), leaving q^T k unchanged, "
        "along a symmetric direction E."
    ),
)
