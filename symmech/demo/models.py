"""Small, locally defined networks whose loss symmetries symmech detects and tracks.

Every model is a plain ``nn.Module`` with readable layer names, has no downloaded weights, and is
``torch.fx.symbolic_trace``-able. The symmetry groups each one carries (hand-countable):

* translation: the final ``nn.Linear`` before cross-entropy (every input column across classes,
  and the bias vector);
* scale: every output channel of a conv followed by BatchNorm (``vgg*-bn``, ``resnet18``);
* rescale: every hidden unit between two layers around a ReLU (``vgg*``, ``mlp``, the transformer's
  feed-forward block, the classifier hidden layer of every VGG).

``build_model(name, **kw)`` builds one by name; see :data:`MODEL_NAMES`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "VGG",
    "VGG_CONFIGS",
    "BasicBlock",
    "MultiHeadSelfAttention",
    "ResNet",
    "TransformerClassifier",
    "build_model",
    "mlp",
    "resnet18",
    "transformer_block",
    "vgg",
]

#: VGG layer configurations: an int is a 3×3 conv with that many output channels,
#: "M" a 2×2 max-pool.
# fmt: off
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg-tiny": [16, 16, "M", 32, 32, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # config A
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",  # config D
              512, 512, 512, "M", 512, 512, 512, "M"],
}
# fmt: on

MODEL_NAMES: tuple[str, ...] = (
    "vgg-tiny",
    "vgg-tiny-bn",
    "vgg11",
    "vgg11-bn",
    "vgg16",
    "vgg16-bn",
    "mlp",
    "resnet18",
    "transformer",
)


def _scaled(channels: int, width_multiplier: float) -> int:
    return max(1, int(round(channels * width_multiplier)))


# --------------------------------------------------------------------------------------------
# VGG


class VGG(nn.Module):
    """VGG-style network: ``features`` (conv stack), flatten, ``classifier`` (one or two Linear).

    Layer names in ``features``: ``conv{b}_{i}`` / ``bn{b}_{i}`` / ``relu{b}_{i}`` for the i-th
    conv of block b, and ``pool{b}`` closing block b. A pool is left out when the feature map is
    already smaller than 2×2, so deep configurations run on tiny images (vgg16 on 8×8 digits).
    ``classifier`` holds ``fc1``, ``relu1``, ``fc2`` (or a single ``fc``).

    Attributes ``conv_channels`` (output channels of each conv, in order), ``feature_size`` (side of
    the final feature map) and ``classifier_in_features`` describe the built network.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        batch_norm: bool,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 8,
        width_multiplier: float = 1.0,
        classifier_hidden: int | None | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, size, block, index = in_channels, image_size, 1, 0
        conv_channels: list[int] = []
        for item in cfg:
            if item == "M":
                if size >= 2:
                    layers[f"pool{block}"] = nn.MaxPool2d(kernel_size=2, stride=2)
                    size //= 2
                block, index = block + 1, 0
                continue
            if not isinstance(item, int) or isinstance(item, bool) or item < 1:
                raise ValueError(f"VGG config entries must be positive ints or 'M', got {item!r}")
            out = _scaled(item, width_multiplier)
            index += 1
            name = f"{block}_{index}"
            layers[f"conv{name}"] = nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=True)
            if batch_norm:
                layers[f"bn{name}"] = nn.BatchNorm2d(out)
            layers[f"relu{name}"] = nn.ReLU()
            conv_channels.append(out)
            channels = out
        if not conv_channels:
            raise ValueError(f"VGG config {list(cfg)!r} has no conv layer")
        self.features = nn.Sequential(layers)
        self.conv_channels: tuple[int, ...] = tuple(conv_channels)
        self.feature_size = size
        self.classifier_in_features = channels * size * size
        hidden = channels if classifier_hidden == "auto" else classifier_hidden
        if hidden:
            self.classifier = nn.Sequential(
                OrderedDict(
                    fc1=nn.Linear(self.classifier_in_features, hidden),
                    relu1=nn.ReLU(),
                    fc2=nn.Linear(hidden, num_classes),
                )
            )
        else:
            self.classifier = nn.Sequential(
                OrderedDict(fc=nn.Linear(self.classifier_in_features, num_classes))
            )
        self.classifier_hidden: int | None = hidden or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def vgg(
    cfg: str | Sequence[int | str],
    batch_norm: bool,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 8,
    width_multiplier: float = 1.0,
    classifier_hidden: int | None | Literal["auto"] = "auto",
) -> VGG:
    """A VGG network from a config name (``"vgg-tiny"``, ``"vgg11"``, ``"vgg16"``) or a list.

    Convs are 3×3, padding 1, ``bias=True``; with ``batch_norm`` each is conv → BatchNorm2d → ReLU,
    otherwise conv → ReLU. ``image_size`` must be the side of the input images: the classifier's
    ``in_features`` is ``last_channels * s * s`` with ``s`` the final feature-map side.
    ``classifier_hidden="auto"`` puts a hidden Linear layer as wide as the last conv between the
    features and the output Linear; ``None`` (or 0) uses the output Linear alone.
    """
    if isinstance(cfg, str):
        if cfg not in VGG_CONFIGS:
            valid = ", ".join(repr(n) for n in VGG_CONFIGS)
            raise ValueError(f"unknown VGG config {cfg!r}; valid names are {valid}")
        cfg = VGG_CONFIGS[cfg]
    return VGG(
        cfg,
        batch_norm,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        width_multiplier=width_multiplier,
        classifier_hidden=classifier_hidden,
    )


# --------------------------------------------------------------------------------------------
# MLP

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


class MLP(nn.Sequential):
    """``flatten → fc1 → {act}1 → fc2 → … → fc{n+1}``; the last Linear feeds cross-entropy."""


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (32, 32),
    num_classes: int = 10,
    activation: str = "relu",
) -> MLP:
    """A fully connected network; inputs are flattened from dimension 1 on (images work as-is).

    Layer names are ``fc1..fc{len(hidden)+1}`` and ``{activation}1..{activation}{len(hidden)}``.
    """
    if activation not in _ACTIVATIONS:
        valid = ", ".join(repr(n) for n in _ACTIVATIONS)
        raise ValueError(f"unknown activation {activation!r}; valid names are {valid}")
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be positive integers, got {list(hidden)!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1))
    widths = [in_features, *hidden]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
        layers[f"{activation}{i}"] = _ACTIVATIONS[activation]()
    layers[f"fc{len(widths)}"] = nn.Linear(widths[-1], num_classes)
    return MLP(layers)


# --------------------------------------------------------------------------------------------
# ResNet-18


class BasicBlock(nn.Module):
    """conv3×3-bn-relu-conv3×3-bn, plus the shortcut (identity or 1×1 conv-bn), then relu."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(channels),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks: stem, ``layer1..layer4``, global average pool, ``fc``."""

    def __init__(
        self,
        blocks_per_layer: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        small_input: bool = True,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if small_input:  # CIFAR-style stem: keeps 32×32 (or 8×8) resolution
            self.conv1 = nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:  # ImageNet-style stem
            self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU()
        channels = base_width
        stages: list[nn.Sequential] = []
        for stage, n_blocks in enumerate(blocks_per_layer):
            width = base_width * 2**stage
            stride = 1 if stage == 0 else 2
            blocks = []
            for b in range(n_blocks):
                blocks.append(BasicBlock(channels, width, stride if b == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    small_input: bool = True,
    base_width: int = 64,
) -> ResNet:
    """Standard ResNet-18 (BasicBlock, [2, 2, 2, 2]), written from scratch, no pretrained weights.

    ``small_input=True`` uses a 3×3 stride-1 stem without max-pool (CIFAR/digits sized images);
    ``False`` the ImageNet 7×7 stride-2 stem with max-pool. Convs have ``bias=False`` (each is
    followed by BatchNorm). ``base_width`` (64 in the standard net) shrinks it for quick tests.
    """
    return ResNet([2, 2, 2, 2], num_classes, in_channels, small_input, base_width)


# --------------------------------------------------------------------------------------------
# Transformer


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention from ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` Linears."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, D) -> (B, H, T, D/H)
        return x.reshape(x.size(0), x.size(1), self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            self._heads(self.q_proj(x)),
            self._heads(self.k_proj(x)),
            self._heads(self.v_proj(x)),
        )
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, T, D/H)
        out = out.transpose(1, 2).reshape(x.size(0), x.size(1), -1)
        return self.out_proj(out)


class TransformerClassifier(nn.Module):
    """One pre-LN transformer block on a sequence of tokens, mean-pooled, then ``head``.

    Input ``(B, seq_len, in_features)``, or anything with ``seq_len * in_features`` values per
    example (an 8×8 digit ``(B, 1, 8, 8)`` is read as 8 tokens of 8 pixels).
    ``embed`` → + ``pos_embedding`` → ``x + attn(ln1(x))`` → ``x + fc2(relu(fc1(ln2(x))))`` →
    ``ln_final`` → mean over tokens → ``head``.
    """

    def __init__(
        self,
        d_model: int = 32,
        n_heads: int = 4,
        d_ff: int = 64,
        seq_len: int = 8,
        num_classes: int = 10,
        in_features: int = 8,
    ) -> None:
        super().__init__()
        self.seq_len, self.in_features = seq_len, in_features
        self.embed = nn.Linear(in_features, d_model)
        self.pos_embedding = nn.Parameter(torch.zeros(1, seq_len, d_model))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.size(0), self.seq_len, self.in_features)
        x = self.embed(x) + self.pos_embedding
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(self.relu(self.fc1(self.ln2(x))))
        return self.head(self.ln_final(x).mean(dim=1))


def transformer_block(
    d_model: int = 32,
    n_heads: int = 4,
    d_ff: int = 64,
    seq_len: int = 8,
    num_classes: int = 10,
    in_features: int = 8,
) -> TransformerClassifier:
    """A small one-block pre-LN transformer classifier (defaults fit 8×8 digits as 8 tokens)."""
    return TransformerClassifier(d_model, n_heads, d_ff, seq_len, num_classes, in_features)


# --------------------------------------------------------------------------------------------
# dispatch


def build_model(name: str, **kw: object) -> nn.Module:
    """Build a model by name; ``kw`` goes to the builder (:func:`vgg`, :func:`mlp`, ...).

    Names: ``vgg-tiny``, ``vgg-tiny-bn``, ``vgg11``, ``vgg11-bn``, ``vgg16``, ``vgg16-bn``,
    ``mlp``, ``resnet18``, ``transformer``. Defaults fit 8×8 one-channel digits except
    ``resnet18`` (``in_channels=3``, as the standard net).
    """
    if name not in MODEL_NAMES:
        valid = ", ".join(repr(n) for n in MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; valid names are {valid}")
    if name.startswith("vgg"):
        cfg = name.removesuffix("-bn")
        return vgg(cfg, batch_norm=name.endswith("-bn"), **kw)  # type: ignore[arg-type]
    if name == "mlp":
        return mlp(**kw)  # type: ignore[arg-type]
    if name == "resnet18":
        return resnet18(**kw)  # type: ignore[arg-type]
    return transformer_block(**kw)  # type: ignore[arg-type]
