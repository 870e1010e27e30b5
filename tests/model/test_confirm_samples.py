"""Confirmation on the first samples of a batch (symmech/model/evaluator.py, confirm.py).

* ``first_samples`` cuts every batch-first input and the labels, and nothing else;
* confirmation's every forward pass sees 8 samples of a 32-sample batch, and the verdicts are
  those of the whole batch: every family of a VGG with BatchNorm confirmed, a false family
  refused;
* inputs that are not batch-first cannot be cut: the whole batch is evaluated instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.zoo import mlp, vgg
from torch import nn

from symmech.model.actions import BlockSlice, Family
from symmech.model.confirm import confirm
from symmech.model.detect import detect
from symmech.model.evaluator import CONFIRM_SAMPLES, first_samples


def test_first_samples_cuts_batch_first_inputs_only() -> None:
    ids, mask, y = torch.arange(32 * 5).reshape(32, 5), torch.ones(1, 5), torch.arange(32)
    xs, ys = first_samples(((ids, mask, True), y), 8)
    assert isinstance(xs, tuple) and len(xs) == 3
    assert torch.equal(xs[0], ids[:8]) and xs[1] is mask and xs[2] is True
    assert torch.equal(ys, y[:8])
    as_list, _ = first_samples(([ids], y), 3)
    assert isinstance(as_list, list) and torch.equal(as_list[0], ids[:3])
    for keep in (None, 32, 100):  # nothing to cut: the batch itself
        batch = (ids, y)
        assert first_samples(batch, keep) is batch
    with pytest.raises(ValueError, match=r"first_samples\(samples=0\): keep at least one"):
        first_samples((ids, y), 0)


def _sizes_seen(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle


def _vgg_batch(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = vgg("vgg-tiny", batch_norm=True)
    return model, torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


def test_confirmation_runs_on_the_first_samples_with_the_whole_batch_verdicts() -> None:
    assert CONFIRM_SAMPLES == 8
    model, x, y = _vgg_batch(32)
    verdicts = {}
    for samples in (CONFIRM_SAMPLES, None):
        found = detect(model, x[:2])
        seen, handle = _sizes_seen(model)
        confirm(model, found, (x, y), samples=samples)
        handle.remove()
        assert seen and set(seen) == {32 if samples is None else 8}, seen
        verdicts[samples] = [(f.symmetry, f.layer, f.confirmed) for f in found]
    assert verdicts[8] == verdicts[None]
    assert all(ok for _, _, ok in verdicts[8]) and len(verdicts[8]) >= 8
    # detect passes it on
    seen, handle = _sizes_seen(model)
    found = detect(model, x[:2], confirm_batch=(x, y), confirm_samples=4)
    handle.remove()
    assert 4 in seen and 32 not in seen and all(f.confirmed for f in found)


def test_a_false_family_is_refused_on_the_first_samples() -> None:
    torch.manual_seed(0)
    model = mlp(16, (8,), 3)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    wrong = Family("scale", "fc1 (no norm after it)", {"theta": [BlockSlice("fc1.weight", 0)]}, 8)
    seen, handle = _sizes_seen(model)
    confirm(model, [wrong], (x, y))
    handle.remove()
    assert set(seen) == {8}
    assert wrong.confirmed is False and "loss changed by" in wrong.reason


class _SequenceFirst(nn.Module):
    """Tokens (T, B, E), as ``nn.MultiheadAttention`` without ``batch_first``: the mean over
    tokens, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x.mean(0))))


def test_inputs_that_are_not_batch_first_are_confirmed_on_the_whole_batch() -> None:
    torch.manual_seed(0)
    model = _SequenceFirst()
    x, y = torch.randn(5, 16, 6), torch.randint(0, 3, (16,))  # y is cut, x (T first) is not
    found = detect(model, x)
    assert {f.symmetry for f in found} >= {"rescale", "translation"}
    labels: list[int] = []

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels.append(target.shape[0])
        return F.cross_entropy(out, target)  # 16 outputs against 8 labels: raises

    confirm(model, found, (x, y), loss_fn)
    assert labels[0] == 8 and labels[-1] == 16  # tried cut, then the whole batch decided
    assert all(f.confirmed for f in found), [(f.layer, f.reason) for f in found]
