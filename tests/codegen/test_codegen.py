"""Generated tracker code against a slow, obvious torch computation of the same quantities.

The reference here is written from the definitions only (docs/theory.md, "The exact discrete law"):
per group j, each block is the concatenation of slice j of every bound tensor, J and c are
written by hand per symmetry, and the update u is built the way ``torch.optim.SGD`` builds it
(checked against a real ``torch.optim.SGD`` step below). Nothing here calls symmech to compute
a reference value; the generated functions are only ever compared with these loops, which live in
``tests/support/reference_sgd.py``.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference_sgd import (
    DTYPE,
    LAYOUTS,
    SYMMETRIES,
    Layout,
    Reference,
    close_to,
    layout,
    sgd_hyper,
    sgd_update,
    sizes,
)
from sympy.matrices.expressions import MatrixSymbol

import symmech
from symmech.codegen.printer import CodegenError, compile_terms, print_reduction
from symmech.codegen.render import UPDATE_CASES, render_module
from symmech.runtime.binding import as_derivation, generated_module

pytestmark = pytest.mark.usefixtures("single_thread")


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
    close_to(mod.charge(A(th), const), ref.charge(th), ref.charge_abs(th), "charge")
    close_to(
        mod.residual(A(th), A(gr), const), ref.xi_dot(th, gr), ref.xi_dot(th, gr, True), "residual"
    )
    close_to(mod.grad_form(A(gr), const), ref.form(gr, gr), ref.form(gr, gr, True), "grad_form")
    close_to(
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
        close_to(uju, ref.form(u, u), scale, f"uJu[{case}]", rtol=1e-11)
        close_to(ujb, ref.form(u, b), scale, f"uJb[{case}]", rtol=1e-11)


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
    close_to(q.double(), want, scale, "charge float32", rtol=1e-6)


def test_committed_scale_module_is_the_rendered_one():
    """generated/scale.py (what users import) is what binding.generated_module executes."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "generated" / "scale.py"
    assert path.read_text() == render_module(as_derivation("scale"))


def test_non_closing_spec_generates_no_laws():
    mod = generated_module(as_derivation("linear_pair_antisymmetric"))
    assert mod.CLOSES is False
    assert "antisymmetric" in mod.WHY_NOT_CLOSED
    assert not hasattr(mod, "Laws") and not hasattr(mod, "charge")
