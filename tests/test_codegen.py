"""Generated tracker code against a slow, obvious torch computation of the same quantities.

The reference here is written from the definitions only (DESIGN.md, "Exact discrete law"):
per group j, each block is the concatenation of slice j of every bound tensor, J and c are
written by hand per symmetry, and the update u is built the way ``torch.optim.SGD`` builds it
(checked against a real ``torch.optim.SGD`` step below). Nothing here calls symmech to compute
a reference value; the generated functions are only ever compared with these loops.

``test_tracker.py`` imports :class:`Reference`, :func:`sgd_update` and :data:`LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.matrices.expressions import MatrixSymbol

import symmech
from symmech.codegen.printer import CodegenError, compile_terms, print_reduction
from symmech.codegen.render import UPDATE_CASES, render_module
from symmech.runtime.binding import as_derivation, generated_module

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# The hand-written reference
# ---------------------------------------------------------------------------------------------

#: ξ = Jθ + c per block: the J weight of every block (J = w·I), and c (translation: 𝟙).
J_WEIGHT = {
    "translation": {"theta": 0.0},
    "scale": {"theta": 1.0},
    "rescale": {"theta_1": 1.0, "theta_2": -1.0},
    "quadratic_rescale": {"theta_1": 1.0, "theta_2": -2.0},
}
OFFSET = {"translation": 1.0}
#: κ with ⟨ξ, θ⟩ = κ Q: translation 1, every quadratic charge 2.
KAPPA = {
    "translation": 1.0,
    "scale": 2.0,
    "rescale": 2.0,
    "quadratic_rescale": 2.0,
    "linear_pair": 2.0,
}


@dataclass(frozen=True)
class Slot:
    """One bound slice: ``block`` gets slice j along ``dim`` of params[name] (after ``view``)."""

    block: str
    name: str
    dim: int | None
    view: tuple[int, ...] | str | None = None


def shaped(t: torch.Tensor, view) -> torch.Tensor:
    if view is None:
        return t
    if view == "T":
        return t.t()
    return t.reshape(view)


def reduce_dims(x: torch.Tensor, dim: int | None) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.ndim))
    dim = dim % x.ndim
    return tuple(i for i in range(x.ndim) if i != dim)


@dataclass
class Reference:
    """Per-group Q, r and ⟨x, Jy⟩ by explicit loops over groups and slices."""

    symmetry: str
    slots: list[Slot]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(s.block for s in self.slots))

    def n_groups(self, params: dict[str, torch.Tensor]) -> int:
        s = self.slots[0]
        x = shaped(params[s.name], s.view)
        return 1 if s.dim is None else x.shape[s.dim]

    def piece(self, state: dict[str, torch.Tensor], block: str, j: int) -> torch.Tensor:
        parts = []
        for s in self.slots:
            if s.block != block:
                continue
            x = shaped(state[s.name], s.view)
            parts.append(x if s.dim is None else x.select(s.dim, j))
        if self.symmetry == "linear_pair":
            assert len(parts) == 1
            return parts[0]  # the whole matrix: J acts by right-multiplication with E
        return torch.cat([p.reshape(-1) for p in parts])

    def J(self, block: str, x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        if self.symmetry == "linear_pair":
            E = self.constants["E"].to(x.dtype)
            E = E.abs() if absolute else E
            sign = 1.0 if (block == "U" or absolute) else -1.0
            return sign * (x @ E)
        w = J_WEIGHT[self.symmetry][block]
        return (abs(w) if absolute else w) * x

    def c(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, OFFSET.get(self.symmetry, 0.0))

    def _per_group(self, params, fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return torch.stack([fn(j) for j in range(self.n_groups(params))])

    def form(self, x: dict, y: dict, absolute: bool = False) -> torch.Tensor:
        """⟨x, Jy⟩ per group (with |x|, |J|, |y| when ``absolute``: the round-off scale)."""

        def one(j):
            total = torch.zeros((), dtype=DTYPE)
            for b in self.blocks:
                xb, yb = self.piece(x, b, j), self.piece(y, b, j)
                if absolute:
                    xb, yb = xb.abs(), yb.abs()
                total = total + torch.sum(xb * self.J(b, yb, absolute))
            return total

        return self._per_group(x, one)

    def xi_dot(self, theta: dict, v: dict, absolute: bool = False) -> torch.Tensor:
        """⟨Jθ + c, v⟩ per group."""

        def one(j):
            total = torch.zeros((), dtype=DTYPE)
            for b in self.blocks:
                tb, vb = self.piece(theta, b, j), self.piece(v, b, j)
                if absolute:
                    xi, vb = self.J(b, tb.abs(), True) + self.c(tb).abs(), vb.abs()
                else:
                    xi = self.J(b, tb) + self.c(tb)
                total = total + torch.sum(xi * vb)
            return total

        return self._per_group(theta, one)

    def charge(self, theta: dict) -> torch.Tensor:
        """Q = ½⟨θ, Jθ⟩ + ⟨c, θ⟩ per group."""

        def lin(j):
            return sum(
                torch.sum(self.c(p) * p) for p in (self.piece(theta, b, j) for b in self.blocks)
            )

        return 0.5 * self.form(theta, theta) + self._per_group(theta, lin)

    def charge_abs(self, theta: dict) -> torch.Tensor:
        """½⟨|θ|, |J||θ|⟩ + ⟨|c|, |θ|⟩: the scale of round-off in Q (Q itself may cross 0)."""
        absd = {k: v.abs() for k, v in theta.items()}

        def lin(j):
            return sum(
                torch.sum(self.c(p).abs() * p)
                for p in (self.piece(absd, b, j) for b in self.blocks)
            )

        return 0.5 * self.form(absd, absd, absolute=True) + self._per_group(theta, lin)

    # arguments of the generated functions, built here from the slots (not by symmech.bind)
    def args(self, state: dict[str, torch.Tensor]) -> dict[str, list]:
        out: dict[str, list] = {b: [] for b in self.blocks}
        for s in self.slots:
            x = shaped(state[s.name], s.view)
            out[s.block].append((x, reduce_dims(x, s.dim)))
        return out


def sgd_update(theta, grad, buf, lr, momentum, dampening, weight_decay, nesterov):
    """(u, b_new) exactly as torch.optim.SGD's single-tensor step builds them (b_new None: β=0)."""
    d = grad + weight_decay * theta if weight_decay != 0 else grad.clone()
    if momentum == 0:
        return d, None
    b = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
    u = d + momentum * b if nesterov else b
    return u, b


def sgd_case(momentum: float, nesterov: bool, first: bool) -> str:
    if momentum == 0:
        return "plain"
    return (
        ("nesterov_first" if first else "nesterov") if nesterov else ("first" if first else "sgd")
    )


# ---------------------------------------------------------------------------------------------
# Layouts: how the blocks of each symmetry sit in real layers
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    params: dict[str, tuple[int, ...]]
    slots: list[Slot]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)


def _sym_matrix(r: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(r, r, generator=gen, dtype=DTYPE)
    return 0.5 * (a + a.T)


def layout(symmetry: str, kind: str, n: dict[str, int], gen: torch.Generator) -> Layout:
    """A binding of ``symmetry`` in a layer arrangement ``kind`` with sizes ``n``."""
    C, K, D, P, k = n["C"], n["K"], n["D"], n["P"], n["k"]
    if symmetry == "translation":
        if kind == "fc_columns":  # final Linear(D, K) before softmax: column j across classes
            return Layout({"fc.weight": (K, D)}, [Slot("theta", "fc.weight", 1)])
        if kind == "fc_bias":  # the whole bias vector is one group
            return Layout({"fc.bias": (K,)}, [Slot("theta", "fc.bias", None)])
        if kind == "flatten_channels":  # Linear after Flatten, viewed (K, C, P): channel c
            return Layout({"fc.weight": (K, C * P)}, [Slot("theta", "fc.weight", 1, (K, C, P))])
    if symmetry == "scale":
        if kind == "conv":  # Conv2d(D, C, k) -> BatchNorm: weight[c] and bias[c]
            return Layout(
                {"conv.weight": (C, D, k, k), "conv.bias": (C,)},
                [Slot("theta", "conv.weight", 0), Slot("theta", "conv.bias", 0)],
            )
        if kind == "fc_rows":
            return Layout(
                {"fc.weight": (C, D), "fc.bias": (C,)},
                [Slot("theta", "fc.weight", 0), Slot("theta", "fc.bias", 0)],
            )
        if kind == "whole":  # a layer before LayerNorm-like normalisation: one group
            return Layout(
                {"fc.weight": (C, D), "fc.bias": (C,)},
                [Slot("theta", "fc.weight", None), Slot("theta", "fc.bias", None)],
            )
    if symmetry in ("rescale", "quadratic_rescale"):
        if kind == "mlp":  # Linear(D, C) -> act -> Linear(C, K)
            return Layout(
                {"l1.weight": (C, D), "l1.bias": (C,), "l2.weight": (K, C)},
                [
                    Slot("theta_1", "l1.weight", 0),
                    Slot("theta_1", "l1.bias", 0),
                    Slot("theta_2", "l2.weight", 1),
                ],
            )
        if kind == "conv_flatten":  # Conv2d(D, C, k) -> act -> Flatten -> Linear(C*P, K)
            return Layout(
                {"conv.weight": (C, D, k, k), "conv.bias": (C,), "fc.weight": (K, C * P)},
                [
                    Slot("theta_1", "conv.weight", 0),
                    Slot("theta_1", "conv.bias", 0),
                    Slot("theta_2", "fc.weight", 1, (K, C, P)),
                ],
            )
    if symmetry == "linear_pair" and kind == "pair":  # x -> W2 W1 x, U = W1ᵀ (D×C), V = W2 (K×C)
        return Layout(
            {"fc1.weight": (C, D), "fc2.weight": (K, C)},
            [Slot("U", "fc1.weight", None, "T"), Slot("V", "fc2.weight", None)],
            {"E": _sym_matrix(C, gen)},
        )
    raise ValueError(f"no layout {kind!r} for {symmetry}")


LAYOUTS = {
    "translation": ("fc_columns", "fc_bias", "flatten_channels"),
    "scale": ("conv", "fc_rows", "whole"),
    "rescale": ("mlp", "conv_flatten"),
    "quadratic_rescale": ("mlp", "conv_flatten"),
    "linear_pair": ("pair",),
}
SYMMETRIES = tuple(LAYOUTS)


@st.composite
def sgd_hyper(draw) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.sampled_from([1e-3, 0.05, 0.3])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.7])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-4, 5e-2])),
        "nesterov": nesterov,
    }


sizes = st.fixed_dictionaries(
    {
        "C": st.integers(1, 5),
        "K": st.integers(1, 4),
        "D": st.integers(1, 4),
        "P": st.integers(1, 4),
        "k": st.integers(1, 3),
    }
)


def _close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str, rtol=1e-12):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = (got - want).abs()
    bound = rtol * scale + 1e-300
    assert torch.all(err <= bound), (
        f"{what}: error {err.max():.3e} > {rtol:g} x scale {scale.max():.3e}"
    )


# ---------------------------------------------------------------------------------------------
# 1. The printer: short exact strings, shared reductions, clear errors
# ---------------------------------------------------------------------------------------------


def test_printer_scale_charge_is_one_squared_norm():
    d = as_derivation("scale")
    prog = compile_terms({"Q": d.conserved}, d, hyper=False)
    assert prog.reductions == [("f0", '_sq(th["theta"])')]
    ((name, code),) = prog.outputs
    assert name == "Q" and code.replace("(0.5)", "0.5") == "0.5*f0"


def test_printer_half_prints_without_parentheses():
    d = as_derivation("scale")
    assert compile_terms({"Q": d.conserved}, d, hyper=False).outputs == [("Q", "0.5*f0")]


def test_printer_translation_inner_with_ones_is_a_sum():
    d = as_derivation("translation")
    theta = d.blocks[0]
    g = d.geometry.grad[theta]
    table = {theta.name: 'th["theta"]', g.name: 'gr["theta"]'}
    assert print_reduction(symmech.Inner(symmech.ones(theta), g), table) == '_sum(gr["theta"])'
    assert print_reduction(symmech.Inner(theta, symmech.ones(theta)), table) == '_sum(th["theta"])'
    assert print_reduction(symmech.Inner(theta, theta), table) == '_sq(th["theta"])'
    assert print_reduction(symmech.Inner(theta, g), table) == '_dot(th["theta"], gr["theta"])'
    dt = d.dynamics.data_terms
    prog = compile_terms({"Q": dt.charge, "r": dt.residual, "gJg": dt.gJg}, d, hyper=False)
    assert prog.reductions == [("f0", '_sum(th["theta"])'), ("f1", '_sum(gr["theta"])')]
    assert prog.outputs == [("Q", "f0"), ("r", "f1"), ("gJg", "_zero")]


def test_printer_shares_reductions_across_outputs():
    d = as_derivation("scale")
    theta = d.blocks[0]
    g = d.geometry.grad[theta]
    eta = sp.Symbol("eta", positive=True)
    terms = {
        "a": symmech.Inner(theta, theta),
        "b": 2 * symmech.Inner(theta, theta) + symmech.Inner(theta, g),
        "c": eta * symmech.Inner(theta, g) - symmech.Inner(theta, theta) / 4,
    }
    prog = compile_terms(terms, d)
    assert prog.reductions == [("f0", '_sq(th["theta"])'), ("f1", '_dot(th["theta"], gr["theta"])')]
    assert dict(prog.outputs) == {"a": "f0", "b": "2*f0 + f1", "c": "lr*f1 - 0.25*f0"}


def test_generated_update_forms_reduce_each_inner_product_once():
    """The scale 'sgd' case needs the 6 products of {θ, g, b}, each computed once."""
    text = render_module(as_derivation("scale"))
    case = text.split("if case == 'sgd':")[1].split("elif")[0]
    lines = [ln.strip() for ln in case.splitlines() if ln.strip().startswith("f")]
    assert len(lines) == 6
    assert len({ln.split(" = ")[1] for ln in lines}) == 6


def test_printer_unbound_matrix_symbol_is_an_error():
    d = as_derivation("scale")
    z = MatrixSymbol("zeta", d.blocks[0].shape[0], 1)
    with pytest.raises(CodegenError, match="zeta is missing from the argument sequences"):
        compile_terms({"x": symmech.Inner(z, d.blocks[0])}, d)


def test_printer_unbound_scalar_symbol_is_an_error():
    d = as_derivation("scale")
    with pytest.raises(CodegenError, match="mu is missing from the argument sequences"):
        compile_terms({"x": sp.Symbol("mu") * symmech.Inner(d.blocks[0], d.blocks[0])}, d)
    eta = sp.Symbol("eta", positive=True)
    with pytest.raises(CodegenError, match="missing from the argument sequences"):
        compile_terms({"x": eta * symmech.Inner(d.blocks[0], d.blocks[0])}, d, hyper=False)


def test_linear_pair_prints_constant_products():
    d = as_derivation("linear_pair")
    prog = compile_terms({"Q": d.dynamics.data_terms.charge}, d, hyper=False)
    assert prog.reductions == [
        ("f0", '_dot(_mm(th["U"], const["E"]), th["U"])'),
        ("f1", '_dot(_mm(th["V"], const["E"]), th["V"])'),
    ]
    ((name, code),) = prog.outputs
    assert name == "Q" and code.replace("(0.5)", "0.5") == "0.5*f0 - 0.5*f1"


def test_linear_pair_symmetric_constant_products_are_shared():
    text = render_module(as_derivation("linear_pair"))
    case = text.split("if case == 'sgd':")[1].split("elif")[0]
    lines = [ln.strip() for ln in case.splitlines() if ln.strip().startswith("f")]
    assert len(lines) == 12  # per block: θθ, θg, θb, gg, gb, bb


# ---------------------------------------------------------------------------------------------
# 2. Generated functions against the reference, on seeded random tensors
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 0.01]),
    nesterov=st.booleans(),
    first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hand_update_is_torch_sgd(momentum, dampening, weight_decay, nesterov, first, seed):
    """The reference's u and b are torch.optim.SGD's: one real step from a preloaded buffer."""
    nesterov = nesterov and momentum > 0
    dampening = 0.0 if nesterov else dampening
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=DTYPE))
    g = torch.randn(3, 4, generator=gen, dtype=DTYPE)
    buf = None if first else torch.randn(3, 4, generator=gen, dtype=DTYPE)
    lr = 0.1
    opt = torch.optim.SGD(
        [p],
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    if buf is not None and momentum > 0:
        opt.state[p]["momentum_buffer"] = buf.clone()
    theta = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    u, b = sgd_update(
        theta, g, buf if momentum > 0 else None, lr, momentum, dampening, weight_decay, nesterov
    )
    torch.testing.assert_close(p.detach(), theta - lr * u, rtol=0, atol=1e-15)
    if momentum > 0:
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=0, atol=1e-15)


def _random_state(lay: Layout, gen: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    def rnd():
        return {n: torch.randn(s, generator=gen, dtype=DTYPE) for n, s in lay.params.items()}

    return {"theta": rnd(), "grad": rnd(), "buf": rnd()}


@pytest.mark.parametrize("symmetry", SYMMETRIES)
@settings(max_examples=15, deadline=None)
@given(data=st.data(), n=sizes, hyper=sgd_hyper(), seed=st.integers(0, 2**16))
def test_generated_functions_match_reference(symmetry, data, n, hyper, seed):
    kind = data.draw(st.sampled_from(LAYOUTS[symmetry]), label="layout")
    gen = torch.Generator().manual_seed(seed)
    lay = layout(symmetry, kind, n, gen)
    ref = Reference(symmetry, lay.slots, lay.constants)
    mod = generated_module(as_derivation(symmetry))
    st_ = _random_state(lay, gen)
    th, gr, bprev = st_["theta"], st_["grad"], st_["buf"]
    const = lay.constants
    A = ref.args

    # charge, residual, gJg
    _close(mod.charge(A(th), const), ref.charge(th), ref.charge_abs(th), "charge")
    _close(
        mod.residual(A(th), A(gr), const), ref.xi_dot(th, gr), ref.xi_dot(th, gr, True), "residual"
    )
    _close(mod.grad_form(A(gr), const), ref.form(gr, gr), ref.form(gr, gr, True), "grad_form")
    _close(
        mod.buffer_form(A(bprev), const),
        ref.form(bprev, bprev),
        ref.form(bprev, bprev, True),
        "buffer_form",
    )

    # update forms, every case, with u and b_new built as torch.optim.SGD does
    lr, beta, tau, lam = hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
    env = {k: (g.abs() + lam * th[k].abs()) * (1 + beta) + bprev[k].abs() for k, g in gr.items()}
    scale = ref.form(env, env, True)
    for case in UPDATE_CASES:
        m = 0.0 if case == "plain" else (beta or 0.9)
        nest = case.startswith("nesterov")
        first = case in ("first", "nesterov_first")
        u, b = {}, {}
        for name in lay.params:
            u[name], b[name] = sgd_update(
                th[name], gr[name], None if first else bprev[name], lr, m, tau, lam, nest
            )
            if b[name] is None:
                b[name] = u[name]  # no buffer: the cross term is <u, J d> with u = d
        uju, ujb = mod.update_forms(
            A(th), A(gr), {} if first or case == "plain" else A(bprev), lr, m, tau, lam, case, const
        )
        _close(uju, ref.form(u, u), scale, f"uJu[{case}]", rtol=1e-11)
        _close(ujb, ref.form(u, b), scale, f"uJb[{case}]", rtol=1e-11)


@pytest.mark.parametrize("symmetry", SYMMETRIES)
def test_generated_functions_float32(symmetry):
    """float32 slices give float32 per-group values, close to the float64 reference."""
    gen = torch.Generator().manual_seed(3)
    lay = layout(symmetry, LAYOUTS[symmetry][-1], {"C": 4, "K": 3, "D": 5, "P": 3, "k": 2}, gen)
    ref = Reference(symmetry, lay.slots, lay.constants)
    mod = generated_module(as_derivation(symmetry))
    st_ = _random_state(lay, gen)
    th32 = {k: v.float() for k, v in st_["theta"].items()}
    const32 = {k: v.float() for k, v in lay.constants.items()}
    q = mod.charge(ref.args(th32), const32)
    assert q.dtype == torch.float32
    want = ref.charge({k: v.double() for k, v in th32.items()})
    scale = ref.charge_abs(st_["theta"])
    _close(q.double(), want, scale, "charge float32", rtol=1e-6)


def test_committed_scale_module_is_the_rendered_one():
    """generated/scale.py (what users import) is what binding.generated_module executes."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "generated" / "scale.py"
    assert path.read_text() == render_module(as_derivation("scale"))


def test_non_closing_spec_generates_no_laws():
    mod = generated_module(as_derivation("linear_pair_antisymmetric"))
    assert mod.CLOSES is False
    assert "antisymmetric" in mod.WHY_NOT_CLOSED
    assert not hasattr(mod, "Laws") and not hasattr(mod, "charge")
