"""The tracker's reduction paths on a GPU (or the CPU), one table, in under five minutes.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--steps 30] [--time-limit 270]

On CUDA: VGG-11 with BatchNorm, width 1.0, 32x32 inputs, batch 128, SGD momentum 0.9, weight
decay 5e-4. On the CPU (or with ``--small``): width 0.25, 16x16, batch 16, so it runs in seconds.

Every per-group inner product among θ, g and the momentum buffer b of every tracked layout (all
six, as the laws with weight decay and Nesterov need them) is computed by

* ``eager``: one reduction per product, as the tracker does without fusion (``GridSlice``);
* ``fused``: every product of every layout in one function, run eagerly
  (:func:`symmech.runtime.fused.all_products`);
* ``compiled``: the same function through ``torch.compile`` (Inductor), as the tracker runs it;
* ``cuda graph``: the compiled function captured once in a CUDA graph and replayed (parameters,
  gradients and buffers keep their addresses, so a replay reads the current values); CUDA only.

Columns: the median milliseconds per hook call; the largest relative difference from ``eager``
(round-off); whether a call synchronises with the host (CUDA: ``set_sync_debug_mode("error")``);
and for the two modes the tracker runs (``eager``, ``compiled``) the training-step ratio with
the tracker (log every step, residual every step) and the tracker's work / ``optimizer.step()``,
plain and tracked models stepped in turn, medians. With ``OUT`` set the table is also written to
``$OUT/gpu_check.txt``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import symmech
from symmech.demo.models import vgg
from symmech.runtime import fused
from symmech.runtime.reductions import GridSlice, ReductionCache

PAIRS = ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))  # θθ θg gg θb gb bb


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def host_syncs(fn: Callable[[], Any], device: torch.device) -> str:
    """'none' if ``fn`` runs under sync-debug "error" mode (CUDA), else the error's first line."""
    if device.type != "cuda":
        return "n/a (cpu)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as err:
        return str(err).splitlines()[0][:40]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def make(args, device: torch.device):
    torch.manual_seed(0)
    model = vgg("vgg11", batch_norm=True, in_channels=3, num_classes=10,
                image_size=args.image_size, width_multiplier=args.width).to(device)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt


def layouts(tracker: symmech.Tracker) -> list[Any]:
    """One bound slice per distinct (parameter, view, group dim) of the tracked families."""
    seen, out = set(), []
    for fam in tracker.families:
        for slices in fam.binding.blocks.values():
            for s in slices:
                key = (id(s.tensor), s.view, s.dim)
                if s.dim is not None and key not in seen:
                    seen.add(key)
                    out.append(s)
    return out


def reduction_rows(args, device: torch.device, x, y, reps: int) -> dict[str, dict[str, Any]]:
    model, opt = make(args, device)
    tracker = symmech.track(model, opt, example_input=(x, y))
    for _ in range(2):  # gradients and momentum buffers exist
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    tracker.detach()
    specs = layouts(tracker)
    state = opt.state

    def members(s) -> list[torch.Tensor]:
        p = s.tensor
        return [s.shaped(t.detach()) for t in (p, p.grad, state[p]["momentum_buffer"])]

    groups = [members(s) for s in specs]
    structure = tuple((s.dim % m[0].ndim, PAIRS) for s, m in zip(specs, groups))

    def eager() -> list[torch.Tensor]:
        cache, out = ReductionCache(), []
        for s, m in zip(specs, groups):
            sl = [GridSlice(t, s, cache) for t in m]
            out.append(torch.stack([sl[i].sq() if i == j else sl[i].dot(sl[j]) for i, j in PAIRS]))
        return out

    saved = fused.MODE
    fused.MODE = "eager"
    rows: dict[str, dict[str, Any]] = {}
    try:
        reference = eager()
        paths: dict[str, Callable[[], list[torch.Tensor]] | None] = {
            "eager": eager,
            "fused": lambda: fused.all_products(structure, groups),
        }
        start = time.perf_counter()
        compiled = fused.run_compiled(structure, groups)
        compile_s = time.perf_counter() - start
        paths["compiled"] = (
            (lambda: fused.run_compiled(structure, groups)) if compiled is not None else None
        )
        if device.type == "cuda" and compiled is not None:
            paths["cuda graph"] = graph_path(lambda: fused.run_compiled(structure, groups), device)
        for name, fn in paths.items():
            if fn is None:
                rows[name] = {"ms": None, "note": fused._failed or "unavailable"}
                continue
            got = fn()
            diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                       for a, b in zip(got, reference))  # fmt: skip
            rows[name] = {"ms": median_ms(fn, device, reps), "diff": diff,
                          "syncs": host_syncs(fn, device)}  # fmt: skip
        if "compiled" in rows and compiled is not None:
            rows["compiled"]["note"] = f"compiled in {compile_s:.1f} s"
    finally:
        fused.MODE = saved
    rows["_layouts"] = {"n": len(specs), "elements": sum(m[0].numel() for m in groups)}
    return rows


def graph_path(fn: Callable[[], list[torch.Tensor]], device: torch.device):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); None if it fails."""
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()

        def replay() -> list[torch.Tensor]:
            graph.replay()
            return outputs

        return replay
    except Exception as err:  # noqa: BLE001 - a capture failure is a row, not a crash
        print(f"  cuda graph capture failed: {type(err).__name__}: {err}")
        return None


def training_ratios(args, device: torch.device, x, y, steps: int) -> dict[str, tuple[float, float]]:
    """(step ratio, tracker work / optimizer.step()) per tracker mode, plain run interleaved."""
    runs = {"plain": make(args, device)}
    for mode in ("eager", "compiled"):
        runs[mode] = make(args, device)
        symmech.track(*runs[mode], example_input=(x, y), log_every=1, residuals=True)
    step_t: dict[str, list[float]] = {k: [] for k in runs}
    opt_t: dict[str, list[float]] = {k: [] for k in runs}
    saved = fused.MODE
    try:
        for i in range(steps + 3):
            for name, (model, opt) in runs.items():
                fused.MODE = name if name != "plain" else saved
                sync(device)
                start = time.perf_counter()
                opt.zero_grad(set_to_none=False)
                F.cross_entropy(model(x), y).backward()
                sync(device)
                mid = time.perf_counter()
                opt.step()
                sync(device)
                end = time.perf_counter()
                if i >= 3:  # warm-up, the plan learnt, the compiled pass built
                    step_t[name].append(end - start)
                    opt_t[name].append(end - mid)
    finally:
        fused.MODE = saved
    med = statistics.median
    plain_step, plain_opt = med(step_t["plain"]), med(opt_t["plain"])
    return {m: (med(step_t[m]) / plain_step, max(med(opt_t[m]) - plain_opt, 0.0) / plain_opt)
            for m in ("eager", "compiled")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="the CPU sizes on any device")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--time-limit", type=float, default=270.0, help="skip training after")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = args.small or device.type != "cuda"
    args.width, args.image_size, batch = (0.25, 16, 16) if small else (1.0, 32, 128)
    steps = args.steps or (10 if small else 30)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    rows = reduction_rows(args, device, x, y, reps=20 if small else 50)
    info = rows.pop("_layouts")
    ratios: dict[str, tuple[float, float]] = {}
    if time.perf_counter() - start < args.time_limit / 2:
        ratios = training_ratios(args, device, x, y, steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"gpu_check on {name} ({device}): vgg11-bn width {args.width}, {args.image_size}x"
        f"{args.image_size}, batch {batch}; {info['n']} layouts, {info['elements']} entries, "
        f"6 products each; torch {torch.__version__}",
        f"{'path':12s} {'ms/call':>8s} {'rel diff':>9s} {'host syncs':>12s} "
        f"{'step ratio':>10s} {'work/opt':>9s}  note",
    ]
    for path, row in rows.items():
        ms = "-" if row.get("ms") is None else f"{row['ms']:.3f}"
        diff = "-" if row.get("diff") is None else f"{row['diff']:.1e}"
        ratio, work = (
            (f"{ratios[path][0]:.3f}", f"{ratios[path][1]:.3f}") if path in ratios else ("-", "-")
        )
        lines.append(f"{path:12s} {ms:>8s} {diff:>9s} {row.get('syncs', '-'):>12s} {ratio:>10s} "
                     f"{work:>9s}  {row.get('note', '')}")  # fmt: skip
    if device.type != "cuda":
        lines.append("no CUDA device: the cuda graph row is skipped; sizes are the small ones")
    lines.append(f"total {time.perf_counter() - start:.0f} s")
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
