"""``SymmechTrainerCallback``: the laws of a model's symmetries, tracked by ``transformers.Trainer``.

>>> from symmech.integrations.huggingface import SymmechTrainerCallback   # doctest: +SKIP
>>> trainer = transformers.Trainer(model, args, train_dataset=data,  # doctest: +SKIP
...                                callbacks=[SymmechTrainerCallback(example_input=batch)])

On ``on_train_begin`` the Trainer hands every callback ``model`` (the unwrapped model) and
``optimizer`` (accelerate's ``AcceleratedOptimizer``, whose ``.optimizer`` is the torch one
the tracker hooks; its ``step`` runs the torch optimizer's step, hooks included). Symmetries
are bindings you give, or found by :func:`symmech.detect` on the model's ``logits`` (a
``ModelOutput`` is read through a thin wrapper): from ``example_input`` (a dict of model inputs,
or ``input_ids``; with ``labels`` each family is confirmed on it), else from the inputs of the
first training forward, right before the first optimizer step.

``on_log`` adds the per-layer summaries of the latest tracked step
(:func:`symmech.runtime.sinks.layer_summaries`) to the logs and to ``state.log_history``;
reporting callbacks that come before this one in the Trainer's list (``report_to``) have
already written theirs, so use :func:`symmech.runtime.sinks.log_to_tensorboard` for
TensorBoard. ``on_train_end`` writes the records and the figure to ``out_dir`` on the main
process. The Trainer's default optimizer, AdamW, is adaptive: each family says whether its
laws cover it (``tracker.summary()``), and is ``observed only`` with the reason where not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from symmech.errors import BindingError, explain
from symmech.runtime.attach import track
from symmech.runtime.binding import Binding
from symmech.runtime.error_scale import merge_scales, term_scales
from symmech.runtime.sinks import layer_summaries
from symmech.runtime.tracker import Tracker

from . import check_log_every, detect_bindings, write_run

__all__ = ["SymmechTrainerCallback", "torch_optimizer"]

_WRAPPED = "model."  # the attribute of the wrapper below, taken off the layer labels


class _Logits(torch.nn.Module):
    """``model(**inputs).logits``: a tensor out, so the output layer can be found."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> torch.Tensor:
        out = self.model(**inputs) if isinstance(inputs, Mapping) else self.model(inputs)
        return getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's (or any) wrapper with an ``.optimizer``."""
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BindingError(
            explain(
                "SymmechTrainerCallback.on_train_begin",
                f"the Trainer passed optimizer={type(optimizer).__name__}, not a torch optimizer",
            )
        )
    return optimizer


def _example(inputs: Any) -> Any:
    """(inputs without labels, labels) when the inputs carry labels, else the inputs."""
    if isinstance(inputs, Mapping) and inputs.get("labels") is not None:
        return ({k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"])
    return inputs


class SymmechTrainerCallback(TrainerCallback):
    """Track the model's symmetries during ``Trainer.train``; ``.tracker`` is the live tracker.

    ``symmetries``: bindings, or a function of the model returning them; None detects them
    (see the module docstring) with ``loss_fn`` (default cross-entropy on the logits) for the
    confirmation. ``log_every``: optimizer steps between the tracker's history rows (default:
    ``args.logging_steps`` when it is a whole number). ``per_group`` adds per-group scalars.
    """

    def __init__(
        self,
        symmetries: Sequence[Binding]
        | Callable[[torch.nn.Module], Sequence[Binding]]
        | None = None,
        log_every: int | None = None,
        out_dir: str | Path | None = None,
        example_input: Any = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        per_group: bool = False,
    ) -> None:
        if log_every is not None:
            check_log_every(f"SymmechTrainerCallback(log_every={log_every!r})", log_every)
        self.symmetries = symmetries
        self.log_every = log_every
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.example_input = example_input
        self.loss_fn = loss_fn
        self.per_group = per_group
        self.tracker: Tracker | None = None
        self.logged: dict[int, dict[str, float]] = {}  # every summary added to the logs, by step
        self.written: list[Path] = []
        self._last: int | None = None
        self._terms: dict[tuple[str, str], float] = {}

    def _bindings(self, model: torch.nn.Module, example: Any) -> list[Binding]:
        if self.symmetries is not None:
            found = self.symmetries(model) if callable(self.symmetries) else self.symmetries
            return list(found)
        return detect_bindings(_Logits(model), _example(example), self.loss_fn, _WRAPPED)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.tracker is not None:
            self.tracker.detach()
        if model is None:
            raise BindingError(
                explain("SymmechTrainerCallback.on_train_begin", "the Trainer passed no model")
            )
        opt = torch_optimizer(optimizer)
        steps = getattr(args, "logging_steps", 1)
        every = self.log_every or (int(steps) if steps >= 1 and steps == int(steps) else 1)
        self._last, self.logged = None, {}
        if self.symmetries is not None or self.example_input is not None:
            bindings = self._bindings(model, self.example_input)
            self.tracker = track(model, opt, bindings, log_every=every)
        else:
            self.tracker = track(model, opt, [], log_every=every)
            self._detect_on_first_step(model)
        self._terms = term_scales(self.tracker.families)

    def _detect_on_first_step(self, model: torch.nn.Module) -> None:
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            if "inputs" not in captured:
                inputs = dict(kwargs) if kwargs else (args[0] if args else None)
                if inputs is not None:
                    captured["inputs"] = inputs
            return None

        handle = model.register_forward_pre_hook(capture, with_kwargs=True)

        def detect_now() -> list[Binding]:
            handle.remove()
            if "inputs" not in captured:
                raise BindingError(
                    explain(
                        "SymmechTrainerCallback",
                        "the model was not called before the first optimizer step",
                        "pass example_input=",
                    )
                )
            return self._bindings(model, captured["inputs"])

        assert self.tracker is not None
        self.tracker.detect_on_first_step(detect_now, hook=handle)

    def summaries(self) -> dict[int, dict[str, float]]:
        """The per-layer scalars of the steps tracked since the last call, by tracker step."""
        if self.tracker is None:
            return {}
        self._terms = merge_scales(self._terms, term_scales(self.tracker.families))
        out = layer_summaries(
            self.tracker.records(),
            per_group=self.per_group,
            since_step=self._last,
            terms=self._terms,
        )
        if out:
            self._last = max(out)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        summaries = self.summaries()
        if not summaries or logs is None:
            return
        latest = summaries[max(summaries)]
        self.logged[max(summaries)] = latest
        logs.update(latest)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(latest)

    def on_train_end(self, args, state, control, **kwargs):
        if self.out_dir is None or self.tracker is None:
            return
        rows = self.tracker.records()  # on every process: collective under torch.distributed
        if state.is_world_process_zero:
            self.written = write_run(rows, self.out_dir)
