"""Find the symmetry groups of a PyTorch model from its graph (torch.fx), then confirm them.

The graph is read by :mod:`.graph`, the families found by the rules of :mod:`.rules` (translation,
scale, rescale) and, on a traced graph, of :mod:`.attention`, :mod:`.norms` and :mod:`.transformer`.

When ``torch.fx.symbolic_trace`` fails (Hugging Face models, shape-dependent Python) the graph of
``torch.export.export(strict=False)`` is read instead, mapped back to the model's leaf modules
(:mod:`.export_graph`; ``path == "export"``, and a note says so). When that fails too
(data-dependent control flow) the module calls are recorded with forward hooks and linked by
tensor identity (``path == "modules"``); that path cannot see functional operations between
modules, so :func:`detect` warns and asks for confirmation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .actions import DetectionResult, SymmetryWarning, format_table
from .evaluator import CONFIRM_SAMPLES
from .graph import Op, export_graph, fx_graph, module_graph
from .rules import families as find_families
from .rules import note as _note
from .trace import Trace

__all__ = ["DetectionResult", "SymmetryWarning", "detect", "format_table"]


def _read_graph(
    model: nn.Module, example_input: Any, notes: list[str]
) -> tuple[list[Op] | None, str, Trace | None]:
    """The graph by torch.fx, else by torch.export (non-strict, mapped back to modules), else by
    recorded module calls (with a warning), else None."""
    name = type(model).__name__
    try:
        ops, trace = fx_graph(model, example_input)
        return ops, "fx", trace
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    try:
        ops, trace = export_graph(model, example_input)
    except Exception as exc:  # noqa: BLE001 - then the module calls
        export_reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    else:
        _note(
            notes,
            f"detect({name}): torch.fx.symbolic_trace failed ({reason}); read the graph of "
            "torch.export.export(strict=False) instead: aten operations mapped back to the "
            "leaf modules they ran in (nn_module_stack) and to the torch functions they implement",
        )
        return ops, "export", trace
    try:
        ops = module_graph(model, example_input)
    except Exception as exc:  # noqa: BLE001 - never raise from detection
        _note(
            notes,
            f"detect({name}): the model could not be run on example_input "
            f"({type(exc).__name__}: {exc}); no symmetry detected",
        )
        return None, "none", None
    _note(
        notes,
        f"detect({name}): torch.fx.symbolic_trace failed ({reason}) and so did torch.export "
        f"({export_reason}); fell back to recording module calls in execution order. This path "
        "cannot see functional operations between modules (residual additions, torch.* calls), "
        "so confirm the families on a batch (confirm_batch=...)",
    )
    return ops, "modules", None


def detect(
    model: nn.Module,
    example_input: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    confirm_batch: tuple[Any, Tensor] | None = None,
    *,
    n_trials: int = 3,
    confirm_samples: int | None = CONFIRM_SAMPLES,
) -> DetectionResult:
    """Find the symmetry families of ``model`` (translation, scale, rescale, attention heads,
    norm_rescale); confirm them on a batch.

    ``example_input`` is one input the model accepts (a tensor or a tuple of positional
    arguments; for a Hugging Face model the ``input_ids``, whose ``ModelOutput`` is read through
    its ``logits``); it is run once to learn shapes, without changing the model. With
    ``confirm_batch=(x, y)`` each family is checked numerically (see :func:`confirm`) with
    ``loss_fn`` (default: the model's own loss when its forward takes ``labels``, else
    cross-entropy), on its first ``confirm_samples`` samples (None: all of them; a symmetry of
    the loss holds on any batch, and the tracker measures its residual on every training batch
    after). Problems are reported as :class:`SymmetryWarning`, never raised: the result's
    ``path`` ("fx", "export" or "modules") says how the graph was read and ``notes`` what was
    left out.
    """
    notes: list[str] = []
    ops, path, trace = _read_graph(model, example_input, notes)
    if ops is None:
        return DetectionResult([], path, notes)
    families = find_families(ops, notes, trace)
    if not families:
        _note(
            notes,
            f"detect({type(model).__name__}): no symmetry found: the output is not produced by "
            "an nn.Linear, no Conv/Linear feeds a normalisation layer alone, and no "
            "layer → homogeneous activation → layer chain without branching exists",
        )
    result = DetectionResult(families, path, notes)
    if confirm_batch is not None and families:
        from .confirm import confirm

        try:
            confirm(
                model, result, confirm_batch, loss_fn, n_trials=n_trials, samples=confirm_samples
            )
        except Exception as exc:  # noqa: BLE001 - detection never breaks training
            _note(notes, f"confirmation failed ({type(exc).__name__}: {exc}); left unconfirmed")
    return result
