"""Detection and confirmation time on reference CNNs at 32×32, one table.

    python benchmarks/confirm_time.py [--batch 16] [--threads 2] [--models resnet18,vgg11_bn,...]
        [--samples all|N]

torchvision is not a dependency, so the reference models are built here: ``resnet18`` (BasicBlocks,
:func:`symmech.demo.models.resnet18`), ``vgg11_bn`` (:func:`symmech.demo.models.vgg`, width 1.0),
``mobilenet_v2`` (inverted residuals with depthwise convs, ReLU6, torchvision's layer widths) and
``efficientnet_b0`` (MBConv blocks with squeeze-excitation and SiLU, the b0 widths). For each the
table gives the families found, the seconds ``symmech.detect(model, x)`` takes (structure only),
the seconds confirmation adds (``detect(..., confirm_batch=(x, y))`` minus the first), and how
many families were confirmed. Confirmation evaluates the batch's first ``confirm_samples``
samples (symmech's default unless ``--samples`` is given; ``all`` for the whole batch). Run it with ``PYTHONPATH`` set to another checkout to time that one.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import symmech
from symmech.demo.models import resnet18, vgg


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=nn.ReLU6):
    layers = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand → 3×3 depthwise → 1×1 project, a skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.skip else self.block(x)


def mobilenet_v2(num_classes: int = 10) -> nn.Module:
    """MobileNetV2 (width 1.0, torchvision's settings), stride-1 stem for 32×32 inputs."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip
    layers: list[nn.Module] = [_conv_bn(3, 32, 3, 1)]
    cin = 32
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [_conv_bn(cin, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(1280, num_classes)]  # fmt: skip
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet's block: expand → depthwise → squeeze-excite → project, a skip when it fits."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcite(hidden, max(1, cin // 4)), _conv_bn(hidden, cout, 1, act=None)]  # fmt: skip
        self.block = nn.Sequential(*layers)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.skip else self.block(x)


def efficientnet_b0(num_classes: int = 10) -> nn.Module:
    """EfficientNet-B0's widths and depths (no stochastic depth), stride-1 stem for 32×32."""
    settings = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # fmt: skip
    layers: list[nn.Module] = [_conv_bn(3, 32, 3, 1, act=nn.SiLU)]
    cin = 32
    for t, k, s, c, n in settings:
        for i in range(n):
            layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
            cin = c
    layers += [_conv_bn(cin, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(1280, num_classes)]  # fmt: skip
    return nn.Sequential(*layers)


MODELS = {
    "resnet18": lambda: resnet18(num_classes=10, in_channels=3),
    "vgg11_bn": lambda: vgg("vgg11", batch_norm=True, in_channels=3, image_size=32),
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_b0": efficientnet_b0,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--samples", default=None, help="all, or how many (default: symmech's)")
    args = parser.parse_args()
    options = {}
    if args.samples is not None:
        options["confirm_samples"] = None if args.samples == "all" else int(args.samples)
    torch.set_num_threads(args.threads)
    samples = options.get("confirm_samples", "default") if args.samples is not None else "default"
    print(f"batch {args.batch}, 32x32, {torch.get_num_threads()} threads, confirmed on samples: "
          f"{samples or 'all'}, symmech from {symmech.__file__}")  # fmt: skip
    print(f"{'model':16s} {'params':>9s} {'families':>8s} {'detect s':>9s} {'confirm s':>9s} "
          f"{'confirmed':>9s}")  # fmt: skip
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name]()
        x = torch.randn(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
        start = time.perf_counter()
        found = symmech.detect(model, x)
        t_detect = time.perf_counter() - start
        start = time.perf_counter()
        confirmed = symmech.detect(model, x, confirm_batch=(x, y), **options)
        t_confirm = time.perf_counter() - start - t_detect
        ok = sum(bool(getattr(f, "confirmed", False)) for f in confirmed)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name:16s} {n_params:9d} {len(found):8d} {t_detect:9.2f} {t_confirm:9.2f} "
              f"{ok:4d}/{len(confirmed):<4d}")  # fmt: skip
        for fam in confirmed:
            if getattr(fam, "confirmed", None) is False:
                print(f"    rejected {fam.symmetry} {fam.layer}: {fam.reason}")


if __name__ == "__main__":
    main()
