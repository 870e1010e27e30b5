"""One parameter's coming step θₖ₊₁ = sθₖ − ηa, with Adam's aₖ made only when it is read, or
measured around the step for an optimizer that is not modelled (:class:`MeasuredDirection`).

A :class:`Direction` holds the shrink s, the step size η and the direction a. Under Adam and
AdamW on the CPU with symmech's C++ kernel loaded, a can stay *pending*: an :class:`AdamPass`
holds what makes it (the gradient, both moments before the step, the scalars), so that the banks
read at once (:mod:`.program`) make a inside the sweep that reads θ, row block by row block,
without writing it to memory and reading it back; anyone else who reads ``Direction.a`` gets it
made then, once, with the values :func:`.native.adam_direction` gives. Adam's step changes its
moments in place: a pass read after that refuses with a clear error instead of a wrong step.

>>> import torch
>>> d = Direction(0.5, 0.1, torch.ones(2))
>>> d.shrink, d.eta, d.a.tolist(), d.made
(0.5, 0.1, [1.0, 1.0], True)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from symmech.errors import explain

from . import native


def _value(x: float | torch.Tensor) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


@dataclass(frozen=True)
class AdamPass:
    """Adam's coming step of one tensor, not made yet: m'/(√v'/√(1 − β₂ᵏ) + ε) with
    m' = lerp(m, g, 1 − β₁) and v' = β₂v + (1 − β₂)g² (then the running maximum under amsgrad),
    from the tensors as they are now."""

    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    vmax: torch.Tensor | None
    betas: tuple[float, float]
    bc2_sqrt: float
    eps: float
    #: the tensors' in-place counters when the pass was taken
    versions: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "versions", tuple(t._version for t in self.tensors()))

    def tensors(self) -> list[torch.Tensor]:
        """g, m, v and, under amsgrad, the running maximum."""
        extra = [] if self.vmax is None else [self.vmax]
        return [self.grad, self.exp_avg, self.exp_avg_sq, *extra]

    def scalars(self) -> list[float]:
        """[1 − β₁, β₂, √(1 − β₂ᵏ), ε]: the kernel's arguments, as :func:`.native.adam_direction`
        passes them."""
        beta1, beta2 = self.betas
        return [1.0 - beta1, beta2, self.bc2_sqrt, self.eps]

    def current(self) -> bool:
        """Whether no tensor was changed in place since the pass was taken (before the step)."""
        return tuple(t._version for t in self.tensors()) == self.versions

    def make(self) -> torch.Tensor:
        """aₖ, in one pass of the kernel; refuses once the step changed the moments."""
        if not self.current():
            raise RuntimeError(
                explain(
                    "Direction.a",
                    "Adam's moments were changed in place after this direction was taken "
                    "(the optimizer step ran): aₖ would no longer be the step's",
                    "read the direction before optimizer.step()",
                )
            )
        a = native.adam_direction(
            self.grad, self.exp_avg, self.exp_avg_sq, self.vmax, self.betas, self.bc2_sqrt, self.eps
        )
        if a is None:  # pragma: no cover - a pass is only taken where the kernel reads it
            raise RuntimeError("Direction.a: symmech's C++ kernel cannot make this Adam step")
        return a


class Direction:
    """One parameter's step θₖ₊₁ = ``shrink``·θₖ − ``eta``·``a``; ``a`` is made on first read
    when the direction holds a ``pending`` :class:`AdamPass` instead."""

    __slots__ = ("shrink", "eta", "_a", "pending")

    def __init__(
        self,
        shrink: float,
        eta: float,
        a: torch.Tensor | None = None,
        pending: AdamPass | None = None,
    ) -> None:
        if (a is None) == (pending is None):
            raise TypeError("Direction(shrink, eta, a) or Direction(shrink, eta, pending=...)")
        self.shrink = shrink
        self.eta = eta
        self._a = a
        self.pending = pending

    @property
    def made(self) -> bool:
        """Whether ``a`` exists as a tensor (else reading it makes it)."""
        return self._a is not None

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            assert self.pending is not None
            self._a = self.pending.make()
        return self._a

    def __repr__(self) -> str:
        a = "pending" if self._a is None else f"tensor{tuple(self._a.shape)}"
        return f"Direction(shrink={self.shrink!r}, eta={self.eta!r}, a={a})"


class MeasuredDirection:
    """aₖ = (θₖ − θₖ₊₁)/ηₖ measured around the step, for an optimizer :func:`direction` lacks.

    Call :meth:`before` just before ``optimizer.step()`` and :meth:`after` just after it; the shrink
    is 1 (a decoupled decay is then part of aₖ) and ηₖ the group's ``lr`` read in :meth:`before`.
    Memory: one copy of the tracked parameters, kept between the two calls.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    >>> opt = torch.optim.SGD([w], lr=0.5)
    >>> w.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    >>> m = MeasuredDirection(opt)
    >>> m.before(); opt.step(); m.after()[w].a.tolist()
    [1.0, -2.0]
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None
    ) -> None:
        self.optimizer = optimizer
        chosen = None if params is None else list(params)
        self._tracked: list[tuple[int, torch.Tensor]] = []
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if chosen is None or any(p is q for q in chosen):
                    self._tracked.append((i, p))
        if chosen is not None and len(self._tracked) != len(chosen):
            raise ValueError(
                explain(
                    f"MeasuredDirection({type(optimizer).__name__}, params=[...])",
                    f"{len(chosen) - len(self._tracked)} of the params are not in the optimizer",
                )
            )
        self._before: list[tuple[float, torch.Tensor]] | None = None

    @torch.no_grad()
    def before(self) -> None:
        """Copy θₖ of every tracked parameter and read each group's lr."""
        self._before = []
        for i, p in self._tracked:
            eta = _value(self.optimizer.param_groups[i]["lr"])
            if eta == 0:
                raise ValueError(
                    explain(
                        "MeasuredDirection.before()",
                        f"group {i} has lr = 0",
                        "a step of size 0 has no direction",
                    )
                )
            self._before.append((eta, p.detach().clone()))

    @torch.no_grad()
    def after(self) -> dict[torch.Tensor, Direction]:
        """The direction of the step just taken, per tracked parameter; frees the copy."""
        if self._before is None:
            raise RuntimeError(
                explain("MeasuredDirection.after()", "before() was not called for this step")
            )
        out = {
            p: Direction(1.0, eta, (theta - p.detach()).div_(eta))
            for (_, p), (eta, theta) in zip(self._tracked, self._before)
        }
        self._before = None
        return out
