"""The loss of a model as a function of its parameters, in float64, on a few samples of a batch.

Confirmation (:mod:`.confirm`) and the symmetry checks (:mod:`.check`) move parameters on a
float64 copy and re-evaluate the loss through ``torch.func.functional_call``: the model itself is
never changed (its buffers, mode and RNG state are restored), and dropout draws the same mask in
every evaluation.

Few samples. A symmetry of the loss is one of the loss on any batch: the per-sample losses are
each invariant, and a BatchNorm's batch statistics are those of whatever batch it sees. So the
checks need not run on the whole training batch, whose float64 passes are the whole cost of
confirmation and grow with it: :func:`first_samples` keeps the first
:data:`CONFIRM_SAMPLES` samples (the whole batch when it is no larger). The tracker still measures
the symmetry's residual ⟨ξ(θ), g⟩ on every training batch, and a family whose symmetry the loss
breaks is marked ``approximate`` with the measured value.

>>> import torch
>>> x, y = torch.randn(32, 5), torch.arange(32) % 3
>>> xs, ys = first_samples((x, y), 8)
>>> tuple(xs.shape), tuple(ys.shape)
((8, 5), (8,))
>>> first_samples((x, y), 64)[0] is x
True
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CONFIRM_SAMPLES", "Evaluator", "evaluation_mode", "first_samples"]

#: how many samples of a batch confirmation evaluates (None: all of them)
CONFIRM_SAMPLES: int | None = 8


def first_samples(batch: tuple[Any, Tensor], samples: int | None) -> tuple[Any, Tensor]:
    """The first ``samples`` samples of ``batch = (x, y)``, or ``batch`` itself when it has no
    more (or ``samples`` is None). The batch size is ``y``'s first dimension; every tensor of
    ``x`` (a tensor, or a tuple or list of positional inputs) whose first dimension has that size
    is cut, the rest (masks shaped (1, T), flags) are passed as they are."""
    x, y = batch
    if samples is None or not isinstance(y, Tensor) or y.ndim == 0:
        return batch
    if samples < 1:
        raise ValueError(f"first_samples(samples={samples}): keep at least one sample")
    size = y.shape[0]
    if size <= samples:
        return batch

    def cut(t: Any) -> Any:
        return t[:samples] if isinstance(t, Tensor) and t.ndim and t.shape[0] == size else t

    xs = type(x)(cut(t) for t in x) if isinstance(x, (tuple, list)) else cut(x)
    return xs, y[:samples]


@contextmanager
def evaluation_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train mode (``train=True``) or leave its mode; restore everything after.

    BatchNorm layers that run on batch statistics get ``track_running_stats=False`` meanwhile, so
    no evaluation updates running statistics (and torch.func transforms see no in-place update).
    """
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        if train:
            model.train()
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.training:
                m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track


class Evaluator:
    """The loss as a function of a parameter dict, in float64, with a fixed dropout seed."""

    def __init__(
        self,
        model: nn.Module,
        batch: tuple[Any, Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
        seed: int = 0,
    ) -> None:
        x, y = batch
        self.model, self.loss_fn, self.seed = model, loss_fn or _cross_entropy, seed
        #: the model is given the labels and its own ``.loss`` is used, with these options
        self.own_loss, self.kwargs = _own_loss(model) if loss_fn is None else (False, {})
        self.params = {n: p.detach().to(torch.float64) for n, p in model.named_parameters()}
        self.buffers = {
            n: b.detach().to(torch.float64) if b.is_floating_point() else b.detach()
            for n, b in model.named_buffers()
        }
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        self.inputs = tuple(
            t.detach().to(torch.float64) if isinstance(t, Tensor) and t.is_floating_point() else t
            for t in inputs
        )
        self.target = y.detach().to(torch.float64) if y.is_floating_point() else y
        self.devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})

    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """L(θ) for the given parameters (any subset replaced; the rest from the model)."""
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            kwargs = {**self.kwargs, "labels": self.target} if self.own_loss else {}
            out = torch.func.functional_call(self.model, ({**self.params, **params}, self.buffers),
                                             self.inputs, kwargs)  # fmt: skip
            if kwargs and isinstance(getattr(out, "loss", None), Tensor):
                return out.loss
            logits = getattr(out, "logits", None)
            return self.loss_fn(out if logits is None else logits, self.target)


def _own_loss(model: nn.Module) -> tuple[bool, dict[str, Any]]:
    """Whether the forward takes ``labels`` (and computes its own loss), and the options it is
    called with then (no cache)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False, {}
    if "labels" not in params:
        return False, {}
    return True, {"use_cache": False} if "use_cache" in params else {}


def _cross_entropy(out: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy; a sequence output (..., T, V) against (..., T) has its classes last."""
    if out.ndim >= 3 and target.ndim == out.ndim - 1 and not target.is_floating_point():
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    return F.cross_entropy(out, target)
