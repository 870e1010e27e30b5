"""Every product of a hook call in one sweep per tensor on the CPU: symmech's C++ kernel.

On the CPU, ``torch.compile`` does not turn the tracker's reductions into one read of each tensor
(a reduction along a conv weight's input channels and one along its output channels are two
loops, each about twice as slow as a dot product), and the eager path makes a product and two
reductions per pair. ``csrc/group_products.cpp`` reads each tensor's sources (θ, g, the momentum
buffer) once and writes, per asked pair (or single source: a sum), the sums along every row (the
groups of the first dimension) and along every column (summed further to the groups of any other
dimension), accumulated in double, four rows at a time, split across torch's threads, into one
float64 vector (:func:`products_into`); :func:`scatter` forms the banks' vectors from it. It
also makes Adam's coming step aₖ from g, m and v in one pass (:func:`adam_direction`, used by
:mod:`.directions`), or inside the sweep that reads θ, never stored. It is compiled without
contracting a multiply and an add into one rounding (``-ffp-contract=off``), so every
element-wise value is the IEEE result of its operations whatever the vector width.

It is built once per machine with :func:`torch.utils.cpp_extension.load` (a C++ compiler and
ninja are needed; the build lies in torch's extension folder, ``TORCH_EXTENSIONS_DIR``, with a
copy of the source, so another checkout of the same source finds it current) and loaded in
about a second afterwards. :func:`build` builds it and waits; :func:`start` builds it
in the background (the ``auto`` mode of :mod:`.fused`, so training never waits for the
compiler): a first build runs in a child process that completes it even when the training script
ends first, and a thread loads it. When the build fails, :func:`failure` says why and everything stays eager.

    >>> import torch
    >>> from symmech.runtime import native
    >>> if native.build():
    ...     theta, grad = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    ...     (values,) = native.layout_products([(0, ((0, 1),))], [[theta, grad]])
    ...     bool(torch.allclose(values[0], (theta * grad).sum((1, 2, 3)), atol=1e-5))
    ... else:
    ...     True
    True
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

#: the kernel's source, shipped with the package
SOURCE = Path(__file__).with_name("csrc") / "group_products.cpp"
NAME = "symmech_group_products"
#: a build lock older than this is left over from a build that was killed: removed
STALE_LOCK_S = 600.0
#: OpenMP on Linux: torch's parallel_for is a header template whose parallel region compiles to
#: one thread without it (the kernel then ignored torch's threads). The library links
#: libgomp.so.1, the one torch has already loaded, so the process keeps one OpenMP runtime.
#: Elsewhere (Apple's clang has no -fopenmp) the loops are vectorised and run on one thread.
_OPENMP = sys.platform.startswith("linux")
CFLAGS = ["-O3", "-fopenmp" if _OPENMP else "-fopenmp-simd", "-fno-math-errno", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"] if _OPENMP else []
#: what a child process runs to build the kernel (argv: name, source, build directory)
_BUILD = (
    "import sys\n"
    "from torch.utils.cpp_extension import load\n"
    f"load(sys.argv[1], sources=[sys.argv[2]], extra_cflags={CFLAGS!r}, "
    f"extra_ldflags={LDFLAGS!r}, "
    "build_directory=sys.argv[3], verbose=False)\n"
)

_module: Any = None
_failed: str | None = None
_thread: threading.Thread | None = None
_lock = threading.Lock()


def _build_directory() -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(NAME, verbose=False))


def _staged(directory: Path) -> Path:
    """The kernel's source copied into the build directory, rewritten only when its contents
    differ: the build then names one path whichever checkout or installation loads it, so a
    second checkout with the same source (a clean clone, another environment) finds the build
    current instead of compiling it again (ninja compares the command and the file's time)."""
    staged = directory / SOURCE.name
    text = SOURCE.read_bytes()
    if not staged.exists() or staged.read_bytes() != text:
        partial = staged.with_name(f"{staged.name}.{os.getpid()}.tmp")
        partial.write_bytes(text)
        os.replace(partial, staged)  # atomic: a concurrent build reads a whole file
    return staged


def _load() -> None:
    """Build (or find the cached build) and import it; on failure, remember why."""
    global _module, _failed
    try:
        from torch.utils.cpp_extension import load

        directory = _build_directory()
        _wait_for_lock(directory / "lock")
        module = load(
            NAME,
            sources=[str(_staged(directory))],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: stay eager
        _failed = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1][:200]}"
        return
    _module = module


def _spawn_build() -> subprocess.Popen | None:
    """A first build (no library yet, or one older than the source) in a child process of its
    own session, which finishes it even when this process ends first: a short script's killed
    thread would leave torch's lock behind, and the next runs would wait for it. None when the
    library is current, or another process holds a fresh lock (:func:`_load` waits for it)."""
    try:
        directory = _build_directory()
        library = directory / f"{NAME}.so"
        if _live_lock(directory / "lock"):
            return None
        staged = _staged(directory)
        if library.exists() and library.stat().st_mtime >= staged.stat().st_mtime:
            return None
        return subprocess.Popen(
            [sys.executable, "-c", _BUILD, NAME, str(staged), str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except Exception:  # noqa: BLE001 - _load builds in this process instead and says why
        return None


def _background(child: subprocess.Popen | None) -> None:
    """:func:`start`'s thread: wait for the child's build, if any, then load the library."""
    if child is not None:
        child.wait()
    _load()


def _live_lock(lock: Path) -> bool:
    """Whether another process holds torch's build lock; a lock older than :data:`STALE_LOCK_S`
    was left by a build that was killed (torch's own wait would never end): removed."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        return False
    return True


def _wait_for_lock(lock: Path) -> None:
    """Wait while another process builds (:func:`_live_lock`)."""
    while _live_lock(lock):
        time.sleep(0.5)


def build() -> bool:
    """Build or load the kernel now and wait for it; True when it is ready."""
    if _module is not None:  # called once per hook call in mode "native": no lock then
        return True
    with _lock:
        thread = _thread
    if thread is not None:
        thread.join()
    with _lock:
        if _module is None and _failed is None:
            _load()
    return _module is not None


def start() -> None:
    """Build or load the kernel in a background thread (once); :func:`ready` says when done."""
    global _thread
    with _lock:
        if _thread is not None or _module is not None or _failed is not None:
            return
        _thread = threading.Thread(
            target=_background, args=(_spawn_build(),), name="symmech-native-build", daemon=True
        )
        _thread.start()


def ready() -> bool:
    """Whether the kernel is loaded (never waits)."""
    return _module is not None


def failure() -> str | None:
    """Why the kernel could not be built (None: it was not, or it was built)."""
    return _failed


def eligible(members: list[torch.Tensor]) -> bool:
    """Whether the kernel reads these sources: contiguous CPU float32/float64 tensors of one
    shape and dtype, with at least one dimension."""
    first = members[0]
    return (
        first.ndim >= 1
        and first.device.type == "cpu"
        and first.dtype in (torch.float32, torch.float64)
        and all(
            m.device == first.device
            and m.dtype == first.dtype
            and m.shape == first.shape
            and m.is_contiguous()
            for m in members
        )
    )


def _source_key(members: list[torch.Tensor]) -> tuple:
    return tuple((m.data_ptr(), tuple(m.shape), m.dtype) for m in members)


def layout_products(
    structure: list[tuple[int, tuple[tuple[int, int], ...]]] | tuple,
    members: list[list[torch.Tensor]],
) -> list[torch.Tensor | None]:
    """For every layout (its group dimension and pairs, and its sources), the per-group sums
    of each pair's product, stacked (len(pairs), G) in the sources' dtype, from one kernel call;
    None for a layout the kernel does not read (:func:`eligible`). Layouts over the same sources
    share one sweep (the rows serve dimension 0, the columns every other dimension)."""
    if _module is None:
        raise RuntimeError("symmech.runtime.native: build() the kernel first")
    sweeps: dict[tuple, int] = {}
    sources: list[list[torch.Tensor]] = []
    pairs: list[list[tuple[int, int]]] = []
    dims: list[list[int]] = []
    plan: list[tuple[int, int, list[int]] | None] = []
    for (dim, layout_pairs), m in zip(structure, members, strict=True):
        if not m or not eligible(m):
            plan.append(None)
            continue
        key = _source_key(m)
        s = sweeps.get(key)
        if s is None:
            s = sweeps[key] = len(sources)
            sources.append(list(m))
            pairs.append([])
            dims.append([])
        index = []
        for pair in layout_pairs:
            pair = (min(pair), max(pair))
            if pair not in pairs[s]:
                pairs[s].append(pair)
            index.append(pairs[s].index(pair))
        dim = dim % m[0].ndim
        if dim not in dims[s]:
            dims[s].append(dim)
        plan.append((s, dims[s].index(dim), index))
    flat = [[k for pair in p for k in pair] for p in pairs]
    swept = sweep(sources, flat, dims) if sources else []
    out: list[torch.Tensor | None] = []
    for where in plan:
        if where is None:
            out.append(None)
            continue
        s, d, index = where
        values = swept[s][d]
        whole = index == list(range(len(pairs[s])))
        out.append(values if whole else values[index])
    return out


def products_into(
    sources: list[list[torch.Tensor]],
    pairs: list[list[int]],
    dims: list[list[int]],
    offsets: list[int],
    out: torch.Tensor,
    made: list[list[int]] | None = None,
    scalars: list[list[float]] | None = None,
) -> list[int]:
    """The kernel's product call: per tensor (its sources, of one shape), for each group
    dimension in ``dims`` (-1: the whole tensor, one value) and each source pair listed flat in
    ``pairs`` ((i, j, i, j, …); j = -1: source i alone, a sum), the per-group sums accumulated
    in double, written into the float64 vector ``out`` from ``offsets[t]`` on (dimension by
    dimension, pair by pair). Returns the tensors it did not read (:func:`eligible` says no):
    their places in ``out`` are left as they were.

    ``made[t]`` = [g, m, v, vmax or -1] (source numbers of tensor t, or [] for none) with
    ``scalars[t]`` = [1 − β₁, β₂, √(1 − β₂ᵏ), ε]: source number ``len(sources[t])`` is then
    Adam's coming step aₖ made from them in the sweep, row block by row block, with the values
    :func:`adam_direction` gives, and never stored."""
    if _module is None:
        raise RuntimeError("symmech.runtime.native: build() the kernel first")
    return _module.products(sources, pairs, dims, offsets, out, made or [], scalars or [])


def scatter(
    values: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``out[dst[k]] += values[src[k]] · coef[k]`` for every k, in one call (float64)."""
    if _module is None:
        raise RuntimeError("symmech.runtime.native: build() the kernel first")
    _module.scatter(values, src, dst, coef, out)


def sweep(
    sources: list[list[torch.Tensor]], pairs: list[list[int]], dims: list[list[int]]
) -> list[list[torch.Tensor]]:
    """:func:`products_into` with the values returned per tensor and dimension, stacked
    (pairs, G) in the sources' dtype; every tensor must be :func:`eligible`."""
    offsets, at = [], 0
    for members, flat, tensor_dims in zip(sources, pairs, dims, strict=True):
        offsets.append(at)
        shape = members[0].shape
        at += len(flat) // 2 * sum(1 if d < 0 else int(shape[d]) for d in tensor_dims)
    out = torch.empty(at, dtype=torch.float64)
    skipped = products_into(sources, pairs, dims, offsets, out)
    if skipped:
        raise ValueError(f"native.sweep: tensors {skipped} are not readable by the kernel")
    result = []
    for members, flat, tensor_dims, start in zip(sources, pairs, dims, offsets, strict=True):
        per_dim, n = [], len(flat) // 2
        for d in tensor_dims:
            groups = 1 if d < 0 else int(members[0].shape[d])
            block = out[start : start + n * groups].view(n, groups)
            per_dim.append(block.to(members[0].dtype))
            start += n * groups
        result.append(per_dim)
    return result


def adam_direction(
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    vmax: torch.Tensor | None,
    betas: tuple[float, float],
    bc2_sqrt: float,
    eps: float,
) -> torch.Tensor | None:
    """Adam's coming step m'/(√v'/√(1 − β₂ᵏ) + ε) from the gradient and the moments before the
    step, in one pass (torch's element-wise order; m' and v' are never stored); None when the
    kernel is not loaded or the tensors are not contiguous CPU float32/float64 of one shape."""
    if _module is None or not hasattr(_module, "adam_direction"):
        return None
    tensors = [g, m, v] + ([vmax] if vmax is not None else [])
    if not eligible(tensors) or any(t.requires_grad for t in tensors):
        return None
    empty = g.new_empty(0)
    beta1, beta2 = betas
    return _module.adam_direction(
        g, m, v, empty if vmax is None else vmax, 1.0 - beta1, beta2, bc2_sqrt, eps
    )


def clear() -> None:
    """Forget the loaded kernel and any failure (tests); a running build is left to finish."""
    global _module, _failed, _thread
    with _lock:
        _module, _failed, _thread = None, None, None
