"""Detection on transformers and residual CNNs, one table: families / groups per symmetry found vs
derived by hand.

    python benchmarks/detect_table.py [--threads 2]

Models (float64, random weights, no downloads): Hugging Face ``GPT2LMHeadModel`` and
``BertForSequenceClassification`` (read through torch.export: torch.fx cannot trace them), a
nanoGPT block (fused c_attn, causal softmax written out, GELU MLP) as a classifier,
``nn.TransformerEncoderLayer`` (pre-LN, ReLU) between a Linear embedding and a head, and
:func:`symmech.demo.models.transformer_block`. The counts "by hand" are worked out below from the
sizes (an attention kind: r(r+1)/2 families of H groups per layer, r = d / H), never from the
code. The CNNs are those of ``benchmarks/confirm_time.py`` (ResNet-18, MobileNetV2 and
EfficientNet-B0 with torchvision's widths and a stride-1 stem, 32×32 inputs); their residual
streams (``stream_rescale``) are counted by hand from the stage settings. ``detect s`` is
``detect(model, x)``; ``confirm s`` is ``confirm(model, found, (x, y))`` on its result.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from symmech.demo.models import transformer_block
from symmech.model.confirm import confirm
from symmech.model.detect import detect


def _attention(layers: int, d: int, heads: int) -> tuple[int, int]:
    r = d // heads
    return layers * r * (r + 1) // 2, layers * r * (r + 1) // 2 * heads


class NanoGPTBlock(nn.Module):
    """nanoGPT's pre-LN block (c_attn → split → heads, causal softmax, c_proj; c_fc → GELU →
    c_proj), then ln_f → mean over tokens → head."""

    def __init__(self, d: int = 16, heads: int = 2, vocab: int = 30, classes: int = 10) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.wte = nn.Embedding(vocab, d)
        self.ln_1, self.c_attn, self.attn_proj = (
            nn.LayerNorm(d),
            nn.Linear(d, 3 * d),
            nn.Linear(d, d),
        )
        self.ln_2, self.c_fc, self.mlp_proj = (
            nn.LayerNorm(d),
            nn.Linear(d, 4 * d),
            nn.Linear(4 * d, d),
        )
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(self.d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (d // self.heads) ** 0.5)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        x = x + self.attn_proj((att @ v).transpose(1, 2).contiguous().view(b, t, d))
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))
        return self.head(self.ln_f(x).mean(dim=1))


class Encoder(nn.Module):
    """Linear(8 → d) → nn.TransformerEncoderLayer (pre-LN, ReLU) → mean → head (10)."""

    def __init__(self, d: int = 8, heads: int = 2, ff: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                                norm_first=True)  # fmt: skip
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(dim=1))


def _cases() -> list[tuple[str, Callable[[], tuple[nn.Module, object, object]], dict]]:
    ids = torch.randint(0, 30, (4, 8), generator=torch.Generator().manual_seed(0))
    cases = []
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        gpt2 = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=30,
                                       n_positions=16)  # fmt: skip
        bert = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2,
                                       hidden_size=16, intermediate_size=32, vocab_size=30,
                                       num_labels=3)  # fmt: skip
        # GPT-2: per layer ln_1 → c_attn and ln_2 → c_fc norm_rescale (16 each); lm_head is
        # tied to wte (no translation, and no stream family: wte writes the residual stream),
        # GELU (no rescale).
        cases.append(("GPT-2 (HF)", lambda: (transformers.GPT2LMHeadModel(gpt2), ids, ids),
                      {"attention_qk": _attention(2, 16, 2), "attention_vo": _attention(2, 16, 2),
                       "norm_rescale": (4, 64)}))  # fmt: skip
        # BERT: classifier T 16 + 1; only the last output.LayerNorm → pooler.dense (16).
        # Streams (post-LN): the embeddings' sum, read only by embeddings.LayerNorm, is a scale
        # family (1 group); per layer two stream segments, each written by a LayerNorm's affine
        # and a sublayer output, read by q/k/v (resp. intermediate.dense) and normalised by the
        # next LayerNorm: 2 stream_rescale of 1 group.
        cases.append(("BERT (HF)",
                      lambda: (transformers.BertForSequenceClassification(bert), ids,
                               torch.tensor([0, 1, 2, 1])),
                      {"attention_qk": _attention(2, 16, 2), "attention_vo": _attention(2, 16, 2),
                       "translation": (2, 17), "norm_rescale": (1, 16), "scale": (1, 1),
                       "stream_rescale": (4, 4)}))  # fmt: skip
    except ImportError:
        print("transformers is not installed: the GPT-2 and BERT rows are left out")
    y = torch.tensor([0, 1, 2, 3])
    # nanoGPT: ln_1 → c_attn, ln_2 → c_fc, ln_f → mean → head norm_rescale (16 each); T 16 + 1;
    # the residual stream (wte, attn_proj, mlp_proj) is read only by ln_1, ln_2, ln_f: scale 1.
    cases.append(("nanoGPT block", lambda: (NanoGPTBlock(), ids, y),
                  {"attention_qk": _attention(1, 16, 2), "attention_vo": _attention(1, 16, 2),
                   "norm_rescale": (3, 48), "translation": (2, 17), "scale": (1, 1)}))  # fmt: skip
    x = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # encoder layer (d 8, 2 heads, ff 16): norm1 → in_proj, norm2 → linear1 (8 each);
    # linear1 → ReLU → linear2 R 16; head T 8 + 1; the stream (the embedding, and inside the
    # layer, which is one graph node, out_proj and linear2 written; norm1 and norm2 normalising;
    # the head reading it through the mean): stream_rescale of 1 group.
    cases.append(("nn.TransformerEncoderLayer", lambda: (Encoder(), x, y),
                  {"attention_qk": _attention(1, 8, 2), "attention_vo": _attention(1, 8, 2),
                   "norm_rescale": (2, 16), "rescale": (1, 16), "translation": (2, 9),
                   "stream_rescale": (1, 1)}))  # fmt: skip
    # demo transformer (d 32, 4 heads, ff 64): ln1 → q,k,v; ln2 → fc1; ln_final → mean → head
    # (32 each); fc1 → relu → fc2 R 64; head T 32 + 1; stream (embed, pos, attn.out, fc2) read
    # only by the LayerNorms: scale 1.
    cases.append(("symmech.demo transformer", lambda: (transformer_block(), x, y),
                  {"attention_qk": _attention(1, 32, 4), "attention_vo": _attention(1, 32, 4),
                   "norm_rescale": (3, 96), "rescale": (1, 64), "translation": (2, 33),
                   "scale": (1, 1)}))  # fmt: skip
    return cases + _cnn_cases()


def _cnn_cases() -> list[tuple[str, Callable[[], tuple[nn.Module, object, object]], dict]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from confirm_time import MODELS

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    # ResNet-18 (tests/model/test_detect.py works these out): T 512 + 1; S every conv → BN, 20
    # convs, 4800 channels; R bn1 → relu → conv2 in each of 8 blocks (1920); one stream per
    # stage, across its adds: 64 + 128 + 256 + 512 = 960.
    resnet = {"translation": (2, 513), "scale": (20, 4800), "rescale": (8, 1920),
              "stream_rescale": (4, 960)}  # fmt: skip
    # MobileNetV2 (17 inverted residuals, ReLU6: no rescale): S 52 convs → BN (17056 channels:
    # stem 32, per block expand t·c_in (not in the first), depthwise t·c_in, projection c_out,
    # last conv 1280); streams where a stage has ≥ 2 blocks: 24, 32, 64, 96, 160 (376); the
    # projection BNs of block 1 (16, read by block 2's expand conv alone) and block 17 (320, read
    # by the last 1×1 conv) are norm_rescale (336); T 1280 + 1.
    mobilenet = {"translation": (2, 1281), "scale": (52, 17056), "norm_rescale": (2, 336),
                 "stream_rescale": (5, 376)}  # fmt: skip
    # EfficientNet-B0 (16 MBConv blocks, SiLU and squeeze-excite: no rescale): S 49 convs → BN
    # (21008); streams 24, 40, 80, 112, 192 (448); norm_rescale block 1 (16) and block 16 (320).
    effnet = {"translation": (2, 1281), "scale": (49, 21008), "norm_rescale": (2, 336),
              "stream_rescale": (5, 448)}  # fmt: skip
    return _block_cases() + [
        ("ResNet-18 (32²)", lambda: (MODELS["resnet18"](), x, y), resnet),
        ("MobileNetV2 (32²)", lambda: (MODELS["mobilenet_v2"](), x, y), mobilenet),
        ("EfficientNet-B0 (32²)", lambda: (MODELS["efficientnet_b0"](), x, y), effnet),
    ]


def _block_cases() -> list[tuple[str, Callable[[], tuple[nn.Module, object, object]], dict]]:
    """A Llama built by hand and from Hugging Face's config, ConvNeXt and Swin blocks (the test
    models of ``tests/support/blocks.py``: rotary attention, SwiGLU MLP, RMSNorm; depthwise conv
    → Permute → LayerNorm → MLP → layer scale; shifted windows and patch merging)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.blocks import TinyConvNeXt, TinyLlama, TinySwin, TinyViT, bottleneck_resnet

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 20, (3, 6), generator=gen)
    labels = torch.randint(0, 20, (3, 6), generator=gen)
    # Llama (2 layers, d 8, 2 heads of r 4, SwiGLU 12, rotary): input/post-attention RMSNorm →
    # q/k/v and → gate/up, final norm → lm_head: norm_rescale 5 × 8; up ↔ down rescale 12 per
    # layer; v/o per head and entry (rotary leaves q/k out): 2 × 10 families of 2 groups; lm_head
    # T 8 columns (no bias); the stream (embed_tokens, o_proj, down_proj) read only by RMSNorms:
    # scale 1.
    llama = {"norm_rescale": (5, 40), "rescale": (2, 24), "attention_vo": (20, 40),
             "translation": (1, 8), "scale": (1, 1)}  # fmt: skip
    cases = [("Llama by hand", lambda: (TinyLlama(), ids, labels), llama)]
    try:
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=20, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
            tie_word_embeddings=False,
        )  # fmt: skip
        cases.append(("Llama (HF)", lambda: (transformers.LlamaForCausalLM(config), ids, ids),
                      llama))  # fmt: skip
    except ImportError:
        pass
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    # ConvNeXt (2 blocks, C 8): dwconv → Permute → LayerNorm scale (1 group each), LayerNorm →
    # pwconv1 norm_rescale 8 each, pwconv2 ↔ layer scale γ rescale 8 each, head T 8 + 1; the
    # stream (stem LayerNorm2d and each γ written, the depthwise convs read, the head's
    # LayerNorm2d normalises over the channels): stream_rescale of 1 group.
    convnext = {"scale": (2, 2), "norm_rescale": (2, 16), "rescale": (2, 16),
                "translation": (2, 9), "stream_rescale": (1, 1)}  # fmt: skip
    cases.append(("ConvNeXt blocks", lambda: (TinyConvNeXt(), x, y), convnext))
    # Swin (2 stages of 2 blocks, d 8 then 16, windows 2, shift 1): conv → Permute → LayerNorm
    # scale 1; norm1 → qkv (through the roll and the windows) and norm2 → mlp.0 norm_rescale
    # 2 × (8, 8, 16, 16) and the merging's LayerNorm(32) → reduction 32; the two stage streams
    # (stem LN / reduction, attention proj and MLP outputs written; norm1, norm2, the merging's
    # or the final LayerNorm reading): scale 1 each; head T 16 + 1; the windowed attention's
    # F.linear of the qkv and proj parameters: 2 heads per block, r 4 in stage 1 and 8 in
    # stage 2, 2 blocks each.
    heads = tuple(a + b for a, b in zip(_attention(2, 8, 2), _attention(2, 16, 2), strict=True))
    swin = {"scale": (3, 3), "norm_rescale": (9, 128), "translation": (2, 17),
            "attention_qk": heads, "attention_vo": heads}  # fmt: skip
    cases.append(("Swin blocks", lambda: (TinySwin(), x, y), swin))
    # ViT (2 layers, d 8, 2 heads of r 4, nn.MultiheadAttention, GELU): q/k and v/o 10 entries
    # × 2 heads per layer; ln_1 → in_proj, ln_2 → mlp.0 and the final ln → x[:, 0] → head
    # norm_rescale 5 × 8; the stream (patch conv, class token, position, out_proj, MLP outputs;
    # read only by the LayerNorms): scale 1; head T 8 + 1.
    vit = {"attention_qk": (20, 40), "attention_vo": (20, 40), "norm_rescale": (5, 40),
           "scale": (1, 1), "translation": (2, 9)}  # fmt: skip
    cases.append(("ViT blocks", lambda: (TinyViT(), x, y), vit))
    # ResNet-50-style (stem with max-pool, 2 stages of 2 bottlenecks, widths 4 → 16, 8 → 32):
    # S every conv → BN: 15 convs, 8 + 40 + 24 + 80 + 48 = 200 channels; R bn1 → relu → conv2
    # and bn2 → relu → conv3 in each block: 8 families, 2·(4+4+8+8) = 48; streams 16 + 32;
    # T 32 + 1.
    bottleneck = {"scale": (15, 200), "rescale": (8, 48), "stream_rescale": (2, 48),
                  "translation": (2, 33)}  # fmt: skip
    cases.append(("ResNet-50-style bottlenecks", lambda: (bottleneck_resnet(), x, y), bottleneck))
    return cases


def _counts(families: list) -> dict[str, tuple[int, int]]:
    """symmetry -> (number of families, total number of groups)."""
    kinds = {f.symmetry for f in families}
    of = {k: [f.n_groups for f in families if f.symmetry == k] for k in kinds}
    return {k: (len(g), sum(g)) for k, g in of.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    header = f"{'model':<27} {'graph':<7} {'symmetry':<15} {'found':>9} {'by hand':>9}"
    print(header + f" {'confirmed':>9} {'detect s':>9} {'confirm s':>9}")
    print("-" * (len(header) + 30))
    for name, build, expected in _cases():
        torch.manual_seed(0)
        model, x, y = build()
        model = model.double()
        t0 = time.perf_counter()
        found = detect(model, x)
        t1 = time.perf_counter()
        got = _counts(found)
        confirm(model, found, (x, y))
        detect_s, confirm_s = t1 - t0, time.perf_counter() - t1
        ok = Counter(f.symmetry for f in found if f.confirmed)
        for i, sym in enumerate(sorted(set(got) | set(expected))):
            f, g = got.get(sym, (0, 0))
            e, h = expected.get(sym, (0, 0))
            mark = "" if (f, g) == (e, h) else "  <-- differs"
            times = f"{detect_s:>9.2f} {confirm_s:>9.2f}" if i == 0 else ""
            print(f"{name if i == 0 else '':<27} {found.path if i == 0 else '':<7} {sym:<15} "
                  f"{f'{f}/{g}':>9} {f'{e}/{h}':>9} {f'{ok[sym]}/{f}':>9} {times}{mark}")  # fmt: skip


if __name__ == "__main__":
    main()
