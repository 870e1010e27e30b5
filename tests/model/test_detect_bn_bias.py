"""A conv / Linear bias read only by a BatchNorm is a per-channel translation: the batch mean
removes b_c ↦ b_c + α exactly (training mode), so ∂L/∂b_c is zero up to round-off.

Counts by hand: conv(1→6, bias) → BN(6) → ReLU → conv(6→5, bias) → BN(5) → ReLU → flatten →
fc(5·16 → 4): T 2 × (per-channel bias) 6 + 5 = 11 groups, plus fc's columns 80 and bias 1;
S 6 + 5; R bn1 → relu → conv2: 6 and bn2 → relu → flatten → fc: 5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.counting import counts
from torch import nn

import symmech
from symmech.model.actions import BlockSlice
from symmech.model.detect import detect, format_table

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 16, 4),
    ).double()  # fmt: skip


def data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 4, (n,), generator=g)


def loss_with_bias_shift(model: nn.Module, batch, layer: int, shift: torch.Tensor) -> float:
    with torch.no_grad():
        saved = model[layer].bias.clone()
        model[layer].bias.add_(shift)
        try:
            return float(F.cross_entropy(model(batch[0]), batch[1]))
        finally:
            model[layer].bias.copy_(saved)


def test_conv_bias_before_batchnorm_counts_slices_and_by_hand_move() -> None:
    model, batch = net(), data()
    fams = detect(model, batch[0], confirm_batch=batch)
    assert counts(fams) == {"translation": (4, 11 + 81), "scale": (2, 11), "rescale": (2, 11)}, (
        format_table(fams)
    )
    assert all(f.confirmed for f in fams), format_table(fams)
    shift = next(f for f in fams if f.layer.startswith("3.bias"))
    assert shift.blocks == {"theta": [BlockSlice("3.bias", 0)]} and shift.n_groups == 5
    # by hand, training mode (batch statistics): any shift per channel leaves the loss unchanged
    base = float(F.cross_entropy(model(batch[0]), batch[1]))
    step = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)
    assert abs(loss_with_bias_shift(model, batch, 3, step) - base) <= 1e-12 * base
    # running statistics (eval mode): the same shift moves the loss; the symmetry is training's
    model.eval()
    base_eval = float(F.cross_entropy(model(batch[0]), batch[1]))
    assert abs(loss_with_bias_shift(model, batch, 3, step) - base_eval) > 1e-6


def test_linear_bias_before_batchnorm1d() -> None:
    torch.manual_seed(0)
    # fc1(6→7) → BN1d(7) → ReLU → fc2(7→3): T 7 (fc1's bias) + fc2's 7 columns + 1 bias
    model = nn.Sequential(nn.Linear(6, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    fams = detect(model, x, confirm_batch=(x, y))
    assert counts(fams) == {"translation": (3, 15), "scale": (1, 7), "rescale": (1, 7)}
    assert all(f.confirmed for f in fams), format_table(fams)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
], ids=["sgd", "adamw"])  # fmt: skip
def test_tracked_exactly_and_training_bit_identical(make) -> None:
    batch = data(16)
    model, ref = net(), net()
    opt, ref_opt = make(model.parameters()), make(ref.parameters())
    tracker = symmech.track(model, opt, example_input=batch)
    for _ in range(40):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(batch[0]), batch[1]).backward()
            o.step()
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    rows = [r for r in tracker.records() if "(batch mean)" in r["layer"]]
    assert {r["layer"] for r in rows} == {"0.bias → 1 (batch mean)", "3.bias → 4 (batch mean)"}
    top: dict[tuple[str, int], float] = {}
    for r in rows:
        key = (r["layer"], r["group"])
        top[key] = max(top.get(key, 0.0), abs(r["observed"]))
    # observed Q_c = b_c against the law, relative to the group's largest |Q|
    worst = max(abs(r["discrete"] - r["observed"]) / top[(r["layer"], r["group"])] for r in rows)
    assert worst <= 1e-9
