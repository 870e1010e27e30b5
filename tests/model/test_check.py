"""G1/G2 residuals on real models in float64, and the torch actions they are built on.

The generator ξ is differentiated from the torch action; here it is compared with the hand-written
column of the table in docs/theory.md, and H ξ with a finite difference of gradients (independent checks).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.zoo import mlp, resnet18, transformer_block, vgg
from torch import nn

from symmech.model.actions import (
    BlockSlice,
    Family,
    Square,
    apply_action,
    generator,
    group_sum,
    identity,
    validate_family,
)
from symmech.model.check import check, format_check, hvp
from symmech.model.detect import detect
from symmech.model.evaluator import Evaluator

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"  # torch-internal, forward AD
)

ROUND_OFF = 1e-12


def batch(n: int = 6, size: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- actions


def two_layer(n_in: int, n_hidden: int, n_out: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n_in * 100 + n_hidden * 10 + n_out)
    shapes = {"a.weight": (n_hidden, n_in), "a.bias": (n_hidden,), "b.weight": (n_out, n_hidden)}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def rescale_family(symmetry: str, n_hidden: int) -> Family:
    return Family(
        symmetry,
        "a → relu → b",
        {"theta_1": [BlockSlice("a.weight", 0), BlockSlice("a.bias", 0)],
         "theta_2": [BlockSlice("b.weight", 1)]},
        n_hidden,
    )  # fmt: skip


sizes = st.integers(min_value=1, max_value=5)


@given(sizes, sizes, sizes)
def test_generator_matches_design_table(n_in: int, n_hidden: int, n_out: int) -> None:
    p = two_layer(n_in, n_hidden, n_out)
    # rescale ξ = (θ_1, −θ_2); quadratic rescale ξ = (θ_1, −2θ_2)
    for symmetry, k in (("rescale", 1), ("quadratic_rescale", 2)):
        xi = generator(p, rescale_family(symmetry, n_hidden))
        assert torch.equal(xi["a.weight"], p["a.weight"])
        assert torch.equal(xi["a.bias"], p["a.bias"])
        assert torch.allclose(xi["b.weight"], -k * p["b.weight"], rtol=0, atol=1e-15)
    # scale ξ = θ_A; translation ξ = 𝟙_A
    scale = Family("scale", "a", {"theta": [BlockSlice("a.weight", 0)]}, n_hidden)
    assert torch.equal(generator(p, scale)["a.weight"], p["a.weight"])
    shift = Family("translation", "b", {"theta": [BlockSlice("b.weight", 1)]}, n_hidden)
    assert torch.equal(generator(p, shift)["b.weight"], torch.ones(n_out, n_hidden).double())


@given(sizes, sizes, st.floats(0.5, 2.0), st.floats(0.5, 2.0))
def test_action_is_a_group_action(n_hidden: int, n_out: int, a: float, b: float) -> None:
    p = two_layer(3, n_hidden, n_out)
    fam = rescale_family("rescale", n_hidden)
    e = identity(fam, p["a.weight"])
    alpha_a, alpha_b = e * a, e * b
    assert all(torch.equal(apply_action(p, fam, e)[k], p[k]) for k in p)
    twice = apply_action(apply_action(p, fam, alpha_a), fam, alpha_b)
    once = apply_action(p, fam, alpha_a * alpha_b)
    assert all(torch.allclose(twice[k], once[k], rtol=1e-14, atol=0) for k in p)


def test_group_sum_against_loop_and_view() -> None:
    w = torch.arange(24.0).reshape(2, 12)  # a Linear after Flatten of (3 channels, 2×2)
    fam = Family("translation", "x", {"theta": [BlockSlice("w", 1, (2, 3, 4))]}, 3)
    got = group_sum({"w": w}, fam)
    want = torch.stack([w[:, 4 * c : 4 * c + 4].sum() for c in range(3)])
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="gives 3 groups, but the family has n_groups=4"):
        validate_family(Family("translation", "x", fam.blocks, 4), {"w": w})


# ----------------------------------------------------------------------------- residuals


def assert_round_off(rows: list[dict]) -> None:
    for r in rows:
        assert r["g1_minus_eps"] < ROUND_OFF and r["g2_minus_eps"] < ROUND_OFF, format_check(rows)
        if r["exact"]:
            assert r["g1"] < ROUND_OFF and r["g2"] < ROUND_OFF, format_check(rows)


@pytest.mark.parametrize(
    "build",
    [lambda: mlp(64, (32, 32), 10), lambda: vgg("vgg-tiny", False), transformer_block],
    ids=["mlp", "vgg-tiny", "transformer"],
)
def test_exact_symmetries_at_round_off(build) -> None:
    torch.manual_seed(0)
    rows = check(build(), batch())
    # the transformer's residual stream (embed, pos, attn.out, fc2) is read only by LayerNorms:
    # its scale family is broken by their eps alone, which the eps prediction accounts for
    assert rows and all(r["exact"] or (r["symmetry"] == "scale" and r["eps"] == 1e-5) for r in rows)
    assert [r["symmetry"] for r in rows if not r["exact"]] == (
        ["scale"] if build is transformer_block else []
    )
    assert_round_off(rows)


def test_quadratic_groupnorm_layernorm_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 12), Square(),
        nn.Linear(12, 8), nn.GroupNorm(2, 8), nn.LeakyReLU(0.1), nn.Linear(8, 10),
    )  # fmt: skip
    x, y = batch()
    rows = check(model, (x.flatten(1), y))
    assert {r["symmetry"] for r in rows} == {"translation", "scale", "rescale", "quadratic_rescale"}
    assert_round_off(rows)  # LayerNorm and GroupNorm eps accounted for exactly


def test_batchnorm_tiny_eps_is_round_off_and_default_eps_is_reported() -> None:
    torch.manual_seed(0)
    model = vgg("vgg-tiny", batch_norm=True)
    data = batch()
    rows = _without_bias_shifts(model, data, check(model, data))
    scale = [r for r in rows if r["symmetry"] == "scale"]
    assert len(scale) == 4 and not any(r["exact"] for r in scale)
    for r in scale:  # eps = 1e-5 breaks G1 well above round-off, by the predicted amount
        assert r["eps"] == 1e-5 and r["g1"] > 1e-8
        assert abs(r["g1"] - r["eps_bound"]) < 1e-10
    assert_round_off(rows)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-12
    tiny = _without_bias_shifts(model, data, check(model, data))
    assert max(r["g1"] for r in tiny) < 1e-10  # eps/σ² ~ 1e-12
    assert_round_off(tiny)


def _without_bias_shifts(model: nn.Module, data, rows: list[dict]) -> list[dict]:
    """The rows other than the conv-bias translations before BatchNorm, after checking those.
    The loss does not depend on such a bias at all (the batch mean removes it): ∂L/∂b, in
    float64 by autograd, is round-off next to the conv weight's gradient, and check() reports
    the group as flat (G1 = G2 = 0, not the 1 that round-off over round-off would give)."""
    shifts = [r for r in rows if "(batch mean)" in r["layer"]]
    assert len(shifts) == 4
    ev = Evaluator(model, data, None)
    params = {n: p.clone().requires_grad_(True) for n, p in ev.params.items()}
    g = dict(zip(params, torch.autograd.grad(ev.loss(params), list(params.values()))))
    for r in shifts:
        conv = r["layer"].split(".bias")[0]
        assert g[f"{conv}.bias"].abs().max() <= 1e-12 * g[f"{conv}.weight"].abs().max(), conv
        assert r["g1"] == 0.0 and r["g2"] == 0.0 and r["g2_denominator"].startswith("flat")
    return [r for r in rows if r not in shifts]


def test_resnet18_rescale_and_scale_subset() -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=1, base_width=4)
    x, y = batch(n=4)
    fams = detect(model, x)
    pick = [f for f in fams if f.symmetry == "rescale"][:2]
    pick += [f for f in fams if f.symmetry == "scale"][-2:] + fams[:1]
    rows = check(model, (x, y), families=pick)
    assert_round_off(rows)


def test_broken_family_gives_large_residuals() -> None:
    model = mlp(64, (8,), 10)
    wrong = Family("scale", "fc1 (no norm)", {"theta": [BlockSlice("fc1.weight", 0)]}, 8)
    (row,) = check(model, batch(), families=[wrong])
    assert row["g1"] > 1e-3 and row["g2"] > 1e-3


def test_hvp_against_finite_differences() -> None:
    torch.manual_seed(0)
    model = mlp(64, (8,), 10, act="tanh")
    ev = Evaluator(model, batch(), None)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in ev.params.items()}
    hv = hvp(ev.loss, ev.params, v)
    h = 1e-5
    grad = torch.func.grad(ev.loss)
    plus = grad({k: p + h * v[k] for k, p in ev.params.items()})
    minus = grad({k: p - h * v[k] for k, p in ev.params.items()})
    for k in hv:
        assert torch.allclose(hv[k], (plus[k] - minus[k]) / (2 * h), rtol=1e-6, atol=1e-8)


def test_check_leaves_model_unchanged() -> None:
    model = vgg("vgg-tiny", batch_norm=True).eval()
    before = copy.deepcopy(model.state_dict())
    rows = check(model, batch())
    assert rows and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="mode must be 'train' or 'as_is'"):
        check(model, batch(), mode="eval")


class _EncoderClassifier(nn.Module):
    """A ViT-like head on nn.TransformerEncoderLayer: attention runs through SDPA, whose fused
    CPU kernel has no double backward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 8, 8))).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_runs_through_sdpa_attention(dtype) -> None:
    """check() needs Hessian-vector products; SDPA's fused kernel cannot give them, so check
    runs attention with the math kernel (the issue: a ViT crashed on CPU)."""
    torch.manual_seed(0)
    model = _EncoderClassifier().to(dtype)
    x, y = batch()
    rows = check(model, (x.to(dtype), y))
    assert rows and any(r["symmetry"] == "translation" for r in rows)
    tol = ROUND_OFF if dtype == torch.float64 else 1e-4
    for r in rows:
        if r["symmetry"] == "translation":
            assert r["g1"] < tol and r["g2"] < tol, format_check(rows)


def test_spec_objects_are_not_kept_alive_without_bound() -> None:
    # detection makes a spec object per family; the action cache keyed by object id held every
    # one of them for the life of the process
    import gc
    import weakref

    from symmech.model import actions
    from symmech.spec.library import BUILTIN

    first = BUILTIN["rescale"]()
    gone = weakref.ref(first)
    params = two_layer(3, 4, 2)
    want = apply_action(params, rescale_family("rescale", 4), torch.full((4,), 2.0))
    actions.spec_action(Family(first, "x", {}, 4))
    del first
    for _ in range(actions.MAX_KEPT + 5):
        actions.spec_action(Family(BUILTIN["rescale"](), "x", {}, 4))
    gc.collect()
    assert gone() is None
    assert len(actions._BY_ID) <= actions.MAX_KEPT
    fam = rescale_family("rescale", 4)
    fam.spec = BUILTIN["rescale"]()
    got = apply_action(params, fam, torch.full((4,), 2.0))
    for k in want:
        assert torch.equal(got[k], want[k])
