"""Demo models: forward shapes, torch.fx tracing, and the hand-countable layer structure."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from symmech.demo.models import (
    MODEL_NAMES,
    VGG,
    build_model,
    mlp,
    resnet18,
    transformer_block,
    vgg,
)

# Default input of each model built with build_model(name) and no keywords.
DEFAULT_INPUT = {name: (3, 1, 8, 8) for name in MODEL_NAMES} | {"resnet18": (3, 3, 32, 32)}


def _check_traced_forward(model: nn.Module, shape: tuple[int, ...], num_classes: int = 10) -> None:
    """fx-trace ``model``, run both on a random batch, and compare (eval mode: no BN updates)."""
    model.eval()
    traced = fx.symbolic_trace(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, traced_out = model(x), traced(x)
    assert out.shape == (shape[0], num_classes)
    assert torch.isfinite(out).all()
    assert torch.equal(out, traced_out)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the conv's only user in the fx graph is a BatchNorm2d."""
    gm = fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                nxt = modules[users[0].target]
                if isinstance(nxt, nn.BatchNorm2d):
                    pairs.append((modules[node.target], nxt))
    return pairs


def _final_linear(model: nn.Module) -> nn.Linear:
    """The Linear whose output is the graph's output (the one that feeds cross-entropy)."""
    gm = fx.symbolic_trace(model)
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert out.op == "call_module"
    layer = dict(gm.named_modules())[out.target]
    assert isinstance(layer, nn.Linear)
    return layer


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_traces_and_runs_on_its_default_input(name: str) -> None:
    _check_traced_forward(build_model(name), DEFAULT_INPUT[name])


@pytest.mark.parametrize("name", ["vgg-tiny", "vgg-tiny-bn", "mlp", "resnet18", "transformer"])
def test_every_small_model_trains_one_step(name: str) -> None:
    torch.manual_seed(0)
    kw = {"base_width": 8} if name == "resnet18" else {}
    model = build_model(name, **kw)
    x, y = torch.randn(DEFAULT_INPUT[name]), torch.tensor([0, 1, 2])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["vgg11", "vgg11-bn", "vgg16", "vgg16-bn"])
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_deep_vgg_on_digits_and_cifar_sized_images(name: str, channels: int, size: int) -> None:
    model = build_model(name, in_channels=channels, image_size=size)
    assert isinstance(model, VGG)
    assert model.feature_size == 1 and model.classifier_in_features == 512
    _check_traced_forward(model, (2, channels, size, size))


def test_vgg_tiny_structure() -> None:
    model = vgg("vgg-tiny", batch_norm=False)
    assert model.conv_channels == (16, 16, 32, 32)
    assert model.feature_size == 2 and model.classifier_in_features == 32 * 2 * 2
    assert [n for n, _ in model.features.named_children()] == [
        "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
        "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    ]  # fmt: skip
    assert [n for n, _ in model.classifier.named_children()] == ["fc1", "relu1", "fc2"]
    assert model.classifier.fc1.in_features == 128 and model.classifier.fc1.out_features == 32
    assert sum(p.numel() for p in model.parameters()) == 20826  # counted by hand
    assert _conv_bn_pairs(model) == []
    assert _final_linear(model) is model.classifier.fc2


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("vgg-tiny-bn", (16, 16, 32, 32)),
        ("vgg11-bn", (64, 128, 256, 256, 512, 512, 512, 512)),
        ("vgg16-bn", (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)),
    ],
)
def test_vgg_bn_every_conv_is_conv_bn_relu_with_bias(name: str, channels: tuple[int, ...]) -> None:
    model = build_model(name)
    assert isinstance(model, VGG) and model.conv_channels == channels
    pairs = _conv_bn_pairs(model)
    assert [conv.out_channels for conv, _ in pairs] == list(channels)
    assert all(conv.bias is not None and bn.num_features == conv.out_channels for conv, bn in pairs)
    children = list(model.features.children())
    for i, layer in enumerate(children):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(children[i + 1], nn.BatchNorm2d)
            assert isinstance(children[i + 2], nn.ReLU)


def test_vgg_pools_are_skipped_only_below_two_pixels() -> None:
    names8 = [n for n, _ in build_model("vgg16").features.named_children() if "pool" in n]
    names32 = [n for n, _ in build_model("vgg16", image_size=32).features.named_children()]
    assert names8 == ["pool1", "pool2", "pool3"]  # 8 -> 4 -> 2 -> 1, then nothing left to pool
    assert [n for n in names32 if "pool" in n] == [f"pool{b}" for b in range(1, 6)]
    assert vgg("vgg-tiny", False, image_size=16).classifier_in_features == 32 * 4 * 4


def test_vgg_options() -> None:
    half = vgg("vgg11", batch_norm=True, width_multiplier=0.5, num_classes=3)
    assert half.conv_channels == (32, 64, 128, 128, 256, 256, 256, 256)
    assert half.classifier_hidden == 256
    _check_traced_forward(half, (2, 1, 8, 8), num_classes=3)
    single = vgg([8, "M", 4], batch_norm=False, classifier_hidden=None, image_size=6)
    assert [n for n, _ in single.classifier.named_children()] == ["fc"]
    assert single.classifier.fc.in_features == 4 * 3 * 3
    _check_traced_forward(single, (2, 1, 6, 6))
    with pytest.raises(ValueError, match="unknown VGG config 'vgg19'; valid names are"):
        vgg("vgg19", batch_norm=False)
    with pytest.raises(ValueError, match="positive ints or 'M', got 'X'"):
        vgg([8, "X"], batch_norm=False)
    with pytest.raises(ValueError, match="has no conv layer"):
        vgg(["M"], batch_norm=False)


def test_mlp_structure() -> None:
    model = mlp(64, [32, 16], 10)
    assert [n for n, _ in model.named_children()] == [
        "flatten", "fc1", "relu1", "fc2", "relu2", "fc3",
    ]  # fmt: skip
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [
        (64, 32),
        (32, 16),
        (16, 10),
    ]
    assert _final_linear(model) is model.fc3
    _check_traced_forward(model, (4, 1, 8, 8))
    _check_traced_forward(mlp(5, [], 2), (4, 5), num_classes=2)
    tanh = mlp(64, [8], 10, activation="tanh")
    assert isinstance(tanh.tanh1, nn.Tanh)
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid names are 'relu'"):
        mlp(64, [8], 10, activation="swish")


def test_resnet18_structure() -> None:
    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the CIFAR ResNet-18 count
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(conv.bias is None for conv in convs)
    pairs = _conv_bn_pairs(model)
    assert len(pairs) == 20  # every conv, shortcuts included, feeds its own BatchNorm
    assert sum(conv.out_channels for conv, _ in pairs) == 4800
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8
    # Only the first block of layer2..layer4 changes width and stride: 3 1×1 shortcuts.
    assert [b.downsample is not None for b in blocks] == [False, False] + [True, False] * 3
    assert model.fc.in_features == 512 and _final_linear(model) is model.fc


@pytest.mark.parametrize(
    ("kw", "shape"),
    [
        ({"in_channels": 1, "base_width": 8}, (2, 1, 8, 8)),
        ({"small_input": False, "base_width": 8}, (2, 3, 32, 32)),
        ({"small_input": False}, (2, 3, 64, 64)),
    ],
)
def test_resnet18_inputs(kw: dict[str, object], shape: tuple[int, ...]) -> None:
    _check_traced_forward(resnet18(**kw), shape)


def test_transformer_structure_and_inputs() -> None:
    model = transformer_block()
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert {n for n, m in model.attn.named_children()} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert (model.fc1.in_features, model.fc1.out_features) == (32, 64)
    assert isinstance(model.relu, nn.ReLU)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 3
    assert _final_linear(model) is model.head and model.head.in_features == 32
    _check_traced_forward(model, (3, 8, 8))  # tokens
    _check_traced_forward(model, (3, 1, 8, 8))  # a digit image, read as 8 rows
    other = transformer_block(16, n_heads=2, d_ff=8, seq_len=4, num_classes=3, in_features=5)
    _check_traced_forward(other, (2, 4, 5), num_classes=3)
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        transformer_block(d_model=30)


def test_transformer_attention_matches_torch_reference() -> None:
    """Our q/k/v/o attention equals torch's scaled_dot_product_attention on the same weights."""
    torch.manual_seed(0)
    attn = transformer_block(d_model=16, n_heads=4).attn
    x = torch.randn(2, 5, 16)
    B, T, H, D = 2, 5, 4, 4

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, T, H, D).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    ref = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 16)
    assert torch.allclose(attn(x), attn.out_proj(ref), atol=1e-6)


def test_build_model_dispatch_and_unknown_name() -> None:
    assert isinstance(build_model("vgg11-bn").features.bn1_1, nn.BatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_model("vgg11").modules())
    assert build_model("mlp", hidden=[7]).fc1.out_features == 7
    with pytest.raises(ValueError, match="unknown model 'vgg19'; valid names are 'vgg-tiny', "):
        build_model("vgg19")
