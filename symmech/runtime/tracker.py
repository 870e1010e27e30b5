"""The live tracker: optimizer step hooks that evaluate every law beside the observed value.

>>> import torch, symmech
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> tracker = symmech.track(model, opt, [symmech.bind("translation", theta=[(model[0].weight, 1)])])
>>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
>>> for _ in range(3):
...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
>>> len(tracker.records())
16

The training loop is unchanged; the hooks only read parameters, gradients and momentum
buffers, queue reductions on the parameters' device, and never wait for it (no ``.item()``).
History is copied to the host only when :meth:`Tracker.records` is called.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..closure import optimizer_closure, unsupported_optimizer_reason
from ..data_terms import sgd_case
from ..errors import BindingError, explain
from .binding import Binding
from .history import History
from .reductions import GridSlice, ReductionCache

Schedule = Callable[[int], bool]


class TrackerWarning(UserWarning):
    """Something the tracker could not follow; training itself is never affected."""


class Family:
    """One bound family of groups with its generated laws."""

    def __init__(
        self, binding: Binding, optimizer: torch.optim.Optimizer, names: dict[int, str], cache: ReductionCache
    ) -> None:
        self.binding = binding
        self.cache = cache
        self.module = binding.module
        self.optimizer = optimizer
        self.symmetry = binding.name
        self.layer = binding.layer
        self.n_groups = binding.n_groups
        self.names = [names.get(id(t), f"tensor{tuple(t.shape)}") for t in binding.tensors]
        self.status = "tracked" if self.module.CLOSES else "observed only"
        self.note = "" if self.module.CLOSES else self.module.WHY_NOT_CLOSED
        self.laws: Any = None
        self._pending: tuple | None = None
        self._fast_path = False
        self._group_of = {
            id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]
        }
        missing = [n for t, n in zip(binding.tensors, self.names) if id(t) not in self._group_of]
        if missing:
            raise BindingError(
                explain(
                    f"track(..., bindings with {binding.name} on {binding.layer})",
                    f"the tensors {missing} are not in the optimizer",
                    "bind parameters that the optimizer updates",
                )
            )

    # -- helpers ---------------------------------------------------------------------
    def _views(self, which: str) -> dict[str, list[GridSlice]] | None:
        out = {}
        for block, slices in self.binding.blocks.items():
            items = []
            for s in slices:
                p = s.tensor
                if which == "theta":
                    t = p.detach()
                elif which == "grad":
                    t = p.grad
                else:
                    t = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if t is None:
                    return None
                items.append(GridSlice(t.detach(), s, self.cache))
            out[block] = items
        return out

    def _hyper(self) -> dict[str, Any] | None:
        groups = [self.optimizer.param_groups[self._group_of[id(t)]] for t in self.binding.tensors]
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        values = {k: [g.get(k, 0.0) for g in groups] for k in keys}
        per_tensor = {
            k: {n: float(v) for n, v in zip(self.names, vals)} for k, vals in values.items()
        }
        if any(len(set(map(float, v))) > 1 for v in values.values()):
            verdict = optimizer_closure(
                self.binding.derivation.dynamics.structural,
                self.binding.derivation.geometry,
                "SGD",
                per_tensor["weight_decay"],
                per_tensor["lr"],
            )
            self._stop(verdict.why or "the group's parameters have different optimizer settings")
            return None
        out = {k: float(v[0]) for k, v in values.items()}
        out["nesterov"] = bool(values["nesterov"][0])
        if bool(groups[0].get("maximize", False)):
            self._stop("maximize=True flips the update's sign; the laws assume minimisation")
            return None
        return out

    def _stop(self, note: str) -> None:
        if self.status == "tracked":
            warnings.warn(
                f"symmech: {self.symmetry} on {self.layer}: not predicted: {note}",
                TrackerWarning,
                stacklevel=4,
            )
        self.status = "observed only"
        self.note = note

    # -- hooks -----------------------------------------------------------------------
    def before_step(self, step: int, log: bool, history: History) -> None:
        m = self.module
        const = self.binding.constants
        th = self._views("theta")
        if self.laws is None and self.module.CLOSES:
            self.laws = m.Laws(m.charge(th, const))
        gr = self._views("grad")
        self._pending = None
        r = m.residual(th, gr, const) if (gr is not None and self.module.CLOSES) else None
        if log:
            history.add(step, self, m.charge(th, const), r)
        if self.status != "tracked":
            return
        if gr is None:
            if any(s.tensor.grad is not None for sl in self.binding.blocks.values() for s in sl):
                self._stop(
                    f"some of {self.names} have no gradient at step {step}; the group moves only in part"
                )
            return  # torch.optim.SGD skips parameters without gradients: Q does not move
        hyper = self._hyper()
        if hyper is None:
            return
        bf = self._views("buffer") if hyper["momentum"] != 0.0 else None
        case = sgd_case(hyper["momentum"], hyper["nesterov"], first_step=bf is None)
        gjg = m.grad_form(gr, const) if hyper["momentum"] == 0.0 else torch.zeros_like(r)
        self._fast_path = case in ("sgd", "first")
        if self._fast_path:
            uju = ujb = None
        else:
            uju, ujb = m.update_forms(
                th,
                gr,
                bf or {},
                hyper["lr"],
                hyper["momentum"],
                hyper["dampening"],
                hyper["weight_decay"],
                case,
                const,
            )
        self._pending = (hyper, r, gjg, uju, ujb)

    def after_step(self) -> None:
        if self._pending is None:
            return
        hyper, r, gjg, uju, ujb = self._pending
        if self._fast_path:
            # u_k = b_k for torch's momentum update, read once from the new buffer
            uju = ujb = self.module.buffer_form(self._views("buffer"), self.binding.constants)
        self.laws.step(
            hyper["lr"],
            hyper["momentum"],
            hyper["dampening"],
            hyper["weight_decay"],
            hyper["nesterov"],
            r,
            gjg,
            uju,
            ujb,
        )
        self._pending = None


class Tracker:
    """Attached to one optimizer; see :func:`track`."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        bindings: Sequence[Binding],
        log_every: int = 1,
        schedule: Schedule | None = None,
    ) -> None:
        if log_every < 1:
            raise BindingError(
                explain(f"track(..., log_every={log_every})", "log_every must be ≥ 1")
            )
        self.optimizer = optimizer
        self.schedule: Schedule = schedule or (lambda step: step % log_every == 0)
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.cache = ReductionCache()
        self.families = [Family(b, optimizer, names, self.cache) for b in bindings]
        self.history = History()
        self.step = 0
        self.detached = False
        if type(optimizer) is not torch.optim.SGD:
            why = unsupported_optimizer_reason(type(optimizer).__name__)
            for f in self.families:
                f._stop(why)
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def _guard(self, family: Family, stage: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:  # the tracker must never break training
            family._stop(f"tracker error {stage} step {self.step}: {type(err).__name__}: {err}")
            family._pending = None

    def _before(self, optimizer, args, kwargs) -> None:
        log = bool(self.schedule(self.step))
        self.cache.clear()
        for f in self.families:
            self._guard(f, "before", lambda f=f: f.before_step(self.step, log, self.history))
        self.cache.clear()

    def _after(self, optimizer, args, kwargs) -> None:
        self.cache.clear()
        for f in self.families:
            self._guard(f, "after", f.after_step)
        self.cache.clear()
        self.step += 1

    # -- results ---------------------------------------------------------------------
    def records(self, final: bool = True) -> list[dict[str, Any]]:
        """Per logged step and group: observed Q and every law's prediction (host floats).

        ``final`` adds the state after the last step when it was not logged already.
        """
        if final and self.step > 0 and self.history.last_step() != self.step:
            for f in self.families:
                self._guard(
                    f,
                    "final",
                    lambda f=f: self.history.add(
                        self.step, f, f.module.charge(f._views("theta"), f.binding.constants)
                    ),
                )
        rows = self.history.rows()
        bad = [
            r
            for r in rows
            if not math.isfinite(r["observed"])
            or (r["discrete"] is not None and not math.isfinite(r["discrete"]))
        ]
        if bad:
            first = bad[0]
            warnings.warn(
                f"symmech: non-finite values from step {first['step']} on ({first['symmetry']} on {first['layer']}): "
                "the gradients or parameters became NaN/inf; predictions after that step are not meaningful",
                TrackerWarning,
                stacklevel=2,
            )
        return rows

    def to_csv(self, path) -> None:
        self.history.to_csv(self.records(), path)

    def plot(self, path, title: str | None = None):
        from .plots import plot_records

        return plot_records(self.records(), path, title=title)

    def detach(self) -> None:
        """Remove the hooks; the optimizer is as it was before :func:`track`."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.detached = True

    def summary(self) -> str:
        lines = [f"{'symmetry':20s} {'layer':40s} {'groups':>6s}  status"]
        for f in self.families:
            lines.append(
                f"{f.symmetry:20s} {f.layer:40s} {f.n_groups:6d}  {f.status}{': ' + f.note if f.note else ''}"
            )
        return "\n".join(lines)
