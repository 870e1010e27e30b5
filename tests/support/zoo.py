"""Reference models for the model-side tests, written here so the tests do not lean on the demo.

Layer names are part of what the tests assert (detected families are labelled by them), so each
builder documents its names. Every model is torch.fx-traceable and sized for 8×8 one-channel
images (``tiny_vit`` and ``transformer_block`` read an image as 8 tokens of 8 pixels).

* :func:`vgg` — ``features``: ``conv{b}_{i}`` [``bn{b}_{i}``] ``relu{b}_{i}`` per conv, ``pool{b}``
  closing block b while the map is at least 2×2; then flatten and ``classifier``: ``fc1``,
  ``relu1``, ``fc2`` (the hidden layer as wide as the last conv).
* :func:`mlp` — ``flatten``, ``fc1``, ``{act}1``, …, ``fc{n+1}``.
* :func:`resnet18` — stem ``conv1 bn1 relu``, ``layer1..layer4`` of two basic blocks
  (``conv1 bn1 relu1 conv2 bn2 relu2`` and ``downsample.conv``/``downsample.bn`` when the shape
  changes), ``avgpool``, ``fc``.
* :func:`transformer_block` — pre-LN: ``embed`` (+ ``pos``), ``ln1``, ``attn`` (``q``, ``k``,
  ``v``, ``out``), ``ln2``, ``fc1``, ``relu``, ``fc2``, ``ln_final``, mean over tokens, ``head``.
* :func:`tiny_vit` — the same shape of block with attention by ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

CONFIGS: dict[str, list[int | str]] = {
    "vgg-tiny": [16, 16, "M", 32, 32, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]
    + [512, 512, 512, "M"],
}


class _VGG(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg(config: str, batch_norm: bool, num_classes: int = 10, side: int = 8) -> nn.Module:
    """A VGG of 3×3 convs (padding 1, with bias) from one of :data:`CONFIGS`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, block, conv = 1, 1, 0
    for item in CONFIGS[config]:
        if item == "M":
            if side >= 2:
                layers[f"pool{block}"] = nn.MaxPool2d(2)
                side //= 2
            block, conv = block + 1, 0
            continue
        conv += 1
        tag = f"{block}_{conv}"
        layers[f"conv{tag}"] = nn.Conv2d(channels, int(item), 3, padding=1)
        if batch_norm:
            layers[f"bn{tag}"] = nn.BatchNorm2d(int(item))
        layers[f"relu{tag}"] = nn.ReLU()
        channels = int(item)
    head = OrderedDict(
        fc1=nn.Linear(channels * side * side, channels), relu1=nn.ReLU(),
        fc2=nn.Linear(channels, num_classes),
    )  # fmt: skip
    return _VGG(nn.Sequential(layers), nn.Sequential(head))


def build(name: str) -> nn.Module:
    """``vgg-tiny``, ``vgg11``, ``vgg16`` (``-bn`` adds BatchNorm) or ``mlp`` by name."""
    if name == "mlp":
        return mlp()
    return vgg(name.removesuffix("-bn"), batch_norm=name.endswith("-bn"))


def mlp(
    n_in: int = 64, widths: tuple[int, ...] = (32, 32), n_out: int = 10, act: str = "relu"
) -> nn.Sequential:
    """Flatten, then Linear layers with ``act`` ("relu" or "tanh") between them."""
    kind = {"relu": nn.ReLU, "tanh": nn.Tanh}[act]
    sizes = (n_in, *widths, n_out)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i in range(1, len(sizes)):
        layers[f"fc{i}"] = nn.Linear(sizes[i - 1], sizes[i])
        if i < len(sizes) - 1:
            layers[f"{act}{i}"] = kind()
    return nn.Sequential(layers)


class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(c_out), nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(c_out), nn.ReLU()
        self.downsample = None
        if stride > 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                            bn=nn.BatchNorm2d(c_out))
            )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(h + skip)


class _ResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU()
        c = width
        for stage in range(4):
            out = width << stage
            first = _Basic(c, out, 1 if stage == 0 else 2)
            setattr(self, f"layer{stage + 1}", nn.Sequential(first, _Basic(out, out, 1)))
            c = out
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = stage(h)
        return self.fc(self.avgpool(h).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 1, base_width: int = 64) -> nn.Module:
    """ResNet-18 with a 3×3 stride-1 stem (no max-pool); stages of width base·1, 2, 4, 8."""
    return _ResNet18(num_classes, in_channels, base_width)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))  # fmt: skip
        if self.fused:
            mixed = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
            mixed = weights @ v
        return self.out(mixed.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, classes: int, fused: bool) -> None:
        super().__init__()
        self.embed, self.pos = nn.Linear(8, d), nn.Parameter(0.02 * torch.randn(1, 8, d))
        self.ln1, self.attn = nn.LayerNorm(d), _Attention(d, heads, fused)
        self.ln2, self.fc1, self.relu, self.fc2 = (
            nn.LayerNorm(d), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)
        )  # fmt: skip
        self.ln_final, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        h = h + self.attn(self.ln1(h))
        h = h + self.fc2(self.relu(self.fc1(self.ln2(h))))
        return self.head(self.ln_final(h).mean(dim=1))


def transformer_block(d: int = 32, heads: int = 4, hidden: int = 64) -> nn.Module:
    """One pre-LN block (attention written out), mean-pooled, 10 classes."""
    return _Block(d, heads, hidden, 10, fused=False)


def tiny_vit(d: int = 8, heads: int = 2, hidden: int = 16) -> nn.Module:
    """The same block with ``F.scaled_dot_product_attention``: 8 patches of 8 pixels."""
    return _Block(d, heads, hidden, 10, fused=True)
