"""Detection on transformers, one table: families / groups per symmetry found vs derived by hand.

    python benchmarks/detect_table.py [--threads 2]

Models (float64, random weights, no downloads): Hugging Face ``GPT2LMHeadModel`` and
``BertForSequenceClassification`` (read through torch.export: torch.fx cannot trace them), a
nanoGPT block (fused c_attn, causal softmax written out, GELU MLP) as a classifier,
``nn.TransformerEncoderLayer`` (pre-LN, ReLU) between a Linear embedding and a head, and
:func:`symmech.demo.models.transformer_block`. The counts "by hand" are worked out below from the
sizes (an attention kind: r(r+1)/2 families of H groups per layer, r = d / H), never from the
code. ``detect s`` is ``detect(model, x)``; ``confirm s`` what ``confirm_batch=(x, y)`` adds.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from symmech.demo.models import transformer_block
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
        # tied to wte (no translation), GELU (no rescale).
        cases.append(("GPT-2 (HF)", lambda: (transformers.GPT2LMHeadModel(gpt2), ids, ids),
                      {"attention_qk": _attention(2, 16, 2), "attention_vo": _attention(2, 16, 2),
                       "norm_rescale": (4, 64)}))  # fmt: skip
        # BERT: classifier T 16 + 1; only the last output.LayerNorm → pooler.dense (16).
        cases.append(("BERT (HF)",
                      lambda: (transformers.BertForSequenceClassification(bert), ids,
                               torch.tensor([0, 1, 2, 1])),
                      {"attention_qk": _attention(2, 16, 2), "attention_vo": _attention(2, 16, 2),
                       "translation": (2, 17), "norm_rescale": (1, 16)}))  # fmt: skip
    except ImportError:
        print("transformers is not installed: the GPT-2 and BERT rows are left out")
    y = torch.tensor([0, 1, 2, 3])
    # nanoGPT: ln_1 → c_attn, ln_2 → c_fc, ln_f → mean → head norm_rescale (16 each); T 16 + 1.
    cases.append(("nanoGPT block", lambda: (NanoGPTBlock(), ids, y),
                  {"attention_qk": _attention(1, 16, 2), "attention_vo": _attention(1, 16, 2),
                   "norm_rescale": (3, 48), "translation": (2, 17)}))  # fmt: skip
    x = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # encoder layer (d 8, 2 heads, ff 16): norm1 → in_proj, norm2 → linear1 (8 each);
    # linear1 → ReLU → linear2 R 16; head T 8 + 1.
    cases.append(("nn.TransformerEncoderLayer", lambda: (Encoder(), x, y),
                  {"attention_qk": _attention(1, 8, 2), "attention_vo": _attention(1, 8, 2),
                   "norm_rescale": (2, 16), "rescale": (1, 16), "translation": (2, 9)}))  # fmt: skip
    # demo transformer (d 32, 4 heads, ff 64): ln1 → q,k,v; ln2 → fc1; ln_final → mean → head
    # (32 each); fc1 → relu → fc2 R 64; head T 32 + 1.
    cases.append(("symmech.demo transformer", lambda: (transformer_block(), x, y),
                  {"attention_qk": _attention(1, 32, 4), "attention_vo": _attention(1, 32, 4),
                   "norm_rescale": (3, 96), "rescale": (1, 64), "translation": (2, 33)}))  # fmt: skip
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
    header = f"{'model':<27} {'graph':<7} {'symmetry':<13} {'found':>9} {'by hand':>9}"
    print(header + f" {'confirmed':>9} {'detect s':>9} {'confirm s':>9}")
    print("-" * (len(header) + 30))
    for name, build, expected in _cases():
        torch.manual_seed(0)
        model, x, y = build()
        model = model.double()
        t0 = time.perf_counter()
        found = detect(model, x)
        t1 = time.perf_counter()
        confirmed = detect(model, x, confirm_batch=(x, y))
        t2 = time.perf_counter()
        detect_s, confirm_s = t1 - t0, (t2 - t1) - (t1 - t0)
        got = _counts(found)
        ok = Counter(f.symmetry for f in confirmed if f.confirmed)
        for i, sym in enumerate(sorted(set(got) | set(expected))):
            f, g = got.get(sym, (0, 0))
            e, h = expected.get(sym, (0, 0))
            mark = "" if (f, g) == (e, h) else "  <-- differs"
            times = f"{detect_s:>9.2f} {confirm_s:>9.2f}" if i == 0 else ""
            print(f"{name if i == 0 else '':<27} {found.path if i == 0 else '':<7} {sym:<13} "
                  f"{f'{f}/{g}':>9} {f'{e}/{h}':>9} {f'{ok[sym]}/{f}':>9} {times}{mark}")  # fmt: skip


if __name__ == "__main__":
    main()
