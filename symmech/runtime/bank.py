"""The laws of every family that shares a param group and κ, advanced as one vector.

One recurrence over the concatenated groups replaces one per family, so a step costs a few
dozen tensor operations whatever the number of layers.
"""

from __future__ import annotations

from functools import cached_property

import torch

from .family import Family
from .stepper import General, Laws, StepData


class Bank:
    """Families whose groups are stacked into one :class:`~.stepper.Laws`."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families
        self.offsets: list[int] = []
        total = 0
        for f in families:
            self.offsets.append(total)
            total += f.n_groups
        self.size = total
        self.laws: Laws | None = None
        self._segments = {
            id(f): slice(start, start + f.n_groups) for f, start in zip(families, self.offsets)
        }

    @cached_property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the families bind, in order (a tensor bound twice appears twice)."""
        return [t for f in self.families for t in f.binding.tensors]

    def start(self) -> None:
        """Start every law from the families' Q₀ (NaN for a family with none)."""
        like = next(t.detach() for f in self.families for t in f.binding.tensors)
        parts = [
            f.q0.reshape(-1).to(torch.float64)
            if f.q0 is not None
            else torch.full((f.n_groups,), float("nan"), dtype=torch.float64, device=like.device)
            for f in self.families
        ]
        turning = torch.cat(
            [torch.full((f.n_groups,), f.rotation, dtype=torch.bool) for f in self.families]
        )
        self.laws = Laws(self.families[0].module.KAPPA, torch.cat(parts), turning)

    def _column(self, data: list[StepData | None], field: str) -> torch.Tensor | None:
        """One field of every family's data, concatenated (see :meth:`_stack`)."""
        values = [None if d is None else getattr(d, field) for d in data]
        return self._stack(values, [d is not None for d in data], field)

    def _stack(
        self, values: list[torch.Tensor | None], live: list[bool], field: str, scale: float = 1.0
    ) -> torch.Tensor | None:
        """Per-family values over the bank's groups, times ``scale``; a family without data
        gives NaN.

        ``residual``, ``gJg`` and ``mixed`` may be None (zero), ``xi_b``, ``restart`` and ``dJd``
        None (NaN: carry on, or not measured): None for the bank when every family's is.
        """
        assert self.laws is not None
        zero_fill = field in ("residual", "gJg", "mixed")
        optional = zero_fill or field in ("xi_b", "restart", "dJd")
        if optional and all(v is None for v in values):
            return None
        parts = []
        for f, alive, value in zip(self.families, live, values):
            if value is None:
                fill = 0.0 if (alive and zero_fill) else float("nan")
                value = torch.full(
                    (f.n_groups,), fill, dtype=torch.float64, device=self.laws.q0.device
                )
            parts.append(value if value.ndim == 1 else value.reshape(-1))
        # one conversion for the bank (float32 → float64 is exact; cat promotes mixed dtypes),
        # after the one product by ``scale`` (in the values' dtype, as each family's would be)
        out = torch.cat(parts)
        return (out * scale if scale != 1.0 else out).to(torch.float64)

    def _flags(self, data: list[StepData | None], field: str) -> torch.Tensor | bool:
        """A per-family flag over the bank's groups (False when no family sets it)."""
        flags = [d is not None and bool(getattr(d, field)) for d in data]
        if not any(flags):
            return False
        assert self.laws is not None
        return torch.cat(
            [
                torch.full((f.n_groups,), flag, dtype=torch.bool, device=self.laws.q0.device)
                for f, flag in zip(self.families, flags)
            ]
        )

    def step(self, data: list[StepData | None]) -> None:
        """Advance the laws by one step with each family's data (None: not predicted)."""
        if self.laws is None:
            self.start()
        assert self.laws is not None
        live = [d for d in data if d is not None]
        if not live:
            return  # no family is tracked
        hyper = live[0].hyper
        if any(d.hyper != hyper for d in live[1:]):  # pragma: no cover - one param group a bank
            raise RuntimeError("families of one bank disagree in hyperparameters")
        general = [d.general for d in live]
        if any(g is not None for g in general):
            self.laws.step(self._general(data, hyper, live))
            return
        uju = self._column(data, "uJu")
        # heavy ball and first steps hand one tensor for both (uₖ = bₖ): one stack for the bank
        same = all(d is None or d.uJu is d.uJb for d in data)
        ujb = uju if same else self._column(data, "uJb")
        assert uju is not None and ujb is not None
        self.laws.step(
            StepData(
                hyper,
                uju,
                ujb,
                self._column(data, "gJg"),
                self._column(data, "residual"),
                xi_b=self._column(data, "xi_b"),
                fresh=self._flags(data, "fresh"),
                restart=self._column(data, "restart"),
                idle=self._flags(data, "idle"),
                rotation_eq=live[0].rotation_eq,
            )
        )

    def advance(self, data: StepData) -> None:
        """Advance the laws by one step with data already laid out over the bank's groups
        (:mod:`.program` reads them for every family at once)."""
        assert self.laws is not None
        self.laws.step(data)

    def _general(self, data: list[StepData | None], hyper, live: list[StepData]) -> StepData:
        """One general step for the bank: every live family's measured terms, concatenated."""
        shrinks = {d.general.shrink for d in live if d.general is not None}
        if len(shrinks) != 1 or any(
            d.general is None and d.idle is False for d in live
        ):  # pragma: no cover
            raise RuntimeError("families of one bank disagree in the kind of step")
        parts = [None if d is None else d.general for d in data]
        alive = [g is not None for g in parts]
        scales = {g.scale for g in parts if g is not None}
        shared = scales.pop() if len(scales) == 1 else None  # one product for the bank

        def stack(name: str, i: int | None = None) -> torch.Tensor | None:
            values = [None if g is None else getattr(g, name) for g in parts]
            if i is None or shared is not None:
                return self._stack(values, alive, name, 1.0 if i is None else shared[i])
            return self._stack(  # settings differ: each family's own product
                [v if g is None else v * g.scale[i] for v, g in zip(values, parts)], alive, name
            )

        xi_a, aJa = stack("xi_a", 0), stack("aJa", 1)
        assert xi_a is not None and aJa is not None
        return StepData(
            hyper,
            None,
            None,
            residual=self._column(data, "residual"),
            restart=self._column(data, "restart"),
            idle=self._flags(data, "idle"),
            general=General(shrinks.pop(), xi_a, aJa, stack("mixed"), stack("dJd")),
            rotation_eq=live[0].rotation_eq,
        )

    def restart_now(self) -> None:
        """Start the laws of families that asked for it at their observed Q, before the step's
        snapshot (so the restart row shows the law back on the observed value)."""
        if self.laws is None:
            return
        q = [f.pending_restart() for f in self.families]
        if any(v is not None for v in q):
            parts = [
                torch.full(
                    (f.n_groups,), float("nan"), dtype=torch.float64, device=self.laws.q0.device
                )
                if v is None
                else v.reshape(-1).to(torch.float64)
                for f, v in zip(self.families, q)
            ]
            self.laws.restart(torch.cat(parts))

    def segment(self, family: Family) -> slice:
        """Where a family's groups sit in the bank's vectors."""
        return self._segments[id(family)]
