"""Framework callbacks: :mod:`symmech.integrations.lightning` (``SymmechCallback``) and
:mod:`symmech.integrations.huggingface` (``SymmechTrainerCallback``).

Each module imports its framework (``pip install "symmech[lightning]"`` or ``"symmech[hf]"``);
this package imports neither. The top layer of the pipeline: it imports the runtime, nothing
imports it. What the two callbacks share (writing the run's files) lives here.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from symmech.errors import BindingError, explain
from symmech.runtime.sinks import write_records

#: The values ``log_to`` may take in the callbacks (``None``: log nothing while training).
LOG_TO = ("logger", "self.log", None)


def check_log_every(call: str, log_every: Any) -> int:
    """``log_every`` as a positive int, or a clear error quoting the call."""
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise BindingError(explain(call, f"log_every must be an int ≥ 1, got {log_every!r}"))
    return log_every


def write_run(tracker: Any, out_dir: str | Path) -> list[Path]:
    """The tracker's records (``records.parquet`` when pyarrow is installed, else
    ``records.csv``) and, when matplotlib is installed, ``theory_vs_observed.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = tracker.records()
    frames = all(importlib.util.find_spec(m) is not None for m in ("pandas", "pyarrow"))
    written = [write_records(rows, out / ("records.parquet" if frames else "records.csv"))]
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn(
            f"symmech: no figure written to {out}: matplotlib is not installed "
            '(pip install "symmech[viz]")',
            stacklevel=2,
        )
    elif rows:
        from symmech.viz.plots import plot_records

        written.append(plot_records(rows, out / "theory_vs_observed.png"))
    return written
