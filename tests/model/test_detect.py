"""Symmetry detection on real models: group counts derived by hand from each architecture.

Notation in the comments: "T" translation, "S" scale, "R" rescale; "families/groups".
A translation family pair is the output Linear's weight columns (in_features groups) and its bias
(1 group). Every expected number below is worked out from the layer sizes, never taken from the
code under test.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from support.zoo import build, mlp, resnet18, transformer_block, vgg
from torch import nn

from symmech.model.actions import BlockSlice, Family, Square
from symmech.model.confirm import confirm
from symmech.model.detect import SymmetryWarning, detect, format_table

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"  # torch-internal, forward AD
)


def counts(families: list[Family]) -> dict[str, tuple[int, int]]:
    """symmetry -> (number of families, total number of groups)."""
    fams, groups = Counter(), Counter()
    for f in families:
        fams[f.symmetry] += 1
        groups[f.symmetry] += f.n_groups
    return {k: (fams[k], groups[k]) for k in fams}


def digits(n: int = 4, channels: int = 1, size: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- MLP


def test_mlp_counts_and_slices() -> None:
    # mlp(64, (32, 32), 10): flatten → fc1(64→32) → relu1 → fc2(32→32) → relu2 → fc3(32→10).
    # T: fc3 columns 32 + bias 1 → 2 families / 33 groups.
    # R: fc1→relu1→fc2 (32 hidden units) and fc2→relu2→fc3 (32) → 2 / 64. S: no norm layer.
    model = mlp(64, (32, 32), 10)
    x, y = digits()
    fams = detect(model, x, confirm_batch=(x, y))
    assert fams.path == "fx"
    assert counts(fams) == {"translation": (2, 33), "rescale": (2, 64)}
    assert all(f.confirmed for f in fams)
    first = next(f for f in fams if f.layer.startswith("fc1"))
    assert first.blocks == {
        "theta_1": [BlockSlice("fc1.weight", 0), BlockSlice("fc1.bias", 0)],
        "theta_2": [BlockSlice("fc2.weight", 1)],
    }
    columns = next(f for f in fams if f.symmetry == "translation" and f.n_groups == 32)
    assert columns.blocks == {"theta": [BlockSlice("fc3.weight", 1)]}
    bias = next(f for f in fams if f.symmetry == "translation" and f.n_groups == 1)
    assert bias.blocks == {"theta": [BlockSlice("fc3.bias", None)]}


# ----------------------------------------------------------------------------- VGG

# On 8×8 inputs a VGG pool is left out once the map is 1×1, the classifier is
# fc1 (C·s² → C) → relu1 → fc2 (C → 10), C the last conv's channels, s the final map side.
# vgg-tiny [16, 16, M, 32, 32, M]: s = 2, C = 32.
#   T: fc2 columns 32 + bias → 2/33.
#   R: conv→conv pairs 16+16+32 (convs 1..3), conv2_2→relu→pool→flatten→fc1 32, fc1→fc2 32
#      → 5 families / 128 groups.  S (with BN): 16+16+32+32 = 96 in 4 families.
# vgg11 [64 M 128 M 256 256 M 512 512 M 512 512 M]: 8 convs, pools 8→4→2→1, s = 1, C = 512.
#   T: 2/513. R: first 7 convs feed the next conv: 64+128+256+256+512+512+512 = 2240, last conv
#      → fc1 512, fc1 → fc2 512 → 9 families / 3264.  S: all 8 convs: 2240+512 = 2752.
# vgg16 (config D): convs 64,64,128,128,256×3,512×6: 13 convs, sum = 128+256+768+3072 = 4224.
#   T: 2/513. R: 12 conv→conv (4224−512 = 3712) + conv→fc1 512 + fc1→fc2 512 → 14 / 4736.
#   S: 13 / 4224.
# With BN, each conv's bias feeds its BatchNorm alone: b_c ↦ b_c + α is removed by the batch
# mean, one translation family per conv with a group per channel (as many as S): vgg-tiny-bn
# T 2/33 + 4/96 = 6/129, vgg11-bn 2/513 + 8/2752 = 10/3265, vgg16-bn 2/513 + 13/4224 = 15/4737.
VGG_EXPECTED = {
    "vgg-tiny": {"translation": (2, 33), "rescale": (5, 128)},
    "vgg-tiny-bn": {"translation": (6, 129), "rescale": (5, 128), "scale": (4, 96)},
    "vgg11": {"translation": (2, 513), "rescale": (9, 3264)},
    "vgg11-bn": {"translation": (10, 3265), "rescale": (9, 3264), "scale": (8, 2752)},
    "vgg16": {"translation": (2, 513), "rescale": (14, 4736)},
    "vgg16-bn": {"translation": (15, 4737), "rescale": (14, 4736), "scale": (13, 4224)},
}


@pytest.mark.parametrize("name", list(VGG_EXPECTED))
def test_vgg_counts(name: str) -> None:
    torch.manual_seed(0)
    model = build(name)
    x, _ = digits(n=2)
    assert counts(detect(model, x)) == VGG_EXPECTED[name]


def test_vgg_tiny_bn_structure_and_confirmation() -> None:
    model = vgg("vgg-tiny", batch_norm=True)
    x, y = digits(n=6)
    fams = detect(model, x, confirm_batch=(x, y))
    assert all(f.confirmed for f in fams), format_table(fams)
    # With BN the rescale incoming side is the BN affine, never the conv before it.
    rescale = [f for f in fams if f.symmetry == "rescale"]
    assert {f.blocks["theta_1"][0].param for f in rescale} == {
        "features.bn1_1.weight", "features.bn1_2.weight", "features.bn2_1.weight",
        "features.bn2_2.weight", "classifier.fc1.weight",
    }  # fmt: skip
    # Last conv block → pool (4×4 → 2×2) → flatten → fc1: fc1's columns seen as (32, 32, 2·2).
    into_fc1 = next(f for f in rescale if f.layer.endswith("classifier.fc1"))
    assert into_fc1.blocks["theta_2"] == [BlockSlice("classifier.fc1.weight", 1, (32, 32, 4))]
    scale = next(f for f in fams if f.symmetry == "scale" and "conv1_1" in f.layer)
    assert scale.blocks == {
        "theta": [BlockSlice("features.conv1_1.weight", 0), BlockSlice("features.conv1_1.bias", 0)]
    }
    assert "eps=1e-05" in scale.reason  # BatchNorm's eps makes it approximate, and says so
    # conv2_1's bias before bn2_1: one translation group per channel (32)
    shift = next(f for f in fams if f.layer.startswith("features.conv2_1.bias"))
    assert (shift.symmetry, shift.n_groups) == ("translation", 32)
    assert shift.blocks == {"theta": [BlockSlice("features.conv2_1.bias", 0)]}
    assert shift.reason == ""  # exact: the batch mean removes the shift, eps plays no part


# ----------------------------------------------------------------------------- ResNet-18


def test_resnet18_no_false_groups_across_residual_adds() -> None:
    # Standard width (64): stem conv1 → bn1 → relu → layer1 (the relu output feeds both the
    # block's conv1 and its identity add: no R). Each BasicBlock: conv1→bn1→relu1→conv2 is the
    # only add-free chain (R through bn1's affine); bn2 → add → relu2: no R.
    # R: 2 blocks per stage × widths 64,128,256,512 → 8 families / 2·(64+128+256+512) = 1920.
    # S: every conv feeds a BN: stem 64; layer1 4×64; layer2 4×128 + downsample 128; layer3
    #    5×256; layer4 5×512 → 64+256+640+1280+2560 = 4800 in 1+4+5+5+5 = 20 families.
    # T: fc (512 → 10): 2 / 513.
    # Streams: one per stage, across its adds (the stem's bn1 writes stage 1's; each stage's
    #    readers include the next stage's conv1 and downsample conv, the last one's the fc):
    #    4 families / 64+128+256+512 = 960 (tests/model/test_streams.py checks them by hand).
    model = resnet18(num_classes=10, in_channels=1)
    x, _ = digits(n=2)
    fams = detect(model, x)
    assert counts(fams) == {"translation": (2, 513), "scale": (20, 4800), "rescale": (8, 1920),
                            "stream_rescale": (4, 960)}  # fmt: skip
    for f in fams:
        if f.symmetry == "rescale":
            stage_block = f.layer.split(".bn1")[0]
            assert f.layer == f"{stage_block}.bn1 → {stage_block}.relu1 → {stage_block}.conv2"


def test_resnet18_small_is_confirmed() -> None:
    model = resnet18(num_classes=10, in_channels=1, base_width=4)
    x, y = digits(n=4)
    fams = detect(model, x, confirm_batch=(x, y), n_trials=1)
    # Same structure with base width 4: S 75·4 = 300, R 30·4 = 120, T 32 + 1, streams 15·4 = 60.
    assert counts(fams) == {"translation": (2, 33), "scale": (20, 300), "rescale": (8, 120),
                            "stream_rescale": (4, 60)}  # fmt: skip
    assert all(f.confirmed for f in fams), format_table(fams)


# ----------------------------------------------------------------------------- transformer / norms


def test_transformer_block() -> None:
    # Pre-LN block: embed → +pos → x + attn(ln1(x)) → x + fc2(relu(fc1(ln2(x)))) → ln_final →
    # mean → head. Every Linear output before a LayerNorm goes through an add: no S. ln1 feeds
    # q, k and v (branching): no R, but norm_rescale of its 32 features against the columns of
    # q, k and v; ln2 → fc1: norm_rescale 32; ln_final → mean over tokens → head: norm_rescale 32.
    # fc1 (32→64) → relu → fc2: R 64. head (32 → 10): T 32 + 1. Attention: 4 heads of r = 8,
    # one family per entry i ≤ j of the 8×8 charge matrix (8·9/2 = 36), 4 groups (heads) each,
    # for q/k and for v/out. The residual stream (written by embed, pos, attn.out and fc2) is
    # read only by ln1, ln2 and ln_final, which normalise over its 32 channels: one α common to
    # all its writers is a scale family of 1 group (approximate: their eps breaks it).
    model = transformer_block()
    x, y = digits(n=4)
    fams = detect(model, x, confirm_batch=(x, y))
    assert counts(fams) == {
        "scale": (1, 1),
        "translation": (2, 33),
        "rescale": (1, 64),
        "norm_rescale": (3, 96),
        "attention_qk": (36, 144),
        "attention_vo": (36, 144),
    }
    assert all(f.confirmed for f in fams)


def test_layernorm_scale_and_rescale_through_affine() -> None:
    # fc1 (8 → 16) → LayerNorm(16) → ReLU → fc2 (16 → 3).
    # LN normalises all 16 outputs of fc1: S = 1 family / 1 group (all of fc1, dim=None).
    # R through LN's affine (γ_j, β_j) vs fc2's columns: 16. T: fc2 columns 16 + bias 1.
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    fams = detect(model, x, confirm_batch=(x, y))
    assert counts(fams) == {"translation": (2, 17), "scale": (1, 1), "rescale": (1, 16)}
    scale = next(f for f in fams if f.symmetry == "scale")
    assert scale.blocks == {"theta": [BlockSlice("0.weight", None), BlockSlice("0.bias", None)]}
    rescale = next(f for f in fams if f.symmetry == "rescale")
    assert rescale.blocks["theta_1"] == [BlockSlice("1.weight", 0), BlockSlice("1.bias", 0)]
    assert all(f.confirmed for f in fams), format_table(fams)


def test_layernorm_over_length_is_not_a_channel_scale() -> None:
    # Conv1d output (B, 4, 10); LayerNorm(10) normalises over the length axis only, not over
    # the conv's channel axis, so the rule gives no S. No activation between LN and fc: no R.
    # Output fc (4·10 → 3): T 40 + 1.
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.LayerNorm(10), nn.Flatten(), nn.Linear(40, 3))
    fams = detect(model, torch.randn(3, 2, 12))
    assert counts(fams) == {"translation": (2, 41)}


def test_groupnorm_and_quadratic_and_leaky() -> None:
    # conv(1→8, 3×3) → GroupNorm(2 groups of 4 channels) → LeakyReLU → flatten → fc1(8·4·4 → 12)
    # → Square → fc2(12 → 3).
    # S: 2 groups (view conv weight (2, 36), bias (2, 4)). R: GN affine (8 channels) vs fc1
    # columns viewed (12, 8, 16). Quadratic R: fc1 rows vs fc2 columns: 12. T: fc2 12 + 1.
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Linear(128, 12), Square(), nn.Linear(12, 3),
    )  # fmt: skip
    x, y = digits(n=6, size=6, classes=3)
    fams = detect(model, x, confirm_batch=(x, y))
    assert counts(fams) == {
        "translation": (2, 13), "scale": (1, 2), "rescale": (1, 8), "quadratic_rescale": (1, 12)
    }  # fmt: skip
    scale = next(f for f in fams if f.symmetry == "scale")
    assert scale.blocks == {
        "theta": [BlockSlice("0.weight", 0, (2, 36)), BlockSlice("0.bias", 0, (2, 4))]
    }
    rescale = next(f for f in fams if f.symmetry == "rescale")
    assert rescale.blocks["theta_2"] == [BlockSlice("4.weight", 1, (12, 8, 16))]
    assert all(f.confirmed for f in fams), format_table(fams)


class Functional(nn.Module):
    """conv → F.relu → F.max_pool2d → x.view(x.size(0), -1) → fc1 → x*x → fc2 → log_softmax."""

    def __init__(self, quadratic: str = "mul") -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 3, 3), nn.Linear(12, 5), nn.Linear(5, 4)
        self.quadratic = quadratic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        h = self.fc1(x.view(x.size(0), -1))
        h = h * h if self.quadratic == "mul" else h**2
        return F.log_softmax(self.fc2(h), dim=-1)


@pytest.mark.parametrize("quadratic", ["mul", "pow"])
def test_functional_ops(quadratic: str) -> None:
    # 6×6 → conv 3×3 → 4×4 → pool → 2×2: R conv (3 channels) vs fc1 columns viewed (5, 3, 4);
    # quadratic R fc1 (5) vs fc2; T through log_softmax: fc2 columns 5 + bias 1.
    model = Functional(quadratic)
    x, y = digits(n=5, size=6, classes=4)
    fams = detect(model, x, loss_fn=F.nll_loss, confirm_batch=(x, y))
    assert counts(fams) == {"translation": (2, 6), "rescale": (1, 3), "quadratic_rescale": (1, 5)}
    assert all(f.confirmed for f in fams), format_table(fams)


# ----------------------------------------------------------------------------- clear messages


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_with_message() -> None:
    # body: Linear(16→8) → ReLU → Linear(8→6) → ReLU → Linear(6→3): R 8 + 6, T 6 + 1.
    x, y = digits(n=5, size=4, classes=3)
    with pytest.warns(SymmetryWarning, match="symbolic_trace failed.*fell back"):
        fams = detect(Untraceable(), x, confirm_batch=(x, y))
    assert fams.path == "modules"
    assert counts(fams) == {"translation": (2, 7), "rescale": (2, 14)}
    assert all(f.confirmed for f in fams)
    assert "fell back" in format_table(fams)


class HiddenResidual(nn.Module):
    """Untraceable, with a functional residual add the module-call path cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(6, 5), nn.ReLU()
        self.fc2, self.fc3 = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        h = self.act(self.fc1(x))
        return self.fc3(self.fc2(h) + h)


def test_fallback_false_group_is_caught_by_confirmation() -> None:
    # The module-call path sees fc1 → act → fc2 (5 units) but not "+ h": confirmation must
    # reject it. T on fc3 (5 + 1) holds.
    x, y = torch.randn(7, 6, generator=torch.Generator().manual_seed(0)), torch.arange(7) % 3
    with pytest.warns(SymmetryWarning, match="cannot see functional operations"):
        fams = detect(HiddenResidual(), x, confirm_batch=(x, y), n_trials=5)
    verdict = {f.layer: f.confirmed for f in fams}
    assert verdict == {
        "fc3 (output layer) weight columns": True,
        "fc3 (output layer) bias": True,
        "fc1 → act → fc2": False,
    }


def test_bad_example_input_warns_instead_of_raising() -> None:
    with pytest.warns(SymmetryWarning, match="could not be run on example_input"):
        assert detect(mlp(8, (4,), 3), torch.randn(2, 5)) == []


def test_model_without_symmetry() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())  # output is tanh, not a Linear
    with pytest.warns(SymmetryWarning, match="no symmetry found"):
        fams = detect(model, torch.randn(2, 4))
    assert fams == []
    assert "0 families" in format_table(fams)


def test_shared_layer_is_not_a_group() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.fc(x)))

    with pytest.warns(SymmetryWarning, match="no symmetry found"):
        assert detect(Twice(), torch.randn(2, 4)) == []


def test_batchnorm_without_affine() -> None:
    # conv(1→4) → BN(affine=False) → ReLU → flatten → fc(64 → 3): S 4 (the conv is still
    # normalised), no R (BN has no per-channel parameters), T 64 + 1 and the conv's bias per
    # channel (the batch mean removes it, affine or not): 3 families / 69 groups.
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 3),
    )  # fmt: skip
    x, y = digits(n=4, size=6, classes=3)
    with pytest.warns(SymmetryWarning, match=r"no rescale family across 1 → 2 → 4.*affine=False"):
        fams = detect(model, x, confirm_batch=(x, y))
    assert counts(fams) == {"translation": (3, 69), "scale": (1, 4)}
    assert all(f.confirmed for f in fams)


def test_eval_mode_is_handled_and_restored() -> None:
    model = vgg("vgg-tiny", batch_norm=True).eval()
    x, y = digits(n=6)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(SymmetryWarning, match="eval mode; confirming with training-mode"):
        fams = detect(model, x, confirm_batch=(x, y))
    assert all(f.confirmed for f in fams)
    assert not any(m.training for m in model.modules())
    # Running statistics under eval mode: scale symmetry fails, and the reason says why; so
    # does the translation of a conv bias before BN (no batch mean subtracts the shift).
    confirm(model, fams, (x, y), mode="as_is")
    for f in fams:
        assert f.confirmed is (f.symmetry != "scale" and "(batch mean)" not in f.layer), f
    bad = next(f for f in fams if f.symmetry == "scale")
    assert "running statistics" in bad.reason
    shift = next(f for f in fams if "(batch mean)" in f.layer)
    assert shift.reason.endswith("running statistics and the shift a batch mean removes does not "
                                 "hold (confirm in train mode)")  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was changed


def test_confirm_rejects_a_false_family() -> None:
    model = mlp(16, (8,), 3)
    x, y = torch.randn(6, 16), torch.randint(0, 3, (6,))
    wrong = Family("scale", "fc1 (no norm after it)", {"theta": [BlockSlice("fc1.weight", 0)]}, 8)
    confirm(model, [wrong], (x, y))
    assert wrong.confirmed is False
    assert "loss changed by" in wrong.reason
    with pytest.raises(ValueError, match="mode must be 'train' or 'as_is'"):
        confirm(model, [wrong], (x, y), mode="eval")


def test_format_table() -> None:
    fams = detect(mlp(8, (4,), 3), torch.randn(2, 8))
    table = format_table(fams)
    header = [c.strip() for c in table.splitlines()[0].split(" | ")]
    assert header == ["layer", "symmetry", "groups", "confirmed"]
    rows = [[c.strip() for c in line.split(" | ")] for line in table.splitlines()[2:-1]]
    assert ["fc1 → relu1 → fc2", "rescale", "4", "-"] in rows
    assert table.splitlines()[-1] == "3 families, 9 groups"


class _Clamped(nn.Module):
    def __init__(self, high: float | None, functional: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.high, self.functional = high, functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = torch.clamp(h, 0.0, self.high) if self.functional else h.clamp(min=0, max=self.high)
        return self.b(h)


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("high", [None, 6.0])
def test_clamp_at_zero_is_a_relu_and_an_upper_bound_is_not(high, functional):
    torch.manual_seed(0)
    model = _Clamped(high, functional).double()
    x = 3 * torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    found = {f.symmetry for f in detect(model, (x, y))}
    # by hand: scale unit j's incoming row by 2 and its outgoing column by 1/2
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.a.weight[:] *= 2
        moved.a.bias[:] *= 2
        moved.b.weight[:] /= 2
    same = torch.allclose(model(x), moved(x), rtol=1e-12, atol=1e-12)
    assert same == (high is None)
    assert ("rescale" in found) == same
