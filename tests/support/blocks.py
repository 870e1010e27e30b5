"""Blocks of current architectures rebuilt by hand (no torchvision, no download), following the
structure of Hugging Face's ``modeling_llama`` and torchvision's ``convnext``.

* :class:`TinyLlama` — ``embed_tokens``, ``layers.{i}`` (``input_layernorm`` (a custom
  :class:`LlamaRMSNorm`), ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj`` with a rotary
  embedding on q and k, ``o_proj``; no biases), ``post_attention_layernorm``, ``mlp``
  (``gate_proj``, ``up_proj``, ``down_proj``: SwiGLU)), ``norm``, ``lm_head`` (no bias).
* :class:`TinyConvNeXt` — stem ``stem.0`` conv (+ ``stem.1`` LayerNorm2d), ``blocks.{i}`` CNBlocks
  (``block.0`` depthwise 7×7 conv, ``block.1`` Permute, ``block.2`` LayerNorm, ``block.3``
  Linear C→4C, ``block.4`` GELU, ``block.5`` Linear 4C→C, ``block.6`` Permute, ``layer_scale``
  γ (C, 1, 1) multiplied in, + input), average pool, ``head.0`` LayerNorm2d, flatten, ``head.2``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- Llama


class LlamaRMSNorm(nn.Module):
    """As Hugging Face's: x · rsqrt(mean(x²) + eps) · weight, the statistics in float32."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(LlamaRMSNorm):
    """Gemma's variant: x̂ · (1 + weight), which is not proportional to the weight."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return hidden_states * torch.rsqrt(variance + self.variance_epsilon) * (1 + self.weight)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, d: int, heads: int, seq: int) -> None:
        super().__init__()
        self.heads, self.r = heads, d // heads
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.r, 2, dtype=torch.float64) / self.r))
        angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.r).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.r).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.r).transpose(1, 2)
        cos, sin = self.cos.to(q.dtype), self.sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class LlamaMLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int, seq: int, norm: type) -> None:
        super().__init__()
        self.input_layernorm = norm(d)
        self.self_attn = LlamaAttention(d, heads, seq)
        self.post_attention_layernorm = norm(d)
        self.mlp = LlamaMLP(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """A causal LM on sequences of exactly ``seq`` tokens (the rotary tables are that long)."""

    def __init__(self, vocab: int = 20, d: int = 8, heads: int = 2, hidden: int = 12,
                 layers: int = 2, seq: int = 6, norm: type = LlamaRMSNorm) -> None:  # fmt: skip
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(d, heads, hidden, seq, norm) for _ in range(layers)
        )
        self.norm = norm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


# ----------------------------------------------------------------------------- ConvNeXt


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d: a LayerNorm over the channels of NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's CNBlock (stochastic depth 0, so it is the identity and left out).
    ``gamma_last=True`` keeps γ of shape (C,) and multiplies it in before the permute back."""

    def __init__(self, dim: int, layer_scale: float = 0.5, gamma_last: bool = False) -> None:
        super().__init__()
        self.gamma_last = gamma_last
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        shape = (dim,) if gamma_last else (dim, 1, 1)
        self.layer_scale = nn.Parameter(torch.ones(shape) * layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_last:
            hidden = x
            for i in range(6):
                hidden = self.block[i](hidden)
            return self.block[6](hidden * self.layer_scale) + x
        result = self.layer_scale * self.block(x)
        result += x
        return result


class TinyConvNeXt(nn.Module):
    def __init__(self, dim: int = 8, blocks: int = 2, classes: int = 10, in_channels: int = 1,
                 gamma_last: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dim, kernel_size=2, stride=2), LayerNorm2d(dim, eps=1e-6)
        )
        self.blocks = nn.Sequential(*(CNBlock(dim, gamma_last=gamma_last) for _ in range(blocks)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            LayerNorm2d(dim, eps=1e-6), nn.Flatten(1), nn.Linear(dim, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.avgpool(self.blocks(self.stem(x))))


# ----------------------------------------------------------------------------- Swin


class WindowAttention(nn.Module):
    """torchvision's ShiftedWindowAttention in small (no relative position bias, no mask):
    roll, windows, ``F.linear`` with the qkv and proj weights, windows back, roll back."""

    def __init__(self, d: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s, ws = self.shift, self.window
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, ws * ws, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5).matmul(k.transpose(-2, -1)).softmax(dim=-1)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    """Pre-LN: x + attention(norm1(x)), then x + mlp(norm2(x)) (stochastic depth 0)."""

    def __init__(self, d: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), WindowAttention(d, heads, window, shift)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Four strided picks concatenated along the channels → LayerNorm(4d) → Linear(4d → 2d)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * d), nn.Linear(4 * d, 2 * d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picks = [x[..., i::2, j::2, :] for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(picks, -1)))


class TinySwin(nn.Module):
    """torchvision's Swin in small: 2×2 patches of an 8×8 image → 4×4 tokens of d channels (conv
    → Permute → LayerNorm); two blocks (window 2, shifts 0 and 1); patch merging → 2×2 tokens of
    2d; two blocks; LayerNorm; mean over the tokens; head."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, d, 2, 2), Permute([0, 2, 3, 1]), nn.LayerNorm(d)),
            nn.Sequential(SwinBlock(d, 2, 2, 0), SwinBlock(d, 2, 2, 1)),
            PatchMerging(d),
            nn.Sequential(SwinBlock(2 * d, 2, 2, 0), SwinBlock(2 * d, 2, 2, 0)),
        )
        self.norm, self.head = nn.LayerNorm(2 * d), nn.Linear(2 * d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(x))
        return self.head(x.permute(0, 3, 1, 2).mean((2, 3)))


# ----------------------------------------------------------------------------- ViT


class EncoderBlock(nn.Module):
    """torchvision's ViT EncoderBlock: pre-LN, nn.MultiheadAttention, GELU MLP."""

    def __init__(self, d: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + inputs
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """torchvision's VisionTransformer in small: conv patches → reshape → permute, a class token
    concatenated before the patches, a position embedding added, encoder blocks, LayerNorm, the
    class token's features → head."""

    def __init__(self, d: int = 8, heads: int = 2, hidden: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(1, d, kernel_size=4, stride=4)
        self.class_token = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos_embedding = nn.Parameter(0.1 * torch.randn(1, 5, d))
        self.layers = nn.Sequential(*(EncoderBlock(d, heads, hidden) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------- ResNet-50-style bottlenecks


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1×1 → 3×3 → 1×1 (×4), BN after each, projection shortcut."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or c_in != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def bottleneck_resnet() -> nn.Module:
    """A ResNet-50-style net in small: stem with max-pool, two stages of two bottlenecks."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(8),
        relu=nn.ReLU(inplace=True), maxpool=nn.MaxPool2d(2),
        layer1=nn.Sequential(Bottleneck(8, 4, 1), Bottleneck(16, 4, 1)),
        layer2=nn.Sequential(Bottleneck(16, 8, 2), Bottleneck(32, 8, 1)),
        avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(32, 10),
    ))  # fmt: skip
