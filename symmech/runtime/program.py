"""Every steady bank's data terms from one sweep and one gather per hook call: the programs.

Once a bank's laws are running, each step asks the same terms of every family. Under
``torch.optim.SGD``: rₖ = ⟨ξ, g⟩ (and Q when logged) before the update and uᵀJu after it (the
forms of θ, g and b instead, without momentum or with Nesterov's). Under an adaptive optimizer
(Adam, AdamW, RMSprop, …: θₖ₊₁ = sθₖ − ηa with one s and one η): ⟨ξ(θ), a⟩ and ⟨a, J a⟩ of
the coming step aₖ, computed for the hook call before any family asks. Each is a fixed linear
combination of per-group products (or sums) of the bound slices (:mod:`.traced`). A
:class:`Gather` lays out every product a set of requests reads; the C++ kernel (:mod:`.native`)
computes them all in one call (one sweep per tensor, reading each source once, every value in
double into one vector) and forms every requested bank vector in one more
(out[dst] += products[src]·coefficient). Under Adam and AdamW a large tensor's aₖ is left
pending (:class:`~.coming_step.AdamPass`) and made inside that sweep from g, m and v, row block
by row block, never stored. No family's Python runs, and no slice view, lookup or generated
function.

:class:`Programs` decides per hook call which banks are *steady*, so that the per-family path
(:meth:`.family.Family.before_step`) would do exactly this: every family tracked with its laws
running (no restart due, Q₀ known), a modelled optimizer, every bound tensor with its gradient
and, under SGD with momentum, its buffer already followed by the laws, or under the general law
its coming step with one shrink and one η. The other banks, and every bank of a tracker whose
ranks each hold part of the terms (FSDP2, ZeRO; under DDP every rank holds everything and reads
its banks at once), on another device than the CPU, or before the kernel is loaded, take the
per-family path, whose values these equal to round-off (tests/runtime/test_program.py). A slice
the kernel cannot read (not contiguous) is reduced eagerly in its place; any error leaves the
step to the per-family path."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import fused, native
from .bank import Bank
from .binding import BoundSlice
from .coming_step import AdamPass
from .directions import modelled
from .family import Family, coming_steps
from .kernels import Forms
from .stepper import General, Hyper, StepData, update_forms
from .traced import FORM_FIELDS, Lin, NotTraced, slot, trace

#: (bank number, function, roles, field): one bank vector of one generated function's value
Request = tuple[int, str, tuple, str | None]
#: a family's traced value with the family's offset in its bank
Part = tuple[int, Lin, Family]
#: where a slot's diagonal terms lie in its tensor: a dimension and the (G, a) indices along it
Diagonal = tuple[int, torch.Tensor]
#: the generated function and the roles of its arguments, per term a step asks for
CHARGE, RESIDUAL, QUADRATIC = ("charge", ("t",)), ("residual", ("t", "g")), ("quadratic", ("b",))
FORMS, FORMS_B = ("forms", ("t", "g", None)), ("forms", ("t", "g", "b"))
XI_A, A_J_A = ("residual", ("t", "a")), ("quadratic", ("a",))  # ⟨ξ(θ), a⟩ and ⟨a, J a⟩


@dataclass
class _Sweep:
    """One tensor (in one view) read by the kernel: its roles, the pairs among them (second role
    None: the first alone, a sum), and the group dimensions whose per-group sums are asked for
    (None: the whole slice, one value)."""

    spec: Any
    roles: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str | None]] = field(default_factory=list)
    dims: list[int | None] = field(default_factory=list)

    def add(self, first: str, second: str | None, dim: int | None) -> None:
        for role in (first, second):
            if role is not None and role not in self.roles:
                self.roles.append(role)
        if "a" in self.roles[:-1]:  # Adam's step is the last source (the kernel may make it)
            self.roles.remove("a")
            self.roles.append("a")
        if (first, second) not in self.pairs:
            self.pairs.append((first, second))
        if dim not in self.dims:
            self.dims.append(dim)

    def flat_pairs(self) -> list[int]:
        """The pairs as source numbers (-1: a sum)."""
        return [-1 if r is None else self.roles.index(r) for pair in self.pairs for r in pair]

    def kernel_dims(self, ndim: int) -> list[int]:
        return [-1 if d is None else d % ndim for d in self.dims]


class Gather:
    """The products that a set of requests reads, laid out for one kernel call, and the gather
    that forms every requested bank vector from them.

    Every term is a per-group sum of a product of two bound slices, or of one slice: each
    slice's products lie in one float64 vector, dimension by dimension and pair by pair (the
    C++ kernel fills it in one call, :func:`.native.products_into`; a slice it cannot read, not
    contiguous, is computed eagerly in its place). A request's vector is Σ coefficient × product
    over its families' terms, at the families' offsets: one :func:`.native.scatter`.
    """

    def __init__(
        self, wanted: list[tuple[Request, list[Part]]], diagonals: dict[tuple, Diagonal]
    ) -> None:
        sweeps: dict[tuple, _Sweep] = {}  # (tensor id, view) -> its sweep
        for _, parts in wanted:
            for _, lin, fam in parts:
                for atom in lin.terms:
                    tid, view, dim = atom[1]
                    if atom[0] == "diag":  # read from the tensor itself, along its dimension d
                        d = diagonals[atom[1]][0]
                        tensor = _spec_of(fam, atom[1]).tensor
                        sw = sweeps.setdefault((tid, None), _Sweep(BoundSlice(tensor, d)))
                        sw.add(atom[2], atom[3], d)
                        continue
                    sw = sweeps.setdefault((tid, view), _Sweep(_spec_of(fam, atom[1])))
                    sw.add(atom[2], atom[3] if atom[0] == "prod" else None, dim)
        self.sweeps = list(sweeps.values())
        where: dict[tuple, int] = {}  # atom -> where its per-group values start
        self.offsets: list[int] = []
        shapes: list[tuple[int, ...]] = []
        at = 0
        for (tid, view), sw in sweeps.items():
            shape = tuple(sw.spec.shaped(torch.empty(sw.spec.tensor.shape, device="meta")).shape)
            self.offsets.append(at)
            shapes.append(shape)
            for dim in sw.dims:
                for first, second in sw.pairs:
                    key = ("prod", (tid, view, dim), first, second)
                    where[key if second is not None else ("sum", (tid, view, dim), first)] = at
                    at += 1 if dim is None else int(shape[dim])
        self.n_products = at
        self.pairs = [sw.flat_pairs() for sw in self.sweeps]
        self.dims = [sw.kernel_dims(len(shape)) for sw, shape in zip(self.sweeps, shapes)]
        src: list[int] = []
        dst: list[int] = []
        coef: list[float] = []
        #: each request's place in the output vector
        self.outputs: dict[Request, slice] = {}
        start = 0
        for request, parts in wanted:
            size = 0
            for offset, lin, fam in parts:
                n = fam.n_groups
                for atom, c in lin.terms.items():
                    if atom[0] == "diag":  # group g's a-th entry: index k[g, a] along d
                        d, k = diagonals[atom[1]]
                        at = where[("prod", (atom[1][0], None, d), atom[2], atom[3])]
                        src.extend((at + k[:, atom[4]]).tolist())
                    else:
                        src.extend(range(where[atom], where[atom] + n))
                    dst.extend(range(start + offset, start + offset + n))
                    coef.extend([c] * n)
                size = max(size, offset + n)
            self.outputs[request] = slice(start, start + size)
            start += size
        self.size = start
        self.src = torch.tensor(src, dtype=torch.long)
        self.dst = torch.tensor(dst, dtype=torch.long)
        self.coef = torch.tensor(coef, dtype=torch.float64)

    def run(
        self,
        read: Callable[[str, torch.Tensor], torch.Tensor | None],
        pending: Callable[[torch.Tensor], AdamPass | None] = lambda p: None,
    ) -> dict:
        """Every requested bank vector (float64) from the tensors ``read(role, parameter)``; a
        parameter's Adam step that is ``pending`` is made inside the kernel's sweep from its
        inputs (never stored)."""
        members, pairs, made, scalars = [], self.pairs, [], []
        for i, sw in enumerate(self.sweeps):
            step = pending(sw.spec.tensor) if "a" in sw.roles else None
            found = self._read(sw, read, sw.roles if step is None else sw.roles[:-1])
            if step is not None:  # "a" is the last role: made from g, m, v (and the maximum)
                k = len(found)
                found.extend(sw.spec.shaped(t) for t in step.tensors())
                at = len(found)  # the made step's source number
                if pairs is self.pairs:
                    pairs = list(self.pairs)
                a = len(sw.roles) - 1
                pairs[i] = [at if j == a else j for j in self.pairs[i]]
                made.append([k, k + 1, k + 2, k + 3 if step.vmax is not None else -1])
                scalars.append(step.scalars())
            else:
                made.append([])
                scalars.append([])
            members.append(found)
        products = torch.empty(self.n_products, dtype=torch.float64)
        if not any(made):
            made = scalars = []
        skipped = native.products_into(
            members, pairs, self.dims, self.offsets, products, made, scalars
        )
        for i in skipped:  # a slice the kernel does not read: the same products, eagerly
            self._eager(i, self._read(self.sweeps[i], read, self.sweeps[i].roles), products)
        out = torch.zeros(self.size, dtype=torch.float64)
        native.scatter(products, self.src, self.dst, self.coef, out)
        return {r: out[s] for r, s in self.outputs.items()}

    @staticmethod
    def _read(sw: _Sweep, read: Callable, roles: list[str]) -> list[torch.Tensor]:
        found = []
        for role in roles:
            t = read(role, sw.spec.tensor)  # under no_grad (the tracker's hooks): no detach
            if t is None:
                raise LookupError(f"no {role!r} of a {tuple(sw.spec.tensor.shape)} tensor")
            found.append(sw.spec.shaped(t))
        return found

    def _eager(self, i: int, members: list[torch.Tensor], products: torch.Tensor) -> None:
        sw, at = self.sweeps[i], self.offsets[i]
        for dim in sw.dims:
            for first, second in sw.pairs:
                x = members[sw.roles.index(first)]
                value = x if second is None else x * members[sw.roles.index(second)]
                sums = fused.group_sums(value, dim).reshape(-1)
                products[at : at + sums.numel()] = sums
                at += sums.numel()


def _check_groups(value: Lin | Forms, fam: Family, diagonals: dict[tuple, Diagonal]) -> None:
    """Every term of a traced value has one value per group of the family, and every diagonal
    term lies in one dimension of its tensor (:func:`diagonal_groups`, kept in ``diagonals``
    by slot for the gather): otherwise the bank keeps the per-family path."""
    lins = [getattr(value, f) for f in FORM_FIELDS] if isinstance(value, Forms) else [value]
    for lin in lins:
        for atom in [] if lin is None else lin.terms:
            spec = _spec_of(fam, atom[1])
            if spec.n_groups != fam.n_groups:
                raise NotTraced(f"a term of {spec.n_groups} groups in a family of {fam.n_groups}")
            if atom[0] == "diag" and atom[1] not in diagonals:
                diagonals[atom[1]] = diagonal_groups(spec)


def diagonal_groups(spec: BoundSlice) -> tuple[int, torch.Tensor]:
    """Where a slice's diagonal terms lie in its tensor: a dimension d and, per group g and
    entry a of the slice's last axis, the index k[g, a] along d such that the entries the term
    sums, slice[g, …, a], are exactly the tensor's entries with index k[g, a] along d (a head's
    feature: a row of q's weight, a column of the output projection's). The term is then the
    kernel's group sum along d at k. Raises :class:`NotTraced` when no dimension holds them.

    >>> import torch
    >>> w = torch.zeros(6, 5)  # two heads of 3 features, as rows
    >>> d, k = diagonal_groups(BoundSlice(w, 0, ("strided", (2, 5, 3), (15, 1, 5), 0)))
    >>> d, k.tolist()
    (0, [[0, 1, 2], [3, 4, 5]])
    """
    shape = tuple(spec.tensor.shape)
    flat = spec.shaped(torch.arange(math.prod(shape)).view(shape))
    if flat.ndim < 2 or (spec.dim is not None and spec.dim % flat.ndim == flat.ndim - 1):
        raise NotTraced("a diagonal term on a slice without a feature axis of its own")
    flat = flat.movedim(spec.dim % flat.ndim, 0) if spec.dim is not None else flat.unsqueeze(0)
    summed = flat.reshape(flat.shape[0], -1, flat.shape[-1])  # (G, the entries summed, a)
    distinct = bool((summed.sort(dim=1).values.diff(dim=1) != 0).all())
    coords = torch.unravel_index(summed, shape)
    for d, c in enumerate(coords):
        k = c[:, 0, :]
        if (
            distinct
            and summed.shape[1] * shape[d] == math.prod(shape)
            and bool((c == k[:, None]).all())
        ):
            return d, k
    raise NotTraced("a diagonal term whose entries are not one index of a dimension")


def _spec_of(fam: Family, where: tuple) -> Any:
    """The family's bound slice in the slot ``where``."""
    for slices in fam.binding.blocks.values():
        for s in slices:
            if slot(s) == where:
                return s
    raise NotTraced("a slot the family does not bind")  # pragma: no cover


@dataclass
class BankStep:
    """How a steady bank's families all step now: torch.optim.SGD's law in one of its cases
    (``"sgd"``: heavy ball, ``"plain"``, ``"nesterov"``), or ``"general"``: θₖ₊₁ = sθₖ − ηa with
    one shrink s and one η for every bound tensor (Adam, AdamW, RMSprop, …)."""

    case: str
    hyper: Hyper
    angle: float | None = None  # the random-walk equilibrium angle of the settings
    shrink: float = 1.0
    eta: float = 1.0


@dataclass
class Step:
    """The steady banks of one hook call and what was read before the update."""

    banks: dict[int, BankStep]  # by bank number
    values: dict[Request, torch.Tensor]
    families: set[int] = field(default_factory=set)  # ids of the families the banks stepped


class Programs:
    """Which banks a hook call steps by one gather, and their data (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cache: Any, step_cache: dict) -> None:
        self.optimizer = optimizer
        self.cache = cache
        #: the tracker's per-hook-call cache: each tensor's coming step (:mod:`.directions`)
        self.step_cache = step_cache
        #: why the programs stopped for good (None: on); set on the first error
        self.off: str | None = None
        self._traced: dict[tuple, list[Part] | None] = {}
        self._gathers: dict[tuple, Gather] = {}
        self._diagonals: dict[tuple, Diagonal] = {}  # by slot, found while tracing
        self._large: tuple[int, bool] | None = None
        self._banks: list[Bank] | None = None  # the banks the caches above were made for

    def pending(self, p: torch.Tensor) -> AdamPass | None:
        """The Adam step of ``p`` for this hook call when it is not made yet (the gather makes
        it in its sweep)."""
        found = self.cache.steps.get(id(p))
        return None if found is None or found.made else found.pending

    def read(self, role: str, p: torch.Tensor) -> torch.Tensor | None:
        """θ, g or a named tensor of this hook call (:meth:`.reductions.ReductionCache.read`),
        or ("b") torch's momentum buffer."""
        if role == "b":
            return self.optimizer.state.get(p, {}).get("momentum_buffer")
        return self.cache.read(role, p)

    def usable(self, banks: list[Bank]) -> bool:
        """Whether the kernel computes the products: loaded, CPU tensors, and under ``"auto"``
        a model as large as the fused pass asks (:data:`.fused.AUTO_MIN_ELEMENTS_CPU`)."""
        if self.off is not None or not native.ready() or fused.MODE not in ("native", "auto"):
            return False
        if not modelled(self.optimizer) or self.cache.absent:
            return False
        if self._large is None or self._large[0] != len(banks):
            tensors = {id(t): t for b in banks for f in b.families for t in f.binding.tensors}
            plain = all(
                type(t) in (torch.Tensor, torch.nn.Parameter)
                and t.device.type == "cpu"
                and t.dtype in (torch.float32, torch.float64)  # lower ones reduce in float32
                for t in tensors.values()
            )
            entries = sum(t.numel() for t in tensors.values())
            large = fused.MODE == "native" or entries >= fused.AUTO_MIN_ELEMENTS_CPU
            self._large = (len(banks), plain and large)
        return self._large[1]

    def _steady(self, bank: Bank) -> BankStep | None:
        """How the bank's families all step now, when each would only hand its bank the terms
        of that step (None: the per-family path)."""
        fams = bank.families
        if bank.laws is None:
            return None
        first = fams[0]
        for f in fams:
            if not f.tracked or f.q0 is None or f.restart_due is not None:
                return None
        hyper, general = first.hyper()
        state, grads = self.optimizer.state, self.cache.grads
        buffers = hyper.momentum != 0.0 and not general
        if buffers and not all(f.follows_buffer for f in fams):
            return None
        for t in bank.tensors:
            g = grads.get(id(t), t.grad)
            if g is None or g.layout != torch.strided:
                return None
            if buffers and state.get(t, {}).get("momentum_buffer") is None:
                return None
        if general:
            return self._general(bank, hyper)
        case = hyper.case(hyper.momentum == 0.0)
        return BankStep(case, hyper) if case in ("sgd", "plain", "nesterov") else None

    def _general(self, bank: Bank, hyper: Hyper) -> BankStep | None:
        """The general step, when every bound tensor's coming step was computed for this hook
        call with one shrink and one finite η (else the families measure their own). Under
        SGD's general law (per-tensor settings, ``maximize``) the tracker did not compute them
        ahead: they are computed here, as a family's first request would."""
        for f in bank.families:
            for t, group in zip(f.binding.tensors, f.group_indices):
                if ("direction", id(t)) not in self.step_cache:
                    if ("directions", group) not in self.step_cache:
                        coming_steps(self.optimizer, self.cache, self.step_cache, group)
        found = [
            self.step_cache.get(("direction", id(t)))
            for f in bank.families
            for t in f.binding.tensors
        ]
        if not found or any(d is None for d in found):
            return None
        shrink, eta = found[0].shrink, found[0].eta
        if not math.isfinite(eta) or any(d.shrink != shrink or d.eta != eta for d in found):
            return None
        return BankStep("general", hyper, shrink=shrink, eta=eta)

    def _parts(self, bank: Bank, fn: tuple) -> list[Part] | None:
        """Each family's traced ``fn`` with its offset in the bank (None: one does not trace)."""
        key = (id(bank), fn)
        if key not in self._traced:
            try:
                parts = [
                    (
                        offset,
                        trace(f.module, fn[0], f.binding.blocks, fn[1], f.binding.constants),
                        f,
                    )
                    for offset, f in zip(bank.offsets, bank.families)
                ]
                for _, value, f in parts:
                    _check_groups(value, f, self._diagonals)
                self._traced[key] = parts
            except NotTraced:
                self._traced[key] = None
        return self._traced[key]

    def _values(self, wanted: list[tuple[int, Bank, tuple, str | None]]) -> dict | None:
        requests = []
        for number, bank, fn, fld in wanted:
            traced = self._parts(bank, fn)
            if traced is None:
                return None
            if fld is not None:
                traced = [(o, getattr(forms, fld), f) for o, forms, f in traced]
                if any(lin is None for _, lin, _ in traced):
                    return None
            requests.append(((number, fn[0], fn[1], fld), traced))
        key = tuple(r for r, _ in requests)
        gather = self._gathers.get(key)
        if gather is None:
            gather = self._gathers[key] = Gather(requests, self._diagonals)
        return gather.run(self.read, self.pending)

    def before(self, banks: list[Bank], log: bool) -> Step | None:
        """Read the steady banks' terms before the update (None: no bank is steady)."""
        if banks is not self._banks:  # traces and gathers are keyed by bank: made for these
            self._banks = banks
            self._traced.clear()
            self._gathers.clear()
            self._diagonals.clear()
        steady: dict[int, BankStep] = {}
        wanted: list[tuple[int, Bank, tuple, str | None]] = []
        for number, bank in enumerate(banks):
            found = self._steady(bank)
            if found is None:
                continue
            case, hyper = found.case, found.hyper
            need = []
            if log:
                need.append((CHARGE, None))
            if log or bank.families[0].residuals:
                need.append((RESIDUAL, None))
            if case in ("plain", "nesterov"):
                fn = FORMS if case == "plain" else FORMS_B
                need.extend((fn, fld) for fld in FORM_FIELDS[: 3 if case == "plain" else 6])
            elif case == "general":
                need.extend([(XI_A, None), (A_J_A, None)])
            if any(self._parts(bank, fn) is None for fn, _ in need):
                continue
            if case == "sgd" and self._parts(bank, QUADRATIC) is None:
                continue
            first = bank.families[0]
            found.angle = first.rotation_eq(hyper) if first.rotation else None
            steady[number] = found
            wanted.extend((number, bank, fn, fld) for fn, fld in need)
        if not steady:
            return None
        values = self._values(wanted) if wanted else {}
        if values is None:
            return None
        return Step(steady, values, {id(f) for n in steady for f in banks[n].families})

    def family_values(
        self, step: Step, banks: list[Bank], log: bool
    ) -> Iterator[tuple[Family, torch.Tensor | None, torch.Tensor | None, BankStep]]:
        """Per family of the steady banks: its observed Q (when logged), its rₖ (or None) and
        how its bank steps."""
        for number, how in step.banks.items():
            bank = banks[number]
            for f in bank.families:
                seg = bank.segment(f)
                q = step.values.get((number, *CHARGE, None)) if log else None
                r = step.values.get((number, *RESIDUAL, None))
                yield f, (None if q is None else q[seg]), (None if r is None else r[seg]), how

    def after(self, step: Step, banks: list[Bank]) -> dict[int, StepData]:
        """Each steady bank's data of the step just taken (uᵀJu read from the new buffer)."""
        wanted = [(n, banks[n], QUADRATIC, None) for n, how in step.banks.items()
                  if how.case == "sgd"]  # fmt: skip
        after = self._values(wanted) if wanted else {}
        if after is None:
            raise NotTraced("a bank's uᵀJu could not be traced")  # pragma: no cover
        out = {}
        v = step.values
        for number, how in step.banks.items():
            hyper = how.hyper
            residual = v.get((number, *RESIDUAL, None))
            if not banks[number].families[0].residuals:
                residual = None
            if how.case == "general":  # the bank's raw sums times η s^(κ−1) and η², at once
                kappa = float(banks[number].families[0].module.KAPPA)
                xi_a = v[(number, *XI_A, None)] * (how.eta * how.shrink ** (kappa - 1.0))
                aJa = v[(number, *A_J_A, None)] * (how.eta * how.eta)
                general = General(how.shrink, xi_a, aJa)
                out[number] = StepData(
                    hyper, None, None, residual=residual, general=general, rotation_eq=how.angle
                )
                continue
            gJg = None
            if how.case == "sgd":
                uJu = uJb = after[(number, *QUADRATIC, None)]
            else:
                fn = FORMS if how.case == "plain" else FORMS_B
                forms = Forms(**{fld: v.get((number, *fn, fld)) for fld in FORM_FIELDS})
                uJu, uJb = update_forms(how.case, hyper, forms)
                gJg = forms.gg if hyper.momentum == 0.0 else None
            out[number] = StepData(
                hyper, uJu, uJb, gJg, residual, fresh=False, rotation_eq=how.angle
            )
        return out
