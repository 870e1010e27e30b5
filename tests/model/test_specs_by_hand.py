"""Specs bound by hand go through the same confirmation and checks as detected built-ins.

A user's own Symmetry, ``linear_pair`` with a symmetric E (and its antisymmetric twin) on a
Linear → Linear pair, and a spec that is not a symmetry of the model. Generators are compared with
hand-written formulas; G1/G2 come from autograd HVPs on the real network (see test_check.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from support.zoo import tiny_vit
from torch import nn

from symmech.model.actions import BlockSlice, Family, Square, generator, validate_family
from symmech.model.check import check, format_check
from symmech.model.confirm import confirm
from symmech.spec.declare import Block, Symmetry, alpha
from symmech.spec.library import BUILTIN

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"  # torch-internal, forward AD
)

ROUND_OFF = 1e-12


def data(n: int = 7, d: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def cubic_spec(power: int) -> Symmetry:
    """(θ₁, θ₂) ↦ (αθ₁, α^(−power) θ₂), under a name the registry does not know."""
    t1, t2 = Block("incoming"), Block("outgoing")
    return Symmetry(
        f"my_rescale_{power}", action={t1: alpha * t1, t2: t2 / alpha**power}, identity=1
    )


def quadratic_net() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4), Square(), nn.Linear(4, 3))


def unit_family(spec: Symmetry) -> Family:
    # hidden unit j: row j of 0.weight and 0.bias in, column j of 2.weight out
    return Family(
        spec, "0 → square → 2 (by hand)",
        {"incoming": [BlockSlice("0.weight", 0), BlockSlice("0.bias", 0)],
         "outgoing": [BlockSlice("2.weight", 1)]},
        4,
    )  # fmt: skip


def assert_exact(rows: list[dict]) -> None:
    for r in rows:
        assert r["exact"], format_check(rows)
        assert r["g1"] < ROUND_OFF and r["g2"] < ROUND_OFF, format_check(rows)


def test_user_spec_is_confirmed_and_checked_at_round_off() -> None:
    # (w·x + b)² scales by α², so the outgoing weights must shrink by α⁻².
    model, batch = quadratic_net(), data()
    fam = unit_family(cubic_spec(2))
    assert (fam.symmetry, fam.spec.name) == ("my_rescale_2", "my_rescale_2")
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    xi = generator(params, fam)
    assert torch.equal(xi["0.weight"], params["0.weight"])  # ξ = (θ₁, −2θ₂) by hand
    assert torch.allclose(xi["2.weight"], -2 * params["2.weight"], rtol=0, atol=1e-15)
    (done,) = confirm(model, [fam], batch, n_trials=4)
    assert done.confirmed is True, done.reason
    rows = check(model, batch, families=[fam])
    assert rows[0]["symmetry"] == "my_rescale_2" and rows[0]["groups"] == 4
    assert_exact(rows)


def test_spec_that_is_not_a_symmetry_is_refused_with_its_residual() -> None:
    model, batch = quadratic_net(), data()
    fam = unit_family(cubic_spec(1))  # α⁻¹ would fit a ReLU, not x ↦ x²
    confirm(model, [fam], batch)
    assert fam.confirmed is False
    found = re.search(r"loss changed by ([0-9.e+-]+) \(relative\)", fam.reason)
    assert found, fam.reason
    assert float(found.group(1)) > 1e-4  # far above the tolerance
    (row,) = check(model, batch, families=[fam])
    assert row["g1"] > 1e-3 and row["g2"] > 1e-3


def linear_pair_family(name: str, const: torch.Tensor, bias: bool) -> Family:
    # f(x) = W₂(W₁x + b₁) + b₂ with U = [W₁ᵀ; b₁ᵀ] (d+1 × r) and V = W₂ (k × r)
    u = [BlockSlice("0.weight", None, "T")] + ([BlockSlice("0.bias", None, (1, 4))] if bias else [])
    key = "E" if name == "linear_pair" else "A"
    return Family(name, "0 → 1 (linear pair)", {"U": u, "V": [BlockSlice("1.weight", None)]}, 1,
                  constants={key: const})  # fmt: skip


@pytest.mark.parametrize("name", ["linear_pair", "linear_pair_antisymmetric"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_pair_on_a_linear_linear_pair(name: str, bias: bool) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    const = (m + m.T) / 2 if name == "linear_pair" else (m - m.T) / 2
    fam = linear_pair_family(name, const, bias)
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    xi = generator(params, fam)
    # ξ_U = U E, ξ_V = −V Eᵀ: W₁ moves by (U E)ᵀ = Eᵀ W₁, b₁ by Eᵀ b₁
    w1, w2 = params["0.weight"], params["1.weight"]
    assert torch.allclose(xi["0.weight"], const.T @ w1, rtol=0, atol=1e-13)
    assert torch.allclose(xi["1.weight"], -w2 @ const.T, rtol=0, atol=1e-13)
    if bias:
        assert torch.allclose(xi["0.bias"], const.T @ params["0.bias"], rtol=0, atol=1e-13)
    batch = data()
    assert confirm(model, [fam], batch, n_trials=3)[0].confirmed is True, fam.reason
    assert_exact(check(model, batch, families=[fam]))


def test_linear_pair_refuses_a_constant_without_the_spec_structure() -> None:
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 3))
    params = dict(model.named_parameters())
    general = torch.arange(16.0).reshape(4, 4)
    with pytest.raises(ValueError, match=r"constant 'E' must be symmetric .* shape \(4, 4\)"):
        validate_family(linear_pair_family("linear_pair", general, False), params)
    without = Family("linear_pair", "pair", {"U": [BlockSlice("0.weight", None, "T")],
                                             "V": [BlockSlice("1.weight", None)]}, 1)  # fmt: skip
    with pytest.raises(ValueError, match=r"needs the constants \['E'\]"):
        validate_family(without, params)
    confirm(model, [without], data())  # confirmation reports instead of raising
    assert without.confirmed is False and "needs the constants" in without.reason


def test_family_errors_quote_the_family() -> None:
    with pytest.raises(ValueError, match=r"Family\(symmetry='nope'\): unknown symmetry"):
        validate_family(Family("nope", "x", {"theta": [BlockSlice("w", 0)]}, 2), {})
    with pytest.raises(ValueError, match=r"the name differs from the spec's name"):
        Family("scale", "x", {}, 1, spec=BUILTIN["rescale"]())
    fam = unit_family(cubic_spec(2))
    fam.blocks = {"incoming": fam.blocks["incoming"]}
    model = quadratic_net()
    with pytest.raises(
        ValueError, match=r"has blocks \['incoming', 'outgoing'\], got \['incoming'\]"
    ):
        validate_family(fam, dict(model.named_parameters()))


def test_check_on_scaled_dot_product_attention_on_cpu() -> None:
    # F.scaled_dot_product_attention's CPU flash kernel has no double backward; check runs the
    # math kernel. Families: head columns 8 + bias 1 (T), fc1 → relu → fc2 16 units (R),
    # ln1 / ln2 / ln_final against what they feed, 8 features each (norm_rescale), and for the
    # 2 heads of r = 4 one family per entry i ≤ j of the 4×4 charge matrix (10) for q/k and v/out.
    torch.manual_seed(0)
    model = tiny_vit()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    rows = check(model, (x, y))
    # The residual stream (patch embedding, position, attention output, fc2) is read only by the
    # three LayerNorms: a scale family of 1 group, broken by their eps alone (G1 and G2 at
    # round-off once the eps prediction is subtracted).
    expected = [("attention_qk", 2)] * 10 + [("attention_vo", 2)] * 10 + [("norm_rescale", 8)] * 3
    expected += [("rescale", 16), ("scale", 1), ("translation", 1), ("translation", 8)]
    assert sorted((r["symmetry"], r["groups"]) for r in rows) == expected
    (stream,) = [r for r in rows if r["symmetry"] == "scale"]
    assert not stream["exact"] and stream["eps"] == 1e-5
    assert stream["g1_minus_eps"] < ROUND_OFF and stream["g2_minus_eps"] < ROUND_OFF
    assert_exact([r for r in rows if r is not stream])
