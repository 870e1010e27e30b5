"""RMSNorm (``nn.RMSNorm`` and a custom ``LlamaRMSNorm`` like Hugging Face's) as a normalisation:
``norm_rescale`` against every Linear that reads it, in a Llama block built by hand and in
Hugging Face's ``LlamaForCausalLM`` from a tiny config.

Counts by hand for L layers of width d, H heads of r = d / H, vocabulary V, no biases:
* norm_rescale: per layer input_layernorm → q, k, v and post_attention_layernorm → gate, up
  (the SwiGLU product silu(gate(x)) · up(x) reads the norm output through two Linears, both
  linear in it), plus the final norm → lm_head: 2L + 1 families of d groups;
* translation: lm_head's weight columns (d groups; no bias, not tied);
* attention_vo: r(r + 1)/2 families of H groups per layer; attention_qk: none (the rotary
  embedding sits between the projections and the scores, and a note says so);
* rescale: per layer up_proj ↔ down_proj, F (the MLP width) groups: the product
  silu(gate(x)) · up(x) is linear in up's output, so up's row c × α and down's column c × 1/α
  leave it unchanged; gate ↔ down has none (SiLU is not positively homogeneous; a note says so).
Each by-hand move below scales parameters directly, not through the library's actions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.blocks import GemmaRMSNorm, TinyLlama
from support.counting import counts
from torch import nn

from symmech.model.actions import BlockSlice
from symmech.model.detect import detect, format_table
from symmech.model.norms import is_rms_norm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # detection notes

D, H, LAYERS, VOCAB, T, F_MLP = 8, 2, 2, 20, 6, 12
R = D // H


def tokens(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (3, T), generator=g), torch.randint(
        0, VOCAB, (3, T), generator=g
    )


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def moved_loss(model: nn.Module, batch, scale: dict[str, tuple[int, torch.Tensor]]) -> float:
    """The loss after multiplying each named parameter by a vector along one axis."""
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
        for name, (axis, v) in scale.items():
            shape = [1] * params[name].ndim
            shape[axis] = -1
            params[name].mul_(v.reshape(shape))
        loss = float(lm_loss(model, *batch))
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return loss


def expected(layers: int) -> dict[str, tuple[int, int]]:
    # scale: the residual stream (embed_tokens and every o_proj and down_proj write it, only the
    # RMSNorms read it), one α on all its writers (tests/model/test_streams.py moves it by hand)
    entries = R * (R + 1) // 2
    return {"norm_rescale": (2 * layers + 1, (2 * layers + 1) * D), "translation": (1, D),
            "scale": (1, 1),
            "attention_vo": (layers * entries, layers * entries * H),
            "rescale": (layers, layers * F_MLP)}  # fmt: skip


def test_custom_rmsnorm_is_recognised_and_gemma_is_not_rescaled() -> None:
    norm = TinyLlama().norm
    assert is_rms_norm(norm) and is_rms_norm(nn.RMSNorm(4))
    assert not is_rms_norm(nn.LayerNorm(4)) and not is_rms_norm(nn.Linear(4, 4))
    torch.manual_seed(0)
    model = TinyLlama(norm=GemmaRMSNorm).double()
    x, y = tokens()
    fams = detect(model, x)
    assert "norm_rescale" not in counts(fams)
    assert any("x̂ · (1 + w)" in n and "layers.0.input_layernorm" in n for n in fams.notes)
    # and rightly so: scaling Gemma's weight by d and q/k/v's columns by 1/d moves the loss
    d = 0.5 + torch.rand(D, dtype=torch.float64)
    base = float(lm_loss(model, x, y))
    move = {"layers.0.input_layernorm.weight": (0, d)}
    move |= {f"layers.0.self_attn.{p}_proj.weight": (1, 1 / d) for p in "qkv"}
    assert abs(moved_loss(model, (x, y), move) - base) > 1e-6 * abs(base)


def test_tiny_llama_counts_slices_confirmation_and_by_hand_move() -> None:
    torch.manual_seed(0)
    model = TinyLlama(VOCAB, D, H, F_MLP, LAYERS, T).double()
    x, y = tokens()
    fams = detect(model, x, confirm_batch=(x, y))
    assert fams.path == "fx"
    assert counts(fams) == expected(LAYERS), format_table(fams)
    assert all(f.confirmed for f in fams), format_table(fams)
    assert sum("attention_qk not detected" in n for n in fams.notes) == LAYERS
    mlp = next(f for f in fams if f.layer.startswith("layers.1.post_attention_layernorm"))
    assert mlp.blocks == {
        "theta_1": [BlockSlice("layers.1.post_attention_layernorm.weight", 0)],
        "theta_2": [BlockSlice("layers.1.mlp.gate_proj.weight", 1),
                    BlockSlice("layers.1.mlp.up_proj.weight", 1)],
    }  # fmt: skip
    # by hand, in float64: the norm's weight × d, gate's and up's input columns × 1/d
    d = 0.5 + torch.rand(D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    base = float(lm_loss(model, x, y))
    move = {"layers.1.post_attention_layernorm.weight": (0, d),
            "layers.1.mlp.gate_proj.weight": (1, 1 / d), "layers.1.mlp.up_proj.weight": (1, 1 / d)}  # fmt: skip
    assert abs(moved_loss(model, (x, y), move) - base) <= 1e-12 * abs(base)
    # moving only gate's columns is no symmetry: both readers must move
    del move["layers.1.mlp.up_proj.weight"]
    assert abs(moved_loss(model, (x, y), move) - base) > 1e-6 * abs(base)
    # the gated product: up's rows × e and down's columns × 1/e, by hand; gate's rows: not one
    gated = next(f for f in fams if f.symmetry == "rescale" and f.layer.startswith("layers.0"))
    assert gated.blocks == {"theta_1": [BlockSlice("layers.0.mlp.up_proj.weight", 0)],
                            "theta_2": [BlockSlice("layers.0.mlp.down_proj.weight", 1)]}  # fmt: skip
    e = 0.5 + torch.rand(F_MLP, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    up = {"layers.0.mlp.up_proj.weight": (0, e), "layers.0.mlp.down_proj.weight": (1, 1 / e)}
    assert abs(moved_loss(model, (x, y), up) - base) <= 1e-12 * abs(base)
    gate = {"layers.0.mlp.gate_proj.weight": (0, e), "layers.0.mlp.down_proj.weight": (1, 1 / e)}
    assert abs(moved_loss(model, (x, y), gate) - base) > 1e-6 * abs(base)
    assert sum("SiLU is not positively homogeneous" in n for n in fams.notes) == LAYERS


def test_torch_rmsnorm_feeds_linear() -> None:
    if not hasattr(nn, "RMSNorm"):
        pytest.skip("this torch has no nn.RMSNorm")
    torch.manual_seed(0)
    # Linear(6→8) → RMSNorm(8) → Linear(8→5): norm_rescale 1/8, translation 2/(8 + 1);
    # fc1 → RMSNorm is no scale family (the rules know LayerNorm, BatchNorm, GroupNorm there)
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 5)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    fams = detect(model, x, confirm_batch=(x, y))
    assert counts(fams) == {"norm_rescale": (1, 8), "translation": (2, 9)}, format_table(fams)
    assert all(f.confirmed for f in fams), format_table(fams)


def test_hf_llama_from_a_tiny_config() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=F_MLP, num_hidden_layers=LAYERS,
        num_attention_heads=H, num_key_value_heads=H, max_position_embeddings=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).double()
    x, y = tokens()
    fams = detect(model, x, confirm_batch=(x, x))  # its own shifted LM loss
    assert fams.path == "export"
    assert counts(fams) == expected(LAYERS), format_table(fams)
    assert all(f.confirmed for f in fams), format_table(fams)
    # by hand: layer 0's input norm × d against q, k, v columns × 1/d (HF's own loss)
    d = 0.5 + torch.rand(D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    prefix = "model.layers.0"
    move = {f"{prefix}.input_layernorm.weight": (0, d)}
    move |= {f"{prefix}.self_attn.{p}_proj.weight": (1, 1 / d) for p in "qkv"}
    base = float(lm_loss(model, x, y))
    assert abs(moved_loss(model, (x, y), move) - base) <= 1e-12 * abs(base)
