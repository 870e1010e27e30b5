"""Tracking under torch.distributed: DDP, FSDP2 (``fully_shard``) and ``ZeroRedundancyOptimizer``.

* **DDP** replicates parameters and (after backward) gradients on every rank: the tracker binds
  to ``ddp.module`` and every rank computes the same records with no communication.
* **FSDP2** shards every parameter on dim 0: each rank reduces its own rows (:mod:`.shards`).
* **ZeRO** keeps each parameter's optimizer state on one owner rank: that rank computes all of
  the parameter's terms, the others none (``ReductionCache.absent``).

In the two split modes every per-step term is a sum over entries, and every law is linear in
those terms with coefficients that are the same on every rank (η, β, τ, λ, κ, the step's
update case), so each rank advances its laws on partial sums and the global value is the sum
over ranks: nothing is communicated per step (``angular_update``, no such sum, is rebuilt from
the summed Qₖ₊₁, ΔQ and ⟨δ, Jδ⟩); :meth:`DistributedTracker.records` sums once
(one ``all_reduce``, one ``all_gather_object`` of the statuses, run-length coded, and
under FSDP2 one all-gather of each bound parameter, for the size of a group's terms that
the residual is judged against). ``records()``,
``to_csv`` and ``plot`` are therefore collective calls: every rank must make them; only the
writer (:func:`is_writer`) writes files.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from symmech.errors import BindingError, explain
from symmech.laws import names

from .binding import Binding, BoundSlice
from .evidence import judge
from .history import without_parts
from .shards import is_sharded, row_ranges, shard_rows
from .stepper import angle_from_parts
from .tracker import Tracker

REPLICATED, FSDP, ZERO = "replicated", "fsdp", "zero"

#: Record columns that are sums over entries (added over ranks in a split mode).
SUMMED = frozenset(
    {
        "observed",
        "residual",
        names.CONTINUOUS,
        *names.PREDICTIONS,
        *getattr(names, "ANATOMY", ()),
        *(("equilibrium",) if hasattr(names, "EQUILIBRIUM") else ()),
        *getattr(names, "ROTATION_PARTS", ()),
    }
)
#: Record columns that every rank computes alike (checked, never added).
SHARED = frozenset(
    {"step", "t", "symmetry", "layer", "group", "label", "status", "note", "angular_equilibrium"}
)


def initialized() -> bool:
    """Whether a default process group exists."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) outside torch.distributed."""
    if not initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_writer() -> bool:
    """Whether this process writes files and figures: rank 0, or not distributed."""
    return rank_and_world()[0] == 0


def unwrap(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """The model inside ``DistributedDataParallel`` (or ``DataParallel``); others as they are."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _zero_type() -> type | None:
    """``ZeroRedundancyOptimizer`` if its module was imported (an optimizer of that class
    implies it was): importing ``torch.distributed.optim`` ourselves would run its
    ``torch.jit.script`` decorators, which warn on every plain run."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return getattr(module, "ZeroRedundancyOptimizer", None)


def split_mode(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer) -> str | None:
    """How the run holds its terms: None (one process), ``replicated``, ``fsdp`` or ``zero``."""
    zero = _zero_type()
    if zero is not None and isinstance(optimizer, zero):
        return ZERO
    if not initialized():
        return None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return FSDP if any(is_sharded(p) for p in params) else REPLICATED


# -- ZeRO --------------------------------------------------------------------------------
class _ZeroState(Mapping):
    """The optimizer state as the tracker reads it under ZeRO: the owner's real state, and on
    other ranks a stand-in momentum buffer wherever the owner has one (its terms are absent
    here), so every rank follows the same update case at every step."""

    def __init__(self, zero: Any) -> None:
        self.local = zero.optim.state
        self.owned = {id(p) for g in zero.optim.param_groups for p in g["params"]}
        self.mirrored: dict[int, torch.Tensor] = {}

    def mirror(self, zero: Any) -> None:
        """After a step: torch.optim.SGD keeps a buffer for every parameter that had a gradient
        in a group with momentum (the owner's rule, applied to parameters owned elsewhere)."""
        for g in zero.param_groups:
            if g.get("momentum", 0.0) == 0.0:
                continue
            for p in g["params"]:
                if id(p) not in self.owned and p.grad is not None:
                    self.mirrored[id(p)] = p

    def __getitem__(self, p: torch.Tensor) -> dict:
        if id(p) in self.owned:
            return self.local[p]
        if id(p) in self.mirrored:
            return {"momentum_buffer": p.detach()}
        raise KeyError(p)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.local
        yield from self.mirrored.values()

    def __len__(self) -> int:
        return len(self.local) + len(self.mirrored)


def zero_view(zero: Any) -> torch.optim.Optimizer:
    """The ZeRO wrapper as the tracker reads it: an instance of the local optimizer's class
    (``torch.optim.SGD``) holding the wrapper's ``param_groups`` (every parameter, settings
    kept in sync by ZeRO) and :class:`_ZeroState`; its hooks are the wrapper's, which fire
    around the whole step (local update and the broadcast of the updated parameters)."""
    cls = type(zero.optim)
    view = cls.__new__(cls)
    state = _ZeroState(zero)
    view.__dict__.update(defaults=dict(zero.optim.defaults), param_groups=zero.param_groups)
    view.__dict__.update(state=state)
    view.register_step_pre_hook = zero.register_step_pre_hook  # type: ignore[method-assign]
    view.register_step_post_hook = zero.register_step_post_hook  # type: ignore[method-assign]
    view.register_load_state_dict_post_hook = zero.register_load_state_dict_post_hook  # type: ignore[method-assign]
    zero.register_step_post_hook(lambda opt, args, kwargs: state.mirror(opt))
    return view


# -- FSDP2: couplings across the shard boundary ----------------------------------------
def _mask(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    if rows is None:
        return t
    out = torch.zeros_like(t)
    out[rows[0] : rows[1]] = t[rows[0] : rows[1]]
    return out


def check_couplings(binding: Binding) -> None:
    """Refuse a binding whose constants couple entries that FSDP2 puts on different ranks.

    The charge is evaluated once on random values of the global shapes, whole and rank by rank
    (each rank's rows, zero elsewhere): the rank sums add up to the whole exactly when the
    constant matrix J has no entry between rows of different ranks. Specs without constants
    reduce entry by entry and always add up.
    """
    slices = [s for sl in binding.blocks.values() for s in sl]
    if not binding.module.CONSTANTS or not any(is_sharded(s.tensor) for s in slices):
        return
    gen = torch.Generator().manual_seed(0)
    full, ranges, world = {}, {}, 1
    for s in slices:
        t = s.tensor
        full[id(t)] = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float64)
        if is_sharded(t):
            _, _, world = shard_rows(t)
            ranges[id(t)] = row_ranges(int(t.shape[0]), world)
    consts = {k: v.detach().to(torch.float64) for k, v in binding.constants.items()}

    def charge(rank: int | None) -> torch.Tensor:
        views = {}
        for block, sl in binding.blocks.items():
            views[block] = []
            for s in sl:
                r = ranges.get(id(s.tensor))
                if rank is None or r is not None or rank == 0:
                    value = _mask(
                        full[id(s.tensor)], None if rank is None or r is None else r[rank]
                    )
                else:  # a whole tensor counts on rank 0 only
                    value = torch.zeros_like(full[id(s.tensor)])
                views[block].append(s.prepare(value))
        return binding.module.charge(views, consts)

    whole = charge(None)
    parts = sum(charge(r) for r in range(world))
    size = sum(float(v.square().sum()) for v in full.values())
    if not torch.allclose(whole, parts, rtol=1e-9, atol=1e-9 * size):
        sharded = [
            f"{getattr(s.tensor, '_symmech_name', '') or tuple(s.tensor.shape)} (view {s.view})"
            for s in slices
            if is_sharded(s.tensor)
        ]
        raise BindingError(
            explain(
                f"track(..., {binding.name} on {binding.layer}) under FSDP2",
                f"the constants {sorted(binding.constants)} couple entries that lie on different "
                f"ranks ({', '.join(sharded)} are sharded on dim 0 of the parameter), so the "
                "per-rank sums miss the cross terms",
                "Bind the layout in which the constant mixes entries within a parameter row "
                "(e.g. drop the transpose), or track this family without sharding",
            )
        )


# -- what goes over the wire ------------------------------------------------------------
class _Counter:
    """Collectives seen, and the bytes of the tensors handed to them."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.bytes = 0


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _tensors(item)


@contextlib.contextmanager
def count_communication() -> Iterator[_Counter]:
    """Count every collective run inside the block: those called by hand, by DDP's reducer,
    by FSDP2, and those a DTensor runs inside its own operations (a dispatch mode that lets
    DTensor handle its ops first, so their collectives on local tensors are seen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .shards import dtensor_type

    counter = _Counter()
    dtensor = dtensor_type()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if dtensor is not None and any(issubclass(t, dtensor) for t in types):
                return NotImplemented
            space = func.namespace
            if space in ("c10d", "_c10d_functional") and not func.__name__.startswith(
                ("wait", "_wrap")
            ):
                counter.calls.append(str(func))
                counter.bytes += sum(
                    t.numel() * t.element_size()
                    for t in _tensors([*args, *(kwargs or {}).values()])
                )
            return func(*args, **(kwargs or {}))

    with Mode():
        yield counter


# -- records -------------------------------------------------------------------------------
def _runs(texts: list[tuple[str, str]]) -> list[tuple[int, tuple[str, str]]]:
    """Run-length code of the rows' (status, note): (first row, value) at every change."""
    out: list[tuple[int, tuple[str, str]]] = []
    for i, v in enumerate(texts):
        if not out or out[-1][1] != v:
            out.append((i, v))
    return out


def _expand(runs: list[tuple[int, tuple[str, str]]], n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for (i, v), nxt in zip(runs, [*(r[0] for r in runs[1:]), n]):
        out.extend([v] * (nxt - i))
    return out


def agree_on_status(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every rank the same status and note per row (collective): a family stopped on one
    rank (a tracker error there) or judged approximate there is so everywhere, with the rank
    that said so."""
    world = rank_and_world()[1]
    if world == 1:
        return rows
    texts = [(r["status"], r["note"]) for r in rows]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, _runs(texts))
    per_rank = [_expand(g, len(rows)) for g in gathered]
    for i, r in enumerate(rows):
        seen = [p[i] for p in per_rank]
        if all(v == seen[0] for v in seen):
            continue
        worst = next((k for k, v in enumerate(seen) if v[0] != "tracked"), 0)
        r["status"], r["note"] = seen[worst][0], f"rank {worst}: {seen[worst][1]}"
    return rows


def global_rows(rows: list[dict[str, Any]], split: bool = True) -> list[dict[str, Any]]:
    """Every rank's rows summed over ranks (collective: every rank calls it with its rows).

    Columns in :data:`SUMMED` are added; a value missing (None) on every rank stays None, on
    some ranks only becomes NaN. ``angular_update`` is rebuilt from the summed Qₖ₊₁ and
    :data:`~symmech.laws.names.ROTATION_PARTS`. Other numeric columns are not sums over entries
    and are NaN with a note. With ``split=False`` (replicated terms) the rows are already global.
    """
    rank, world = rank_and_world()
    if world == 1 or not rows:
        return rows
    if split:
        cols = sorted(SUMMED & rows[0].keys())
        other = [
            k
            for k, v in rows[0].items()
            if k not in SUMMED
            and k not in SHARED
            and k not in _REBUILT
            and (v is None or isinstance(v, float))
        ]
        n, c, o = len(rows), len(cols), len(other)
        buf = torch.zeros(n, 2 * c + o + 2, dtype=torch.float64)
        for i, r in enumerate(rows):
            for j, k in enumerate(cols):
                v = r[k]
                if v is not None:
                    buf[i, j], buf[i, c + j] = v, 1.0
            for j, k in enumerate(other):
                buf[i, 2 * c + j] = float(r[k] is not None)
            buf[i, -2], buf[i, -1] = float(r["step"]), float(r["group"])
        local_keys = buf[:, -2:].clone()
        torch.distributed.all_reduce(buf)
        if not torch.equal(buf[:, -2:], world * local_keys):
            raise RuntimeError(
                explain(
                    f"records() on rank {rank}",
                    "the ranks hold different rows (steps or groups differ)",
                    "attach the tracker on every rank with the same symmetries",
                )
            )
        values = buf[:, :c].tolist()
        present = buf[:, c : 2 * c].tolist()
        elsewhere = buf[:, 2 * c : 2 * c + o].tolist()
        for r, vals, pres, seen in zip(rows, values, present, elsewhere):
            for k, v, p in zip(cols, vals, pres):
                r[k] = v if p == world else (None if p == 0 else float("nan"))
            gone = [k for k, p in zip(other, seen) if p > 0]
            for k in other:
                r[k] = float("nan") if k in gone else None
            if gone:
                note = (
                    f"{', '.join(gone)}: not a sum over entries, unavailable when terms are split"
                )
                r["note"] = f"{r['note']}; {note}" if r["note"] else note
        _rebuild_angles(rows)
    return rows


#: Columns that are no sums over entries but are rebuilt from summed ones (:func:`global_rows`).
_REBUILT = frozenset({names.ANGULAR_UPDATE})


def _rebuild_angles(rows: list[dict[str, Any]]) -> None:
    """``angular_update`` of the global rows from their summed Qₖ₊₁, ΔQ and ⟨δ, Jδ⟩ (None where
    a part is missing or the angle is not defined, as in one process)."""
    dq_name, dsq_name = names.ROTATION_PARTS
    want = [
        r
        for r in rows
        if r.get(dq_name) is not None
        and r.get(dsq_name) is not None
        and r.get("discrete_residual") is not None
    ]
    for r in rows:
        r[names.ANGULAR_UPDATE] = None
    if not want:
        return
    q_after, dq, dsq = (
        torch.tensor([r[k] for r in want], dtype=torch.float64)
        for k in ("discrete_residual", dq_name, dsq_name)
    )
    for r, a in zip(want, angle_from_parts(q_after, dq, dsq).tolist()):
        r[names.ANGULAR_UPDATE] = a if math.isfinite(a) else None


class _Whole:
    """A family as :func:`judge_residuals` reads it, with its binding on whole parameters (the
    size of a group's terms is a maximum, not a sum over ranks); everything else, status
    changes included, is the family's own."""

    def __init__(self, family: Any, binding: Binding) -> None:
        self._family = family
        self.binding = binding

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)


def _whole_bindings(families: Sequence[Any]) -> list[Any]:
    """Families on gathered parameters where FSDP2 shards them (collective: one all-gather per
    sharded bound tensor, the same on every rank)."""
    gathered: dict[int, torch.Tensor] = {}
    out = []
    for f in families:
        b = f.binding
        if not any(is_sharded(t) for t in b.tensors):
            out.append(f)
            continue
        for t in b.tensors:
            if is_sharded(t) and id(t) not in gathered:
                gathered[id(t)] = t.detach().full_tensor()
        blocks = {
            k: [BoundSlice(gathered.get(id(s.tensor), s.tensor), s.dim, s.view, s.name) for s in v]
            for k, v in b.blocks.items()
        }
        whole = Binding(b.derivation, blocks, b.constants, b.layer, b.detected)
        out.append(_Whole(f, whole))
    return out


class DistributedTracker(Tracker):
    """A :class:`Tracker` on one rank of a distributed run (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer,
        bindings: Sequence[Binding],
        mode: str,
        absent: Sequence[torch.Tensor] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(model, optimizer, bindings, **kwargs)
        self.mode = mode
        self.cache.absent.update(id(t) for t in absent)
        if self.split:  # sharded and absent slices: each family reads its own terms
            self._programs = None

    @property
    def split(self) -> bool:
        """Whether each rank holds part of every term (FSDP2, ZeRO) rather than all of it."""
        return self.mode in (FSDP, ZERO)

    def records(self, final: bool = True) -> list[dict[str, Any]]:
        """The global records, the same on every rank (collective in a split mode)."""
        rows = global_rows(self._rows(final), split=self.split)
        families = _whole_bindings(self.families) if self.mode == FSDP else self.families
        judge(rows, families)
        return without_parts(agree_on_status(rows))

    def to_csv(self, path) -> None:
        rows = self.records()
        if is_writer():
            self.history.to_csv(rows, path)

    def plot(self, path, title: str | None = None):
        rows = self.records()
        if not is_writer():
            return None
        from symmech.viz.plots import plot_records

        return plot_records(rows, path, title=title)


def attach(
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    bindings: Sequence[Binding],
    **kwargs: Any,
) -> Tracker:
    """The tracker for this run: a plain :class:`Tracker` in one process, else a
    :class:`DistributedTracker` on the unwrapped model and, under ZeRO, :func:`zero_view`."""
    model = unwrap(model)
    mode = split_mode(model, optimizer)
    if mode is None:
        return Tracker(model, optimizer, bindings, **kwargs)
    rank = rank_and_world()[0]
    tensors = {id(t): t for b in bindings for t in b.tensors}
    if mode == ZERO:
        view = zero_view(optimizer)
        owned = view.state.owned  # type: ignore[attr-defined]
        absent = [t for i, t in tensors.items() if i not in owned]
        return DistributedTracker(model, view, bindings, ZERO, absent, **kwargs)
    if mode == FSDP:
        for b in bindings:
            check_couplings(b)
        whole = [t for t in tensors.values() if not is_sharded(t)]  # counted on rank 0 only
        absent = whole if rank != 0 else []
        return DistributedTracker(model, optimizer, bindings, FSDP, absent, **kwargs)
    return DistributedTracker(model, optimizer, bindings, REPLICATED, **kwargs)
