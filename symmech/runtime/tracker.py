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

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from symmech.errors import BindingError, explain

from .bank import Bank
from .binding import Binding
from .directions import modelled, not_modelled_reason
from .evidence import judge
from .family import Family, TrackerWarning, coming_steps
from .history import History, Snapshot, without_parts
from .hook_order import HookOrder, Read
from .program import Programs, Step
from .reductions import ReductionCache

Schedule = Callable[[int], bool]

__all__ = ["Schedule", "Tracker", "TrackerWarning"]


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
        max_history: int | None = None,
        spill_dir: str | None = None,
        measure_updates: bool = False,
    ) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise BindingError(
                explain(
                    f"track(..., log_every={log_every!r})",
                    "log_every must be an int ≥ 1",
                    "use schedule=... for any other rule",
                )
            )
        if schedule is not None and not callable(schedule):
            raise BindingError(
                explain(
                    f"track(..., schedule={schedule!r})", "schedule must be a function of the step"
                )
            )
        self.optimizer = optimizer
        self.model = model
        self.schedule: Schedule = schedule or (lambda step: step % log_every == 0)
        self.cache = ReductionCache()
        self.residuals = residuals
        self.families: list[Family] = []
        self.banks: list[Bank] | None = None
        self.history = History(max_history=max_history, spill_dir=spill_dir)
        self.step = 0
        self.detached = False
        self._bank_of: dict[int, Bank] = {}  # id(family) -> its bank
        self._step_cache: dict = {}  # per hook call: each tensor's coming step, temporaries
        #: θₖ kept across the step for an optimizer that is not modelled (measure_updates)
        self._copies: dict | None = {} if measure_updates else None
        self._measured = False  # this step's data was read (after the closure, if any)
        self._skipped = False  # a step the optimizer skips (GradScaler found inf)
        self._adopt(bindings)
        pre = optimizer.register_step_pre_hook(self._before)
        self._order = HookOrder(pre)
        self._late: Read | None = None  # what was read before a pre-hook registered later ran
        self._handles: list[Any] = [
            pre,
            optimizer.register_step_post_hook(self._after),
            optimizer.register_load_state_dict_post_hook(
                lambda opt: self._reloaded("the optimizer's state was loaded")
            ),
        ]
        if model is not None:
            self._handles.append(
                model.register_load_state_dict_post_hook(
                    lambda module, keys: self._reloaded("the model's parameters were loaded")
                )
            )
        self._detect: Callable[[], Sequence[Binding]] | None = None
        #: the steady banks' terms in one sweep and gather (None: every family on its own)
        self._programs: Programs | None = Programs(optimizer, self.cache, self._step_cache)
        self._fast: Step | None = None  # the banks this hook call steps at once

    def _adopt(self, bindings: Sequence[Binding], detected: bool = False) -> None:
        names = (
            {id(p): n for n, p in self.model.named_parameters()} if self.model is not None else {}
        )
        families = [
            Family(
                b,
                self.optimizer,
                names,
                self.cache,
                residuals=self.residuals,
                step_cache=self._step_cache,
                copies=self._copies,
            )
            for b in bindings
        ]
        if not modelled(self.optimizer) and self._copies is None:
            why = not_modelled_reason(self.optimizer)
            for f in families:
                f.stop(why)
        low = sorted({f.precision() for f in families if f.precision()})
        if low:
            warnings.warn(
                f"symmech: approximate laws: {'; '.join(low)}", TrackerWarning, stacklevel=4
            )
        self.families.extend(families)

    def _reloaded(self, what: str) -> None:
        """A checkpoint was loaded (resume, or a rollback after a bad step): every law
        restarts from the state found at the next step."""
        for f in self.families:
            f.restart(f"{what} before step {self.step}")

    def detect_on_first_step(
        self, detect: Callable[[], Sequence[Binding]], hook: Any | None = None
    ) -> None:
        """Find the symmetries right before the first optimizer step (used by :func:`track`);
        ``hook`` (a handle with ``remove()``) goes when the tracker is detached."""
        self._detect = detect
        if hook is not None:
            self._handles.append(hook)

    @property
    def detection_pending(self) -> bool:
        """Whether detection waits for the first optimizer step."""
        return self._detect is not None

    def _guard(self, family: Family, stage: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:  # the tracker must never break training
            family.stop(f"tracker error {stage} step {self.step}: {type(err).__name__}: {err}")
            return None

    def _make_banks(self) -> None:
        self.banks = [Bank(fams) for fams in self._bank_families()]
        self._bank_of = {id(f): bank for bank in self.banks for f in bank.families}

    def _bank_families(self) -> list[list[Family]]:
        """The families of each bank, in order."""
        by_key: dict[tuple, list[Family]] = {}
        for f in self.families:
            if not f.module.CLOSES or f.frozen:
                continue
            groups = set(f.group_indices)
            # specs with constants (attention heads) in banks of their own: a constant off its
            # diagonal (heads of up to 8 features) does not trace, and would keep every other
            # family of the bank off the one read of :mod:`.program`
            traced = not f.module.CONSTANTS
            key = (min(groups), f.module.KAPPA, traced) if len(groups) == 1 else ("solo", id(f))
            by_key.setdefault(key, []).append(f)
        return list(by_key.values())

    def _snapshots(
        self, observed: dict[int, torch.Tensor | None], final: bool = False
    ) -> list[Snapshot]:
        """Every family as it is now (``final``: after the last step, so no residual), for
        :meth:`History.add`, which copies the values at once: the snapshots hold the live
        tensors."""
        laws: dict[int, tuple[dict[str, torch.Tensor], float]] = {}
        settings_of: dict[tuple[int, ...], Any] = {}  # read once per param group and call
        out = []
        for f in self.families:
            bank = self._bank_of.get(id(f))
            state, t, segment = None, None, None
            if bank is not None and bank.laws is not None:
                if id(bank) not in laws:
                    laws[id(bank)] = (bank.laws.predictions(), bank.laws.t)
                state, t = laws[id(bank)]
                segment = bank.segment(f)
            elif bank is not None:
                t = 0.0
            obs = observed.get(id(f))
            settings = settings_of.get(f.group_indices[:1])
            if settings is None:
                settings = settings_of[f.group_indices[:1]] = f.settings()
            note = f.note
            if final and f.restart_due is not None:  # the last step's data were dropped
                state, segment = None, None
                note = "; ".join(
                    filter(None, [note, f"laws restart at the next step: {f.restart_due}"])
                )
            out.append(
                Snapshot(
                    step=self.step,
                    t=t,
                    symmetry=f.symmetry,
                    layer=f.layer,
                    observed=obs,  # History.add copies them at once (no clone here)
                    residual=None if final else f.residual,
                    laws=state,
                    segment=segment,
                    momentum=settings.momentum,
                    nesterov=settings.nesterov,
                    status=f.status,
                    note=note,
                    residuals=f.residuals,
                    continuous=not f.general,
                    rotation=f.rotation,
                    labels=f.binding.labels,
                )
            )
        return out

    def _before(self, optimizer, args, kwargs):
        """The step pre-hook: measure now, or right after a closure computed the gradients."""
        self._measured = False
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is None:
            self._measure(kwargs)
            return None

        def measured_closure():
            loss = closure()
            if not self._measured:
                self._measure(kwargs)
            return loss

        if len(args) > 1:
            return (args[0], measured_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": measured_closure}

    @torch.no_grad()
    def _measure(self, kwargs: dict) -> None:
        """Everything before the update: θₖ, gₖ (unscaled under a GradScaler), bₖ₋₁."""
        self._measured = True
        self._skipped = False
        found_inf = kwargs.get("found_inf", getattr(self.optimizer, "found_inf", None))
        if found_inf is not None and bool(found_inf.ne(0).any()):  # one sync, amp steps only
            self._skipped = True  # the fused kernel skips the whole step: not a step
            return
        if self._detect is not None:
            detect, self._detect = self._detect, None
            try:
                self._adopt(detect(), detected=True)
            except Exception as err:  # the tracker must never break training
                warnings.warn(
                    f"symmech: detection on the first step failed: {err}",
                    TrackerWarning,
                    stacklevel=4,
                )
        log = bool(self.schedule(self.step))
        self._late = self._order.read(self.optimizer) if self._order.late() else None
        self.cache.clear()
        grad_scale = kwargs.get("grad_scale", getattr(self.optimizer, "grad_scale", None))
        if grad_scale is not None:  # the fused kernel divides by it: read what it uses
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.cache.grads[id(p)] = self.cache.keep(p.grad / grad_scale)
        if self._steps_first():
            for group in list(self.cache.bound):
                try:
                    coming_steps(self.optimizer, self.cache, self._step_cache, group)
                except Exception:  # noqa: BLE001 - each family meets its own error, as before
                    pass
        fast = self._fast = self._bank_step(log)
        observed = {
            id(f): self._guard(f, "before", lambda f=f: f.before_step(self.step, log))
            for f in self.families
            if fast is None or id(f) not in fast.families
        }
        if fast is not None:
            for f, q, r, how in self._programs.family_values(fast, self.banks or [], log):
                f.stepped_by_bank(r, how.hyper.momentum, general=how.case == "general")
                observed[id(f)] = q
        if self.banks is None:
            self._make_banks()
            for bank in self.banks or []:
                bank.start()
        for bank in self.banks or []:
            bank.restart_now()
        if log:
            self.history.add(self._snapshots(observed))
        self.cache.clear()
        self._step_cache.clear()

    def _bank_step(self, log: bool) -> Step | None:
        """The steady banks' terms of this step, read at once (:mod:`.program`); None leaves
        every family to its own path (also after any error, which turns the programs off)."""
        programs = self._programs
        if programs is None or not self.banks or self._late is not None:
            return None
        try:
            if not programs.usable(self.banks):
                return None
            return programs.before(self.banks, log)
        except Exception as err:  # noqa: BLE001 - the tracker must never break training
            programs.off = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"symmech: reading the banks' terms at once failed at step {self.step} "
                f"({programs.off}); each family reads its own from now on (same values, slower)",
                TrackerWarning,
                stacklevel=4,
            )
            return None

    def _steps_first(self) -> bool:
        """Whether to compute every tracked tensor's coming step aₖ before any family asks for a
        product: under an adaptive optimizer the fused pass, made at the first product asked,
        then reads aₖ with θ and g (one sweep per tensor) instead of leaving ⟨θ, a⟩ and ⟨a, a⟩
        eager. The families would compute the same steps a moment later."""
        return (
            self.cache.plan.fusing
            and type(self.optimizer) is not torch.optim.SGD
            and modelled(self.optimizer)
            and any(f.tracked for f in self.families)
        )

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        if self._skipped or not self._measured:
            self._skipped = False
            return
        self._measured = False
        if self._late is not None:
            self._caught_late_hook(self._late)
            self._late = None
        self.cache.clear()
        fast, self._fast = self._fast, None
        stacked = self._bank_data(fast)
        for number, bank in enumerate(self.banks or []):
            try:
                if fast is not None and number in fast.banks:
                    if number in stacked:
                        bank.advance(stacked[number])
                    continue
                data = [self._guard(f, "after", f.finish_step) for f in bank.families]
                bank.step(data)
            except Exception as err:  # the tracker must never break training
                for f in bank.families:
                    f.stop(f"tracker error after step {self.step}: {type(err).__name__}: {err}")
        self.cache.clear()
        self._step_cache.clear()
        if self._copies:
            self._copies.clear()
        self.step += 1

    def _bank_data(self, fast: Step | None) -> dict:
        """The data of the step just taken of the banks read at once; on an error their
        families stop with it (their laws cannot continue without this step)."""
        if fast is None or self._programs is None:
            return {}
        try:
            return self._programs.after(fast, self.banks or [])
        except Exception as err:  # noqa: BLE001 - the tracker must never break training
            for number in fast.banks:
                for f in (self.banks or [])[number].families:
                    f.stop(f"tracker error after step {self.step}: {type(err).__name__}: {err}")
            return {}

    def _caught_late_hook(self, read: Read) -> None:
        """A step pre-hook registered after the tracker's ran after its read: restart the laws
        of every family whose settings or gradients it changed (their data of this step are
        not what the optimizer used), and run the tracker's hook last from now on."""
        groups, grads = self._order.changed(self.optimizer, read)
        moved = self._order.run_last()
        for f in self.families:
            what = [c for i in dict.fromkeys(f.group_indices) for c in groups.get(i, [])]
            if any(id(t) in grads for t in f.binding.tensors):
                what.append("the gradients")
            if what and f.tracked:
                f.restart(
                    f"a step pre-hook registered after track changed {', '.join(what)} after "
                    f"the tracker read step {self.step}"
                    + ("; the tracker's hook now runs last" if moved else "")
                )

    # -- results ---------------------------------------------------------------------
    def _final_state_missing(self) -> bool:
        return self.step > 0 and self.history.last_step() != self.step

    def _final_state(self) -> list[Snapshot]:
        """Q(θₙ) after the last step (no gradient, so no residual)."""
        observed = {id(f): self._guard(f, "final", f.observe) for f in self.families}
        return self._snapshots(observed, final=True)

    def records(self, final: bool = True) -> list[dict[str, Any]]:
        """Per logged step and group: observed Q and every law's prediction (host floats).

        ``final`` adds the state after the last step when it was not logged already.
        """
        rows = self._rows(final)
        judge(rows, self.families)
        return without_parts(rows)

    def _rows(self, final: bool) -> list[dict[str, Any]]:
        """This process's logged rows, and with ``final`` the state after the last step when
        it was not logged (reported but not stored: the next step logs it anew); with the
        rotation parts, which ``records`` removes after use."""
        rows = self.history.rows(parts=True)
        if final and not self.detached and self._final_state_missing():
            extra = History()
            extra.add(self._final_state())
            rows += extra.rows(parts=True)
        return rows

    def to_csv(self, path) -> None:
        self.history.to_csv(self.records(), path)

    def to_dataframe(self):
        """The records as a long pandas DataFrame (one row per logged step × group; extra
        ``frames``)."""
        from .sinks import records_to_dataframe

        return records_to_dataframe(self.records())

    def to_parquet(self, path):
        """Write the records as Parquet (pyarrow, extra ``frames``); returns the path."""
        from .sinks import write_parquet

        return write_parquet(self.records(), path)

    def log_to(self, writer, *, per_group: bool = False, since_step: int | None = None) -> int:
        """Per-layer scalars (observed, each law, the error relative to the family's scale) to a
        TensorBoard ``SummaryWriter``; returns how many were written."""
        from .error_scale import term_scales
        from .sinks import log_to_tensorboard

        return log_to_tensorboard(
            self.records(),
            writer,
            per_group=per_group,
            since_step=since_step,
            terms=term_scales(self.families),
        )

    def plot(self, path, title: str | None = None):
        from symmech.viz.plots import plot_records

        return plot_records(self.records(), path, title=title)

    def plot_anatomy(self, path, title: str | None = None):
        """Stacked parts of each layer's Q − Q₀: weight decay, breaking, finite step."""
        from symmech.viz.anatomy import plot_anatomy

        return plot_anatomy(self.records(), path, title=title)

    def plot_rotation(self, path, title: str | None = None):
        """Angular updates of every scale layer against their random-walk equilibrium."""
        from symmech.viz.anatomy import plot_rotation

        return plot_rotation(self.records(), path, title=title)

    def detach(self) -> None:
        """Remove the hooks; the optimizer is as it was before :func:`track`."""
        if not self.detached and self._final_state_missing():
            self.history.add(self._final_state())
        for h in self._handles:
            h.remove()
        self._handles = []
        self.detached = True

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue in another process: step, every law's state, each
        family's status and the history (save it with ``torch.save``)."""
        return {
            "version": 1,
            "step": self.step,
            "families": [f.state_dict() for f in self.families],
            "banks": [None if b.laws is None else b.laws.state_dict() for b in (self.banks or [])],
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a tracker with the same families (bindings or
        detection on the same model). Load model and optimizer state first, this last."""
        call = "Tracker.load_state_dict(state)"
        if not isinstance(state, dict) or state.get("version") != 1:
            raise BindingError(explain(call, "state is not a Tracker.state_dict()"))
        mine = [(f.symmetry, f.layer, f.n_groups) for f in self.families]
        theirs = [(f["symmetry"], f["layer"], f["n_groups"]) for f in state["families"]]
        if mine != theirs:
            raise BindingError(
                explain(
                    call,
                    f"the saved tracker has the families {theirs}, this one {mine}",
                    "track the same symmetries of the same model before loading",
                )
            )
        banks = len(self._bank_families())
        if banks != len(state["banks"]):  # a state from a symmech that banked otherwise
            raise BindingError(
                explain(
                    call,
                    f"the saved laws fill {len(state['banks'])} banks, this tracker has "
                    f"{banks} (a state saved before the specs with constants, the attention "
                    "heads, had banks of their own)",
                    "track without load_state_dict: the model and the optimizer load as they "
                    "are, and the laws start again from the observed charges",
                )
            )
        for f, saved in zip(self.families, state["families"]):
            f.load_state_dict(saved)
        self._detect = None
        self._make_banks()
        assert self.banks is not None
        for bank, laws in zip(self.banks, state["banks"]):
            bank.start()
            if laws is not None:
                assert bank.laws is not None
                bank.laws.load_state_dict(laws)
        self.step = int(state["step"])
        self.history = copy.deepcopy(state["history"])

    def summary(self) -> str:
        """One line per family: groups, the exact law's largest error relative to the family's
        scale (see :mod:`.error_scale`), status and note."""
        from .error_scale import max_errors, term_scales

        errors = max_errors(self.records(), term_scales(self.families)) if self.step else {}
        lines = [f"{'symmetry':20s} {'layer':40s} {'groups':>6s} {'discrete err':>12s}  status"]
        for f in self.families:
            err = errors.get((f.symmetry, f.layer), {}).get("discrete")
            shown = "-" if err is None else f"{err:.1e}"
            lines.append(
                f"{f.symmetry:20s} {f.layer:40s} {f.n_groups:6d} {shown:>12s}  "
                f"{f.status}{': ' + f.note if f.note else ''}"
            )
        return "\n".join(lines)
