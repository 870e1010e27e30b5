"""Framework callbacks: :mod:`symmech.integrations.lightning` (``SymmechCallback``) and
:mod:`symmech.integrations.huggingface` (``SymmechTrainerCallback``).

Each module imports its framework (``pip install "symmech[lightning]"`` or ``"symmech[hf]"``);
this package imports neither. The top layer of the pipeline: it imports the runtime, nothing
imports it. What the two callbacks share (writing the run's files) lives here.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from symmech.errors import BindingError, explain
from symmech.runtime.attach import bindings_from_families, detection_input, split_example
from symmech.runtime.sinks import write_records

if TYPE_CHECKING:  # torch comes with the runtime; imported here only for the type hints
    import torch

    from symmech.runtime.binding import Binding

#: The values ``log_to`` may take in the callbacks (``None``: log nothing while training).
LOG_TO = ("logger", "self.log", None)


def check_log_every(call: str, log_every: Any) -> int:
    """``log_every`` as a positive int, or a clear error quoting the call."""
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise BindingError(explain(call, f"log_every must be an int ≥ 1, got {log_every!r}"))
    return log_every


def detect_bindings(
    model: torch.nn.Module,
    example: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    prefix: str = "",
) -> list[Binding]:
    """Bindings of the symmetries :func:`symmech.detect` finds in ``model`` on ``example`` (an
    input, or an ``(x, y)`` batch that confirms each family with ``loss_fn``). ``prefix`` is
    taken off the layer labels (a wrapper's attribute name)."""
    from symmech.model.detect import detect

    x, batch = split_example(model, example, "detect_bindings")
    found = list(detect(model, detection_input(x, batch), loss_fn=loss_fn, confirm_batch=batch))
    bindings = bindings_from_families(model, found)
    if prefix:  # every name in the label that starts with it, wherever it stands
        name_start = re.compile(rf"(?<![\w.]){re.escape(prefix)}")
        for b in bindings:
            b.layer = name_start.sub("", b.layer)
    return bindings


def write_run(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write a tracker's records (``records.parquet`` when pyarrow is installed, else
    ``records.csv``) and, when matplotlib is installed, ``theory_vs_observed.png``.

    Under ``torch.distributed`` ``tracker.records()`` is a collective call: every rank makes it,
    then only the writing rank calls this.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
