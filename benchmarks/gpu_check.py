"""The one script to run on a CUDA machine: overhead, host syncs, correctness, law-update speed.

    python benchmarks/gpu_check.py [--steps 50] [--quick] [--time-limit 270]

On CUDA (VGG-11 with BatchNorm, 32x32 inputs, batch 128, SGD momentum 0.9, weight decay 5e-4):

1. overhead: ``symmech.track(model, opt, example_input=(x, y), ...)`` for three configurations
   (log every step & residuals on; log every 50 & residuals on; log every 50 & residuals off);
   the steady-state steps run under ``torch.cuda.set_sync_debug_mode("error")`` (a short
   "warn" pass first names the file and line of any host sync); prints, as
   ``benchmarks/overhead.py`` does, (step with tracker) / (step without) and
   (tracker work) / (``optimizer.step()``), medians over steps, plain and tracked interleaved,
   ``torch.cuda.synchronize()`` around every timed region;
2. correctness: conv -> BatchNorm(eps 1e-12) -> ReLU -> linear, 200 steps on the GPU, max relative
   error of the ``discrete`` column against ``observed`` in float64 (expect <= 1e-9) and float32
   (expect <= 1e-4), relative to each group's max of |Q| and ½θᵀ|J|θ + |c|ᵀ|θ| as in the tests;
3. law-update variants, per step of ``Laws.step`` (symmech/runtime/stepper.py): (a) eager; (b) ``torch.compile``d,
   default and "reduce-overhead" modes (compiled once per class on a stand-in object: compiling
   ``laws.step`` as is recompiles every call, shown as (b0)); (c) replayed as a CUDA graph.
   Timed alone on the largest bank and inside training; each variant's laws are compared with (a).

Detection and confirmation run once (the first ``track(..., example_input=(x, y))``); the other
VGG instances get the same families re-bound to their own parameters by name.

Without CUDA it says so and runs the same code on a tiny CPU model (seconds), CUDA-only parts
skipped. Every section is guarded: a failure prints its traceback summary and the next section
runs. With ``OUT`` set, everything printed is also written to ``$OUT/gpu_check.txt`` as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import symmech
from symmech.demo.models import vgg
from symmech.laws.names import DISCRETE, DISCRETE_RESIDUAL, FIRST_ORDER, SECOND_ORDER
from symmech.runtime.binding import Binding
from symmech.runtime.stepper import Hyper, StepData

CONFIGS: dict[str, dict[str, Any]] = {
    "log every step, residual every step": dict(log_every=1, residuals=True),
    "log every 50, residual every step": dict(log_every=50, residuals=True),
    "log every 50, residual when logged": dict(log_every=50, residuals=False),
}
#: the configuration attached with detection (``example_input``); the others reuse its families
DETECT_CONFIG = "log every 50, residual every step"
LAW_STATE = (DISCRETE, DISCRETE_RESIDUAL, FIRST_ORDER, SECOND_ORDER)
HYPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)


# ------------------------------------------------------------------------------------------
# reporting


class Report:
    """Print with flush, and append each line to ``$OUT/gpu_check.txt`` as it is printed."""

    def __init__(self, path: Path | None) -> None:
        self.start = time.perf_counter()
        self.fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = path.open("w")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.fh is not None:
            self.fh.write(line + "\n")
            self.fh.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def section(self, title: str, fn: Callable[[], Any]) -> Any:
        self(f"\n== {title}  [t = {self.elapsed():.0f} s]")
        try:
            return fn()
        except Exception as err:  # one failure must not lose the other figures
            self.failure(title, err)
            return None

    def failure(self, what: str, err: BaseException) -> None:
        self(f"   FAILED {what}: {type(err).__name__}: {str(err).strip()[:400]}")
        for frame in traceback.extract_tb(err.__traceback__)[-5:]:
            self(
                f"     at {Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line}"
            )


@dataclasses.dataclass
class Settings:
    device: torch.device
    model: str
    image_size: int
    width: float
    batch: int
    steps: int  # timed steps per model
    warmup: int  # untimed steps first (the tracker's first step, compilation, capture)
    check_steps: int  # correctness run length
    micro_steps: int  # timed calls of Laws.step alone
    time_limit: float  # seconds; optional variants are skipped past it
    quick: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def sync(device: torch.device) -> None:
    """``torch.cuda.synchronize()``, allowed even while the sync debug mode is "error"."""
    if device.type != "cuda":
        return
    mode = torch.cuda.get_sync_debug_mode()
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    if mode:
        torch.cuda.set_sync_debug_mode(mode)


@contextlib.contextmanager
def sync_debug(device: torch.device, mode: str | None) -> Iterator[None]:
    if device.type != "cuda" or mode is None:
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def med_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


# ------------------------------------------------------------------------------------------
# models and tracking


def make_vgg(s: Settings) -> tuple[nn.Module, torch.optim.SGD]:
    torch.manual_seed(0)
    model = vgg(
        s.model,
        batch_norm=True,
        in_channels=3,
        num_classes=10,
        image_size=s.image_size,
        width_multiplier=s.width,
    ).to(s.device)
    return model, torch.optim.SGD(model.parameters(), **HYPER)


def make_batch(s: Settings, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g)
    y = torch.randint(0, 10, (s.batch,), generator=g)
    return x.to(s.device), y.to(s.device)


def forward_backward(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> None:
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()


def on_device(model: nn.Module, device: torch.device, report: Report, what: str) -> None:
    """Detection may work on CPU copies: the tracked model must be back on ``device``."""
    where = {p.device.type for p in model.parameters()}
    if where != {device.type}:
        report(f"   NOTE {what}: parameters on {sorted(where)} after track(); moving to {device}")
        model.to(device)


def rebind(tracker: symmech.Tracker, source: nn.Module, model: nn.Module) -> list[Binding]:
    """The tracker's bindings moved onto another instance of the same architecture (by name),
    so detection and confirmation run once per script."""
    src_names = {id(p): n for n, p in source.named_parameters()}
    params = dict(model.named_parameters())
    out = []
    for f in tracker.families:
        b = f.binding
        blocks = {
            k: [
                dataclasses.replace(sl, tensor=params[sl.name or src_names[id(sl.tensor)]])
                for sl in slices
            ]
            for k, slices in b.blocks.items()
        }
        out.append(Binding(b.derivation, blocks, dict(b.constants), b.layer))
    return out


def tracked_ok(tracker: symmech.Tracker) -> list[str]:
    """Families that stopped being predicted, with the reason (empty: all fine)."""
    return [
        f"{f.symmetry} on {f.layer}: {f.note}"
        for f in tracker.families
        if f.status != "tracked" and f.module.CLOSES
    ]


def describe(model: nn.Module, tracker: symmech.Tracker) -> str:
    n_par = sum(p.numel() for p in model.parameters())
    n_groups = sum(f.n_groups for f in tracker.families)
    banks = [b.size for b in tracker.banks or []]
    return f"{n_par} parameters, {len(tracker.families)} families, {n_groups} groups" + (
        f", banks of {banks} groups" if banks else ""
    )


# ------------------------------------------------------------------------------------------
# 1. overhead and host syncs

_SHARED: dict[str, Any] = {}  # the detection result, reused by the variants section


def detect_and_track(
    s: Settings, report: Report, model: nn.Module, opt, x, y, **cfg: Any
) -> symmech.Tracker:
    if "tracker" in _SHARED:
        tracker = symmech.track(
            model, opt, rebind(_SHARED["tracker"], _SHARED["model"], model), **cfg
        )
    else:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = symmech.track(model, opt, example_input=(x, y), **cfg)
        report(
            f"   track(model, opt, example_input=(x, y)) with detection and confirmation: "
            f"{time.perf_counter() - start:.1f} s; {len(caught)} warnings"
        )
        for w in caught[:5]:
            report(f"     warning: {str(w.message)[:200]}")
        _SHARED.update(tracker=tracker, model=model)
    on_device(model, s.device, report, "track")
    return tracker


def locate_syncs(
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]], x, y, steps: int, device
) -> dict[str, list[str]]:
    """Run ``steps`` steps of every model under sync debug mode "warn"; where each sync was."""
    found: dict[str, list[str]] = {}
    for i in range(steps):
        for name, (model, opt) in runs.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with sync_debug(device, "warn"):
                    forward_backward(model, opt, x, y)
                    opt.step()
            for w in caught:
                if "synchroniz" in str(w.message):
                    where = f"{'first step' if i == 0 else 'later steps'}: {Path(w.filename).name}:{w.lineno}"
                    found.setdefault(name, [])
                    if where not in found[name]:
                        found[name].append(where)
    return found


def section_overhead(s: Settings, report: Report) -> None:
    x, y = make_batch(s)
    runs: dict[str, tuple[nn.Module, torch.optim.SGD]] = {"plain": make_vgg(s)}
    trackers: dict[str, symmech.Tracker] = {}
    order = [DETECT_CONFIG] + [c for c in CONFIGS if c != DETECT_CONFIG]
    for name in order:
        runs[name] = make_vgg(s)
        trackers[name] = detect_and_track(s, report, *runs[name], x, y, **CONFIGS[name])
    report(
        f"   {s.model}-bn width {s.width}, {s.image_size}x{s.image_size}, batch {s.batch}, "
        f"{s.device}: {describe(runs['plain'][0], trackers[DETECT_CONFIG])}"
    )

    warm = max(s.warmup, 2)
    check_mode: str | None = None
    if s.cuda:
        found = locate_syncs(runs, x, y, warm, s.device)
        report(f"   host syncs seen in {warm} warm-up steps (mode 'warn'):")
        for name in runs:
            report(f"     {name:38s} {', '.join(found.get(name, [])) or 'none'}")
        plain_later = [w for w in found.get("plain", []) if w.startswith("later")]
        check_mode = "error" if not plain_later else None
        if plain_later:
            report("   the plain training step itself syncs: timed steps run without 'error' mode")
    else:
        for _ in range(warm):
            for model, opt in runs.values():
                forward_backward(model, opt, x, y)
                opt.step()
        report("   (no CUDA: the host-sync check is skipped)")

    step_times: dict[str, list[float]] = {k: [] for k in runs}
    opt_times: dict[str, list[float]] = {k: [] for k in runs}
    raised: list[str] = []
    with sync_debug(s.device, check_mode):
        for _ in range(s.steps):
            for name, (model, opt) in runs.items():
                try:
                    total = timed(lambda m=model, o=opt: forward_backward(m, o, x, y), s.device)
                    t_opt = timed(opt.step, s.device)
                except RuntimeError as err:
                    raised.append(f"{name}: {str(err)[:200]}")
                    continue
                step_times[name].append(total + t_opt)
                opt_times[name].append(t_opt)
    if check_mode:
        stopped = {n: tracked_ok(t) for n, t in trackers.items()}
        bad = raised or any(stopped.values())
        report(
            f"   sync check ({s.steps} steps x {len(runs)} models under set_sync_debug_mode('error')): "
            + ("FAIL" if bad else "PASS: nothing raised, every family still tracked")
        )
        for line in raised[:5]:
            report(f"     raised: {line}")
        for n, notes in stopped.items():
            for note in notes[:3]:
                report(f"     {n}: stopped: {note[:300]}")

    plain_step, plain_opt = med_ms(step_times["plain"]), med_ms(opt_times["plain"])
    report(f"   plain: training step {plain_step:.3f} ms, optimizer.step() {plain_opt:.3f} ms")
    for name in CONFIGS:
        if not step_times[name]:
            report(f"   {name:38s} no timings")
            continue
        work = max(med_ms(opt_times[name]) - plain_opt, 0.0)
        report(
            f"   {name:38s} step ratio {med_ms(step_times[name]) / plain_step:6.3f} (target <= 1.05)"
            f"   tracker work / optimizer.step() {work / plain_opt:6.3f} (target <= 0.5)"
            f"   [tracker work {work:.3f} ms]"
        )
    for t in trackers.values():
        t.detach()


# ------------------------------------------------------------------------------------------
# 2. correctness on the device


def small_net(image: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=1e-12),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * image * image, 10),
    ).to(device, dtype)


def magnitudes(tracker: symmech.Tracker) -> dict[tuple[str, str], torch.Tensor]:
    """Per family and group, the size Q is measured against: ½θᵀ|J|θ + |c|ᵀ|θ|, taken here as
    Σ|θ| when Q is linear in θ (translation) and ½Σθ² otherwise (as tests/runtime/test_tracker.py
    does with the exact |J|), so a Q that happens to be near 0 does not inflate the error."""
    out = {}
    for f in tracker.families:
        linear = all(
            getattr(v, "is_ZeroMatrix", False) or v == 0
            for v in f.binding.derivation.affine.J_apply.values()
        )
        total: torch.Tensor | None = None
        for slices in f.binding.blocks.values():
            for sl in slices:
                x, dims = sl.prepare(sl.tensor.detach().to("cpu", torch.float64))
                v = x.abs() if linear else 0.5 * x * x
                v = (v.sum(dims) if dims else v).reshape(-1)
                total = v if total is None else total + v
        if total is not None:
            out[(f.symmetry, f.layer)] = total
    return out


def relative_errors(
    rows: list[dict[str, Any]], *sizes: dict[tuple[str, str], torch.Tensor]
) -> dict[tuple[str, str], dict[str, float]]:
    """Per family: max over steps and groups of |law - observed| / scale, with scale per group
    the max of |observed| over the steps and of the given magnitudes (first and last θ)."""
    by: dict[tuple[str, str], dict[int, list[tuple[float, float | None, float | None]]]] = {}
    for r in rows:
        if r["discrete"] is None:
            continue
        key = (r["symmetry"], r["layer"])
        by.setdefault(key, {}).setdefault(r["group"], []).append(
            (r["observed"], r["discrete"], r["discrete_residual"])
        )
    out = {}
    for key, groups in by.items():
        err = {"discrete": 0.0, "discrete_residual": 0.0, "groups": float(len(groups))}
        for j, series in groups.items():
            mags = [float(m[key][j]) for m in sizes if key in m and j < m[key].numel()]
            scale = max([abs(o) for o, _, _ in series] + mags + [1e-300])
            err["discrete"] = max(err["discrete"], max(abs(d - o) for o, d, _ in series) / scale)
            res = [abs(dr - o) for o, _, dr in series if dr is not None]
            if res:
                err["discrete_residual"] = max(err["discrete_residual"], max(res) / scale)
        out[key] = err
    return out


def section_correctness(s: Settings, report: Report) -> None:
    image, batch = 8, 64
    g = torch.Generator().manual_seed(2)
    batches = [
        (
            torch.randn(batch, 3, image, image, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
        )
        for _ in range(4)
    ]
    for dtype, bound in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        try:
            data = [(bx.to(s.device, dtype), by.to(s.device)) for bx, by in batches]
            model = small_net(image, dtype, s.device)
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
            tracker = symmech.track(model, opt, example_input=data[0], log_every=1)
            on_device(model, s.device, report, "correctness track")
            size0 = magnitudes(tracker)
            start = time.perf_counter()
            for k in range(s.check_steps):
                forward_backward(model, opt, *data[k % len(data)])
                opt.step()
            sync(s.device)
            elapsed = time.perf_counter() - start
            errs = relative_errors(tracker.records(), size0, magnitudes(tracker))
            stopped = tracked_ok(tracker)
            worst = max((e["discrete"] for e in errs.values()), default=float("nan"))
            verdict = "OK" if worst <= bound and not stopped else "OVER"
            report(
                f"   {str(dtype):14s} {s.check_steps} steps on {s.device} ({elapsed:.1f} s): "
                f"max rel err discrete vs observed {worst:.2e} (expect <= {bound:.0e}) {verdict}"
            )
            for (sym, layer), e in errs.items():
                report(
                    f"     {sym:12s} {layer[:52]:52s} {int(e['groups']):4d} groups  discrete "
                    f"{e['discrete']:.2e}  discrete_residual {e['discrete_residual']:.2e}"
                )
            for note in stopped:
                report(f"     stopped: {note[:300]}")
            tracker.detach()
        except Exception as err:
            report.failure(f"correctness {dtype}", err)


# ------------------------------------------------------------------------------------------
# 3. law-update variants


_COMPILED: dict[tuple[type, str], tuple[Callable, Any]] = {}


def install_naive_compile(laws: Any, mode: str) -> None:
    """(b0) ``laws.step = torch.compile(laws.step)``: dynamo guards on the Python counters
    ``self.t`` and ``self.steps``, so it recompiles every step up to its limit (8), then
    runs eager (seen on CPU: 8 graphs for 8 calls, then ~9 ms/call instead of 0.12 ms)."""
    laws.step = torch.compile(laws.step, mode=None if mode == "default" else mode)


def install_compile(laws: Any, mode: str) -> None:
    """(b) ``Laws.step`` compiled once per class: it runs on a stand-in object whose Python
    counters are fixed (t = 0, steps = 1), and the counters advance outside the graph; the
    first step (different branches) stays eager."""
    cls = type(laws)
    if (cls, mode) not in _COMPILED:
        fn = torch.compile(cls.step, mode=None if mode == "default" else mode)
        _COMPILED[(cls, mode)] = (fn, object.__new__(cls))
    fn, shim = _COMPILED[(cls, mode)]
    eager = laws.step
    clone = mode == "reduce-overhead"

    def step(data: StepData) -> None:
        if laws.steps == 0:
            return eager(data)
        shim.__dict__.update(laws.__dict__)
        shim.t, shim.steps = 0.0, 1
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        fn(shim, data)
        for k, v in shim.__dict__.items():
            if k not in ("t", "steps"):
                # reduce-overhead: outputs live in the CUDA graph's pool, reused by the next replay
                if clone and isinstance(v, torch.Tensor) and v is not getattr(laws, k):
                    v = v.clone()
                setattr(laws, k, v)
        laws.t += data.hyper.lr
        laws.steps += 1
        return None

    laws.step = step


class GraphedStep:
    """(c) ``Laws.step`` captured once as a CUDA graph and replayed: the state tensors are
    updated in place (the captured step writes new tensors, copied back into the old ones),
    the data columns are copied into static inputs, ``t`` and ``steps`` advance on the host.
    Eager for the first two steps and for good once the hyperparameters (or which optional
    columns are given) change."""

    def __init__(self, laws: Any) -> None:
        self.laws = laws
        self.eager = laws.step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.inputs: list[torch.Tensor | None] = []
        self.names: list[str] = []
        self.state: dict[str, torch.Tensor] = {}
        self.disabled = False

    def __call__(self, data: StepData) -> None:
        cols = (data.residual, data.gJg, data.uJu, data.uJb)
        key = (data.hyper, tuple(c is None for c in cols))
        if self.graph is not None and key != self.key:
            self.disabled = True
        if self.disabled or self.laws.steps < 2:
            return self.eager(data)
        if self.graph is None:
            self._capture(key, cols)
        for dst, src in zip(self.inputs, cols):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        self.laws.t += data.hyper.lr
        self.laws.steps += 1
        return None

    def _capture(self, key: tuple, cols: tuple) -> None:
        laws = self.laws
        names = [k for k, v in vars(laws).items() if isinstance(v, torch.Tensor) and k != "q0"]
        seen: set[int] = set()
        for k in names:  # no two state attributes may share storage
            if getattr(laws, k).data_ptr() in seen:
                setattr(laws, k, getattr(laws, k).clone())
            seen.add(getattr(laws, k).data_ptr())
        self.names = names
        self.state = {k: getattr(laws, k) for k in names}
        self.key = key
        counters = (laws.t, laws.steps)
        self.inputs = [None if c is None else c.detach().clone() for c in cols]
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.body()
            extra = [
                k
                for k, v in vars(laws).items()
                if isinstance(v, torch.Tensor) and k not in names and k != "q0"
            ]
            if extra:
                raise RuntimeError(f"Laws.step made new state {extra}: cannot replay")
        finally:  # capture ran Python once: put the state objects and counters back
            for k in names:
                setattr(laws, k, self.state[k])
            laws.t, laws.steps = counters
        self.graph = graph

    def body(self) -> None:
        """What the graph holds: one eager step on the state and the static inputs, then the
        new values copied into the state tensors."""
        laws = self.laws
        r, gjg, uju, ujb = self.inputs
        self.eager(StepData(self.key[0], uju, ujb, gjg, r))
        new = {}
        for k in self.names:
            v = getattr(laws, k)
            new[k] = v.clone() if any(v is b for b in self.state.values()) else v
        for k in self.names:
            self.state[k].copy_(new[k])


def install_graph(laws: Any, mode: str) -> None:
    laws.step = GraphedStep(laws)


VARIANTS: dict[str, tuple[Callable[[Any, str], None] | None, str]] = {
    "(a) eager": (None, ""),
    "(b) torch.compile default": (install_compile, "default"),
    "(b) torch.compile reduce-overhead": (install_compile, "reduce-overhead"),
    "(c) CUDA graph replay": (install_graph, ""),
}
CUDA_ONLY = {"(b) torch.compile reduce-overhead", "(c) CUDA graph replay"}


def law_state_diff(a: Any, b: Any) -> float:
    worst = 0.0
    for n in LAW_STATE:
        x, y = getattr(a, n), getattr(b, n)
        scale = float(x.abs().max().clamp_min(1e-300))
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def micro(s: Settings, report: Report, bank: Any) -> None:
    """``Laws.step`` alone on the largest bank's size, with fixed synthetic data."""
    laws0 = bank.laws
    cls, q0, n = type(laws0), laws0.q0.detach().clone(), laws0.q0.numel()
    kappa = laws0.kappa
    g = torch.Generator().manual_seed(3)
    inputs = [
        tuple(
            (torch.rand(n, generator=g, dtype=torch.float64) * 1e-3).to(q0.device) for _ in range(4)
        )
        for _ in range(4)
    ]
    hyper = Hyper(HYPER["lr"], HYPER["momentum"], 0.0, HYPER["weight_decay"], False)
    data = [StepData(hyper, uJu=u, uJb=b, gJg=g_, residual=r) for r, g_, u, b in inputs]
    warm, steps = 6, s.micro_steps

    def run(laws: Any, start: int, count: int) -> None:
        for i in range(start, start + count):
            laws.step(data[i % len(data)])

    reference = cls(kappa, q0)
    run(reference, 0, warm + steps)
    results: dict[str, float] = {}
    report(f"   Laws.step alone, {n} groups (float64 state), {steps} timed calls after {warm}:")
    todo = list(VARIANTS.items())
    if s.cuda and not s.quick:
        todo.insert(1, ("(b0) torch.compile(laws.step) as is", (install_naive_compile, "default")))
    for name, (install, mode) in todo:
        if name in CUDA_ONLY and not s.cuda:
            report(f"     {name:38s} skipped (CUDA only)")
            continue
        if name != "(a) eager" and report.elapsed() > s.time_limit:
            report(f"     {name:38s} skipped (time limit {s.time_limit:.0f} s reached)")
            continue
        try:
            laws = cls(kappa, q0)
            if install is not None:
                install(laws, mode)
            naive = name.startswith("(b0)")
            if naive:
                from torch._dynamo.utils import counters

                graphs0 = counters["stats"].get("unique_graphs", 0)
            t0 = time.perf_counter()
            n_warm = 1 if naive else warm
            run(laws, 0, n_warm)
            sync(s.device)
            first = time.perf_counter() - t0
            count = 3 if naive else steps
            per = timed(lambda laws=laws, k=n_warm, c=count: run(laws, k, c), s.device) / count
            if naive:
                graphs = counters["stats"].get("unique_graphs", 0) - graphs0
                report(
                    f"     {name:38s} {per * 1e6:9.1f} us/step over calls 2-4; {graphs} dynamo "
                    f"graphs for {n_warm + count} calls (a recompile per call means self.t / "
                    "self.steps are guarded; not used further)"
                )
                continue
            run(laws, n_warm + count, warm + steps - n_warm - count)
            sync(s.device)
            diff = law_state_diff(reference, laws)
            results[name] = per
            report(
                f"     {name:38s} {per * 1e6:9.1f} us/step   first {warm} calls {first:6.2f} s   "
                f"max rel diff vs eager {diff:.1e}"
            )
        except Exception as err:
            report.failure(name, err)
    if results:
        best = min(results, key=results.get)
        base = results.get("(a) eager")
        report(
            f"   fastest alone: {best} ({results[best] * 1e6:.1f} us/step"
            + (f", {base / results[best]:.2f}x eager)" if base else ")")
        )


def section_variants(s: Settings, report: Report) -> None:
    x, y = make_batch(s)
    runs: dict[str, tuple[nn.Module, torch.optim.SGD]] = {"plain": make_vgg(s)}
    trackers: dict[str, symmech.Tracker] = {}
    names = [
        n
        for n in VARIANTS
        if (s.cuda or n not in CUDA_ONLY) and (n == "(a) eager" or s.cuda or not s.quick)
    ]
    for name in names:
        runs[name] = make_vgg(s)
        trackers[name] = detect_and_track(
            s, report, *runs[name], x, y, log_every=50, residuals=True
        )
    size0 = {name: magnitudes(t) for name, t in trackers.items()}
    # the first step builds the banks; then each variant is installed on every bank
    for model, opt in runs.values():
        forward_backward(model, opt, x, y)
        opt.step()
    first = trackers[names[0]]
    report(f"   tracked models: log every 50, residuals on; {describe(runs['plain'][0], first)}")
    micro(s, report, max(first.banks, key=lambda b: b.size))

    for name in names:
        install, mode = VARIANTS[name]
        if install is not None and report.elapsed() > s.time_limit:
            report(f"   {name}: skipped in training (time limit {s.time_limit:.0f} s reached)")
            runs.pop(name)
            continue
        try:
            if install is not None:
                for bank in trackers[name].banks:
                    install(bank.laws, mode)
        except Exception as err:
            report.failure(f"install {name}", err)
            runs.pop(name)
    step_times: dict[str, list[float]] = {k: [] for k in runs}
    opt_times: dict[str, list[float]] = {k: [] for k in runs}
    report(f"   training {len(runs)} models: {s.warmup} warm-up steps (compilation, capture) ...")
    start = time.perf_counter()
    for i in range(s.warmup + s.steps):
        for name, (model, opt) in list(runs.items()):
            try:
                total = timed(lambda m=model, o=opt: forward_backward(m, o, x, y), s.device)
                t_opt = timed(opt.step, s.device)
            except Exception as err:
                report.failure(f"training with {name}", err)
                runs.pop(name)
                continue
            if i >= s.warmup:
                step_times[name].append(total + t_opt)
                opt_times[name].append(t_opt)
        if i == s.warmup - 1:
            report(f"   warm-up (compilation, capture) {time.perf_counter() - start:.1f} s")
    plain_step, plain_opt = med_ms(step_times["plain"]), med_ms(opt_times["plain"])
    report(
        f"   inside training ({s.steps} steps, interleaved): plain step {plain_step:.3f} ms, "
        f"optimizer.step() {plain_opt:.3f} ms"
    )
    errs_by = {
        n: relative_errors(t.records(), size0[n], magnitudes(t)) for n, t in trackers.items()
    }
    reference = errs_by[names[0]]
    work_by: dict[str, float] = {}
    for name in names:
        if name not in runs or not step_times[name]:
            continue
        work = max(med_ms(opt_times[name]) - plain_opt, 0.0)
        work_by[name] = work
        errs = errs_by[name]
        worst = max((e["discrete"] for e in errs.values()), default=float("nan"))
        ref = max((e["discrete"] for e in reference.values()), default=float("nan"))
        stopped = tracked_ok(trackers[name])
        report(
            f"     {name:38s} step ratio {med_ms(step_times[name]) / plain_step:6.3f}   tracker work "
            f"{work:7.3f} ms = {work / plain_opt:6.3f} x optimizer.step()   discrete vs observed "
            f"{worst:.1e} (eager {ref:.1e})"
            + (f"   STOPPED: {stopped[0][:200]}" if stopped else "")
        )
    if work_by:
        best = min(work_by, key=work_by.get)
        base = work_by.get("(a) eager")
        gain = (
            f", {base / work_by[best]:.2f}x less than eager"
            if base and work_by[best] > 0 and best != "(a) eager"
            else ""
        )
        report(
            f"   fastest in training: {best} (tracker work {work_by[best]:.3f} ms/step{gain}; "
            "medians, differences of a few percent are noise)"
        )
    for t in trackers.values():
        t.detach()


# ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--quick", action="store_true", help="fewer steps, fewer variants")
    parser.add_argument(
        "--time-limit", type=float, default=270.0, help="seconds; optional variants skipped after"
    )
    args = parser.parse_args()
    out = os.environ.get("OUT")
    report = Report(Path(out) / "gpu_check.txt" if out else None)
    cuda = torch.cuda.is_available()
    if cuda:
        s = Settings(
            device=torch.device("cuda"),
            model="vgg11",
            image_size=32,
            width=1.0,
            batch=128,
            steps=args.steps or (20 if args.quick else 50),
            warmup=5,
            check_steps=200,
            micro_steps=100 if args.quick else 300,
            time_limit=args.time_limit,
            quick=args.quick,
        )
        props = torch.cuda.get_device_properties(0)
        report(
            f"gpu_check: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, symmech {symmech.__version__}"
        )
    else:
        report(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False): the GPU checks need a "
            "CUDA machine. Running the CPU smoke path (tiny model, CUDA-only parts skipped)."
        )
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        s = Settings(
            device=torch.device("cpu"),
            model="vgg-tiny",
            image_size=8,
            width=0.5,
            batch=16,
            steps=args.steps or 5,
            warmup=2,
            check_steps=200 if not args.quick else 40,
            micro_steps=50,
            time_limit=args.time_limit,
            quick=args.quick,
        )
    report(f"settings: {dataclasses.asdict(s)}")
    report.section("1. overhead and host syncs", lambda: section_overhead(s, report))
    report.section("2. correctness on the device", lambda: section_correctness(s, report))
    report.section("3. law-update variants", lambda: section_variants(s, report))
    report(f"\ndone in {report.elapsed():.0f} s")
    if report.fh is not None:
        report.fh.close()


if __name__ == "__main__":
    main()
