"""How fast can any separate tracker pass be? One table of ratios to ``optimizer.step()``.

    python benchmarks/read_floor.py [--width 1.0] [--threads 1] [--repeats 9]

On vgg11-bn (32×32 classes, ``--width``) with SGD (momentum 0.9, weight decay 5e-4), every time
measured with the caches flushed first (a 256 MB write), as a pass after backward meets them:

* ``optimizer.step()`` itself: each tensor's four operations run back to back, so after the first
  read the tensor is in cache and SGD's ~11N element moves cost about 3N from memory;
* the memory floor of the tracker's two passes: one ``torch.dot`` per tensor of θ with g (before
  the step) and of the momentum buffer with itself (after it), the fastest read torch has;
* symmech's CPU kernel (:mod:`symmech.runtime.native`) for the same two passes, with the groups
  along rows and columns of every weight, as the tracker asks for them.

A pass that reads θ, g and b once cannot cost less than the dot products, whatever computes it:
the ratio in that row is the floor of any hook-based tracker on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from symmech.demo.models import vgg
from symmech.runtime import native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg(
        "vgg11", batch_norm=True, in_channels=3, num_classes=10, image_size=32,
        width_multiplier=args.width,
    )  # fmt: skip
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt.step()  # the momentum buffers exist from here on
    thetas = [p.detach() for p in params]
    grads = [p.grad for p in params]
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    flush = torch.zeros(64 * 2**20)

    def cold(fn) -> float:
        times = []
        for _ in range(args.repeats):
            flush.add_(1.0)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def dots():
        for t, g in zip(thetas, grads):
            torch.dot(t.reshape(-1), g.reshape(-1))
        for b in bufs:
            torch.dot(b.reshape(-1), b.reshape(-1))

    rows = {"optimizer.step()": cold(opt.step), "torch.dot per tensor (θ·g, b·b)": cold(dots)}
    if native.build():
        dims = [[0, 1] if t.ndim > 1 else [0] for t in thetas]

        def kernel():
            native.sweep([[t, g] for t, g in zip(thetas, grads)], [[0, 1]] * len(dims), dims)
            native.sweep([[b] for b in bufs], [[0, 0]] * len(dims), dims)

        rows["symmech kernel, rows and columns (θ·g, b·b)"] = cold(kernel)
    else:
        rows[f"symmech kernel: not built ({native.failure()})"] = float("nan")
    n = sum(p.numel() for p in params)
    print(
        f"vgg11-bn width {args.width}: {n} parameters, SGD, {torch.get_num_threads()} threads, "
        "caches flushed before each pass"
    )
    base = rows["optimizer.step()"]
    print(f"  {'pass':46s} {'ms':>8s} {'/ optimizer.step()':>19s}")
    for name, seconds in rows.items():
        print(f"  {name:46s} {seconds * 1e3:8.2f} {seconds / base:19.2f}")


if __name__ == "__main__":
    main()
