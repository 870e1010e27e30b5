"""The names of the laws, as every layer spells them (records, CSV columns, figures, tables).

* ``gradient_flow``: Q conserved, what the symmetry alone promises;
* ``continuous``: the paper's modified flow, ``first_order`` without momentum (M1) and
  ``second_order`` with heavy-ball momentum (M2);
* ``discrete``: the exact step-by-step law of ``torch.optim.SGD``, predicted from Q₀ alone;
* ``discrete_residual``: the same law fed the measured symmetry residual rₖ = ⟨ξ, g⟩.

Under an adaptive optimizer (Adam, AdamW, RMSprop, Adagrad) or per-tensor hyperparameters the
exact discrete law takes the measured ⟨ξ, a⟩ of the update direction; the continuous models do
not close there and are absent. Beside the laws every tracked row carries the anatomy of the
change since the start (:data:`ANATOMY`, which adds up to ``discrete_residual`` − Q₀) and, for
scale groups, the rotation of the weights (:data:`ROTATION`).

>>> LAWS
('gradient_flow', 'continuous', 'discrete', 'discrete_residual')
"""

from __future__ import annotations

GRADIENT_FLOW = "gradient_flow"
CONTINUOUS = "continuous"
DISCRETE = "discrete"
DISCRETE_RESIDUAL = "discrete_residual"
FIRST_ORDER = "first_order"
SECOND_ORDER = "second_order"

DQ_DECAY = "dQ_decay"
DQ_BREAKING = "dQ_breaking"
DQ_STEP = "dQ_step"
DQ_HISTORY = "dQ_history"
ANGULAR_UPDATE = "angular_update"
ANGULAR_EQUILIBRIUM = "angular_equilibrium"
EQUILIBRIUM = "equilibrium"

#: The laws a tracker reports per step and group, in the order of tables and figures.
LAWS: tuple[str, ...] = (GRADIENT_FLOW, CONTINUOUS, DISCRETE, DISCRETE_RESIDUAL)
#: The continuous models behind ``continuous`` (which one applies depends on the momentum).
CONTINUOUS_MODELS: tuple[str, ...] = (FIRST_ORDER, SECOND_ORDER)
#: What the law stepper advances: every law but ``continuous``, which is one of its models.
PREDICTIONS: tuple[str, ...] = (
    GRADIENT_FLOW,
    DISCRETE,
    DISCRETE_RESIDUAL,
    FIRST_ORDER,
    SECOND_ORDER,
)
#: The parts of Q − Q₀ since tracking started (or the laws last restarted): weight decay (coupled
#: or decoupled), what breaks the symmetry (the residual rₖ and a preconditioner's ⟨ξ, a⟩), the
#: finite-step ½η² term, and the share of a momentum buffer that existed before tracking began.
ANATOMY: tuple[str, ...] = (DQ_DECAY, DQ_BREAKING, DQ_STEP, DQ_HISTORY)
#: Scale groups: the angle between θₖ₋₁ and θₖ (radians), its random-walk equilibrium for the
#: optimizer's settings, and the Q where the exact law stands still under the step's forcing.
ROTATION: tuple[str, ...] = (ANGULAR_UPDATE, ANGULAR_EQUILIBRIUM, EQUILIBRIUM)
#: Not record columns: the last step's ΔQ and ⟨δ, Jδ⟩ (δ = θₖ − θₖ₋₁) of a scale group, both sums
#: over entries, from which ``angular_update`` is rebuilt when ranks hold parts of every group.
ROTATION_PARTS: tuple[str, ...] = ("rotation_dq", "rotation_delta_sq")
