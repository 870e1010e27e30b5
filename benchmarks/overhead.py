"""Tracker overhead on a VGG-style network: ratios measured in one run, printed.

    python benchmarks/overhead.py [--model vgg11] [--image-size 16] [--width 0.5] [--steps 30]

For several tracker configurations (laws advanced every step in all of them), prints
* (training step with the tracker) / (training step without)          target ≤ 1.05;
* (tracker work per step) / (``optimizer.step()`` time)                target ≤ 0.5,
  where tracker work is the time the step hooks add to ``optimizer.step()``.
Plain and tracked models are stepped in turn, so drift in machine load hits all alike; the
median over steps is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import symmech
from symmech.demo.models import vgg

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def make():
        torch.manual_seed(0)
        model = vgg(
            args.model,
            batch_norm=not args.no_bn,
            in_channels=3,
            num_classes=10,
            image_size=args.image_size,
            width_multiplier=args.width,
        ).to(device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs = {"plain": make()}
    trackers = {}
    for name, cfg in CONFIGS.items():
        runs[name] = make()
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
            total = timed(lambda model=model, opt=opt: forward_backward(model, opt))
            t_opt = timed(opt.step)
            if i >= 3:  # warm-up, and the tracker's first step
                step_times[name].append(total + t_opt)
                opt_times[name].append(t_opt)
    med = statistics.median
    model = runs["plain"][0]
    tracker = next(iter(trackers.values()))
    print(
        f"{args.model}{'' if args.no_bn else '-bn'} width {args.width}, {args.image_size}x{args.image_size} "
        f"images, batch {args.batch}, {device} ({torch.get_num_threads()} threads): "
        f"{sum(p.numel() for p in model.parameters())} parameters, {len(tracker.families)} families, "
        f"{sum(f.n_groups for f in tracker.families)} groups; laws advanced every step"
    )
    plain_step, plain_opt = med(step_times["plain"]), med(opt_times["plain"])
    print(
        f"  plain: training step {plain_step * 1e3:.2f} ms, optimizer.step() {plain_opt * 1e3:.2f} ms"
    )
    for name in CONFIGS:
        work = max(med(opt_times[name]) - plain_opt, 0.0)
        print(
            f"  {name:38s} step ratio {med(step_times[name]) / plain_step:6.3f} (target <= 1.05)   "
            f"tracker work / optimizer.step() {work / plain_opt:6.3f} (target <= 0.5)"
        )
    for t in trackers.values():
        t.detach()


if __name__ == "__main__":
    main()
