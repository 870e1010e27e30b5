"""An independent NumPy evaluator of every law (Green's kernels, exact step transitions).

It shares no code with the symbolic engine or the generated trackers, so tests can compare them.
"""

from .numeric_laws import SGDHyper, predict_laws

__all__ = ["SGDHyper", "predict_laws"]
