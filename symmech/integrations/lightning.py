"""``SymmechCallback``: the laws of a LightningModule's symmetries, tracked while ``Trainer.fit`` runs.

>>> from symmech.integrations.lightning import SymmechCallback     # doctest: +SKIP
>>> trainer = lightning.pytorch.Trainer(callbacks=[SymmechCallback(log_every=10)])  # doctest: +SKIP

On fit start the callback attaches :func:`symmech.track` to the LightningModule itself (an
``nn.Module`` holding every parameter, whether or not it keeps them under ``.model``) and to
each optimizer of ``trainer.optimizers`` (already set up then); under ``strategy="ddp"`` every
rank tracks its own replica, whose parameters are the same on every rank. Every ``log_every``
optimizer steps the per-layer summaries of the steps since the last log
(:func:`symmech.runtime.sinks.layer_summaries`: observed Q, each law, the discrete law's error
relative to the family's scale) go to the trainer's loggers (``log_to="logger"``, at the
tracker's steps) or through ``LightningModule.log`` (``log_to="self.log"``, the latest step,
at Lightning's own logging interval). On fit end, on global rank 0 only, ``out_dir`` receives
the records (Parquet when pyarrow is installed, else CSV) and the figure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from symmech.errors import BindingError, explain
from symmech.runtime.attach import track
from symmech.runtime.binding import Binding
from symmech.runtime.error_scale import merge_scales, term_scales
from symmech.runtime.sinks import layer_summaries
from symmech.runtime.tracker import Tracker

from . import LOG_TO, check_log_every, detect_bindings, write_run

__all__ = ["SymmechCallback"]

Symmetries = Sequence[Binding] | Callable[[torch.nn.Module], Sequence[Binding]]


class SymmechCallback(pl.Callback):
    """Track the module's symmetries during ``fit``; ``.tracker`` is the live tracker (the first
    optimizer's; ``.trackers`` has one per optimizer).

    ``symmetries``: bindings (or a function of the LightningModule returning them); when None
    they are detected from ``example_input`` (a tensor, or an ``(x, y)`` batch that confirms each
    family with ``loss_fn``), else from the module's ``example_input_array``, else from the first
    call of the module's ``forward`` (one optimizer only). ``log_every``: optimizer steps between
    logs (and between the tracker's history rows). ``per_group`` adds per-group scalars.
    """

    def __init__(
        self,
        symmetries: Symmetries | None = None,
        log_every: int = 50,
        log_to: str | None = "logger",
        out_dir: str | Path | None = None,
        example_input: Any = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        per_group: bool = False,
    ) -> None:
        super().__init__()
        call = f"SymmechCallback(log_every={log_every!r}, log_to={log_to!r})"
        self.log_every = check_log_every(call, log_every)
        if log_to not in LOG_TO:
            raise BindingError(explain(call, f"log_to must be one of {LOG_TO}, got {log_to!r}"))
        self.symmetries = symmetries
        self.log_to = log_to
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.example_input = example_input
        self.loss_fn = loss_fn
        self.per_group = per_group
        self.trackers: list[Tracker] = []
        self.written: list[Path] = []
        self._logged: list[int | None] = []  # per tracker: the last step logged
        self._terms: list[dict[tuple[str, str], float]] = []

    @property
    def tracker(self) -> Tracker | None:
        """The tracker of the first optimizer (None before fit starts)."""
        return self.trackers[0] if self.trackers else None

    # -- attaching -------------------------------------------------------------------------
    def _bindings(self, module: torch.nn.Module, example: Any) -> list[Binding] | None:
        if self.symmetries is None and example is None:
            return None
        if self.symmetries is not None:
            found = self.symmetries(module) if callable(self.symmetries) else self.symmetries
            return list(found)
        return detect_bindings(module, example, self.loss_fn)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for tracker in self.trackers:
            tracker.detach()
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise BindingError(
                explain("SymmechCallback.on_fit_start", "the trainer has no optimizer to track")
            )
        example = self.example_input
        if example is None:
            example = getattr(pl_module, "example_input_array", None)
        bindings = self._bindings(pl_module, example)
        if bindings is None and len(optimizers) > 1:
            raise BindingError(
                explain(
                    f"SymmechCallback() with {len(optimizers)} optimizers",
                    "there is no example input to detect the symmetries from",
                    "pass example_input=(x, y), set the module's example_input_array, "
                    "or pass symmetries=[symmech.bind(...)]",
                )
            )
        self.trackers = []
        for opt in optimizers:
            mine = None
            if bindings is not None:
                owned = {id(p) for group in opt.param_groups for p in group["params"]}
                mine = [b for b in bindings if all(id(t) in owned for t in b.tensors)]
            self.trackers.append(track(pl_module, opt, mine, log_every=self.log_every))
        self._logged = [None] * len(self.trackers)
        self._terms = [term_scales(t.families) for t in self.trackers]

    # -- logging ---------------------------------------------------------------------------
    def summaries(self) -> dict[int, dict[str, float]]:
        """The scalars not logged yet, by tracker step (marks them logged)."""
        out: dict[int, dict[str, float]] = {}
        several = len(self.trackers) > 1
        for i, tracker in enumerate(self.trackers):
            self._terms[i] = merge_scales(self._terms[i], term_scales(tracker.families))
            per_step = layer_summaries(
                tracker.records(),
                per_group=self.per_group,
                since_step=self._logged[i],
                terms=self._terms[i],
                prefix=f"symmech/optimizer{i}" if several else "symmech",
            )
            for step, tags in per_step.items():
                out.setdefault(step, {}).update(tags)
            if per_step:
                self._logged[i] = max(per_step)
        return dict(sorted(out.items()))

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_to is None or not self.trackers:
            return
        summaries = self.summaries()
        if not summaries:
            return
        if self.log_to == "self.log":
            latest = summaries[max(summaries)]
            pl_module.log_dict(latest, on_step=True, on_epoch=False, logger=True)
            return
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                for step, tags in summaries.items():
                    logger.log_metrics(tags, step=step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step % self.log_every == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_to == "logger":
            self._log(trainer, pl_module)  # the state after the last step

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is None:
            return
        several = len(self.trackers) > 1
        self.written = []
        for i, tracker in enumerate(self.trackers):
            rows = tracker.records()  # on every rank: a collective call under torch.distributed
            if trainer.is_global_zero:
                where = self.out_dir / f"optimizer{i}" if several else self.out_dir
                self.written += write_run(rows, where)
