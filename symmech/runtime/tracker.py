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

from symmech.derive.closure import optimizer_closure, unsupported_optimizer_reason
from symmech.derive.data_terms import sgd_case
from symmech.errors import BindingError, explain

from .binding import Binding
from .history import History
from .reductions import GridSlice, ReductionCache

Schedule = Callable[[int], bool]


class TrackerWarning(UserWarning):
    """Something the tracker could not follow; training itself is never affected."""


class Family:
    """One bound family of groups with its generated laws."""

    def __init__(
        self,
        binding: Binding,
        optimizer: torch.optim.Optimizer,
        names: dict[int, str],
        cache: ReductionCache,
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
        self.q0: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.bank: Bank | None = None
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
        indices = {self._group_of[id(t)] for t in self.binding.tensors}
        if len(indices) == 1:  # the common case: read the one param group directly
            g = self.optimizer.param_groups[next(iter(indices))]
            if g.get("maximize", False):
                self._stop("maximize=True flips the update's sign; the laws assume minimisation")
                return None
            return {
                "lr": float(g["lr"]),
                "momentum": float(g.get("momentum", 0.0)),
                "dampening": float(g.get("dampening", 0.0)),
                "weight_decay": float(g.get("weight_decay", 0.0)),
                "nesterov": bool(g.get("nesterov", False)),
            }
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
    def before_step(self, step: int, log: bool, residuals: bool) -> torch.Tensor | None:
        """Queue this step's data; returns the observed charge when the step is logged."""
        m = self.module
        const = self.binding.constants
        th = (
            self._views("theta")
            if (log or self.q0 is None or residuals or self.status != "tracked")
            else None
        )
        observed = m.charge(th, const) if (log or self.q0 is None) else None
        if self.q0 is None:
            self.q0 = observed
        self._pending = None
        self.residual = None
        if self.status != "tracked":
            return observed
        if any(t.grad is None for t in self.binding.tensors):
            self._stop(
                f"{self.names} have no (or only some) gradients at step {step}; torch.optim.SGD skips "
                "parameters without gradients, so the group does not follow the law's update"
            )
            return observed
        hyper = self._hyper()
        if hyper is None:
            return observed
        state = self.optimizer.state.get(self.binding.tensors[0], {})
        first_step = hyper["momentum"] == 0.0 or state.get("momentum_buffer") is None
        case = sgd_case(hyper["momentum"], hyper["nesterov"], first_step=first_step)
        self._fast_path = case in ("sgd", "first")
        need_grad = residuals or log or hyper["momentum"] == 0.0 or not self._fast_path
        gr = self._views("grad") if need_grad else None
        r = m.residual(th, gr, const) if (residuals or log) else None
        self.residual = r
        gjg = m.grad_form(gr, const) if hyper["momentum"] == 0.0 else None
        if self._fast_path:
            uju = ujb = None
        else:
            th = th if th is not None else self._views("theta")
            bf = self._views("buffer") if not first_step else None
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
        self._pending = (hyper, r if residuals else None, gjg, uju, ujb)
        return observed

    def finish_data(self) -> tuple | None:
        """After the optimizer step: the data of the step just taken (or None)."""
        if self._pending is None:
            return None
        hyper, r, gjg, uju, ujb = self._pending
        if self._fast_path:
            # u_k = b_k for torch's momentum update, read once from the new buffer
            uju = ujb = self.module.buffer_form(self._views("buffer"), self.binding.constants)
        self._pending = None
        return hyper, r, gjg, uju, ujb


class Bank:
    """The laws of every family that shares a param group and κ, advanced as one vector.

    One recurrence over the concatenated groups replaces one per family, so a step costs a
    few dozen tensor operations whatever the number of layers.
    """

    def __init__(self, families: list[Family]) -> None:
        self.families = families
        self.offsets: list[int] = []
        total = 0
        for f in families:
            self.offsets.append(total)
            total += f.n_groups
        self.size = total
        self.laws: Any = None

    def start(self) -> None:
        like = next(t.detach() for f in self.families for t in f.binding.tensors)
        parts = [
            f.q0.reshape(-1).to(torch.float64)
            if f.q0 is not None
            else torch.full((f.n_groups,), float("nan"), dtype=torch.float64, device=like.device)
            for f in self.families
        ]
        q0 = torch.cat(parts)
        self.laws = self.families[0].module.Laws(q0)
        self._zeros = torch.zeros_like(q0)

    def step(self, data: list[tuple | None]) -> None:
        if self.laws is None:
            self.start()
        live = [d for d in data if d is not None]
        if not live:
            return  # nothing moved (no gradients) or no family is tracked
        hyper = live[0][0]
        if any(d[0] != hyper for d in live[1:]):  # pragma: no cover - one param group per bank
            raise RuntimeError("families of one bank disagree in hyperparameters")

        def column(i: int) -> torch.Tensor:
            values = [None if d is None else d[i] for d in data]
            if all(v is None for v in values) and all(d is not None for d in data) and i in (1, 2):
                # no residual / no first-order forcing this step: one shared zero
                return self._zeros
            parts = []
            for f, d, value in zip(self.families, data, values):
                if value is None:
                    fill = 0.0 if (d is not None and i in (1, 2)) else float("nan")
                    value = torch.full(
                        (f.n_groups,), fill, dtype=torch.float64, device=self.laws.q0.device
                    )
                parts.append(value.reshape(-1).to(torch.float64))
            return torch.cat(parts)

        self.laws.step(
            hyper["lr"],
            hyper["momentum"],
            hyper["dampening"],
            hyper["weight_decay"],
            hyper["nesterov"],
            column(1),
            column(2),
            column(3),
            column(4),
        )

    def segment(self, family: Family) -> slice:
        i = self.families.index(family)
        return slice(self.offsets[i], self.offsets[i] + family.n_groups)


class Tracker:
    """Attached to one optimizer; see :func:`track`."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        bindings: Sequence[Binding],
        log_every: int = 1,
        schedule: Schedule | None = None,
        residuals: bool = True,
    ) -> None:
        if log_every < 1:
            raise BindingError(
                explain(f"track(..., log_every={log_every})", "log_every must be ≥ 1")
            )
        self.optimizer = optimizer
        self.model = model
        self.schedule: Schedule = schedule or (lambda step: step % log_every == 0)
        self.cache = ReductionCache()
        self.residuals = residuals
        self.families: list[Family] = []
        self.banks: list[Bank] | None = None
        self.history = History()
        self.step = 0
        self.detached = False
        self._adopt(bindings)
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]
        self._detect_on_first_step: Callable[[], Sequence[Binding]] | None = None

    def _adopt(self, bindings: Sequence[Binding]) -> None:
        names = (
            {id(p): n for n, p in self.model.named_parameters()} if self.model is not None else {}
        )
        families = [Family(b, self.optimizer, names, self.cache) for b in bindings]
        for f in families:
            f.tracker_residuals = self.residuals
        if type(self.optimizer) is not torch.optim.SGD:
            why = unsupported_optimizer_reason(type(self.optimizer).__name__)
            for f in families:
                f._stop(why)
        self.families.extend(families)

    def detect_on_first_step(self, detect: Callable[[], Sequence[Binding]]) -> None:
        """Find the symmetries right before the first optimizer step (used by :func:`track`)."""
        self._detect_on_first_step = detect

    def _guard(self, family: Family, stage: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # the tracker must never break training
            family._stop(f"tracker error {stage} step {self.step}: {type(err).__name__}: {err}")
            family._pending = None
            return None

    def _make_banks(self) -> None:
        by_key: dict[tuple, list[Family]] = {}
        for f in self.families:
            if not f.module.CLOSES:
                continue
            groups = {f._group_of[id(t)] for t in f.binding.tensors}
            key = (min(groups), f.module.KAPPA) if len(groups) == 1 else ("solo", id(f))
            by_key.setdefault(key, []).append(f)
        self.banks = [Bank(fams) for fams in by_key.values()]
        for bank in self.banks:
            for f in bank.families:
                f.bank = bank

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        if self._detect_on_first_step is not None:
            detect, self._detect_on_first_step = self._detect_on_first_step, None
            try:
                self._adopt(detect())
            except Exception as err:  # the tracker must never break training
                warnings.warn(
                    f"symmech: detection on the first step failed: {err}",
                    TrackerWarning,
                    stacklevel=3,
                )
        log = bool(self.schedule(self.step))
        self.cache.clear()
        observed = {}
        for f in self.families:
            observed[f] = self._guard(
                f, "before", lambda f=f: f.before_step(self.step, log, self.residuals)
            )
        if self.banks is None:
            self._make_banks()
            for bank in self.banks:
                bank.start()
        if log:
            self.history.add(self.step, self.families, observed)
        self.cache.clear()

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        self.cache.clear()
        for bank in self.banks or []:
            data = [self._guard(f, "after", f.finish_data) for f in bank.families]
            try:
                bank.step(data)
            except Exception as err:  # the tracker must never break training
                for f in bank.families:
                    f._stop(f"tracker error after step {self.step}: {type(err).__name__}: {err}")
        self.cache.clear()
        self.step += 1

    # -- results ---------------------------------------------------------------------
    def _final_state_missing(self) -> bool:
        return self.step > 0 and self.history.last_step() != self.step

    def _add_final_state(self, history: History) -> None:
        """Log Q(θₙ) after the last step (no gradient, so no residual) into ``history``."""
        observed = {
            f: self._guard(
                f, "final", lambda f=f: f.module.charge(f._views("theta"), f.binding.constants)
            )
            for f in self.families
        }
        history.add(self.step, self.families, observed, final=True)

    def records(self, final: bool = True) -> list[dict[str, Any]]:
        """Per logged step and group: observed Q and every law's prediction (host floats).

        ``final`` adds the state after the last step when it was not logged already.
        """
        rows = self.history.rows()
        if final and not self.detached and self._final_state_missing():
            # the state after the last step, reported but not stored: the next step logs it anew
            extra = History()
            self._add_final_state(extra)
            rows += extra.rows()
        numeric = (
            "observed",
            "residual",
            "discrete",
            "discrete_residual",
            "first_order",
            "second_order",
        )
        bad = [
            r for r in rows if any(r[k] is not None and not math.isfinite(r[k]) for k in numeric)
        ]
        if bad:
            first = min(bad, key=lambda r: r["step"])
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
        from symmech.viz.plots import plot_records

        return plot_records(self.records(), path, title=title)

    def detach(self) -> None:
        """Remove the hooks; the optimizer is as it was before :func:`track`."""
        if not self.detached and self._final_state_missing():
            self._add_final_state(self.history)
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
