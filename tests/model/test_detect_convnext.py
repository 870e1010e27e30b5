"""ConvNeXt blocks (torchvision's structure, rebuilt in tests/support/blocks.py): the depthwise
conv → Permute → LayerNorm scale, and the pwconv2 ↔ layer-scale rescale.

Counts by hand for B blocks of width C and a head Linear(C → K):
* scale: per block the depthwise conv's weight and bias × one α (the LayerNorm over the channels
  of each position removes a common factor, up to its eps): B families of 1 group;
* norm_rescale: per block the LayerNorm's affine against pwconv1's input columns: B / B·C;
* rescale: per block pwconv2's row c and bias c × α_c against γ_c × 1/α_c (layer scale): B / B·C;
  pwconv1 → GELU → pwconv2 has none (GELU is not positively homogeneous; a note per block);
* translation: the head's weight columns (C) and bias (1): 2 / C + 1.
Residual streams are another rule's (tests/model/test_streams.py) and are left out here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.blocks import LayerNorm2d, TinyConvNeXt
from support.counting import counts
from torch import nn

from symmech.model.actions import BlockSlice
from symmech.model.detect import detect, format_table
from symmech.model.graph import export_graph
from symmech.model.rules import families

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # detection notes

C, B, K = 8, 2, 10


EXPECTED = {"scale": (B, B), "norm_rescale": (B, B * C), "rescale": (B, B * C),
            "translation": (2, C + 1)}  # fmt: skip


def images(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, K, (n,), generator=g)


def model(gamma_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = TinyConvNeXt(C, B, K, gamma_last=gamma_last).double()
    with torch.no_grad():  # γ and biases away from their initial constants
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def loss_after(net: nn.Module, batch, scale: dict[str, torch.Tensor]) -> float:
    """The loss of a copy whose named parameters are multiplied by the given tensors."""
    moved = copy.deepcopy(net)
    params = dict(moved.named_parameters())
    with torch.no_grad():
        for name, factor in scale.items():
            params[name].mul_(factor)
        return float(F.cross_entropy(moved(batch[0]), batch[1]))


@pytest.mark.parametrize("gamma_last", [False, True])
def test_convnext_counts_slices_and_confirmation(gamma_last: bool) -> None:
    net, batch = model(gamma_last), images()
    fams = detect(net, batch[0], confirm_batch=batch)
    assert fams.path == "fx"
    assert counts(fams) == EXPECTED, format_table(fams)
    assert all(f.confirmed for f in fams), format_table(fams)
    assert sum("GELU is not positively homogeneous" in n for n in fams.notes) == B
    scale = next(f for f in fams if f.symmetry == "scale" and f.layer.startswith("blocks.1"))
    assert scale.blocks == {"theta": [BlockSlice("blocks.1.block.0.weight", None),
                                      BlockSlice("blocks.1.block.0.bias", None)]}  # fmt: skip
    assert "eps=1e-06" in scale.reason  # approximate, and says by how much
    ls = next(f for f in fams if f.symmetry == "rescale" and f.layer.startswith("blocks.0"))
    assert ls.blocks == {
        "theta_1": [BlockSlice("blocks.0.block.5.weight", 0), BlockSlice("blocks.0.block.5.bias", 0)],
        "theta_2": [BlockSlice("blocks.0.layer_scale", 0)],
    }  # fmt: skip


def test_convnext_through_torch_export_keeps_the_permute() -> None:
    # torch.export collapses leaf modules; a module that only permutes stays its permute
    net, batch = model(), images()
    ops, trace = export_graph(net, batch[0])
    assert counts(families(ops, [], trace)) == EXPECTED


def test_convnext_moves_by_hand() -> None:
    net, batch = model(), images()
    base = float(F.cross_entropy(net(batch[0]), batch[1]))
    g = torch.Generator().manual_seed(1)
    a = 0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64)
    # layer scale: pwconv2 row c and bias c × a_c, γ_c × 1/a_c: exact
    move = {"blocks.0.block.5.weight": a, "blocks.0.block.5.bias": a.reshape(-1),
            "blocks.0.layer_scale": 1 / a.reshape(C, 1, 1)}  # fmt: skip
    assert abs(loss_after(net, batch, move) - base) <= 1e-12 * base
    # γ alone is no symmetry
    assert (
        abs(loss_after(net, batch, {"blocks.0.layer_scale": 1 / a.reshape(C, 1, 1)}) - base) > 1e-6
    )
    # the depthwise conv × 1.7: exact when the LayerNorm's eps is 0, a small change with its eps
    alpha = torch.tensor(1.7, dtype=torch.float64)
    dw = {"blocks.1.block.0.weight": alpha, "blocks.1.block.0.bias": alpha}
    with_eps = abs(loss_after(net, batch, dw) - base)
    assert 0 < with_eps < 1e-5 * base
    no_eps = copy.deepcopy(net)
    no_eps.blocks[1].block[2].eps = 0.0
    base0 = float(F.cross_entropy(no_eps(batch[0]), batch[1]))
    assert abs(loss_after(no_eps, batch, dw) - base0) <= 1e-12 * base0
    # per-channel factors on the depthwise conv are no symmetry: the LayerNorm mixes channels
    assert abs(loss_after(net, batch, {"blocks.1.block.0.bias": a.reshape(-1)}) - base) > 1e-6


def test_layer_scale_with_a_second_reader_is_not_claimed() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
            self.gamma = nn.Parameter(torch.full((6,), 0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.head(torch.relu(self.gamma * h) + h)  # h also read without γ

    net = Fork().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert "rescale" not in counts(detect(net, x))


def test_permute_with_dims_computed_at_run_time_is_not_followed() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.ln, self.fc = nn.Conv2d(1, 4, 3), nn.LayerNorm(4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x).permute(0, x.dim() - 2, x.dim() - 1, 1)  # dims are fx nodes
            return self.fc(self.ln(h)).mean((1, 2))

    fams = detect(Dynamic(), torch.randn(2, 1, 6, 6))
    assert counts(fams) == {"norm_rescale": (1, 4)}  # ln → fc; no scale through the permute


def test_layernorm2d_traced_into_rescales_against_the_downsampling_conv() -> None:
    # torchvision's LayerNorm2d calls F.layer_norm between two permutes (fx traces into it):
    # its affine γ_c, β_c against the input channel c of the 2×2 conv that downsamples after it
    # (ConvNeXt's stage transition) is a norm_rescale of 8 groups, found through the permute back
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 2, 2), LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2),
                        nn.Flatten(), nn.Linear(64, 10)).double()  # fmt: skip
    x, y = images()
    fams = detect(net, x, confirm_batch=(x, y))
    (norm,) = [f for f in fams if f.symmetry == "norm_rescale"]
    assert (norm.layer, norm.n_groups) == ("1 → 2", 8)
    assert norm.blocks == {"theta_1": [BlockSlice("1.weight", 0), BlockSlice("1.bias", 0)],
                           "theta_2": [BlockSlice("2.weight", 1)]}  # fmt: skip
    assert norm.confirmed, format_table(fams)
    d = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    base = float(F.cross_entropy(net(x), y))
    moved = loss_after(
        net, (x, y), {"1.weight": d, "1.bias": d, "2.weight": 1 / d.reshape(1, 8, 1, 1)}
    )
    assert abs(moved - base) <= 1e-12 * base
