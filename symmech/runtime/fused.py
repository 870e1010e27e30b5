"""Every product among θ and g of one hook call in one compiled pass: the fused reductions.

Each data term of a law is a per-group inner product among θ, g and the momentum buffer. The
tracker asks for them family by family (:mod:`.reductions`), which on its own costs one or more
reductions and several Python dispatches per product. :class:`Plan` learns which products among
θₖ, gₖ and the momentum buffer the families ask for in a hook call (per *layout*: a parameter, its
view and its group dimension), and from the next such call on computes all of them at the first
request with one ``torch.compile``'d function per model layout: Inductor turns every layout's
reductions into one loop that reads each tensor once, and the Python cost per step no longer grows
with the families. Calls are told apart by their first request (before the step: θ and g; after
it: the updated buffer), each with its own plan.

Modes (:data:`MODE`, or the environment variable ``SYMMECH_REDUCTIONS``):

* ``"eager"``: every product reduced when asked (no compilation);
* ``"compiled"``: compile from the second hook call on;
* ``"native"``: on the CPU, symmech's C++ kernel (:mod:`.native`: one sweep per tensor that
  reads each source once, for the groups along every dimension), built when first needed and
  waited for; on other devices as ``"compiled"``;
* ``"auto"`` (default): on the CPU, the C++ kernel once its build is ready, eager until then.
  The build starts in the background (:func:`.native.start`) the first time a tracked model
  covers :data:`AUTO_MIN_ELEMENTS_CPU` entries and is cached per machine, so later runs load it
  in about a second. On CUDA, compile once the plan has been asked for on :data:`AUTO_AFTER`
  hook calls and covers at least
  :data:`AUTO_MIN_ELEMENTS` entries (compiling takes seconds, so short runs and small models stay
  eager). ``torch.compile`` is not used on the CPU: Inductor's C++ loops reduce a
  512×512×3×3 conv weight along its input channels in 3.5 ms against the eager 0.9 ms (one
  thread), and a layout's row and column reductions become two loops.

If compilation fails, a warning says so once and every product is reduced eagerly from then on.
A third tensor joins a layout's pass when it is asked for in two calls in a row at the same
storage (torch's momentum buffer), or when it is a named tensor of the hook call (role ``"a"``:
the coming step aₖ of an adaptive optimizer, made anew each call, registered in
:attr:`.reductions.ReductionCache.steps` and read as that role); other temporaries (ηa when the η
differ between tensors) and sharded, absent or low-precision slices are always reduced eagerly.
The fused values equal the eager ones to round-off (tests/runtime/test_fused.py,
tests/runtime/test_native.py); training is untouched and nothing waits for the device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import native

#: one of :data:`MODES` (see the module docstring)
MODE = os.environ.get("SYMMECH_REDUCTIONS", "auto")
MODES = ("eager", "compiled", "native", "auto")
#: in "auto" mode: hook calls with the same plan before compiling, and the entries it must cover
AUTO_AFTER = 50
AUTO_MIN_ELEMENTS = 1_000_000
#: in "auto" mode on the CPU: the entries a plan must cover for the C++ kernel. vgg11-bn width
#: 0.5 (2.4 M entries, one thread, tracker work / optimizer.step()): under SGD, logging every
#: step, 3.3–3.5× with the kernel against 3.7–6.0× eager (the eager products are temporaries,
#: whose cost depends on what the allocator returned to the system before: after a small
#: confirmation every one page-faults), logging every 50 steps 2.4–2.5× against 2.2–2.3×; under
#: AdamW 1.8–2.3× against 3.0–4.1×. A transformer block of 0.8 M entries (71 families) under
#: AdamW measured 3.4× against 2.7× while its attention heads kept every family of their bank
#: off the one read; with the heads in banks of their own, 3.1× against 4.1× logging every step
#: and 2.4× against 3.3× every 50 steps. Much smaller models stay eager: Python per tensor
#: outweighs the sweep there, and they need no build.
AUTO_MIN_ELEMENTS_CPU = 500_000
#: compiled functions kept (one per model layout: shapes, strides, dtypes, group dims, products)
MAX_COMPILED = 8

_failed: str | None = None  # why compilation failed (then everything stays eager)
_compiled: dict[tuple, Callable[..., list[torch.Tensor]]] = {}

Structure = tuple[tuple[int, tuple[tuple[int, int], ...]], ...]


def reduce_dims(ndim: int, dim: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != dim % ndim)


def layout_products(
    members: list[torch.Tensor], dim: int, pairs: tuple[tuple[int, int], ...]
) -> torch.Tensor:
    """Σ over each group of members[i] · members[j] for every (i, j) in ``pairs``, stacked
    (len(pairs), G): one pass over the members when compiled (Inductor fuses the reductions)."""
    dims = reduce_dims(members[0].ndim, dim)
    out = [(members[i] * members[j]).sum(dims) if dims else members[i] * members[j]
           for i, j in pairs]  # fmt: skip
    return torch.stack(out)


def group_sums(p: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Sum ``p`` over every dimension but ``dim`` (None: everything, one group), with long
    contiguous reductions: rows for the leading dimension, else a matrix-vector product with 𝟙
    (on the CPU an order of magnitude faster than a strided ``sum``)."""
    if dim is None:
        return p.sum().reshape(1)
    if p.ndim == 1:
        return p
    dim = dim % p.ndim
    if dim == 0:
        return p.reshape(p.shape[0], -1).sum(dim=1)
    shape = p.shape
    lead = 1
    for n in shape[:dim]:
        lead *= n
    groups = shape[dim]
    if lead > 1:
        p2 = torch.mv(p.reshape(lead, -1).t(), _ones(lead, p.dtype, p.device)).reshape(groups, -1)
    else:
        p2 = p.reshape(groups, -1)
    return p2.sum(dim=1) if p2.shape[1] > 1 else p2.reshape(groups)


_ONES: dict[tuple, torch.Tensor] = {}


def _ones(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """𝟙 of length ``n``, made once per length, dtype and device (never written to)."""
    key = (n, dtype, device)
    ones = _ONES.get(key)
    if ones is None:
        if len(_ONES) >= 256:
            _ONES.clear()
        ones = _ONES[key] = torch.ones(n, dtype=dtype, device=device)
    return ones


def all_products(structure: Structure, members: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """:func:`layout_products` of every layout (``structure``: each layout's dim and pairs)."""
    return [
        layout_products(m, dim, pairs) for (dim, pairs), m in zip(structure, members, strict=True)
    ]


_compiles = 0


def _compile(structure: Structure) -> Callable[..., list[torch.Tensor]]:
    def run(members: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return all_products(structure, members)

    # a code object of its own per model layout: dynamo counts recompilations per code object,
    # and the ninth layout of one shared ``run`` would hit its limit and fail (fullgraph)
    global _compiles
    _compiles += 1
    run.__code__ = run.__code__.replace(co_name=f"symmech_fused_products_{_compiles}")
    return torch.compile(run, dynamic=False, fullgraph=True)


def run_compiled(
    structure: Structure, members: list[list[torch.Tensor]]
) -> list[torch.Tensor] | None:
    """Every layout's products by the compiled function of this model layout (None: failed)."""
    global _failed
    if _failed is not None:
        return None
    key = (structure, tuple((t.shape, t.stride(), t.dtype, t.device) for m in members for t in m))
    fn = _compiled.get(key)
    try:
        if fn is None:
            if len(_compiled) >= MAX_COMPILED:
                _compiled.pop(next(iter(_compiled)))
            fn = _compiled[key] = _compile(structure)
        return fn(members)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _failed = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        warnings.warn(
            f"symmech: torch.compile of the fused reductions failed ({_failed}); reducing every "
            "product eagerly from now on (same values, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


#: reads a role of a parameter in this hook call: ("t", p) → θ, ("g", p) → its gradient, a named
#: role ("a") → the tensor registered under it; None when there is none
Reader = Callable[[str, torch.Tensor], torch.Tensor | None]


class _Layout:
    """One layout's sources ("t": θ, "g": its gradient, a named role, or a kept tensor) and the
    products asked."""

    __slots__ = ("spec", "sources", "pairs", "seen")

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.sources: list[str | torch.Tensor] = []
        self.pairs: set[tuple[int, int]] = set()
        self.seen: tuple | None = None  # storage of a third tensor asked for once so far

    def index(self, role: str | torch.Tensor, key: tuple) -> int | None:
        for i, s in enumerate(self.sources):
            if isinstance(s, str):
                if isinstance(role, str) and s == role:
                    return i
            elif not isinstance(role, str) and _key(s) == key:
                return i
        return None

    def add(self, role: str | torch.Tensor, key: tuple) -> int | None:
        """Add a source (a kept tensor only when asked for at the same storage twice in a row)."""
        if isinstance(role, str):
            self.sources.append(role)
            return len(self.sources) - 1
        if self.seen != key:
            self.seen = key
            return None
        self.sources = [s for s in self.sources if isinstance(s, str)] + [role]  # one kept tensor
        self.pairs = {
            (i, j) for i, j in self.pairs if i < len(self.sources) - 1 and j < len(self.sources) - 1
        }
        return len(self.sources) - 1

    def members(self, read: Reader) -> list[torch.Tensor] | None:
        out = []
        for s in self.sources:
            if isinstance(s, torch.Tensor):
                out.append(s)
                continue
            t = read(s, self.spec.tensor)
            if t is None or t.dtype != self.spec.tensor.dtype:
                return None
            out.append(self.spec.shaped(t.detach()))
        return out if len({(m.shape, m.dtype) for m in out}) == 1 else None

    def version(self, read: Reader) -> tuple:
        """What identifies the sources' current values (in-place updates bump ``_version``)."""
        p = self.spec.tensor
        named = tuple(
            None if t is None else (id(t), t._version)
            for t in (read(s, p) for s in self.sources if isinstance(s, str) and s != "t")
        )
        kept = tuple(s._version for s in self.sources if isinstance(s, torch.Tensor))
        return p._version, named, kept


def _key(x: torch.Tensor) -> tuple:
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


class _Phase:
    """The layouts one kind of hook call asks for, and how many calls asked for no more."""

    def __init__(self) -> None:
        self.layouts: dict[tuple, _Layout] = {}
        self.stable = 0
        #: (number of layouts, entries of their distinct tensors), counted for that many layouts
        self.entries: tuple[int, int] | None = None


class Plan:
    """The products the families asked for, per kind of hook call and layout, learned across
    calls; from the next call on every one of them comes from a single compiled pass."""

    def __init__(self) -> None:
        self.phases: dict[tuple, _Phase] = {}
        self.phase: _Phase | None = None  # this call's (None: nothing asked for yet)
        self._grew = False
        self._computed = False
        #: this call's products: layout → {pair: per-group values}
        self.results: dict[tuple, dict[tuple[int, int], torch.Tensor]] = {}
        self.versions: dict[tuple, tuple] = {}
        #: "auto" found the model too small to be worth compiling: no more learning either
        self.off = False

    def end_call(self) -> None:
        """A hook call ended: forget its values; count it if products were asked for."""
        if self.phase is not None:
            self.phase.stable = 0 if self._grew else self.phase.stable + 1
            if MODE == "auto" and self.phase.stable >= 2 and not self.off:
                self.off = not _large_enough(self.phase)
                if not self.off and _engine(_first_tensor(self.phase)) == "native":
                    native.start()  # in the background: eager until it is ready
        self.phase = None
        self._grew = self._computed = False
        self.results.clear()
        self.versions.clear()

    @property
    def fusing(self) -> bool:
        """Whether products may come from a fused pass at all: not in mode ``"eager"``, nor once
        ``"auto"`` found the model too small (a lookup still asks its tensor's device)."""
        return MODE != "eager" and not (self.off and MODE == "auto")

    def _active(self, phase: _Phase) -> bool:
        engine = _engine(_first_tensor(phase)) if phase.layouts else None
        if engine is None or phase.stable < 1:
            return False
        if MODE == "compiled" or (MODE == "native" and engine == "compiled"):
            return True
        if MODE == "native":
            return native.build() or bool(_warn_native())
        if not _large_enough(phase):
            return False
        if engine == "native":
            return native.ready()
        return phase.stable >= AUTO_AFTER

    def lookup(
        self,
        layout: tuple,
        spec: Any,
        roles: tuple[str | torch.Tensor, str | torch.Tensor],
        read: Reader,
    ) -> torch.Tensor | None:
        """The per-group product of the two ``roles`` ("t", "g", a named role or a tensor) in
        ``layout`` from this call's fused pass (None: not fused; the caller reduces it eagerly,
        and the plan includes it from the next call)."""
        if not self.fusing or _engine(spec.tensor) is None:
            return None
        keys = tuple(_key(r) if isinstance(r, torch.Tensor) else r for r in roles)
        if self.phase is None:
            self.phase = self.phases.setdefault((layout, keys), _Phase())
        phase = self.phase
        entry = phase.layouts.get(layout)
        if entry is None:
            entry = phase.layouts[layout] = _Layout(spec)
        found = [entry.index(r, k) for r, k in zip(roles, keys)]
        if None in found:
            for n, (r, k) in enumerate(zip(roles, keys)):
                if found[n] is None:
                    found[n] = entry.index(r, k)
                    found[n] = entry.add(r, k) if found[n] is None else found[n]
            self._grew = True
            if None not in found:
                entry.pairs.add((min(found), max(found)))
            return None
        pair = (min(found), max(found))
        if pair not in entry.pairs:
            entry.pairs.add(pair)
            self._grew = True
            return None
        known = self.versions.get(layout)  # None: the pass gave this layout nothing
        if self._computed and known is not None and known != entry.version(read):
            self._computed = False  # a source changed since the pass (outside a hook call)
            self.results.clear()
        if not self._computed:
            self._computed = True
            if self._active(phase):
                self._compute(phase, read)
        got = self.results.get(layout)
        return None if got is None else got.get(pair)

    def _compute(self, phase: _Phase, read: Reader) -> None:
        names, structure, members = [], [], []
        for layout, entry in phase.layouts.items():
            m = entry.members(read)
            if m is None or not entry.pairs:
                continue
            pairs = tuple(sorted(entry.pairs))
            names.append((layout, pairs))
            structure.append((layout[2], pairs))
            members.append(m)
        if not members:
            return
        if _engine(members[0][0]) == "native":
            values: list[torch.Tensor | None] | None = native.layout_products(structure, members)
        else:
            values = run_compiled(tuple(structure), members)
        if values is None:
            return
        for (layout, pairs), v in zip(names, values, strict=True):
            if v is None:
                continue
            self.results[layout] = dict(zip(pairs, v.unbind(0)))
            self.versions[layout] = phase.layouts[layout].version(read)


_native_warned = False


def _first_tensor(phase: _Phase) -> torch.Tensor:
    return next(iter(phase.layouts.values())).spec.tensor


def _large_enough(phase: _Phase) -> bool:
    """Whether the phase's layouts cover the entries "auto" asks for before it fuses on their
    device (:data:`AUTO_MIN_ELEMENTS_CPU` on the CPU, else :data:`AUTO_MIN_ELEMENTS`)."""
    if not phase.layouts:
        return False
    if phase.entries is None or phase.entries[0] != len(phase.layouts):
        # each tensor once, however many layouts (dims, views) read it
        tensors = {id(lay.spec.tensor): lay.spec.tensor for lay in phase.layouts.values()}
        phase.entries = (len(phase.layouts), sum(t.numel() for t in tensors.values()))
    cpu = _first_tensor(phase).device.type == "cpu"
    return phase.entries[1] >= (AUTO_MIN_ELEMENTS_CPU if cpu else AUTO_MIN_ELEMENTS)


def _engine(tensor: torch.Tensor) -> str | None:
    """What computes the fused products of tensors on this one's device under :data:`MODE`:
    ``"native"`` (the C++ kernel, CPU), ``"compiled"`` (``torch.compile``) or None (eager)."""
    if MODE not in MODES or MODE == "eager":
        return None
    if tensor.device.type == "cpu" and MODE in ("native", "auto"):
        return "native" if native.failure() is None else _warn_native()
    if MODE == "auto" and tensor.device.type != "cuda":
        return None
    return None if _failed is not None else "compiled"


def _warn_native() -> None:
    """Say once that the C++ kernel could not be built (the products stay eager)."""
    global _native_warned
    if not _native_warned:
        _native_warned = True
        warnings.warn(
            f"symmech: the C++ kernel for the tracker's products could not be built "
            f"({native.failure()}); reducing every product eagerly (same values, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
