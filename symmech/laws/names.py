"""The names of the laws, as every layer spells them (records, CSV columns, figures, tables).

* ``gradient_flow``: Q conserved, what the symmetry alone promises;
* ``continuous``: the paper's modified flow, ``first_order`` without momentum (M1) and
  ``second_order`` with heavy-ball momentum (M2);
* ``discrete``: the exact step-by-step law of ``torch.optim.SGD``, predicted from Q₀ alone;
* ``discrete_residual``: the same law fed the measured symmetry residual rₖ = ⟨ξ, g⟩.

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
