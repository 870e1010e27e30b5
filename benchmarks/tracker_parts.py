"""Where the tracker's time per step goes: one table of milliseconds per training step.

    python benchmarks/tracker_parts.py [--model vgg11] [--width 0.5] [--image-size 16]
        [--batch 64] [--optimizer sgd|adamw] [--log-every 50] [--reductions native]
        [--steps 60] [--threads 1]

A plain and a tracked copy of the model are stepped in turn; ``optimizer.step()`` is timed on
both (median), and on the tracked copy the tracker's parts are timed by wrapping them with a
clock for the same steps. Each clock counts its own time only: the time of a clocked call
inside it (the C++ kernel inside the fused pass, the lookups inside a family's call) goes to
that call's row, so the rows add up, and the rest of the tracker's work is the hooks' own
Python. The wrappers add a few microseconds per call. The rows: the kernel's call; the banks
whose terms are read at once (:mod:`~symmech.runtime.program`: reading the inputs, the gather);
for the other families the fused pass around the kernel (:mod:`~symmech.runtime.fused`), the
product lookups, slice views and the rest of their calls; the laws (the banks' vector updates,
:mod:`~symmech.runtime.bank`, :mod:`~symmech.runtime.stepper`); under an adaptive optimizer the
directions aₖ (replaying its moment updates before the step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import symmech
from symmech.demo.models import vgg
from symmech.runtime import bank, family, fused, native, program, reductions, tracker

#: (label, owner, attribute): what is timed; each clock counts its own time only (exclusive:
#: the time of clocked calls inside it goes to theirs)
PARTS: list[tuple[str, Any, str]] = [
    ("families", family.Family, "before_step"),
    ("families", family.Family, "finish_step"),
    ("compute", fused.Plan, "_compute"),
    ("lookups", reductions.GridSlice, "_fused"),
    ("views", family.Family, "views_of"),
    ("programs", program.Programs, "before"),
    ("programs", program.Programs, "after"),
    ("laws", bank.Bank, "step"),
    ("laws", bank.Bank, "advance"),
    ("directions", tracker, "coming_steps"),  # an adaptive optimizer's aₖ, before any product
]
ROWS = [
    ("C++ kernel call", "kernel"),
    ("banks read at once: inputs and gather (program.Programs)", "programs"),
    ("families' fused pass around the kernel (Plan._compute)", "compute"),
    ("product lookups (GridSlice._fused)", "lookups"),
    ("slice views (Family.views_of)", "views"),
    ("rest of the families' own calls", "families"),
    ("laws: the banks' vector updates (Bank.step, advance)", "laws"),
    ("adaptive directions aₖ (coming_steps; 0 under SGD)", "directions"),
]


_stack: list[list[float]] = []  # per open clocked call: the time of clocked calls inside it


def _clocked(totals: dict[str, float], label: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        start = time.perf_counter()
        _stack.append([0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            inner = _stack.pop()[0]
            spent = time.perf_counter() - start
            totals[label] = totals.get(label, 0.0) + spent - inner
            if _stack:
                _stack[-1][0] += spent

    return run


class _KernelClock:
    """The C++ kernel's module with its product call clocked."""

    def __init__(self, module: Any, totals: dict[str, float]) -> None:
        self._module = module
        self.products = _clocked(totals, "kernel", module.products)

    def __getattr__(self, name: str) -> Any:  # scatter, adam_direction: as they are
        return getattr(self._module, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--reductions", default="native")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fused.MODE = args.reductions

    def make():
        torch.manual_seed(0)
        model = vgg(args.model, batch_norm=True, in_channels=3, num_classes=10,
                    image_size=args.image_size, width_multiplier=args.width)  # fmt: skip
        if args.optimizer == "adamw":
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))
    (plain, opt_p), (tracked, opt_t) = make(), make()
    tracker = symmech.track(tracked, opt_t, example_input=(x, y), log_every=args.log_every)

    def forward_backward(model, opt):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    for _ in range(5):  # warm-up: the plan settles, the kernel is built or loaded
        for model, opt in ((plain, opt_p), (tracked, opt_t)):
            forward_backward(model, opt)
            opt.step()
    totals: dict[str, float] = {}
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in PARTS]
    for label, owner, name in PARTS:
        setattr(owner, name, _clocked(totals, label, getattr(owner, name)))
    kernel = native._module
    if kernel is not None:
        native._module = _KernelClock(kernel, totals)
    steps: dict[str, list[float]] = {"plain": [], "tracked": []}
    try:
        for _ in range(args.steps):
            for key, (model, opt) in (("plain", (plain, opt_p)), ("tracked", (tracked, opt_t))):
                forward_backward(model, opt)
                start = time.perf_counter()
                opt.step()
                steps[key].append(time.perf_counter() - start)
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        native._module = kernel
    plain_ms = statistics.median(steps["plain"]) * 1e3
    tracked_ms = statistics.median(steps["tracked"]) * 1e3
    print(
        f"{args.model}-bn width {args.width}, {args.image_size}x{args.image_size}, batch "
        f"{args.batch}, {type(opt_t).__name__}, log every {args.log_every}, reductions "
        f"{args.reductions}, {torch.get_num_threads()} thread(s), {len(tracker.families)} "
        f"families, {args.steps} steps (kernel {'loaded' if kernel is not None else 'not used'})"
    )
    print(f"  {'optimizer.step() without the tracker':46s} {plain_ms:8.2f} ms")
    print(f"  {'optimizer.step() with it (median)':46s} {tracked_ms:8.2f} ms")
    print(f"  {'tracker work':46s} {tracked_ms - plain_ms:8.2f} ms")
    ms = {k: v / args.steps * 1e3 for k, v in totals.items()}
    print("  by part, exclusive (mean per step, the clocks' own cost included):")
    for label, key in ROWS:
        print(f"    {label:56s} {ms.get(key, 0.0):8.2f} ms")
    rest = tracked_ms - plain_ms - sum(ms.get(key, 0.0) for _, key in ROWS)
    print(f"    {'the rest: the hooks themselves (snapshots, history, …)':56s} {rest:8.2f} ms")
    tracker.detach()


if __name__ == "__main__":
    main()
