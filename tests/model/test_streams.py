"""Residual streams (``stream_rescale``): detection on ResNet (basic and bottleneck blocks),
MobileNetV2's linear bottlenecks and residual MLPs, each checked against writers and readers named
here by hand; a by-hand move of every stream (per-channel α on the writers' output channels, 1/α on
the readers' input channels, written out per layer type) leaves the float64 output unchanged, and
leaving one reader out changes it; streams that a normalisation reads, or that a concatenation
joins, give no family and a note that names the operation; confirmation refuses a stream with a
reader missing; tracked, the exact law holds under SGD and AdamW and the charge matches
½(Σ‖writer rows‖² − Σ‖reader columns‖²) computed from the weights."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from unittest import mock

import pytest
import torch
from support.blocks import TinyConvNeXt, TinyLlama, TinySwin, TinyViT, bottleneck_resnet
from support.sgd import digits_batches
from support.zoo import resnet18, transformer_block
from torch import nn

import symmech
from symmech.model import streams as stream_rule
from symmech.model.actions import Family
from symmech.model.confirm import confirm
from symmech.model.detect import detect
from symmech.runtime.attach import bindings_from_families

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits as (n, 1, 8, 8) float64 images, and their labels."""
    ((x, y),) = digits_batches(1, n)
    return x.reshape(n, 1, 8, 8), y


def _train(model: nn.Module, opt: torch.optim.Optimizer, batch, steps: int) -> None:
    """``steps`` full-batch steps of cross-entropy."""
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()


def _streams(fams) -> list[Family]:
    return [f for f in fams if f.symmetry == "stream_rescale"]


def _modules(fam: Family, block: str) -> list[str]:
    """The layers of one block of the family, sorted by name."""
    return sorted({p.param.rsplit(".", 1)[0] for p in fam.blocks[block]})


def _move_by_hand(model: nn.Module, writers, readers, alpha: torch.Tensor) -> None:
    """Scale output channel c of each writer by α_c, input channel c of each reader by 1/α_c."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in writers:
            m = mods[name]
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.mul_(alpha)
                m.bias.mul_(alpha)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(alpha.reshape(-1, *([1] * (m.weight.ndim - 1))))
                if m.bias is not None:
                    m.bias.mul_(alpha)
            else:
                raise AssertionError(name)
        for name in readers:
            m = mods[name]
            if isinstance(m, nn.Conv2d) and m.groups > 1:  # depthwise: filter c reads channel c
                m.weight.div_(alpha.reshape(-1, 1, 1, 1))
            elif isinstance(m, nn.Conv2d):
                m.weight.div_(alpha.reshape(1, -1, 1, 1))
            else:
                m.weight.div_(alpha.reshape(1, -1))


def _check_by_hand(model: nn.Module, x: torch.Tensor, writers, readers) -> None:
    """The hand move keeps the float64 output; without the last reader it does not."""
    model = model.double().train()
    torch.manual_seed(0)
    with torch.no_grad():
        base = model(x)
    c = dict(model.named_modules())[writers[0]].weight.shape[0]  # the stream's channels
    alpha = torch.exp(torch.empty(c, dtype=torch.float64).uniform_(-0.7, 0.7))
    moved = copy.deepcopy(model)
    _move_by_hand(moved, writers, readers, alpha)
    with torch.no_grad():
        assert torch.allclose(moved(x), base, rtol=1e-11, atol=1e-11 * float(base.abs().max()))
    partial = copy.deepcopy(model)
    _move_by_hand(partial, writers, readers[:-1], alpha)
    with torch.no_grad():
        assert float((partial(x) - base).abs().max()) > 1e-4 * float(base.abs().max())


# ----------------------------------------------------------------------------- ResNet


def test_resnet18_one_stream_per_stage_by_hand() -> None:
    # Stage k's stream: written by the stem's bn1 (stage 1) or the first block's downsample bn,
    # and by every block's bn2; read by every block's conv1 in the stage and by the next stage's
    # first conv1 and downsample conv (the fc after the last stage, through avgpool + flatten).
    model = resnet18(num_classes=10, in_channels=1, base_width=4)
    x = _images(8)[0].float()
    fams = _streams(detect(model, x))
    assert [f.n_groups for f in fams] == [4, 8, 16, 32]
    expected = []
    for stage in range(1, 5):
        s, nxt = f"layer{stage}", f"layer{stage + 1}"
        first_writer = ["bn1"] if stage == 1 else [f"{s}.0.downsample.bn"]
        writers = sorted(first_writer + [f"{s}.0.bn2", f"{s}.1.bn2"])
        readers = [f"{s}.1.conv1"] + (
            [f"{nxt}.0.conv1", f"{nxt}.0.downsample.conv"] if stage < 4 else ["fc"]
        )
        if stage == 1:
            readers = ["layer1.0.conv1"] + readers
        expected.append((writers, sorted(readers)))
    found = [(_modules(f, "theta_1"), _modules(f, "theta_2")) for f in fams]
    assert found == expected
    for fam, (writers, readers) in zip(fams, expected, strict=True):
        # every BN writer contributes its weight and its bias, every reader its weight only
        assert len(fam.blocks["theta_1"]) == 2 * len(writers)
        assert len(fam.blocks["theta_2"]) == len(readers)
        _check_by_hand(copy.deepcopy(model), x.double(), writers, readers)


def test_bottleneck_resnet_streams_by_hand() -> None:
    # The stem (conv1 → bn1 → relu → maxpool) feeds layer1.0's conv1 and its downsample, not an
    # add: bn1 → relu → maxpool → {conv1, downsample conv} is no stream (no add) but a branching
    # chain. Stage 1's stream (16 channels) is written by layer1.0's bn3 and downsample bn and by
    # layer1.1.bn3, read by layer1.1.conv1 and layer2.0's conv1 and downsample conv; stage 2's
    # (32) by layer2.0.bn3, its downsample bn, layer2.1.bn3, read by layer2.1.conv1 and the fc.
    model = bottleneck_resnet()
    x = _images(8)[0].float()
    fams = _streams(detect(model, x))
    expected = [
        (["layer1.0.bn3", "layer1.0.downsample.1", "layer1.1.bn3"],
         ["layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]),
        (["layer2.0.bn3", "layer2.0.downsample.1", "layer2.1.bn3"], ["fc", "layer2.1.conv1"]),
    ]  # fmt: skip
    assert [f.n_groups for f in fams] == [16, 32]
    assert [(_modules(f, "theta_1"), _modules(f, "theta_2")) for f in fams] == expected
    for writers, readers in expected:
        _check_by_hand(copy.deepcopy(model), x.double(), writers, readers)


# ----------------------------------------------------------------------------- MobileNetV2


def _conv_bn_relu6(c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True),
    )  # fmt: skip


class _InvertedResidual(nn.Module):
    """torchvision's InvertedResidual: [expand 1×1] → depthwise 3×3 → linear 1×1 projection + BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = c_in * t
        layers = [_conv_bn_relu6(c_in, hidden)] if t != 1 else []
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _mobilenet_v2() -> nn.Module:
    blocks = [_InvertedResidual(8, 6, 1, 1), _InvertedResidual(6, 12, 2, 2),
              _InvertedResidual(12, 12, 1, 2), _InvertedResidual(12, 12, 1, 2),
              _InvertedResidual(12, 16, 2, 2), _InvertedResidual(16, 16, 1, 2)]  # fmt: skip
    features = nn.Sequential(_conv_bn_relu6(1, 8, 3), *blocks, _conv_bn_relu6(16, 32))
    return nn.Sequential(OrderedDict(
        features=features, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        classifier=nn.Sequential(nn.Dropout(0.0), nn.Linear(32, 10)),
    ))  # fmt: skip


def test_mobilenet_v2_linear_bottleneck_streams_by_hand() -> None:
    # Blocks 2–3 (12 channels) and 5 (16) add their input: the streams are written by the
    # projection BNs of blocks 1–3 (resp. 4–5) and read by the expand convs of blocks 2–4 (resp.
    # block 5's expand conv and the last 1×1 conv). Block 0's projection BN (no add) feeds block
    # 1's expand conv alone: that is norm_rescale, not a stream.
    model = _mobilenet_v2()
    x = _images(8)[0].float()
    found = detect(model, x)
    fams = _streams(found)
    f = "features"
    expected = [
        ([f"{f}.2.conv.3", f"{f}.3.conv.3", f"{f}.4.conv.3"],
         [f"{f}.3.conv.0.0", f"{f}.4.conv.0.0", f"{f}.5.conv.0.0"]),
        ([f"{f}.5.conv.3", f"{f}.6.conv.3"], [f"{f}.6.conv.0.0", f"{f}.7.0"]),
    ]  # fmt: skip
    assert [(_modules(s, "theta_1"), _modules(s, "theta_2")) for s in fams] == expected
    assert [s.n_groups for s in fams] == [12, 16]
    norm = [s.layer for s in found if s.symmetry == "norm_rescale"]
    assert norm == [f"{f}.1.conv.2 → {f}.2.conv.0.0"]
    for writers, readers in expected:
        _check_by_hand(copy.deepcopy(model), x.double(), writers, readers)


class _DepthwiseReader(nn.Module):
    """A stream read by a depthwise conv: its filter c (not a column) reads channel c."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.branch, self.bn_b = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.bn_b(self.branch(h))
        return self.head(torch.tanh(self.dw(h)).flatten(1))


def test_depthwise_conv_reads_a_stream_through_its_filters() -> None:
    model = _DepthwiseReader()
    x = _images(8)[0].float()
    (fam,) = _streams(detect(model, x))
    assert (_modules(fam, "theta_1"), _modules(fam, "theta_2")) == (
        ["bn", "bn_b"],
        ["branch", "dw"],
    )
    assert [(p.param, p.dim) for p in fam.blocks["theta_2"]] == [("branch.weight", 1),
                                                                 ("dw.weight", 0)]  # fmt: skip
    _check_by_hand(copy.deepcopy(model), x.double(), ["bn", "bn_b"], ["dw", "branch"])


# ----------------------------------------------------------------------------- residual MLP


class _ResidualMLP(nn.Module):
    """Tokens → Linear → two residual ReLU blocks (no normalisation) → mean over tokens → head."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.fc3, self.fc4 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 8))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = h + self.fc4(torch.relu(self.fc3(h)))
        return self.head(h.mean(dim=1))


def test_residual_mlp_channels_last_stream_by_hand() -> None:
    model = _ResidualMLP()
    x = digits_batches(1, 8)[0][0]
    (fam,) = _streams(detect(model, x.float()))
    writers, readers = ["embed", "fc2", "fc4"], ["fc1", "fc3", "head"]
    assert (_modules(fam, "theta_1"), _modules(fam, "theta_2")) == (writers, readers)
    assert fam.n_groups == 12
    _check_by_hand(copy.deepcopy(model), x, writers, readers)


# ----------------------------------------------------------------------------- refusals


class _PreActivation(nn.Module):
    """A pre-activation block: the stream is read by a BatchNorm (``norm``), which normalises
    each channel on its own, and by the head; ``norm`` may be any normalisation."""

    def __init__(self, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if norm is None else norm
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.conv(torch.relu(self.bn(h)))
        return self.head(h.mean(dim=(2, 3)))


class _Concat(nn.Module):
    """A dense connection: the stream is concatenated with another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h + self.b(torch.relu(h))
        return self.head(torch.cat([h, h], dim=1)).flatten(1)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            _PreActivation(nn.Tanh()),
            "bn (Tanh) read the stream and are neither linear readers (conv, Linear) nor",
        ),
        (_Concat(), "cat (cat) concatenate the stream along its channels with other tensors"),
    ],
)
def test_streams_that_cannot_be_rescaled_say_why(model: nn.Module, reason: str) -> None:
    x = _images(8)[0].float()
    with pytest.warns(symmech.SymmetryWarning, match="no stream_rescale family through add"):
        found = detect(model, x)
    assert not _streams(found)
    (message,) = [n for n in found.notes if "stream_rescale" in n]
    assert reason in message


# ----------------------------------------------------------------------------- normalised streams


def _without_eps(model: nn.Module) -> nn.Module:
    """A float64 copy whose normalisations have eps = 1e-300 (BatchNorm refuses 0 in training):
    their scale invariance is then exact to round-off."""
    model = copy.deepcopy(model).double()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            m.eps = 1e-300
    return model


def _by_names(writers, readers, alpha: float):
    """A move (of a model) multiplying the named writers by α and dividing the readers by α."""

    def move(m: nn.Module) -> None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name in writers:
                    p.mul_(alpha)
                elif name in readers:
                    p.div_(alpha)

    return move


def _output_change(model: nn.Module, x: torch.Tensor, move) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        base = model(x)
        moved = copy.deepcopy(model)
        move(moved)
        return float((moved(x) - base).abs().max() / base.abs().max())


def test_stream_read_by_a_batchnorm_is_per_channel_and_approximate() -> None:
    # Pre-activation: stem and conv write the stream, the head reads it (through the mean), bn
    # normalises it per channel. Moving writers by α_c and the head's columns by 1/α_c changes
    # bn's input by α_c: exact without eps, a small change with bn's eps = 1e-5.
    model = _PreActivation()
    x, y = _images(16)
    found = detect(model, x.float())
    (fam,) = _streams(found)
    assert (_modules(fam, "theta_1"), _modules(fam, "theta_2")) == (["conv", "stem"], ["head"])
    assert (fam.n_groups, fam.absorbed_by) == (4, ("bn",))
    alpha = torch.tensor([0.6, 1.7, 1.3, 0.8], dtype=torch.float64)

    def move(m: nn.Module) -> None:
        _move_by_hand(m, ["stem", "conv"], ["head"], alpha)

    assert _output_change(_without_eps(model), x, move) < 1e-12
    assert 1e-9 < _output_change(model.double(), x, move) < 1e-3
    confirm(model.double(), found, (x, y))
    assert fam.confirmed and fam.reason.startswith("approximate: bn eps=1e-05 moves the loss by")


def test_stream_read_by_a_groupnorm_is_per_group_of_channels() -> None:
    # GroupNorm(2, 4) normalises channels {0, 1} and {2, 3} together: it undoes one α per group,
    # so the family has 2 groups, each writer's and reader's channels viewed as (2, 2)
    model = _PreActivation(nn.GroupNorm(2, 4))
    x, y = _images(16)
    found = detect(model, x.float())
    (fam,) = _streams(found)
    assert (fam.n_groups, fam.absorbed_by) == (2, ("bn",))
    alpha = torch.tensor([0.6, 0.6, 1.7, 1.7], dtype=torch.float64)  # one α per group

    def move(m: nn.Module) -> None:
        _move_by_hand(m, ["stem", "conv"], ["head"], alpha)

    def per_channel(m: nn.Module) -> None:  # not a symmetry: α differs inside a group
        _move_by_hand(m, ["stem", "conv"], ["head"], torch.tensor([0.6, 1.7, 1.3, 0.8]).double())

    assert _output_change(_without_eps(model), x, move) < 1e-12
    assert 1e-9 < _output_change(model.double(), x, move) < 1e-3
    assert _output_change(_without_eps(model), x, per_channel) > 1e-3
    confirm(model.double(), found, (x, y))
    assert fam.confirmed and fam.reason.startswith("approximate: bn eps=1e-05")


class _PostNorm(nn.Module):
    """Post-LN: ln0's affine and fc2 write a stream read by fc1 and normalised by ln1."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed, self.ln0 = nn.Linear(8, d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.ln1, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln0(self.embed(x.reshape(x.shape[0], 8, 8)))
        h = self.ln1(h + self.fc2(torch.relu(self.fc1(h))))
        return self.head(h.mean(dim=1))


def test_post_norm_stream_is_one_group_read_by_fc1_and_normalised_by_ln1() -> None:
    model = _PostNorm()
    ((x, y),) = digits_batches(1, 16)
    found = detect(model, x.float())
    (fam,) = _streams(found)
    assert fam.layer == "stream ln0, fc2 → fc1 and (normalised by ln1)"
    assert fam.n_groups == 1 and fam.absorbed_by == ("ln1",)
    assert all(p.dim is None for b in fam.blocks.values() for p in b)  # whole tensors, one α
    assert {p.param for p in fam.blocks["theta_1"]} == {"ln0.weight", "ln0.bias", "fc2.weight",
                                                        "fc2.bias"}  # fmt: skip

    def move(m: nn.Module) -> None:  # one α on the writers, 1/α on fc1's weight (not its bias)
        with torch.no_grad():
            for p in (m.ln0.weight, m.ln0.bias, m.fc2.weight, m.fc2.bias):
                p.mul_(1.6)
            m.fc1.weight.div_(1.6)

    assert _output_change(_without_eps(model), x, move) < 1e-12
    assert 1e-9 < _output_change(model.double(), x, move) < 1e-3
    confirm(model.double(), found, (x, y))
    assert fam.confirmed and fam.reason.startswith("approximate: ln1 eps=1e-05")


def test_pre_norm_transformer_stream_is_a_scale_family_of_its_writers() -> None:
    # The demo's pre-LN block: embed, pos, attn.out and fc2 write the stream, only ln1, ln2 and
    # ln_final read it: one α on all writers is a scale family (exact without eps).
    model = transformer_block(d=16, heads=4, hidden=32)
    ((x, y),) = digits_batches(1, 16)
    (fam,) = [f for f in detect(model, x.float()) if f.absorbed_by]
    assert (fam.symmetry, fam.n_groups) == ("scale", 1)
    assert fam.absorbed_by == ("ln1", "ln2", "ln_final")
    writers = {"embed.weight", "embed.bias", "pos", "attn.out.weight", "attn.out.bias",
               "fc2.weight", "fc2.bias"}  # fmt: skip
    assert {p.param for p in fam.blocks["theta"]} == writers

    move = _by_names(writers, (), 0.7)

    assert _output_change(_without_eps(model), x, move) < 1e-12
    assert 1e-9 < _output_change(model.double(), x, move) < 1e-3


def test_llama_stream_read_by_rmsnorms_is_a_scale_family() -> None:
    # Llama: embed_tokens, o_proj and down_proj write the stream; the RMSNorms (here nn.RMSNorm,
    # which computes in the input's dtype) are its only readers
    torch.manual_seed(0)
    model = TinyLlama(norm=nn.RMSNorm).double()
    ids = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    found = detect(model, ids)
    (fam,) = [f for f in found if f.absorbed_by]
    assert (fam.symmetry, fam.n_groups) == ("scale", 1)
    norms = ["layers.0.input_layernorm", "layers.0.post_attention_layernorm",
             "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm"]  # fmt: skip
    assert sorted(fam.absorbed_by) == norms
    writers = {"embed_tokens.weight"} | {
        f"layers.{i}.{w}.weight" for i in range(2) for w in ("self_attn.o_proj", "mlp.down_proj")
    }
    assert {p.param for p in fam.blocks["theta"]} == writers

    move = _by_names(writers, (), 1.8)

    exact = copy.deepcopy(model)
    for name in norms:
        exact.get_submodule(name).eps = 1e-300
        model.get_submodule(name).eps = 1e-6  # Llama's
    assert _output_change(exact, ids, move) < 1e-12
    assert 1e-12 < _output_change(model, ids, move) < 1e-3
    confirm(model, found, (ids, torch.randint(0, 20, (3, 6))))
    assert fam.confirmed and fam.reason.startswith("approximate: layers.0.input_layernorm")


def test_vit_stream_through_patches_class_token_and_position_is_a_scale_family() -> None:
    # The stream starts at the patch conv (channels on axis 1, then last after the permute),
    # the class token (concatenated along the tokens) and the position embedding; every
    # attention's out_proj and MLP output write it; ln_1, ln_2 and the final ln read it.
    torch.manual_seed(0)
    model = TinyViT().double()
    x, y = _images(16)
    found = detect(model, x)
    (fam,) = [f for f in found if f.absorbed_by]
    assert (fam.symmetry, fam.n_groups) == ("scale", 1)
    writers = {"conv_proj.weight", "conv_proj.bias", "class_token", "pos_embedding"} | {
        f"layers.{i}.{p}" for i in range(2)
        for p in ("self_attention.out_proj.weight", "self_attention.out_proj.bias",
                  "mlp.2.weight", "mlp.2.bias")
    }  # fmt: skip
    assert {p.param for p in fam.blocks["theta"]} == writers
    assert sorted(fam.absorbed_by) == ["layers.0.ln_1", "layers.0.ln_2", "layers.1.ln_1",
                                       "layers.1.ln_2", "ln"]  # fmt: skip

    move = _by_names(writers, (), 1.4)

    assert _output_change(_without_eps(model), x, move) < 1e-12
    assert 1e-9 < _output_change(model, x, move) < 1e-3
    confirm(model, found, (x, y))
    assert fam.confirmed and fam.reason.startswith("approximate:")


@pytest.mark.parametrize("gamma_last", [False, True])
def test_convnext_stream_through_permutes_and_layer_scale(gamma_last: bool) -> None:
    # ConvNeXt: the stem's LayerNorm2d (fx traces into it: permute → F.layer_norm → permute)
    # and each block's layer scale γ (after the permute back, or before it) write the stream;
    # each block's depthwise conv reads it through its filters; the head's LayerNorm2d
    # normalises it over the channels: one α for all channels, 1/α on the depthwise filters.
    torch.manual_seed(0)
    model = TinyConvNeXt(gamma_last=gamma_last).double()
    x, y = _images(16)
    found = detect(model, x)
    (fam,) = _streams(found)
    assert fam.n_groups == 1 and fam.absorbed_by == ("head.0",)
    writers = {"stem.1.weight", "stem.1.bias", "blocks.0.layer_scale", "blocks.1.layer_scale"}
    readers = {"blocks.0.block.0.weight", "blocks.1.block.0.weight"}
    assert {p.param for p in fam.blocks["theta_1"]} == writers
    assert {p.param for p in fam.blocks["theta_2"]} == readers

    move = _by_names(writers, readers, 0.6)

    assert _output_change(_without_eps(model), x, move) < 1e-12  # LayerNorm2d is a LayerNorm
    assert 1e-12 < _output_change(model, x, move) < 1e-3
    confirm(model, found, (x, y))
    assert fam.confirmed and fam.reason.startswith("approximate: head.0 eps=1e-06")


def test_swin_streams_through_shifted_windows_and_patch_merging() -> None:
    # Stage 1's stream: the stem's LayerNorm (after conv → Permute), each block's attention proj
    # (F.linear, after windows back and the reverse roll) and MLP output write it; norm1, norm2
    # and patch merging's LayerNorm(4d), through the concatenation of four strided picks, read
    # it. Stage 2's: the merging's reduction, then the same; the final norm reads it.
    torch.manual_seed(0)
    model = TinySwin().double()
    x, y = _images(16)
    found = detect(model, x)
    fams = [f for f in found if f.absorbed_by]
    assert [(f.symmetry, f.n_groups) for f in fams] == [("scale", 1), ("scale", 1)]
    # the windowed attention projects with F.linear of the qkv and proj parameters: its heads
    # are read as from Linear modules (2 heads of r = 4 in stage 1, of 8 in stage 3)
    attention = {(f.symmetry, f.layer) for f in found if f.symmetry.startswith("attention")}
    assert attention == {(kind, f"features.{s}.{b}.attn{'.qkv' if kind.endswith('qk') else ''}")
                         for s in (1, 3) for b in (0, 1)
                         for kind in ("attention_qk", "attention_vo")}  # fmt: skip
    assert not any("attention core" in n for n in found.notes)

    def blocks(stage: int) -> set[str]:
        return {f"features.{stage}.{b}.{w}.{p}" for b in (0, 1) for w in ("attn.proj", "mlp.2")
                for p in ("weight", "bias")}  # fmt: skip

    writers = [{"features.0.2.weight", "features.0.2.bias"} | blocks(1),
               {"features.2.reduction.weight"} | blocks(3)]  # fmt: skip
    norms = [[f"features.1.{b}.norm{k}" for b in (0, 1) for k in (1, 2)] + ["features.2.norm"],
             [f"features.3.{b}.norm{k}" for b in (0, 1) for k in (1, 2)] + ["norm"]]  # fmt: skip
    for fam, mine, absorbing in zip(fams, writers, norms, strict=True):
        assert {p.param for p in fam.blocks["theta"]} == mine
        assert sorted(fam.absorbed_by) == sorted(absorbing)
        move = _by_names(mine, (), 1.5)
        assert _output_change(_without_eps(model), x, move) < 1e-12
        assert 1e-9 < _output_change(model, x, move) < 1e-3
    confirm(model, found, (x, y))
    assert all(f.confirmed and f.reason.startswith("approximate:") for f in fams)
    assert all(f.confirmed for f in found if f.symmetry.startswith("attention"))
    # by hand, in the shifted block: head 1's q rows times A and its k rows times A⁻ᵀ leave
    # every score, and so the output, unchanged; its v rows times B and proj columns times B⁻¹ too
    gen = torch.Generator().manual_seed(5)
    r, d = 4, 8  # 2 heads of 4 in stage 1: head 1 is rows r to 2r of q, k and v
    a = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(
        r, r, generator=gen, dtype=torch.float64
    )
    b = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(
        r, r, generator=gen, dtype=torch.float64
    )

    def heads(m: nn.Module, parts: str = "qkvo") -> None:
        qkv = m.get_submodule("features.1.1.attn.qkv")
        proj = m.get_submodule("features.1.1.attn.proj")
        rows = {s: slice(i * d + r, i * d + 2 * r) for i, s in enumerate("qkv")}
        mats = {"q": a.T, "k": torch.linalg.inv(a), "v": b.T}
        with torch.no_grad():
            for side in parts.replace("o", ""):
                qkv.weight[rows[side]] = mats[side] @ qkv.weight[rows[side]]
                qkv.bias[rows[side]] = mats[side] @ qkv.bias[rows[side]]
            if "o" in parts:
                proj.weight[:, r : 2 * r] = proj.weight[:, r : 2 * r] @ torch.linalg.inv(b.T)

    assert _output_change(model, x, heads) < 1e-12
    assert _output_change(model, x, lambda m: heads(m, "q")) > 1e-6  # not vacuous
    assert _output_change(model, x, lambda m: heads(m, "v")) > 1e-6
    # norm1 reaches the windowed attention's F.linear through roll, views and permutes that keep
    # the features last: norm_rescale against the qkv weight's columns (the shifted block too)
    norm = {f.layer for f in found if f.symmetry == "norm_rescale"}
    assert {f"features.{s}.{b}.norm1 → features.{s}.{b}.attn.qkv" for s in (1, 3)
            for b in (0, 1)} <= norm  # fmt: skip
    d = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    block = "features.1.1"

    def rescale(m: nn.Module) -> None:
        with torch.no_grad():
            m.get_submodule(f"{block}.norm1").weight.mul_(d)
            m.get_submodule(f"{block}.norm1").bias.mul_(d)
            m.get_submodule(f"{block}.attn.qkv").weight.div_(d)

    assert _output_change(model, x, rescale) < 1e-12


def test_confirmation_refuses_a_stream_with_a_reader_left_out() -> None:
    model = resnet18(num_classes=10, in_channels=1, base_width=4).double()
    x, y = _images(16)
    found = detect(model, x)
    streams = _streams(found)
    broken = Family("stream_rescale", "stage 2 without its last reader",
                    {"theta_1": streams[1].blocks["theta_1"],
                     "theta_2": streams[1].blocks["theta_2"][:-1]}, streams[1].n_groups)  # fmt: skip
    found[:] = streams + [broken]
    confirm(model, found, (x, y))
    assert [f.confirmed for f in found] == [True] * 4 + [False]
    assert re.match(r"loss changed by \S+ \(relative\) when group \d+ was moved", found[-1].reason)


# ----------------------------------------------------------------------------- tracking


def _charges_by_hand(model: nn.Module, fam: Family) -> torch.Tensor:
    """½(Σ‖writer output channel c‖² − Σ‖reader input channel c‖²), from the weights."""
    params = dict(model.named_parameters())
    q = torch.zeros(fam.n_groups, dtype=torch.float64)
    for block, sign in (("theta_1", 0.5), ("theta_2", -0.5)):
        for piece in fam.blocks[block]:
            w = params[piece.param].detach()
            q += sign * (w.movedim(piece.dim, 0).reshape(fam.n_groups, -1) ** 2).sum(dim=1)
    return q


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resnet_streams_tracked_exactly_200_float64_steps(optimizer: str) -> None:
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=1, base_width=4).double()
    twin = copy.deepcopy(model)
    x, y = _images(32)
    fams = _streams(detect(model, x))
    assert len(fams) == 4

    def make(m: nn.Module) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.05)

    opt = make(model)
    tracker = symmech.track(model, opt, bindings_from_families(model, fams), log_every=20)
    start = [_charges_by_hand(model, f) for f in fams]
    _train(model, opt, (x, y), 200)
    _train(twin, make(twin), (x, y), 200)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # training bit-identical
    rows = tracker.records()
    for fam, tracked, q0 in zip(fams, tracker.families, start, strict=True):
        assert tracked.status == "tracked", tracked.status
        mine = [r for r in rows if r["layer"] == fam.layer]
        scale = max(float(q0.abs().max()), max(abs(r["observed"]) for r in mine))
        assert max(abs(r["discrete"] - r["observed"]) for r in mine) <= 1e-9 * scale
        final = [r for r in mine if r["step"] == 200]
        truth = _charges_by_hand(model, fam)
        assert [r["observed"] for r in final] == pytest.approx(truth.tolist(), abs=1e-12 * scale)
        moved = float((truth - q0).abs().max())
        assert moved > 1e-3 * scale  # the charge moved: the law was not checked on a constant


def test_groupnorm_stream_tracked_with_its_measured_residual() -> None:
    # the per-group family (views (lead, 2, rest)) bound and tracked: the exact law fed the
    # measured rₖ holds over 100 float64 SGD steps, Q matches the weights, training unchanged
    torch.manual_seed(0)
    model = _PreActivation(nn.GroupNorm(2, 4)).double()
    twin = copy.deepcopy(model)
    x, y = _images(16)
    fams = _streams(detect(model, x))

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    tracker = symmech.track(model, opt, bindings_from_families(model, fams), log_every=10)
    _train(model, opt, (x, y), 100)
    _train(twin, torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
           (x, y), 100)  # fmt: skip
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    rows = tracker.records()
    params = dict(model.named_parameters())
    truth = torch.zeros(2, dtype=torch.float64)  # ½(Σ writers' rows² − head columns²) per group
    for name in ("stem.weight", "stem.bias", "conv.weight", "conv.bias"):
        truth += 0.5 * (params[name].detach().reshape(4, -1) ** 2).sum(1).reshape(2, 2).sum(1)
    truth -= 0.5 * (params["head.weight"].detach() ** 2).sum(0).reshape(2, 2).sum(1)
    final = [r for r in rows if r["step"] == 100]
    scale = max(abs(r["observed"]) for r in rows)
    assert [r["observed"] for r in final] == pytest.approx(truth.tolist(), abs=1e-12 * scale)
    assert max(abs(r["discrete_residual"] - r["observed"]) for r in rows) <= 1e-9 * scale


def test_a_failure_of_the_stream_rule_is_a_note_not_an_exception() -> None:
    # detection never breaks on a bug of one rule: the stream rule raising inside is reported
    model = resnet18(num_classes=10, in_channels=1, base_width=4)
    with mock.patch.object(stream_rule, "_grow", side_effect=RuntimeError("boom")):
        with pytest.warns(symmech.SymmetryWarning, match="the stream rule failed"):
            found = detect(model, _images(4)[0].float())
    assert not _streams(found)
    assert any(n.endswith("the stream rule failed (RuntimeError: boom)") for n in found.notes)
    assert {f.symmetry for f in found} >= {"scale", "rescale", "translation"}  # the others ran


def test_a_stream_missing_a_reader_is_not_reported_exact_when_tracked() -> None:
    # the law wrong on purpose: stage 2's stream bound without its last reader is no symmetry;
    # tracked anyway (bound by hand, no confirmation), its rows say approximate with the measured
    # residual, the law without rₖ misses Q, and the law fed rₖ still matches it
    torch.manual_seed(0)
    model = resnet18(num_classes=10, in_channels=1, base_width=4).double()
    x, y = _images(16)
    good = _streams(detect(model, x))[1]
    broken = Family("stream_rescale", "stage 2 without its last reader",
                    {"theta_1": good.blocks["theta_1"],
                     "theta_2": good.blocks["theta_2"][:-1]}, good.n_groups)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with pytest.warns(symmech.TrackerWarning, match="approximate"):
        tracker = symmech.track(model, opt, bindings_from_families(model, [broken]), log_every=5)
        _train(model, opt, (x, y), 30)
        rows = tracker.records()
    (fam,) = tracker.families
    assert fam.status.startswith("approximate: |r| = "), fam.status
    scale = max(abs(r["observed"]) for r in rows)
    assert max(abs(r["discrete"] - r["observed"]) for r in rows) > 1e-6 * scale
    assert max(abs(r["discrete_residual"] - r["observed"]) for r in rows) <= 1e-9 * scale
