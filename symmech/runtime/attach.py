"""``symmech.track``: one call that attaches every law to a model and its optimizer.

Symmetries are given as bindings (:func:`symmech.bind`) or found automatically from the
model's graph (:func:`symmech.detect`), each detected family confirmed on a batch when one
is given, and turned into bindings.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from symmech.errors import BindingError, explain

from .binding import Binding, BoundSlice, bind
from .distributed import FSDP, ZERO, attach, split_mode, unwrap
from .tracker import Schedule, Tracker, TrackerWarning


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every name of a Parameter used under more than one name (tied weights), to all its names."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {n: group for group in names.values() if len(group) > 1 for n in group}


def bindings_from_families(model: torch.nn.Module, families: Sequence[Any]) -> list[Binding]:
    """Turn detected families (parameter names and dims) into bindings on the model's tensors.

    Each binding gets the family's spec (or built-in name), its constants (moved to the
    parameters' device) and its group labels. Families that failed confirmation, or that touch a
    tied Parameter (one tensor used by several layers), are skipped with a warning that gives
    the reason.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = tied_names(model)
    out = []
    for fam in families:
        shared = sorted(
            {s.param for slices in fam.blocks.values() for s in slices if s.param in tied}
        )
        reason = fam.reason if getattr(fam, "confirmed", None) is False else None
        if shared:
            uses = "; ".join(" = ".join(tied[n]) for n in shared)
            reason = (
                f"it acts on tied weights ({uses}: one Parameter used by several layers); the "
                "gradient sums every use, and the transformation of this layer alone changes the "
                "other uses, so it is not a symmetry of the loss"
            )
        if reason is not None:
            warnings.warn(
                f"symmech: {fam.symmetry} on {fam.layer} not tracked: {reason}",
                TrackerWarning,
                stacklevel=3,
            )
            continue
        blocks = {
            name: [BoundSlice(params[s.param], s.dim, s.view, s.param) for s in slices]
            for name, slices in fam.blocks.items()
        }
        device = next(iter(blocks.values()))[0].tensor.device
        constants = {k: v.to(device) for k, v in (getattr(fam, "constants", None) or {}).items()}
        binding = bind(
            getattr(fam, "spec", None) or fam.symmetry,
            layer=fam.layer,
            constants=constants,
            labels=getattr(fam, "labels", None) or None,
            **blocks,
        )
        binding.detected = True
        out.append(binding)
    return out


def _required_inputs(model: torch.nn.Module) -> int | None:
    """How many positional inputs ``model.forward`` requires (None: cannot tell)."""
    try:
        params = inspect.signature(unwrap(model).forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def split_example(model: torch.nn.Module, example: Any, call: str) -> tuple[Any, Any]:
    """``(inputs, batch)`` from ``example_input``: a pair is an ``(x, y)`` batch (x itself a
    tuple of positional inputs for a model that takes several: ``((x, mask), y)``), a 1-tuple
    of a tuple the inputs alone (``((x, mask),)``), anything else the model's input. A pair of
    tensors for a model whose forward requires two inputs is refused: ``(x, mask)`` must not be
    read as ``(x, y)``."""
    if isinstance(example, (tuple, list)) and len(example) == 1:
        if isinstance(example[0], (tuple, list)):
            return tuple(example[0]), None  # ((x, mask),): the inputs alone
    if not (isinstance(example, (tuple, list)) and len(example) == 2):
        return example, None
    required = _required_inputs(model) or 0
    if isinstance(example[0], torch.Tensor) and required >= 2:
        name = type(unwrap(model)).__name__
        raise BindingError(
            explain(
                f"{call}(..., example_input=(tensor, tensor))",
                f"{name}.forward requires {required} inputs, so this pair could "
                "be its inputs or an (x, y) batch",
                "give example_input=((x, mask), y) to detect and confirm on a batch, or "
                "example_input=((x, mask),) for the inputs alone",
            )
        )
    return example[0], example


def detection_input(x: Any, batch: tuple[Any, Any] | None) -> Any:
    """The input detection runs the model on: ``x``, or only the first samples that confirmation
    reads when ``x`` comes with a batch (the graph needs shapes, and one float32 pass of a large
    batch took longer than confirming: 1.2 s for a ResNet-18 at batch 128)."""
    if batch is None:
        return x
    from symmech.model.evaluator import CONFIRM_SAMPLES, first_samples

    return first_samples(batch, CONFIRM_SAMPLES)[0]


def track(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    symmetries: Sequence[Binding] | Any | None = None,
    log_every: int = 1,
    example_input: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    schedule: Schedule | None = None,
    residuals: bool = True,
    *,
    max_history: int | None = None,
    spill_dir: str | None = None,
    measure_updates: bool = False,
) -> Tracker:
    """Attach the laws of every symmetry to ``optimizer``; the training loop stays as it is.

    ``symmetries``: bindings from :func:`symmech.bind` (or the result of :func:`symmech.detect`);
    when None they are detected from
    the model's graph using ``example_input`` (an input tensor, or an ``(x, y)`` batch, which
    also confirms each family numerically with ``loss_fn``, default cross-entropy; the graph is
    read and the families confirmed on the batch's first 8 samples). Without
    either, the first forward input is captured and the graph is read right before the first
    optimizer step (structure only: give a batch to confirm families numerically).
    ``log_every`` thins the history only (laws update every step); ``schedule(step) -> bool``
    replaces it with any rule. ``residuals=False`` skips the per-step symmetry residual
    rₖ = ⟨ξ, g⟩ (one reduction of θ·g per tensor) and with it the residual-corrected law;
    rₖ is then still measured at logged steps.

    Long runs: ``max_history=N`` keeps at most N logged steps (thinned evenly over the run),
    ``spill_dir=PATH`` writes full chunks of history to disk. ``measure_updates=True`` tracks
    an optimizer symmech does not model (Lion, NAdam, your own) by measuring each step from a
    copy of θₖ kept across it (memory: one copy of the tracked parameters); otherwise its
    families are observed only.

    Under torch.distributed (:mod:`.distributed`): a ``DistributedDataParallel`` model is
    tracked through ``model.module``; with FSDP2 or ``ZeroRedundancyOptimizer`` each rank
    computes its share and ``records()`` (collective) sums them; only rank 0 writes files.
    """
    options = dict(max_history=max_history, spill_dir=spill_dir, measure_updates=measure_updates)
    model = unwrap(model)
    mode = split_mode(model, optimizer)
    if isinstance(symmetries, Binding) or not (
        symmetries is None or isinstance(symmetries, (list, tuple)) or hasattr(symmetries, "path")
    ):
        raise BindingError(
            explain(
                f"track(model, optimizer, {type(symmetries).__name__})",
                "symmetries must be a list of bindings",
                "pass [symmech.bind(...)], or leave it out to detect them",
            )
        )
    if symmetries is None and mode == FSDP:
        raise BindingError(
            explain(
                "track(fully_sharded_model, optimizer)",
                "symmetries cannot be detected on a model whose parameters are sharded DTensors",
                "detect before fully_shard (families = symmech.detect(model, x)) and pass "
                "track(model, optimizer, families) after it, or give bindings",
            )
        )
    if symmetries is None and example_input is None:
        if mode == ZERO:
            raise BindingError(
                explain(
                    "track(model, ZeroRedundancyOptimizer)",
                    "detection on the first step is not available under ZeRO",
                    "give example_input=(x, y) or bindings",
                )
            )
        return _track_detecting_on_first_step(
            model, optimizer, log_every, loss_fn, schedule, residuals, options
        )
    if symmetries is None:
        from symmech.model.detect import detect

        x, batch = split_example(model, example_input, "track")
        symmetries = detect(model, detection_input(x, batch), loss_fn=loss_fn, confirm_batch=batch)
    if not all(isinstance(b, Binding) for b in symmetries):
        families = [b for b in symmetries if not isinstance(b, Binding)]
        if all(hasattr(f, "blocks") and hasattr(f, "symmetry") for f in families):
            symmetries = [b for b in symmetries if isinstance(b, Binding)]
            symmetries += bindings_from_families(model, families)
    for b in symmetries:
        if not isinstance(b, Binding):
            raise BindingError(
                explain(
                    "track(..., symmetries=[...])",
                    f"{b!r} is not a binding",
                    "make one with symmech.bind(...)",
                )
            )
    return attach(
        model,
        optimizer,
        list(symmetries),
        log_every=log_every,
        schedule=schedule,
        residuals=residuals,
        **options,
    )


def _track_detecting_on_first_step(
    model, optimizer, log_every, loss_fn, schedule, residuals, options
) -> Tracker:
    tracker = Tracker(
        model,
        optimizer,
        [],
        log_every=log_every,
        schedule=schedule,
        residuals=residuals,
        **options,
    )
    captured: dict[str, Any] = {}

    def capture(module, args):
        if "x" not in captured and args:
            captured["x"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        return None

    handle = model.register_forward_pre_hook(capture)

    def detect_now() -> list[Binding]:
        handle.remove()
        if "x" not in captured:
            raise BindingError(
                "track(model, optimizer): the model was not called before the first step"
            )
        from symmech.model.detect import detect

        x = captured["x"][0] if len(captured["x"]) == 1 else captured["x"]
        families = list(detect(model, x, loss_fn=loss_fn))
        warnings.warn(
            f"symmech: detected {len(families)} families from the graph on the first step without "
            "confirming them on a batch; pass example_input=(x, y) to confirm each numerically",
            TrackerWarning,
            stacklevel=4,
        )
        return bindings_from_families(model, families)

    tracker.detect_on_first_step(detect_now, hook=handle)
    return tracker
