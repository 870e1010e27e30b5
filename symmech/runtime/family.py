"""One bound family of groups while training: what it reads, measures and reports per step.

Before ``optimizer.step()`` a family reads θₖ, gₖ and bₖ₋₁ through its generated module
(Q, rₖ and the forms ⟨x, J y⟩) and the param group's settings; after the step it hands the
step's :class:`~.stepper.StepData` to its bank. Under ``torch.optim.SGD`` with one setting for
every bound tensor that is all the law needs; under Adam, AdamW, RMSprop, Adagrad, per-tensor
settings or ``maximize`` it reads each tensor's coming step sθ − ηa (:mod:`.directions`) and
measures ⟨ξ(Sθ), ηa⟩ and ⟨ηa, J ηa⟩ instead (the general law). When it cannot follow the
optimizer it :meth:`~Family.stop`\\ s with a reason and is observed only; training is never
affected.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from symmech.errors import BindingError, SymmechError, explain
from symmech.reference.any_optimizer import angular_equilibrium

from .batched import Batch, signature
from .binding import Binding
from .directions import Direction, direction, directions_of, modelled
from .reductions import GridSlice, ReductionCache
from .stepper import General, Hyper, StepData, update_forms

Which = Literal["theta", "grad", "buffer"]
TRACKED, OBSERVED_ONLY, APPROXIMATE = "tracked", "observed only", "approximate"
LOW_PRECISION = (torch.float16, torch.bfloat16)


class TrackerWarning(UserWarning):
    """Something the tracker could not follow; training itself is never affected."""


@dataclass
class _Pending:
    """A step's data before the optimizer runs; None forms are read from the new buffer."""

    hyper: Hyper
    residual: torch.Tensor | None
    gJg: torch.Tensor | None = None
    uJu: torch.Tensor | None = None  # None: heavy ball, uₖ = bₖ read from the updated buffer
    uJb: torch.Tensor | None = None
    xi_b: torch.Tensor | None = None  # measured ⟨ξ(θₖ), bₖ₋₁⟩ of a buffer the law did not follow
    fresh: bool = False  # torch creates the buffer in this step
    restart: torch.Tensor | None = None  # the observed Qₖ the laws start anew from
    idle: bool = False  # no gradient: the optimizer skips the group
    general: General | None = None  # the measured terms of a step sθ − ηa
    measured: bool = False  # the step is measured from a copy of θₖ after it was taken
    rotation_eq: float | None = None


def _read_hyper(group: dict) -> Hyper:
    return Hyper(
        lr=float(group["lr"]),
        momentum=float(group.get("momentum", 0.0)),
        dampening=float(group.get("dampening", 0.0)),
        weight_decay=float(group.get("weight_decay", 0.0)),
        nesterov=bool(group.get("nesterov", False)),
    )


class Family:
    """One bound family of groups with its generated module, status and per-step data."""

    def __init__(
        self,
        binding: Binding,
        optimizer: torch.optim.Optimizer,
        names: dict[int, str],
        cache: ReductionCache,
        residuals: bool = True,
        step_cache: dict | None = None,
        copies: dict | None = None,
    ) -> None:
        self.binding = binding
        #: per hook call, shared by the tracker's families: each tensor's direction and temporaries
        self.step_cache: dict = {} if step_cache is None else step_cache
        #: θₖ of every tensor, kept from before to after the step when the optimizer is not
        #: modelled and the tracker measures updates (None: not measuring)
        self.copies: dict | None = copies
        #: whether the last step used the general law (the continuous models do not apply)
        self.general = False
        #: whether the charge is ½|θ|² per group, so the rotation of θ is reported
        self.rotation = binding.name == "scale"
        self.cache = cache
        self.module = binding.module
        self.optimizer = optimizer
        self.residuals = residuals
        self.symmetry = binding.name
        self.layer = binding.layer
        self.n_groups = binding.n_groups
        self.names = [names.get(id(t), f"tensor{tuple(t.shape)}") for t in binding.tensors]
        self.status = TRACKED if self.module.CLOSES else OBSERVED_ONLY
        self.note = "" if self.module.CLOSES else self.module.WHY_NOT_CLOSED
        #: the constants argument of the generated functions (only a spec with constants takes it)
        self.const: tuple[dict[str, torch.Tensor], ...] = (
            (binding.constants,) if self.module.CONSTANTS else ()
        )
        self.q0: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None  # rₖ measured at the current step, if any
        self._residual_aliases: bool | None = None  # whether rₖ shares a gradient's memory
        self._pending: _Pending | None = None
        self._xi_known = False  # whether the laws follow the momentum buffer
        self._restart: str | None = None  # why the laws start anew at the next step
        group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        #: bound tensors the optimizer does not update (frozen while fine-tuning)
        self.frozen = [n for t, n in zip(binding.tensors, self.names) if id(t) not in group_of]
        if self.frozen and not binding.detected:
            raise BindingError(
                explain(
                    f"track(..., bindings with {binding.name} on {binding.layer})",
                    f"the tensors {self.frozen} are not in the optimizer",
                    "bind parameters that the optimizer updates",
                )
            )
        #: the optimizer's param group of each bound tensor, in binding order
        self.group_indices = tuple(group_of[id(t)] for t in binding.tensors if id(t) in group_of)
        #: families that differ from this one only in their constants (:mod:`.batched`)
        self.batch: Batch | None = None
        self.batch_row = 0
        key = signature(binding, self.module, self.group_indices)
        if key is not None:
            self.batch = cache.batches.setdefault(key, Batch(self.module))
            self.batch_row = self.batch.join(self)
        if self.frozen:
            self.stop(
                f"{self.frozen} are not in the optimizer (frozen), so the group's update is not "
                "torch.optim.SGD's; its charge is observed only"
            )
        elif self.tracked and self.precision():
            self.approximate(self.precision(), warn=False)  # the tracker warns once for all
        if self.tracked and not self.frozen:
            for t, g in zip(binding.tensors, self.group_indices):
                cache.bound.setdefault(g, {})[id(t)] = t

    @property
    def tracked(self) -> bool:
        """Whether the laws are advanced (status ``tracked`` or ``approximate: …``)."""
        return self.status == TRACKED or self.status.startswith(APPROXIMATE)

    def precision(self) -> str:
        """What the parameters' precision allows ('' for float32 and wider)."""
        low = sorted({t.dtype for t in self.binding.tensors if t.dtype in LOW_PRECISION}, key=str)
        if not low:
            return ""
        eps = max(torch.finfo(d).eps for d in low)
        names = "/".join(str(d).removeprefix("torch.") for d in low)
        return (
            f"{names} parameters: every update is rounded to {eps:.1e} of |θ|, so Q may leave "
            f"the laws by about {eps:.1e} × Σ|θ| (Σθ² for a quadratic charge) per step; "
            "reductions accumulate in float32"
        )

    # -- reading -----------------------------------------------------------------------
    def views(self, which: Which) -> dict[str, list[GridSlice]] | None:
        """θ, g or b (torch's momentum buffer) of every block as slices; None when absent."""
        if which == "theta":
            return self.views_of(lambda p: p, "theta", share="theta")
        if which == "grad":
            return self.views_of(lambda p: self.cache.grads.get(id(p), p.grad), share="grad")
        state = self.optimizer.state
        return self.views_of(
            lambda p: state.get(p, {}).get("momentum_buffer"), "buffer", share="buffer"
        )

    def views_of(
        self,
        read: Callable[[torch.Tensor], torch.Tensor | None],
        role: str | None = None,
        share: str | None = None,
    ) -> dict[str, list[GridSlice]] | None:
        """``read(parameter)`` (a tensor of the parameter's shape) of every block as slices
        (``role``: a tensor that lives across steps, see :meth:`ReductionCache.slice`). With
        ``share`` (what ``read`` reads, the same for every member of the family's batch) the
        members of a batch build them once per hook call."""
        key = None
        if share is not None and self.batch is not None:
            key = ("views", id(self.batch), share)
            if key in self.cache.grids:
                return self.cache.grids[key]
        out: dict[str, list[GridSlice]] | None = {}
        for block, slices in self.binding.blocks.items():
            items = []
            for s in slices:
                t = read(s.tensor)
                if t is None:
                    out = None
                    break
                items.append(self.cache.slice(t, s, role))
            if out is None:
                break
            out[block] = items
        if key is not None:
            self.cache.grids[key] = out
        return out

    def run(self, name: str, *args: dict[str, list[GridSlice]] | None, roles: tuple[str, ...]):
        """The generated function ``name`` of these views (and the family's constants): from
        the batch's one evaluation for every member when the family has one (:mod:`.batched`).
        ``roles`` name what each view holds (θₖ, gₖ, a temporary per tensor of this hook call),
        the same for every member of a batch."""
        if self.batch is not None:
            got = self.batch.evaluate(self, name, args, roles)
            if got is not None:
                return got
        return getattr(self.module, name)(*args, *self.const)

    def observe(self) -> torch.Tensor:
        """Q(θ) of every group now."""
        return self.module.charge(self.views("theta"), *self.const)

    def settings(self) -> Hyper:
        """The settings of the first bound tensor's param group (as recorded per step)."""
        if not self.group_indices:
            return Hyper(lr=0.0)
        return _read_hyper(self.optimizer.param_groups[self.group_indices[0]])

    def hyper(self) -> tuple[Hyper, bool]:
        """The settings of the first bound tensor's group, and whether the step needs the
        general law: an optimizer other than SGD, settings that differ between the bound
        tensors' groups, or ``maximize``. Read once per hook call for all families that bind
        tensors of the same param groups."""
        key = ("hyper", self.group_indices)
        found = self.step_cache.get(key)
        if found is None:
            found = self.step_cache[key] = self._read_settings()
        return found

    def _read_settings(self) -> tuple[Hyper, bool]:
        groups = [self.optimizer.param_groups[i] for i in dict.fromkeys(self.group_indices)]
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        mixed = any(any(g.get(k, 0.0) != groups[0].get(k, 0.0) for k in keys) for g in groups[1:])
        general = (
            type(self.optimizer) is not torch.optim.SGD
            or mixed
            or any(bool(g.get("maximize", False)) for g in groups)
        )
        return _read_hyper(groups[0]), general

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the family carries between steps (see :meth:`Tracker.state_dict`)."""
        return {
            "symmetry": self.symmetry,
            "layer": self.layer,
            "n_groups": self.n_groups,
            "status": self.status,
            "note": self.note,
            "q0": None if self.q0 is None else self.q0.detach().clone(),
            "xi_known": self._xi_known,
            "restart": self._restart,
        }

    def load_state_dict(self, state: dict) -> None:
        self.status, self.note = state["status"], state["note"]
        q0 = state["q0"]
        like = self.binding.tensors[0]
        self.q0 = None if q0 is None else q0.to(like.device)
        self._xi_known, self._restart = bool(state["xi_known"]), state["restart"]
        self._pending = None

    # -- status ------------------------------------------------------------------------
    def stop(self, note: str) -> None:
        """Stop predicting (observed only from now on), with the reason; warns once."""
        if self.tracked:
            warnings.warn(
                f"symmech: {self.symmetry} on {self.layer}: not predicted: {note}",
                TrackerWarning,
                stacklevel=4,
            )
        self.status = OBSERVED_ONLY
        self.note = note
        self._pending = None

    def _owned(self, value: torch.Tensor | None) -> torch.Tensor | None:
        """``value``, or a copy when it shares memory with a bound gradient (a one-entry group's
        ⟨ξ, g⟩ is the gradient entry itself, which ``zero_grad`` would change under the family);
        decided on the first value."""
        if value is None:
            return None
        if self._residual_aliases is None:
            try:
                ptr = value.untyped_storage().data_ptr()
                grads = [t.grad for t in self.binding.tensors if t.grad is not None]
                self._residual_aliases = any(g.untyped_storage().data_ptr() == ptr for g in grads)
            except (RuntimeError, NotImplementedError):  # no plain storage: copy to be safe
                self._residual_aliases = True
        return value.clone() if self._residual_aliases else value

    def approximate(self, why: str, warn: bool = True) -> None:
        """Keep predicting, but say the laws hold only approximately here, and why."""
        if self.status == TRACKED and warn:
            warnings.warn(
                f"symmech: {self.symmetry} on {self.layer}: approximate: {why}",
                TrackerWarning,
                stacklevel=4,
            )
        if self.tracked:
            self.status = f"{APPROXIMATE}: {why}"

    # -- one step ----------------------------------------------------------------------
    def restart(self, why: str) -> None:
        """Start the laws anew from the next step's observed state (a tracked family only)."""
        if self.tracked:
            self._restart = why
        self._xi_known = False
        self._pending = None

    def before_step(self, step: int, log: bool) -> torch.Tensor | None:
        """Queue this step's data; returns the observed charge when the step is logged."""
        first_q = self.q0 is None
        restart = self._restart is not None and self.tracked and not first_q
        need_q = log or first_q or restart
        hyper, general = self.hyper() if self.tracked else (Hyper(lr=0.0), False)
        th = (
            self.views("theta")
            if (need_q or self.residuals or not self.tracked or not self._xi_known or general)
            else None
        )
        observed = self.run("charge", th, roles=("theta",)) if need_q else None
        if first_q:  # a copy: a per-entry group's charge may be a view of the parameter itself
            self.q0 = None if observed is None else observed.clone()
        self._pending = None
        self.residual = None
        if not self.tracked:
            return observed
        grads = [self.cache.grads.get(id(t), t.grad) for t in self.binding.tensors]
        if all(g is None for g in grads):  # torch's optimizers skip them: nothing moves
            self._pending = _Pending(hyper, None, idle=True)
            return observed
        if any(g is None for g in grads) and not general:
            bare = [n for n, g in zip(self.names, grads) if g is None]
            self.restart(f"{bare} had no gradient at step {step} while the rest of the group did")
            return observed
        rotation_eq = self.rotation_eq(hyper) if self.rotation else None
        if general:
            return self._before_general(step, log, hyper, th, observed, restart, rotation_eq)
        self.general = False
        state = self.optimizer.state
        buffers = [
            state.get(t, {}).get("momentum_buffer") is not None for t in self.binding.tensors
        ]
        if hyper.momentum != 0.0 and any(buffers) and not all(buffers):
            self.restart(f"only some of {self.names} had a momentum buffer at step {step}")
            return observed
        first_step = hyper.momentum == 0.0 or not buffers[0]
        case = hyper.case(first_step)
        heavy_ball = case in ("sgd", "first")
        need_grad = self.residuals or log or not heavy_ball
        gr = self.views("grad") if need_grad else None
        if self.residuals or log:
            self.residual = self._owned(self.run("residual", th, gr, roles=("theta", "grad")))
        residual = self.residual if self.residuals else None
        self._pending = _Pending(
            hyper,
            residual,
            fresh=hyper.momentum != 0.0 and first_step,
            rotation_eq=rotation_eq,
        )
        self._mark_restart(step, restart, observed)
        bf = self.views("buffer") if not first_step else None
        if bf is not None and not self._xi_known:
            self._pending.xi_b = self.run("residual", th, bf, roles=("theta", "buffer"))
        self._xi_known = hyper.momentum != 0.0
        if not heavy_ball:
            th = th if th is not None else self.views("theta")
            forms = self.run("forms", th, gr, bf, roles=("theta", "grad", "buffer"))
            self._pending.uJu, self._pending.uJb = update_forms(case, hyper, forms)
            self._pending.gJg = forms.gg if hyper.momentum == 0.0 else None
        return observed

    def _mark_restart(self, step: int, restart: bool, observed: torch.Tensor | None) -> None:
        if restart and self._pending is not None:
            self._pending.restart = observed
            self.note = f"laws restarted at step {step}: {self._restart}"
            self._restart = None

    def rotation_eq(self, hyper: Hyper) -> float | None:
        """The random-walk equilibrium angle for this step's settings (None: no model), once
        per hook call and param group."""
        key = ("rotation_eq", self.group_indices[0], hyper)
        if key not in self.step_cache:
            self.step_cache[key] = self._equilibrium_angle(hyper)
        return self.step_cache[key]

    def _equilibrium_angle(self, hyper: Hyper) -> float | None:
        name = type(self.optimizer).__name__
        group = self.optimizer.param_groups[self.group_indices[0]]
        if name == "Adam" and group.get("decoupled_weight_decay", False):
            name = "AdamW"
        value, _ = angular_equilibrium(name, hyper.lr, hyper.weight_decay, hyper.momentum)
        return value

    def _direction(self, tensor: torch.Tensor, group: int) -> Direction:
        """The tensor's coming step, computed once per hook call for every family."""
        key = ("direction", id(tensor))
        if key not in self.step_cache and ("directions", group) not in self.step_cache:
            coming_steps(self.optimizer, self.cache, self.step_cache, group)
        if key not in self.step_cache:
            grad = self.cache.grads.get(id(tensor))
            found = direction(self.optimizer, group, tensor, grad=grad)
            _keep_step(self.cache, self.step_cache, tensor, found)
        return self.step_cache[key]

    def _temporary(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.step_cache:
            self.step_cache[key] = make()
        return self.step_cache[key]

    def _before_general(self, step, log, hyper, th, observed, restart, rotation_eq):
        """The general law's data: ⟨ξ(Sθ), ηa⟩, ⟨ηa, J ηa⟩ and what per-tensor shrinks add."""
        m = self.module
        self.general = True
        self._xi_known = False  # SGD's law re-reads the buffer if it resumes
        if self.copies is not None and not modelled(self.optimizer):
            return self._before_measured(log, hyper, th, observed, step, restart, rotation_eq)
        try:
            found = {
                id(t): self._direction(t, g)
                for t, g in zip(self.binding.tensors, self.group_indices)
            }
        except (SymmechError, ValueError, IndexError) as err:
            self.stop(str(err))
            return observed
        dirs = list(found.values())
        s0, eta = dirs[0].shrink, dirs[0].eta
        if all(d.eta == eta for d in dirs) and math.isfinite(eta):
            # one η for every tensor: ⟨ξ, ηa⟩ = η⟨ξ, a⟩ and ⟨ηa, J ηa⟩ = η²⟨a, J a⟩ read a
            # itself (no ηa temporary: one pass over each tensor fewer)
            step_views = self.views_of(lambda p: found[id(p)].a, share="a")
            role, by = "a", (eta, eta * eta)
        else:
            step_views = self.views_of(
                lambda p: self._temporary(
                    ("eta_a", id(p)), lambda: found[id(p)].a * found[id(p)].eta
                ),
                share="eta_a",
            )
            role, by = "eta_a", (1.0, 1.0)
        if self.residuals or log:
            self.residual = self._owned(
                self.run("residual", th, self.views("grad"), roles=("theta", "grad"))
            )
        kappa = float(m.KAPPA)
        mixed = dJd = None
        if all(d.shrink == s0 for d in dirs):
            xi_a = self.run("residual", th, step_views, roles=("theta", role))
            scale = (by[0] * s0 ** (kappa - 1.0), by[1])
        else:
            shrunk = self.views_of(
                lambda p: self._temporary(
                    ("shrunk", id(p)), lambda: p.detach() * found[id(p)].shrink
                ),
                share="shrunk",
            )
            xi_a = self.run("residual", shrunk, step_views, roles=("shrunk", role))
            scale = by
            q = observed if observed is not None else self.run("charge", th, roles=("theta",))
            mixed = self.run("charge", shrunk, roles=("shrunk",)) - s0**kappa * q
            if self.rotation:
                moved = self.views_of(
                    lambda p: self._temporary(
                        ("moved", id(p)),
                        lambda: (
                            p.detach() * (found[id(p)].shrink - 1.0)
                            - found[id(p)].a * found[id(p)].eta
                        ),
                    ),
                    share="moved",
                )
                dJd = self.run("quadratic", moved, roles=("moved",))
        # xi_a and aJa raw: the bank multiplies them by ``scale`` for all its families at once
        aJa = self.run("quadratic", step_views, roles=(role,))
        general = General(s0, xi_a, aJa, mixed=mixed, dJd=dJd, scale=scale)
        self._pending = _Pending(
            hyper,
            self.residual if self.residuals else None,
            general=general,
            rotation_eq=rotation_eq,
        )
        self._mark_restart(step, restart, observed)
        return observed

    @property
    def follows_buffer(self) -> bool:
        """Whether the laws follow torch's momentum buffer (its share ⟨ξ, b⟩ is carried)."""
        return self._xi_known

    def stepped_by_bank(
        self, residual: torch.Tensor | None, momentum: float, general: bool = False
    ) -> None:
        """This step's terms were read for the family's whole bank at once (:mod:`.program`):
        keep what the per-family path keeps (rₖ for the records, whether the step is the general
        one, whether the laws follow SGD's buffer), queue nothing."""
        self._pending = None
        self.residual = residual
        self.general = general
        self._xi_known = momentum != 0.0 and not general

    @property
    def restart_due(self) -> str | None:
        """Why the laws restart at the next step, when they do (their values until then are not
        predictions)."""
        return self._restart if self.tracked else None

    def pending_restart(self) -> torch.Tensor | None:
        """The observed Q the laws restart from at this step, if they do."""
        return None if self._pending is None else self._pending.restart

    def _before_measured(self, log, hyper, th, observed, step, restart, rotation_eq):
        """An optimizer that is not modelled: keep θₖ (one copy per tensor, shared by every
        family) and measure the step once it is taken (:meth:`finish_step`)."""
        assert self.copies is not None
        for t in self.binding.tensors:
            if id(t) not in self.copies:
                self.copies[id(t)] = t.detach().clone()
        if self.residuals or log:
            self.residual = self._owned(
                self.run("residual", th, self.views("grad"), roles=("theta", "grad"))
            )
        self._pending = _Pending(
            hyper,
            self.residual if self.residuals else None,
            measured=True,
            rotation_eq=rotation_eq,
        )
        self._mark_restart(step, restart, observed)
        return observed

    def _measured_general(self) -> General:
        """⟨ξ(θₖ), ηa⟩ and ⟨ηa, J ηa⟩ of the step just taken, with ηa = θₖ − θₖ₊₁."""
        assert self.copies is not None
        copies = self.copies
        before = self.views_of(lambda p: copies[id(p)])
        moved = self.views_of(
            lambda p: self._temporary(("moved", id(p)), lambda: copies[id(p)] - p.detach())
        )
        return General(
            1.0,
            self.run("residual", before, moved, roles=("before", "moved")),
            self.run("quadratic", moved, roles=("moved",)),
        )

    def finish_step(self) -> StepData | None:
        """After the optimizer step: the data of the step just taken (None: not predicted)."""
        p, self._pending = self._pending, None
        if p is None:
            return None
        if p.idle:
            q0 = self.q0
            assert q0 is not None
            zero = torch.zeros(self.n_groups, dtype=torch.float64, device=q0.device)
            return StepData(p.hyper, zero, zero, idle=True)
        if p.measured:
            p.general = self._measured_general()
        if p.general is not None:
            return StepData(
                p.hyper,
                None,
                None,
                residual=p.residual,
                restart=p.restart,
                general=p.general,
                rotation_eq=p.rotation_eq,
            )
        if p.uJu is None or p.uJb is None:
            p.uJu = p.uJb = self.run("quadratic", self.views("buffer"), roles=("buffer",))
        return StepData(
            p.hyper,
            p.uJu,
            p.uJb,
            p.gJg,
            p.residual,
            xi_b=p.xi_b,
            fresh=p.fresh,
            restart=p.restart,
            rotation_eq=p.rotation_eq,
        )


def coming_steps(
    optimizer: torch.optim.Optimizer, cache: ReductionCache, step_cache: dict, group: int
) -> None:
    """The coming steps of every tracked tensor of the param group, in one batch
    (:func:`~.directions.directions_of`; Adam's aₖ left pending where the kernel makes it), kept
    for this hook call in ``step_cache`` and, for the fused pass to read as role "a", in
    ``cache.steps``. On any error each is left to
    :meth:`Family._direction` alone, so the error reaches only the families that bind the failing
    tensor."""
    step_cache[("directions", group)] = True
    tensors = list(cache.bound.get(group, {}).values())
    grads = [cache.grads.get(id(t)) for t in tensors]
    try:
        found = directions_of(optimizer, group, tensors, grads, defer=True)
    except (SymmechError, ValueError, IndexError, RuntimeError):
        return
    for t, d in zip(tensors, found):
        _keep_step(cache, step_cache, t, d)


def _keep_step(cache: ReductionCache, step_cache: dict, tensor: torch.Tensor, d: Direction) -> None:
    """Keep ``tensor``'s coming step for this hook call: for the families (``step_cache``) and
    for the fused pass, which reads aₖ as role "a" (``cache.steps``; a pending aₖ is made when
    first read, or inside the sweep of the banks read at once)."""
    step_cache[("direction", id(tensor))] = d
    cache.steps[id(tensor)] = d
