"""The banks read at once (symmech/runtime/program.py, traced.py) against independent computations.

* a generated function's traced form, evaluated term by term on random tensors, equals the
  function itself run on plain tensors, for every built-in spec without constants and for the
  attention heads' diagonal generators (traced with their constants); constants off the
  diagonal, products of terms and branches on values are refused; where a diagonal term's
  entries lie in its tensor, against a brute-force search;
* a transformer block under AdamW: the heads' banks apart from the rest, read at once with heads
  of 16 features and family by family with heads of 4, the eager records, training untouched;
* on the float64 test nets, under every case of torch.optim.SGD (heavy ball, no momentum,
  Nesterov, dampening, weight decay) and logging/residual settings drawn by hypothesis, the
  tracker with the banks read at once gives the records of the per-family eager path to 1e-12,
  the kernel ran, and training is bit-identical to an untracked twin;
* the exact discrete law against the charge measured by hand after every step;
* a run whose momentum is switched off and on, a gradient the kernel cannot read (not
  contiguous) and an error inside the gather: the same records as the eager path, training
  untouched;
* the general law (AdamW, Adam with amsgrad, RMSprop, Adagrad, SGD with ``maximize``): the eager
  records, the exact law against the charge measured by hand, training bit-identical;
* the tracker's exactness tests for a GradScaler (fused and foreach SGD) and for a closure, run
  again with the banks read at once.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.training import (
    Config,
    assert_same_training,
    hand_charges,
    law_error,
    make_net,
    make_opt,
    worst_record_difference,
)

import symmech
from symmech.demo.models import transformer_block
from symmech.runtime import directions, fused, native, program
from symmech.runtime.binding import BoundSlice
from symmech.runtime.family import TrackerWarning
from symmech.runtime.kernels import Forms
from symmech.runtime.traced import FORM_FIELDS, NotTraced, slot, trace

NETS = ("scale", "rescale", "quadratic", "translation", "conv_flatten")


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert native.build(), f"the C++ kernel could not be built: {native.failure()}"


@pytest.fixture(autouse=True)
def restore_mode():
    saved = fused.MODE
    yield
    fused.MODE = saved


# ---------------------------------------------------------------------------------------------
# The traced form of a generated function
# ---------------------------------------------------------------------------------------------


def _reduce(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Σ over every axis but ``dim`` (None: everything), written out independently."""
    if dim is None:
        return x.sum().reshape(1)
    return x.movedim(dim, 0).reshape(x.shape[dim], -1).sum(1)


def _evaluate(lin, specs: dict[tuple, BoundSlice], values: dict[str, dict[int, torch.Tensor]]):
    """A traced combination evaluated term by term on the tensors ``values[role][id(tensor)]``
    (a diagonal term: the slices' entries a along their last axis)."""
    out = None
    for atom, c in lin.terms.items():
        spec = specs[atom[1]]
        dim = atom[1][2]
        x = spec.shaped(values[atom[2]][id(spec.tensor)])
        term = x if atom[0] == "sum" else x * spec.shaped(values[atom[3]][id(spec.tensor)])
        if atom[0] == "diag":
            term = term[..., atom[4]]
        term = c * _reduce(term, dim)
        out = term if out is None else out + term
    return out


def _plain(blocks: dict[str, list[BoundSlice]], role_values: dict[int, torch.Tensor]):
    """The views of one role as plain (tensor, reduce_dims) pairs: the generated code's eager
    path, which shares nothing with the traced one."""
    return {
        b: [s.prepare(role_values[id(s.tensor)]) for s in slices] for b, slices in blocks.items()
    }


def _random_values(blocks: dict[str, list[BoundSlice]], gen: torch.Generator) -> dict:
    """Random float64 θ, g and b (roles "t", "g", "b") for every bound tensor, by id."""
    return {
        role: {
            id(s.tensor): torch.randn(s.tensor.shape, generator=gen, dtype=torch.float64)
            for slices in blocks.values()
            for s in slices
        }
        for role in "tgb"
    }


@pytest.mark.parametrize("name", NETS)
def test_traced_terms_equal_the_generated_functions(name) -> None:
    net = make_net(name)
    opt = make_opt(net, Config(momentum=0.9))
    tracker = symmech.track(net.model, opt, net.bindings())
    gen = torch.Generator().manual_seed(1)
    for family in tracker.families:
        blocks = family.binding.blocks
        specs = {}
        for slices in blocks.values():
            for s in slices:
                specs[slot(s)] = s
        values = _random_values(blocks, gen)
        calls = [("charge", ("t",)), ("residual", ("t", "g")), ("quadratic", ("b",)),
                 ("forms", ("t", "g", None)), ("forms", ("t", "g", "b"))]  # fmt: skip
        for fn, roles in calls:
            traced = trace(family.module, fn, blocks, roles)
            args = [None if r is None else _plain(blocks, values[r]) for r in roles]
            want = getattr(family.module, fn)(*args)
            pairs = (
                [(getattr(traced, f), getattr(want, f)) for f in FORM_FIELDS]
                if isinstance(want, Forms)
                else [(traced, want)]
            )
            for lin, value in pairs:
                if value is None:
                    assert lin is None
                    continue
                got = _evaluate(lin, specs, values)
                if got is None:  # no term: the function is zero (a translation's J)
                    assert not bool(value.any()), (name, fn)
                    continue
                torch.testing.assert_close(got, value.reshape(-1), rtol=1e-12, atol=1e-12)


def test_traced_attention_terms_equal_the_generated_functions() -> None:
    # heads of 16 features: one family per diagonal generator eᵢeᵢᵀ, traced with its constant
    # into ("diag", …, a) terms; evaluated on the slices' entries a against the generated
    # functions run on plain tensors with the constant multiplied out
    torch.manual_seed(0)
    model = transformer_block(32, 2, 64, 6, 5, 8).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = symmech.track(model, opt, example_input=(torch.randn(2, 6, 8).double(),
                                                       torch.randint(0, 5, (2,))))  # fmt: skip
    heads = [f for f in tracker.families if f.module.CONSTANTS]
    assert len(heads) == 32
    gen = torch.Generator().manual_seed(1)
    for family in heads:
        blocks, const = family.binding.blocks, family.binding.constants
        specs = {slot(s): s for slices in blocks.values() for s in slices}
        values = _random_values(blocks, gen)
        for fn, roles in (("charge", ("t",)), ("residual", ("t", "g")), ("quadratic", ("b",))):
            traced = trace(family.module, fn, blocks, roles, const)
            assert {atom[0] for atom in traced.terms} == {"diag"}
            args = [_plain(blocks, values[r]) for r in roles]
            want = getattr(family.module, fn)(*args, const)
            got = _evaluate(traced, specs, values)
            torch.testing.assert_close(got, want.reshape(-1), rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 3),
    features=st.integers(1, 4),
    inner=st.integers(1, 5),
    layout=st.sampled_from(["rows", "columns", "interleaved", "mixed", "repeated"]),
)
def test_diagonal_groups_against_a_brute_force_search(heads, features, inner, layout) -> None:
    # the slab a diagonal term reads, found by diagonal_groups, against every dimension tried
    # by brute force on the entries the term sums; a layout where a feature's entries are no
    # one index of a dimension is refused
    width = heads * features
    if layout == "rows":  # a q weight: (heads·features) rows of ``inner`` inputs
        w = torch.zeros(width, inner)
        view = ("strided", (heads, inner, features), (features * inner, 1, inner), 0)
    elif layout == "columns":  # an output projection: ``inner`` rows of (heads·features) inputs
        w = torch.zeros(inner, width)
        view = ("strided", (heads, inner, features), (features, width, 1), 0)
    elif layout == "interleaved":  # features outermost: row f·heads + h
        w = torch.zeros(width, inner)
        view = ("strided", (heads, inner, features), (inner, 1, heads * inner), 0)
    elif layout == "mixed":  # each feature's entries spread over two rows: no slab
        if inner < 2 or width < 2:
            return
        w = torch.zeros(width, inner)
        view = ("strided", (heads, inner, features), (features * inner, 1, 1), 0)
    else:  # one entry of a row read ``inner`` times: in one slab, but not the whole of it
        if inner < 2:
            return
        w = torch.zeros(width, inner)
        view = ("strided", (heads, inner, features), (features * inner, 0, inner), 0)
    spec = BoundSlice(w, 0, view)
    flat = spec.shaped(torch.arange(w.numel()).view(w.shape))
    want = None
    for d in range(w.ndim):
        index = torch.arange(w.numel()).view(w.shape)
        ok, k = True, torch.empty(heads, features, dtype=torch.long)
        for g in range(heads):
            for a in range(features):
                entries = sorted(flat[g, :, a].tolist())  # with repeats: summed as often
                coord = {int(i) // w.stride(d) % w.shape[d] for i in entries}
                slab = sorted(index.select(d, next(iter(coord))).reshape(-1).tolist())
                ok = ok and len(coord) == 1 and entries == slab
                k[g, a] = next(iter(coord))
        if ok:
            want = (d, k)
            break
    if want is None:
        with pytest.raises(NotTraced):
            program.diagonal_groups(spec)
        return
    d, k = program.diagonal_groups(spec)
    assert d == want[0] and torch.equal(k, want[1])


class _Fake:
    CONSTANTS = ()

    @staticmethod
    def product(th):
        from symmech.runtime.kernels import sq

        return sq(th["theta"]) * sq(th["theta"])

    @staticmethod
    def branch(th):
        from symmech.runtime.kernels import sq

        return sq(th["theta"]) if sq(th["theta"]) else 0.0

    @staticmethod
    def matrix(th):
        from symmech.runtime.kernels import dot, mm

        return dot(mm(th["theta"], torch.ones(3, 3, dtype=torch.float64)), th["theta"])

    @staticmethod
    def scaled_by_tensor(th):
        from symmech.runtime.kernels import sq

        return torch.tensor(2.0) * sq(th["theta"])


@pytest.mark.parametrize("fn", ["product", "branch", "matrix", "scaled_by_tensor"])
def test_terms_that_are_not_sums_of_products_are_refused(fn) -> None:
    w = torch.ones(4, 3, dtype=torch.float64)
    with pytest.raises(NotTraced):
        trace(_Fake, fn, {"theta": [BoundSlice(w, 0)]}, ("t",))


def test_a_spec_with_constants_is_refused() -> None:
    net = make_net("linear_pair")
    tracker = symmech.track(net.model, make_opt(net, Config()), net.bindings())
    (family,) = tracker.families
    with pytest.raises(NotTraced, match="constants"):
        trace(family.module, "residual", family.binding.blocks, ("t", "g"))


# ---------------------------------------------------------------------------------------------
# The tracker with the banks read at once
# ---------------------------------------------------------------------------------------------


class _Counter:
    """Counts the banks' steps read at once (wraps Programs.after)."""

    def __init__(self, monkeypatch) -> None:
        self.steps = 0
        original = program.Programs.after

        def after(programs, step, banks):
            self.steps += 1
            return original(programs, step, banks)

        monkeypatch.setattr(program.Programs, "after", after)


def _run(name, cfg, mode, steps, between=None, **options):
    net = make_net(name)
    opt = make_opt(net, cfg)
    tracker = None
    if mode is not None:
        fused.MODE = mode
        tracker = symmech.track(net.model, opt, net.bindings(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackerWarning)
        for k in range(steps):
            opt.zero_grad(set_to_none=True)
            net.loss().backward()
            if between is not None:
                between(k, net, opt)
            opt.step()
        rows = tracker.records() if tracker is not None else None
    return net, opt, tracker, rows


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(NETS),
    case=st.sampled_from(["heavy", "plain", "nesterov", "dampened"]),
    weight_decay=st.sampled_from([0.0, 1e-3]),
    log_every=st.integers(1, 3),
    residuals=st.booleans(),
)
def test_banks_at_once_equal_each_family_on_its_own(
    monkeypatch, name, case, weight_decay, log_every, residuals
) -> None:
    cfg = Config(
        momentum=0.0 if case == "plain" else 0.9,
        dampening=0.3 if case == "dampened" else 0.0,
        nesterov=case == "nesterov",
        weight_decay=weight_decay,
    )
    options = dict(log_every=log_every, residuals=residuals)
    plain_net, plain_opt, _, _ = _run(name, cfg, None, 9)
    _, _, _, eager_rows = _run(name, cfg, "eager", 9, **options)
    counter = _Counter(monkeypatch)
    net, opt, tracker, rows = _run(name, cfg, "native", 9, **options)
    monkeypatch.undo()
    assert counter.steps >= 6  # every step once the laws run (the first ones are per family)
    assert tracker._programs.off is None
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert_same_training(plain_net.model, net.model, plain_opt, opt)


@pytest.mark.parametrize("name", ["rescale", "scale", "conv_flatten"])
def test_exact_law_against_the_charge_measured_by_hand(monkeypatch, name) -> None:
    # Q computed by hand from the weights after every step (support.reference_sgd), against the
    # exact discrete law fed the measured rₖ, advanced by the banks read at once
    charges = []
    counter = _Counter(monkeypatch)
    fused.MODE = "native"
    net = make_net(name)
    opt = make_opt(net, Config(momentum=0.9, weight_decay=5e-4))
    tracker = symmech.track(net.model, opt, net.bindings())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackerWarning)
        charges.append(hand_charges(net))
        for _ in range(40):
            opt.zero_grad(set_to_none=True)
            net.loss().backward()
            opt.step()
            charges.append(hand_charges(net))
        rows = tracker.records()
    assert counter.steps >= 38
    assert law_error(rows, charges, "discrete_residual") <= 1e-10


def test_momentum_switched_off_and_on_and_a_gradient_the_kernel_cannot_read(monkeypatch) -> None:
    # steps 4–6 without momentum (the buffer stays; the law follows it again after), and the
    # last layer's weight gradient transposed in memory (not contiguous: reduced eagerly in its
    # place within the gather)
    def between(k, net, opt):
        opt.param_groups[0]["momentum"] = 0.0 if 4 <= k < 7 else 0.9
        w = net.params()["2.weight"]
        w.grad = w.grad.t().contiguous().t()
        assert not w.grad.is_contiguous()

    cfg = Config(momentum=0.9, weight_decay=1e-3)
    plain_net, plain_opt, _, _ = _run("rescale", cfg, None, 12, between)
    _, _, _, eager_rows = _run("rescale", cfg, "eager", 12, between)
    counter = _Counter(monkeypatch)
    net, opt, tracker, rows = _run("rescale", cfg, "native", 12, between)
    assert counter.steps >= 8
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert_same_training(plain_net.model, net.model, plain_opt, opt)


def test_an_error_in_the_gather_warns_once_and_each_family_reads_its_own(monkeypatch) -> None:
    calls = []

    def broken(self, read, pending):
        calls.append(1)
        raise RuntimeError("a broken gather")

    cfg = Config(momentum=0.9)
    plain_net, plain_opt, _, _ = _run("scale", cfg, None, 8)
    _, _, _, eager_rows = _run("scale", cfg, "eager", 8)
    monkeypatch.setattr(program.Gather, "run", broken)
    fused.MODE = "native"
    net = make_net("scale")
    opt = make_opt(net, cfg)
    tracker = symmech.track(net.model, opt, net.bindings())
    with pytest.warns(TrackerWarning, match="reading the banks' terms at once failed") as seen:
        for _ in range(8):
            opt.zero_grad(set_to_none=True)
            net.loss().backward()
            opt.step()
    assert sum("at once failed" in str(w.message) for w in seen) == 1
    assert len(calls) == 1 and "a broken gather" in tracker._programs.off
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackerWarning)
        rows = tracker.records()
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert_same_training(plain_net.model, net.model, plain_opt, opt)


def test_auto_leaves_a_small_model_to_the_families(monkeypatch) -> None:
    counter = _Counter(monkeypatch)
    _, _, tracker, _ = _run("rescale", Config(momentum=0.9), "auto", 6)
    assert counter.steps == 0 and not tracker._programs.usable(tracker.banks)


ADAPTIVE = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, maximize=True),
}


def _run_with(name, make, mode, steps, **options):
    net = make_net(name)
    opt = make(net.model.parameters())
    tracker = None
    if mode is not None:
        fused.MODE = mode
        tracker = symmech.track(net.model, opt, net.bindings(), **options)
    charges = [hand_charges(net)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackerWarning)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            net.loss().backward()
            opt.step()
            charges.append(hand_charges(net))
        rows = tracker.records() if tracker is not None else None
    return net, opt, tracker, rows, charges


class _MadeSteps:
    """Counts the kernel's sweeps that made Adam's step from g, m and v (never stored)."""

    def __init__(self, monkeypatch) -> None:
        self.sweeps = 0
        original = native.products_into

        def products_into(sources, pairs, dims, offsets, out, made=None, scalars=None):
            self.sweeps += sum(1 for m in made or () if m)
            return original(sources, pairs, dims, offsets, out, made, scalars)

        monkeypatch.setattr(native, "products_into", products_into)


@pytest.mark.parametrize("optimizer", sorted(ADAPTIVE))
@pytest.mark.parametrize("name", ["scale", "rescale", "conv_flatten"])
def test_adaptive_steps_of_banks_at_once(monkeypatch, name, optimizer) -> None:
    # the general law's terms ⟨ξ(θ), a⟩ and ⟨a, J a⟩ of the coming step aₖ, read for every
    # steady bank at once: the per-family eager records to 1e-12, the exact law fed rₖ against
    # the charge measured by hand after every step, training bit-identical
    make = ADAPTIVE[optimizer]
    plain_net, plain_opt, _, _, _ = _run_with(name, make, None, 10)
    _, _, _, eager_rows, _ = _run_with(name, make, "eager", 10, log_every=2)
    counter = _Counter(monkeypatch)
    net, opt, tracker, rows, charges = _run_with(name, make, "native", 10, log_every=2)
    assert counter.steps >= 8 and tracker._programs.off is None
    assert all(f.general for f in tracker.families)
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert law_error(rows, charges, "discrete_residual") <= 1e-10
    assert_same_training(plain_net.model, net.model, plain_opt, opt)


@pytest.mark.parametrize("optimizer", ["adamw", "adam_amsgrad"])
@pytest.mark.parametrize("name", ["scale", "rescale", "conv_flatten"])
def test_adam_steps_made_inside_the_sweep(monkeypatch, name, optimizer) -> None:
    # every tensor above 16 entries takes Adam's one-pass step (directions.SMALL lowered): its aₖ
    # is left pending and the gather's sweep makes it from g, m, v (and the running maximum)
    # while it reads θ; the same records as the eager per-family path, the exact law against
    # the charge measured by hand, training bit-identical
    make = ADAPTIVE[optimizer]
    monkeypatch.setattr(directions, "SMALL", 16)
    monkeypatch.setattr(directions, "SMALL_PENDING", 16)
    plain_net, plain_opt, _, _, _ = _run_with(name, make, None, 10)
    _, _, _, eager_rows, _ = _run_with(name, make, "eager", 10, log_every=2)
    counter, made = _Counter(monkeypatch), _MadeSteps(monkeypatch)
    net, opt, tracker, rows, charges = _run_with(name, make, "native", 10, log_every=2)
    assert counter.steps >= 8 and tracker._programs.off is None
    assert made.sweeps >= 8, made.sweeps
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert law_error(rows, charges, "discrete_residual") <= 1e-10
    assert_same_training(plain_net.model, net.model, plain_opt, opt)


def _transformer_run(mode: str | None, n_heads: int = 2, optimizer: str = "adamw", steps: int = 6):
    torch.manual_seed(0)
    model = transformer_block(32, n_heads, 64, 6, 5, 8).double()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    else:  # heavy ball: the buffer's uᵀJu read after the step
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    tracker = None
    if mode is not None:
        fused.MODE = mode
        tracker = symmech.track(model, opt, example_input=(x, y), log_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackerWarning)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, opt, tracker, None if tracker is None else tracker.records()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("n_heads, read_at_once", [(2, True), (8, False)])
def test_attention_heads_bank_apart(monkeypatch, n_heads, read_at_once, optimizer) -> None:
    # a transformer block under AdamW or SGD: the attention heads' families (specs with constants)
    # have banks of their own, so the norms', the MLP's and the stream's bank is read at once
    # whatever the heads do. Heads of 16 features (one diagonal generator eᵢeᵢᵀ a family) are
    # read at once too, from the rows of q, k, v and the columns of the output projection;
    # heads of 4 (every entry i ≤ j, constants off the diagonal) keep the per-family path.
    # The records equal the per-family eager path's to 1e-12, training is bit-identical.
    plain_model, plain_opt, _, _ = _transformer_run(None, n_heads, optimizer)
    _, _, _, eager_rows = _transformer_run("eager", n_heads, optimizer)
    counter = _Counter(monkeypatch)
    model, opt, tracker, rows = _transformer_run("native", n_heads, optimizer)
    monkeypatch.undo()
    banks = tracker.banks
    assert banks is not None
    heads = [b for b in banks if any(f.module.CONSTANTS for f in b.families)]
    assert heads and all(f.module.CONSTANTS for b in heads for f in b.families)
    assert any(f.symmetry.startswith("attention") for b in heads for f in b.families)
    rest = [b for b in banks if b not in heads]
    assert rest and all(tracker._programs._steady(b) is not None for b in rest)
    steady = tracker._programs.before(banks, log=True)
    assert steady is not None
    on_path = {banks.index(b) for b in heads} & set(steady.banks)
    assert bool(on_path) == read_at_once
    assert counter.steps >= 4 and tracker._programs.off is None
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert_same_training(plain_model, model, plain_opt, opt)


def test_heads_whose_features_are_no_slab_keep_their_own_path(monkeypatch) -> None:
    # when a head's diagonal terms lie in no one dimension of the tensor (diagonal_groups
    # refuses), only the heads' bank keeps the per-family path: found while tracing, so the
    # programs stay on for the other banks, with the eager records and training untouched
    def refuse(spec):
        raise NotTraced("no slab (on purpose)")

    monkeypatch.setattr(program, "diagonal_groups", refuse)
    plain_model, plain_opt, _, _ = _transformer_run(None)
    _, _, _, eager_rows = _transformer_run("eager")
    model, opt, tracker, rows = _transformer_run("native")
    banks = tracker.banks
    assert banks is not None and tracker._programs.off is None
    steady = tracker._programs.before(banks, log=True)
    assert steady is not None
    on_path = {banks[n].families[0].module.CONSTANTS != () for n in steady.banks}
    assert on_path == {False}
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert_same_training(plain_model, model, plain_opt, opt)


@pytest.mark.parametrize(
    "name, args",
    [
        ("test_grad_scaler_reads_unscaled_gradients_and_skips_inf_steps", ("fused",)),
        ("test_grad_scaler_reads_unscaled_gradients_and_skips_inf_steps", ("foreach",)),
        ("test_step_with_closure_measures_the_new_gradients", (True,)),
    ],
)
def test_exactness_checks_hold_with_banks_at_once(monkeypatch, name, args) -> None:
    # the exactness tests of the tracker (hand charges, bit-identical twins) run again with the
    # banks read at once: a GradScaler's unscaled gradients and skipped steps, a closure
    import importlib.util
    from pathlib import Path

    where = Path(__file__).with_name("test_tracker_exact.py")
    spec = importlib.util.spec_from_file_location("tracker_exact_again", where)
    assert spec is not None and spec.loader is not None
    exact = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exact)
    counter = _Counter(monkeypatch)
    fused.MODE = "native"
    getattr(exact, name)(*args)
    assert counter.steps >= 5


def test_the_tracker_exactness_suites_pass_with_banks_read_at_once() -> None:
    # every test of test_tracker_exact.py and test_tracker_outside.py (resume, rollback, frozen
    # layers, tied weights, lr = 0, late hooks, edits of θ, broken symmetries, float32 runs) in
    # a process whose tracker products come from the kernel, so the steady banks are read at once
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, SYMMECH_REDUCTIONS="native", PYTHONPATH=str(root / "tests"))
    suites = ["tests/runtime/test_tracker_exact.py", "tests/runtime/test_tracker_outside.py"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-p", "support.count_programs", *suites],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.search(r"steps of banks read at once: (\d+)", done.stdout)
    assert found is not None and int(found.group(1)) > 300, done.stdout[-2000:]
