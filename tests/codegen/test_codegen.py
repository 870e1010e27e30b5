"""Generated tracker code against a slow, obvious torch computation of the same quantities.

The reference here is written from the definitions only (docs/theory.md, "The exact discrete law"):
per group j, each block is the concatenation of slice j of every bound tensor, J and c are
written by hand per symmetry, and the update u is built the way ``torch.optim.SGD`` builds it
(checked against a real ``torch.optim.SGD`` step below). Nothing here calls symmech to compute
a reference value; the generated functions are only ever compared with these loops, which live in
``tests/support/reference_sgd.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
from symmech.codegen.printer import CodegenError, companion_table, compile_terms
from symmech.codegen.render import format_code, render_module, spec_fingerprint
from symmech.derive.data_terms import HYPER_SYMBOLS
from symmech.errors import SymmechError
from symmech.runtime.binding import as_derivation
from symmech.runtime.kernels import Forms
from symmech.runtime.modules import committed_path, generated_module
from symmech.runtime.stepper import Hyper, update_forms

pytestmark = pytest.mark.usefixtures("single_thread")

UPDATE_CASES = ("sgd", "first", "nesterov", "nesterov_first", "plain")


# ---------------------------------------------------------------------------------------------
# 1. The printer: short exact strings, shared reductions, clear errors
# ---------------------------------------------------------------------------------------------


def test_printer_scale_charge_is_one_squared_norm():
    d = as_derivation("scale")
    prog = compile_terms({"Q": d.conserved}, companion_table(d))
    assert prog.assignments == []
    assert prog.outputs == [("Q", '0.5*sq(th["theta"])')]
    assert prog.kernels == {"sq"}


def test_printer_translation_inner_with_ones_is_a_sum():
    d = as_derivation("translation")
    theta = d.blocks[0]
    g = d.geometry.grad[theta]
    table = {theta.name: 'th["theta"]', g.name: 'gr["theta"]'}
    ones = symmech.ones(theta)
    one = compile_terms
    assert one({"a": symmech.Inner(ones, g)}, table).outputs == [("a", 'total(gr["theta"])')]
    assert one({"a": symmech.Inner(theta, ones)}, table).outputs == [("a", 'total(th["theta"])')]
    assert one({"a": symmech.Inner(theta, theta)}, table).outputs == [("a", 'sq(th["theta"])')]
    assert one({"a": symmech.Inner(theta, g)}, table).outputs == [
        ("a", 'dot(th["theta"], gr["theta"])')
    ]
    dt = d.dynamics.data_terms
    prog = compile_terms({"Q": dt.charge, "r": dt.residual, "gJg": dt.gJg}, companion_table(d))
    assert prog.outputs == [
        ("Q", 'total(th["theta"])'),
        ("r", 'total(gr["theta"])'),
        ("gJg", 'zeros(th["theta"])'),
    ]


def test_printer_collects_and_shares_reductions():
    d = as_derivation("scale")
    theta = d.blocks[0]
    g = d.geometry.grad[theta]
    inner = symmech.Inner
    terms = {
        "a": inner(theta, theta) + 2 * inner(theta, theta),
        "b": 2 * inner(theta, theta) + inner(theta, g),
        "c": inner(theta, g) / 2 - inner(theta, theta) / 4,
    }
    prog = compile_terms(terms, companion_table(d))
    # each reduction is computed once (sympy.cse) and each output collected per reduction
    assert prog.assignments == [("s0", 'sq(th["theta"])'), ("s1", 'dot(th["theta"], gr["theta"])')]
    assert dict(prog.outputs) == {"a": "3*s0", "b": "2*s0 + s1", "c": "-0.25*s0 + 0.5*s1"}
    single = compile_terms({"b": terms["b"]}, companion_table(d))
    assert single.outputs == [("b", 'dot(th["theta"], gr["theta"]) + 2*sq(th["theta"])')]


def test_linear_pair_shares_constant_products_across_forms():
    """θE is formed once for ⟨θ, Jθ⟩, ⟨θ, Jg⟩ and ⟨θ, Jb⟩; bE once for ⟨g, Jb⟩ and ⟨b, Jb⟩."""
    d = as_derivation("linear_pair")
    bf = d.dynamics.data_terms.bilinear_forms
    table = companion_table(d)
    first = compile_terms(
        {"tt": bf["theta", "theta"], "tg": bf["theta", "grad"], "gg": bf["grad", "grad"]}, table
    )
    assert first.assignments == [
        ("s0", 'mm(th["U"], const["E"])'),
        ("s1", 'mm(th["V"], const["E"])'),
    ]
    assert dict(first.outputs)["tt"] == 'dot(s0, th["U"]) - dot(s1, th["V"])'
    second = compile_terms(
        {"tb": bf["theta", "buf"], "gb": bf["grad", "buf"], "bb": bf["buf", "buf"]},
        table,
        shared=first,
    )
    assert second.assignments == [
        ("s2", 'mm(bf["U"], const["E"])'),
        ("s3", 'mm(bf["V"], const["E"])'),
    ]
    assert dict(second.outputs) == {
        "tb": 'dot(s0, bf["U"]) - dot(s1, bf["V"])',
        "gb": 'dot(s2, gr["U"]) - dot(s3, gr["V"])',
        "bb": 'dot(s2, bf["U"]) - dot(s3, bf["V"])',
    }


def test_vanishing_forms_share_one_zero():
    d = as_derivation("translation")
    bf = d.dynamics.data_terms.bilinear_forms
    prog = compile_terms({k: bf[k] for k in bf}, companion_table(d))
    assert prog.assignments == [("s0", 'zeros(th["theta"])')]
    assert {code for _, code in prog.outputs} == {"s0"}


def test_printer_unbound_matrix_symbol_is_an_error():
    d = as_derivation("scale")
    z = MatrixSymbol("zeta", d.blocks[0].shape[0], 1)
    with pytest.raises(CodegenError, match="zeta is missing from the argument sequences"):
        compile_terms({"x": symmech.Inner(z, d.blocks[0])}, companion_table(d))


def test_printer_unbound_scalar_symbol_is_an_error():
    d = as_derivation("scale")
    inner = symmech.Inner(d.blocks[0], d.blocks[0])
    with pytest.raises(CodegenError, match="mu is missing from the argument sequences of x"):
        compile_terms({"x": sp.Symbol("mu") * inner}, companion_table(d))
    # hyperparameters never reach generated code: the law stepper owns them
    with pytest.raises(CodegenError, match="eta is missing from the argument sequences"):
        compile_terms({"x": HYPER_SYMBOLS["lr"] * inner}, companion_table(d))


def test_linear_pair_prints_constant_products():
    d = as_derivation("linear_pair")
    prog = compile_terms({"Q": d.dynamics.data_terms.charge}, companion_table(d))
    assert prog.outputs == [
        (
            "Q",
            '0.5*dot(mm(th["U"], const["E"]), th["U"]) - 0.5*dot(mm(th["V"], const["E"]), th["V"])',
        )
    ]
    assert prog.kernels == {"dot", "mm"}


@pytest.mark.parametrize("case", UPDATE_CASES)
def test_stepper_update_forms_are_the_engines_expansion(case):
    """The stepper's uᵀJu, uᵀJb in the forms B_xy equal the engine's expansion of torch's update.

    For scale (J = I) B_xy = ⟨x, y⟩; the engine expands u and b symbolically from the update
    rule, the stepper writes them by hand in B_θθ, ..., B_bb: both must agree as polynomials.
    """
    d = as_derivation("scale")
    dt = d.dynamics.data_terms
    bf = dt.bilinear_forms
    h = {k: HYPER_SYMBOLS[k] for k in ("momentum", "dampening", "weight_decay")}
    hyper = Hyper(lr=0.1, nesterov=case.startswith("nesterov"), **h)
    forms = Forms(
        bf["theta", "theta"],
        bf["theta", "grad"],
        bf["grad", "grad"],
        bf["theta", "buf"],
        bf["grad", "buf"],
        bf["buf", "buf"],
    )
    uju, ujb = update_forms(case, hyper, forms)
    assert sp.expand(sp.nsimplify(uju) - dt.uJu[case]) == 0
    assert sp.expand(sp.nsimplify(ujb) - dt.uJb[case]) == 0


def test_stepper_update_forms_need_the_buffer():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="'sgd' needs the momentum buffer's forms"):
        update_forms("sgd", Hyper(lr=0.1, momentum=0.9), Forms(z, z, z))


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
    C = (lay.constants,) if mod.CONSTANTS else ()  # only a spec with constants takes them
    A = ref.args

    # charge, residual, <x, J x> and the six forms B_xy
    close_to(mod.charge(A(th), *C), ref.charge(th), ref.charge_abs(th), "charge")
    close_to(
        mod.residual(A(th), A(gr), *C), ref.xi_dot(th, gr), ref.xi_dot(th, gr, True), "residual"
    )
    close_to(mod.quadratic(A(gr), *C), ref.form(gr, gr), ref.form(gr, gr, True), "gJg")
    close_to(
        mod.quadratic(A(bprev), *C), ref.form(bprev, bprev), ref.form(bprev, bprev, True), "bJb"
    )
    forms = mod.forms(A(th), A(gr), A(bprev), *C)
    pairs = {
        "tt": (th, th),
        "tg": (th, gr),
        "gg": (gr, gr),
        "tb": (th, bprev),
        "gb": (gr, bprev),
        "bb": (bprev, bprev),
    }
    for key, (x, y) in pairs.items():
        close_to(getattr(forms, key), ref.form(x, y), ref.form(x, y, True), f"B_{key}")
    no_buffer = mod.forms(A(th), A(gr), None, *C)
    assert no_buffer.tb is None and no_buffer.gb is None and no_buffer.bb is None

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
        has_buffer = not (first or case == "plain")
        B = mod.forms(A(th), A(gr), A(bprev) if has_buffer else None, *C)
        uju, ujb = update_forms(case, Hyper(lr, m, tau, lam, nest), B)
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
    q = mod.charge(ref.args(th32), *((const32,) if mod.CONSTANTS else ()))
    assert q.dtype == torch.float32
    want = ref.charge({k: v.double() for k, v in th32.items()})
    scale = ref.charge_abs(st_["theta"])
    close_to(q.double(), want, scale, "charge float32", rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. The committed modules: what the runtime imports, readable, formatted
# ---------------------------------------------------------------------------------------------

GENERATED = Path(__file__).resolve().parents[2] / "generated"
COMMITTED = sorted(p.stem for p in GENERATED.glob("*.py"))


@pytest.mark.parametrize("name", COMMITTED)
def test_runtime_imports_the_committed_module(name):
    """generated/<name>.py (what a reviewer reads) is the module the tracker runs."""
    d = as_derivation(name)
    mod = generated_module(d)
    assert Path(mod.__file__) == GENERATED / f"{name}.py"
    assert mod.FINGERPRINT == spec_fingerprint(d.symmetry)
    assert sys.modules[mod.__name__] is mod  # importable by name (torch.compile, pickling)


def test_committed_scale_module_is_the_rendered_one():
    assert (GENERATED / "scale.py").read_text() == render_module(as_derivation("scale"))


def test_stale_or_foreign_committed_module_is_not_imported(tmp_path):
    d = as_derivation("rescale")
    text = (GENERATED / "rescale.py").read_text()
    (tmp_path / "rescale.py").write_text(text)
    assert committed_path(d, tmp_path) == tmp_path / "rescale.py"
    (tmp_path / "rescale.py").write_text(text.replace(spec_fingerprint(d.symmetry), "0" * 32))
    assert committed_path(d, tmp_path) is None
    assert committed_path(d, tmp_path / "nowhere") is None


def test_a_spec_without_a_committed_module_is_rendered():
    """A user's spec (here scale under another name) runs rendered code with the same results."""
    theta = symmech.Block("theta")
    user = symmech.Symmetry("my_scale", action={theta: symmech.alpha * theta}, identity=1)
    mod = generated_module(as_derivation(user))
    assert mod.__file__ == "<generated my_scale>" and mod.KAPPA == 2.0
    committed = generated_module(as_derivation("scale"))
    x = [(torch.arange(6.0, dtype=DTYPE).reshape(2, 3), (1,))]
    torch.testing.assert_close(mod.charge({"theta": x}), committed.charge({"theta": x}))
    assert generated_module(as_derivation(user)) is mod


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_modules_are_formatted_and_lint_clean(name):
    text = (GENERATED / f"{name}.py").read_text()
    assert "fmt: off" not in text
    assert format_code(text) == text
    lint = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--select",
            "E,F,W,B,I,UP",
            "--ignore",
            "E501",  # as the project: long strings (a spec's why-not sentence) stay whole
            "--stdin-filename",
            f"{name}.py",
            "-",
        ],
        input=text,
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout
    # helpers come from one runtime module, never copied
    assert "\ndef _" not in text and "import torch" not in text


def test_formatting_without_ruff_says_what_to_install(monkeypatch):
    def no_ruff(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "/usr/bin/python: No module named ruff")

    monkeypatch.setattr(subprocess, "run", no_ruff)
    with pytest.raises(SymmechError, match=r"formatting generated code needs ruff: pip install"):
        render_module(as_derivation("scale"))


def test_non_closing_spec_generates_no_laws():
    mod = generated_module(as_derivation("linear_pair_antisymmetric"))
    assert mod.CLOSES is False
    assert "antisymmetric" in mod.WHY_NOT_CLOSED
    assert not hasattr(mod, "forms") and not hasattr(mod, "charge")
