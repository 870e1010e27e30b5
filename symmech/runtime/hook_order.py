"""The tracker reads a step's data last: step pre-hooks registered after it are caught.

The tracker reads θₖ, gₖ and the settings in a step pre-hook. A pre-hook registered after
:func:`~symmech.track` runs after that read and before the update; if it changes the settings
(a learning-rate warm-up written as a hook) or the gradients (clipping in a hook), the laws
would advance with values the optimizer did not use, and every row would still say
``tracked``. :class:`HookOrder` sees such a hook on the step it first runs, tells which
groups and tensors it changed (settings compared by value, gradients by identity and
in-place version counter, no copies and no host sync), and moves the tracker's hook to the
end so that from the next step on it reads what the step uses.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = torch.optim.SGD([w], lr=0.1)
>>> order = HookOrder(opt.register_step_pre_hook(lambda o, a, k: None))
>>> order.late()
False
>>> late = opt.register_step_pre_hook(lambda o, a, k: o.param_groups[0].update(lr=0.05))
>>> order.late()
True
>>> w.grad = torch.ones(3)
>>> seen = order.read(opt)
>>> _ = opt.step()
>>> order.changed(opt, seen)
({0: ['lr: 0.1 → 0.05']}, set())
>>> order.run_last()
True
>>> order.late()
False
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Read:
    """What the tracker read before a step: each group's settings, each gradient's identity."""

    settings: list[dict[str, Any]] = field(default_factory=list)
    #: id(parameter) -> (id(gradient), its version counter); None when it had no gradient
    grads: dict[int, tuple[int, int] | None] = field(default_factory=dict)


def _value(v: Any) -> Any:
    """A setting as compared after the step: a tensor by identity and version (no sync)."""
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), v._version)
    return v


def _shown(v: Any) -> str:
    return "a tensor" if isinstance(v, tuple) and v[:1] == ("tensor",) else repr(v)


class HookOrder:
    """Keeps the tracker's step pre-hook (``handle``) the last one of its optimizer."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _hooks(self) -> OrderedDict | None:
        ref = getattr(self.handle, "hooks_dict_ref", None)
        hooks = ref() if callable(ref) else None
        return hooks if isinstance(hooks, OrderedDict) else None

    def late(self) -> bool:
        """Whether a pre-hook registered after the tracker's runs after it at the next step."""
        hooks = self._hooks()
        return bool(hooks) and next(reversed(hooks)) != self.handle.id

    def run_last(self) -> bool:
        """Move the tracker's hook after every other one (between steps only: the optimizer
        iterates over the hooks during one); False when torch keeps them elsewhere."""
        hooks = self._hooks()
        if hooks is None or self.handle.id not in hooks:
            return False
        hooks.move_to_end(self.handle.id)
        return True

    @staticmethod
    def read(optimizer: torch.optim.Optimizer) -> Read:
        """The settings and gradients as the tracker reads them now."""
        out = Read()
        for group in optimizer.param_groups:
            out.settings.append({k: _value(v) for k, v in group.items() if k != "params"})
            for p in group["params"]:
                g = p.grad
                out.grads[id(p)] = None if g is None else (id(g), g._version)
        return out

    @staticmethod
    def changed(
        optimizer: torch.optim.Optimizer, before: Read
    ) -> tuple[dict[int, list[str]], set[int]]:
        """Groups whose settings differ from ``before`` (index -> 'name: old → new'), and the
        ids of parameters whose gradient was replaced or changed in place since."""
        now = HookOrder.read(optimizer)
        groups: dict[int, list[str]] = {}
        for i, (old, new) in enumerate(zip(before.settings, now.settings)):
            diff = [
                f"{k}: {_shown(old.get(k))} → {_shown(new.get(k))}"
                for k in dict.fromkeys([*old, *new])
                if old.get(k) != new.get(k)
            ]
            if diff:
                groups[i] = diff
        grads = {p for p, g in now.grads.items() if before.grads.get(p) != g}
        return groups, grads
