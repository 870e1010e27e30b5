"""Tracker overhead on a VGG-style network: ratios measured in one run, printed as one table.

    python benchmarks/overhead.py [--model vgg11|transformer] [--image-size 16] [--width 0.5]
        [--steps 30] [--optimizer sgd|adamw] [--reductions eager,native] [--configs 0,1,2]

For several tracker configurations (laws advanced every step in all of them), prints
* (training step with the tracker) / (training step without);
* (tracker work per step) / (``optimizer.step()`` time), where tracker work is the time the step
  hooks add to ``optimizer.step()``.
The targets (CPU): vgg11-bn width 1.0, 32², batch 128 (``--image-size 32 --width 1.0 --batch
128``), every law advanced and the residual every step: step ratio ≤ 1.02, tracker work ≤ 0.35;
the small net (the defaults): step ratio ≤ 1.08.
Plain and tracked models are stepped in turn, so drift in machine load hits all alike; the
median over steps is reported. ``--reductions`` lists the ways the tracker's products are
reduced (:mod:`symmech.runtime.fused`: ``eager``, one reduction per product; ``native``, every
product of a hook call by symmech's C++ kernel on the CPU, one sweep per tensor; ``compiled``, one
``torch.compile``d pass; ``auto``): one tracked copy per configuration and way, one row each. The
kernel is built (or loaded) and the compiled pass made during the three warm-up steps (not timed).
``--configs`` picks rows of :data:`CONFIGS` by index (default all three). Last, the tensor
operations that one more ``optimizer.step()`` dispatches, hooks included (plain and per row).
``--model transformer`` times :func:`symmech.demo.models.transformer_block` with ``--d-model``
(heads of 32), a feed-forward of 4 × d-model and ``--seq-len`` tokens of 32 features (``--width``
and ``--image-size`` are ignored).
Run it with ``PYTHONPATH`` set to another checkout to time that one (a checkout without
:mod:`symmech.runtime.fused` is timed as it is, in a row named ``as is``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import symmech
from symmech.demo.models import transformer_block, vgg

try:
    from symmech.runtime import fused
except ImportError:  # a checkout from before the fused reductions
    fused = None

CONFIGS = {
    "log every step, residual every step": dict(log_every=1, residuals=True),
    "log every 50, residual every step": dict(log_every=50, residuals=True),
    "log every 50, residual when logged": dict(log_every=50, residuals=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg11")
    parser.add_argument("--no-bn", action="store_true")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--reductions", default="eager,native")
    parser.add_argument("--configs", default="0,1,2")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=32)
    args = parser.parse_args()
    modes = args.reductions.split(",") if fused is not None else ["as is"]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    configs = {k: CONFIGS[k] for i, k in enumerate(CONFIGS) if str(i) in args.configs.split(",")}
    transformer = args.model == "transformer"

    def build() -> torch.nn.Module:
        if transformer:
            d = args.d_model
            return transformer_block(d, max(d // 32, 1), 4 * d, args.seq_len, 10, 32)
        return vgg(
            args.model,
            batch_norm=not args.no_bn,
            in_channels=3,
            num_classes=10,
            image_size=args.image_size,
            width_multiplier=args.width,
        )

    def make():
        torch.manual_seed(0)
        model = build().to(device)
        if args.optimizer == "adamw":
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    shape = (args.seq_len, 32) if transformer else (3, args.image_size, args.image_size)
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = {"plain": make()}
    trackers, mode_of = {}, {"plain": None}
    for config, cfg in configs.items():
        for mode in modes:
            name = f"{config} | {mode}"
            runs[name], mode_of[name] = make(), mode
            trackers[name] = symmech.track(*runs[name], example_input=(x, y), **cfg)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def forward_backward(model, opt):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    step_times = {k: [] for k in runs}
    opt_times = {k: [] for k in runs}
    for i in range(args.steps + 3):
        for name, (model, opt) in runs.items():
            if fused is not None and mode_of[name] is not None:
                fused.MODE = mode_of[name]
            total = timed(lambda model=model, opt=opt: forward_backward(model, opt))
            t_opt = timed(opt.step)
            if i >= 3:  # warm-up, and the tracker's first step
                step_times[name].append(total + t_opt)
                opt_times[name].append(t_opt)
    med = statistics.median
    model = runs["plain"][0]
    tracker = next(iter(trackers.values()))
    if transformer:
        what = f"transformer d_model {args.d_model}, {args.seq_len} tokens"
    else:
        what = (
            f"{args.model}{'' if args.no_bn else '-bn'} width {args.width}, "
            f"{args.image_size}x{args.image_size} images"
        )
    print(
        f"{what}, batch {args.batch}, {device} ({torch.get_num_threads()} threads): "
        f"{sum(p.numel() for p in model.parameters())} parameters, {len(tracker.families)} families, "
        f"{sum(f.n_groups for f in tracker.families)} groups; laws advanced every step; "
        f"{type(runs['plain'][1]).__name__}"
    )
    statuses: dict[str, int] = {}
    for f in tracker.families:
        statuses[f.status.split(":")[0]] = statuses.get(f.status.split(":")[0], 0) + 1
    print(f"  family statuses: {statuses} (observed only: the tracker reads Q, advances no law)")
    plain_step, plain_opt = med(step_times["plain"]), med(opt_times["plain"])
    print(
        f"  plain: training step {plain_step * 1e3:.2f} ms, optimizer.step() {plain_opt * 1e3:.2f} ms"
    )
    print(f"  {'configuration':38s} {'reductions':10s} {'step ratio':>10s} {'work/opt.step':>13s}")
    for name in trackers:
        config, mode = name.split(" | ")
        work = max(med(opt_times[name]) - plain_opt, 0.0)
        print(
            f"  {config:38s} {mode:10s} {med(step_times[name]) / plain_step:10.3f} "
            f"{work / plain_opt:13.3f}"
        )
    print(
        "  targets (CPU): width 1.0, 32x32, batch 128: step ratio <= 1.02, tracker work / "
        "optimizer.step() <= 0.35; width 0.5, 16x16, batch 64: step ratio <= 1.08"
    )
    counts = {name: _operations(*runs[name], forward_backward) for name in ("plain", *trackers)}
    print(
        "  tensor operations in one more optimizer.step() (machine load does not change them): "
        + ", ".join(f"{k.split(' | ')[0]}: {v}" for k, v in counts.items())
    )
    for t in trackers.values():
        t.detach()


def _operations(model, opt, forward_backward) -> int:
    """The aten operations one ``optimizer.step()`` dispatches (with its hooks), after a
    forward and backward pass that are not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    forward_backward(model, opt)
    with Count():
        opt.step()
    return Count.n


if __name__ == "__main__":
    main()
