"""Tracker overhead under torch.distributed: 2 CPU processes, gloo, DDP / FSDP2 / ZeRO.

    python benchmarks/distributed_overhead.py [--steps 20] [--width 16] [--batch 32] [--log-every 10]

For each kind, a plain and a tracked copy of a small conv+BN net (detected symmetries) are
stepped in turn on the same batches, so load drift hits both alike; printed per kind:
* (training step with the tracker) / (training step without), median over steps;
* bytes handed to collectives per step by the tracker: every collective of a tracked and of a
  plain step is counted (DDP's reducer, FSDP2's all-gathers, ZeRO's broadcasts, DTensor-internal
  ones; ``symmech.runtime.distributed.count_communication``) and the difference is the tracker's
  (target 0 between logs);
* bytes of one ``records()`` call (the one reduction the split modes need).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import symmech
from symmech.runtime.distributed import count_communication

KINDS = ("ddp", "fsdp", "zero")
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def net(width: int) -> nn.Module:
    torch.manual_seed(0)
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * w * 16, 10),
    )


def build(kind: str, width: int, families):
    model = net(width)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer)
        fully_shard(model)
        return model, torch.optim.SGD(model.parameters(), **SGD)
    ddp = nn.parallel.DistributedDataParallel(model)
    if kind == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ddp, ZeroRedundancyOptimizer(
            ddp.parameters(), optimizer_class=torch.optim.SGD, **SGD
        )
    return ddp, torch.optim.SGD(ddp.parameters(), **SGD)


def step(model, opt, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def run(rank: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(rank)
    data = [
        (
            torch.randn(args.batch, 3, 8, 8, generator=gen),
            torch.randint(0, 10, (args.batch,), generator=gen),
        )
        for _ in range(args.steps + 3)
    ]
    families = symmech.detect(net(args.width), data[0][0], confirm_batch=data[0])
    lines = []
    for kind in KINDS:
        plain, plain_opt = build(kind, args.width, families)
        model, opt = build(kind, args.width, families)
        tracker = symmech.track(model, opt, families, log_every=args.log_every)
        times: dict[str, list[float]] = {"plain": [], "tracked": []}
        for i, (x, y) in enumerate(data):
            t_plain, t_tracked = step(plain, plain_opt, x, y), step(model, opt, x, y)
            if i >= 3:  # warm-up
                times["plain"].append(t_plain)
                times["tracked"].append(t_tracked)
        n = 3  # steps counted, none of them logged
        with count_communication() as without:
            for x, y in data[:n]:
                step(plain, plain_opt, x, y)
        first = tracker.step
        with count_communication() as with_tracker:
            for x, y in data[:n]:
                step(model, opt, x, y)
        logged = [s for s in range(first, first + n) if tracker.schedule(s)]
        with count_communication() as records:
            rows = tracker.records()
        ratio = statistics.median(times["tracked"]) / statistics.median(times["plain"])
        lines.append(
            f"{kind:5s} {ratio:10.3f} {(with_tracker.bytes - without.bytes) / n:14.1f} "
            f"{without.bytes / n:12.0f} {records.bytes:14d} {len(rows):6d}  "
            f"(logged among counted steps: {logged or 'none'}, {len(tracker.families)} families)"
        )
        tracker.detach()
    if rank == 0:
        Path(out).write_text("\n".join(lines))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "table.txt"
    torch.multiprocessing.spawn(run, args=(args, port, str(out)), nprocs=2, join=True)
    print(
        f"{'kind':5s} {'step ratio':>10s} {'tracker B/step':>14s} {'step B/step':>12s} "
        f"{'records() B':>14s} {'rows':>6s}"
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
