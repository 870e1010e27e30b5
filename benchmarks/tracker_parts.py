"""Where the tracker's time per step goes: one table of milliseconds per training step.

    python benchmarks/tracker_parts.py [--model vgg11] [--width 0.5] [--image-size 16]
        [--batch 64] [--optimizer sgd|adamw] [--log-every 50] [--reductions native]
        [--steps 60] [--threads 1]

A plain and a tracked copy of the model are stepped in turn; ``optimizer.step()`` is timed on
both (median), and on the tracked copy the tracker's parts are timed by wrapping them with a
clock for the same steps (the wrappers add a few microseconds per call, so the parts sum to a
little more than the work they explain). The parts nest: the fused products (:mod:`~symmech.
runtime.fused`: the C++ kernel's call inside it) are asked for inside the families' calls;
product lookups and slice views are the Python around them; the laws are the banks' vector
updates (:mod:`~symmech.runtime.bank`, :mod:`~symmech.runtime.stepper`); under an adaptive
optimizer the directions aₖ (replaying its moment updates before the step) come first.
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
from symmech.runtime import bank, family, fused, native, reductions, tracker

#: (label, owner, attribute): what is timed, outermost first
PARTS: list[tuple[str, Any, str]] = [
    ("before", family.Family, "before_step"),
    ("after", family.Family, "finish_step"),
    ("compute", fused.Plan, "_compute"),
    ("lookups", reductions.GridSlice, "_fused"),
    ("views", family.Family, "views_of"),
    ("laws", bank.Bank, "step"),
    ("directions", tracker, "coming_steps"),  # an adaptive optimizer's aₖ, before any product
]


KERNEL = "C++ kernel call"


def _clocked(totals: dict[str, float], label: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - start

    return run


class _KernelClock:
    """The C++ kernel's module with its one entry point clocked."""

    def __init__(self, module: Any, totals: dict[str, float]) -> None:
        self._module = module
        self.group_products = _clocked(totals, KERNEL, module.group_products)

    def __getattr__(self, name: str) -> Any:  # its other entry points (adam_direction) as they are
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
    kernel_ms = ms.get(KERNEL, 0.0)
    compute, lookups = ms.get(PARTS[2][0], 0.0), ms.get(PARTS[3][0], 0.0)
    views = ms.get(PARTS[4][0], 0.0)
    calls = ms.get(PARTS[0][0], 0.0) + ms.get(PARTS[1][0], 0.0)
    rows = [
        ("C++ kernel call", kernel_ms),
        ("fused pass around it (Plan._compute - kernel)", compute - kernel_ms),
        ("product lookups (GridSlice._fused - pass)", lookups - compute),
        ("slice views (Family.views_of)", views),
        ("rest of the families' calls", calls - lookups - views),
        ("laws: the banks' vector updates (Bank.step)", ms.get(PARTS[5][0], 0.0)),
        ("adaptive directions aₖ (coming_steps; 0 under SGD)", ms.get(PARTS[6][0], 0.0)),
    ]
    print("  by part, exclusive (mean per step, the clocks' own cost included):")
    for label, value in rows:
        print(f"    {label:50s} {value:8.2f} ms")
    tracker.detach()


if __name__ == "__main__":
    main()
