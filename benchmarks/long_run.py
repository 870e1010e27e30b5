"""Long runs: memory and time per step of a tracked training loop, cosine schedule.

A small MLP on random data trains for ``--steps`` steps with ``torch.optim.SGD`` (momentum, weight
decay) under ``CosineAnnealingLR``: a new learning rate every step, the case that grows per-lr
caches. For each ``--log-every`` value it prints the process's resident memory growth over the run
(MB), the tracker's history size, and the time per step with and without the tracker measured in
the same process (ratio). Run it before and after a change on the same machine::

    python benchmarks/long_run.py --steps 100000 --log-every 1 100

``--max-history N`` or ``--spill-dir DIR`` bound the history (see ``symmech.runtime.history``);
``--io`` also times ``records()``, ``to_csv`` and ``plot`` of each run's history::

    python benchmarks/long_run.py --steps 5000 --log-every 1 --io
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import symmech
from symmech.runtime.history import History


def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, opt


def run(
    steps: int,
    log_every: int | None,
    max_history: int | None = None,
    spill_dir: str | None = None,
    io: bool = False,
) -> tuple[float, float, int]:
    """(seconds per step, RSS growth in MB, number of records) for one run."""
    model, opt = make()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    tracker = None
    if log_every is not None:
        tracker = symmech.track(model, opt, example_input=(x, y), log_every=log_every)
        if max_history is not None or spill_dir is not None:
            tracker.history = History(max_history=max_history, spill_dir=spill_dir)
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    seconds = (time.perf_counter() - start) / steps
    grown = rss_mb() - before
    n_records = len(tracker.records()) if tracker is not None else 0
    if io and tracker is not None:
        time_io(tracker)
    return seconds, grown, n_records


def time_io(tracker) -> None:
    """Seconds of records(), to_csv and plot of a tracker's history (printed)."""
    with tempfile.TemporaryDirectory() as folder:
        timings = {}
        start = time.perf_counter()
        rows = tracker.records()
        timings["records()"] = time.perf_counter() - start
        start = time.perf_counter()
        tracker.to_csv(Path(folder) / "records.csv")
        timings["to_csv"] = time.perf_counter() - start
        start = time.perf_counter()
        tracker.plot(Path(folder) / "plot.png")
        timings["plot"] = time.perf_counter() - start
    print(f"    {len(rows)} rows: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--log-every", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-history", type=int, default=None)
    parser.add_argument("--spill-dir", default=None)
    parser.add_argument("--io", action="store_true", help="time records(), to_csv and plot")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, _, _ = run(args.steps, None)
    print(f"{args.steps} steps, cosine schedule, plain step {plain * 1e3:.3f} ms")
    print(f"{'log_every':>9}  {'ms/step':>8}  {'ratio':>6}  {'RSS +MB':>8}  {'records':>9}")
    for every in args.log_every:
        seconds, grown, n = run(args.steps, every, args.max_history, args.spill_dir, args.io)
        print(f"{every:>9}  {seconds * 1e3:8.3f}  {seconds / plain:6.2f}  {grown:8.1f}  {n:>9}")


if __name__ == "__main__":
    main()
