"""Detection on Hugging Face GPT-2 and BERT (torch.fx cannot trace them; torch.export can).

Small configs, no downloads, float64. Every expected count is derived by hand from the config:
d = hidden size, H heads of r = d / H, L layers; an attention kind has one family per entry i ≤ j
of the r×r charge matrix (r(r+1)/2 families per layer), each with H groups (the heads).
GPT-2's c_attn / c_proj / c_fc are ``Conv1D`` (weight (in, out)); the head slices are checked
against the columns HF's own split reads, and a family bound with nn.Linear's layout is rejected.
"""

from __future__ import annotations

import copy

import pytest
import torch

from symmech.model.actions import BlockSlice, Family, slice_view, strided
from symmech.model.confirm import confirm
from symmech.model.detect import detect, format_table
from symmech.runtime.attach import bindings_from_families, track
from symmech.runtime.error_scale import charge_terms

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # detection notes; HF config warnings
]

D, H, LAYERS, VOCAB, T = 8, 2, 2, 30, 6
R = D // H
ENTRIES = R * (R + 1) // 2  # 10 families per attention kind and layer


def gpt2(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=LAYERS, n_head=H, n_embd=D, vocab_size=VOCAB,
                                     n_positions=16, tie_word_embeddings=tied)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=LAYERS, num_attention_heads=H,
                                     hidden_size=D, intermediate_size=2 * D, vocab_size=VOCAB,
                                     num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(seed))


def counts(families: list) -> dict[str, tuple[int, int]]:
    """symmetry -> (number of families, total number of groups)."""
    kinds = {f.symmetry for f in families}
    of = {k: [f.n_groups for f in families if f.symmetry == k] for k in kinds}
    return {k: (len(g), sum(g)) for k, g in of.items()}


@pytest.fixture(scope="module")
def gpt2_found():
    model, x = gpt2(), ids()
    return model, detect(model, x, confirm_batch=(x, x))  # labels = inputs: HF shifts them


def test_gpt2_counts_notes_and_confirmation(gpt2_found) -> None:
    # Per layer: attention_qk and attention_vo, 10 families of 2 heads each; ln_1 → c_attn and
    # ln_2 → c_fc are read only by one Conv1D each (the residual takes the LN's input, not its
    # output): norm_rescale of d = 8 features. c_fc → GELU → c_proj: no rescale (GELU is not
    # positively homogeneous). lm_head.weight is wte.weight: no translation, and ln_f → lm_head
    # is no norm_rescale either.
    model, fams = gpt2_found
    assert fams.path == "export"
    assert counts(fams) == {
        "attention_qk": (LAYERS * ENTRIES, LAYERS * ENTRIES * H),
        "attention_vo": (LAYERS * ENTRIES, LAYERS * ENTRIES * H),
        "norm_rescale": (2 * LAYERS, 2 * LAYERS * D),
    }
    assert all(f.confirmed for f in fams), format_table(fams)
    notes = "\n".join(fams.notes)
    assert "torch.export" in notes and "symbolic_trace failed" in notes
    assert (
        "no translation family for lm_head: lm_head.weight is tied to transformer.wte.weight"
        in notes
    )
    assert "NewGELUActivation is not positively homogeneous" in notes
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_conv1d_slices_are_hf_heads(gpt2_found) -> None:
    # HF splits c_attn's output (in, 3d) into q | k | v columns, head h = columns h·r … h·r + r − 1
    # of each; c_proj (in = d, out = d) reads head h's features as rows h·r … of its weight.
    model, fams = gpt2_found
    attn = model.transformer.h[0].attn
    w, b, wp = attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight
    qk = next(f for f in fams if f.symmetry == "attention_qk" and ".h.0." in f.layer)
    vo = next(f for f in fams if f.symmetry == "attention_vo" and ".h.0." in f.layer)
    for h in range(H):
        for piece, part in ((qk.blocks["Q"], 0), (qk.blocks["K"], 1), (vo.blocks["V"], 2)):
            cols = slice(part * D + h * R, part * D + (h + 1) * R)
            assert torch.equal(slice_view(w, piece[0])[h], w[:, cols])
            assert torch.equal(slice_view(b, piece[1])[h], b[cols].reshape(1, R))
        assert torch.equal(slice_view(wp, vo.blocks["O"][0])[h], wp[h * R : (h + 1) * R].T)
    norm = next(f for f in fams if f.symmetry == "norm_rescale")
    assert norm.blocks["theta_2"] == [BlockSlice("transformer.h.0.attn.c_attn.weight", 0)]


def test_gpt2_linear_layout_on_conv1d_is_rejected(gpt2_found) -> None:
    # The same Q/K family with c_attn.weight read as nn.Linear's (out, in) = (3d, d) layout
    # (head h's rows h·r … of q and of k, transposed) is no symmetry of GPT-2.
    model, fams = gpt2_found
    good = next(f for f in fams if f.symmetry == "attention_qk" and ".h.0." in f.layer)
    name = "transformer.h.0.attn.c_attn.weight"
    q, k = (BlockSlice(name, 0, strided((H, D, R), (R * D, 1, D), first * D)) for first in (0, D))
    blocks = {"Q": [q, good.blocks["Q"][1]], "K": [k, good.blocks["K"][1]]}
    wrong = Family("attention_qk", "linear layout", blocks, H, constants=good.constants)
    confirm(model, [wrong], (ids(), ids()))
    assert wrong.confirmed is False, wrong.reason
    assert "loss changed by" in wrong.reason


def test_gpt2_untied_head_has_translation() -> None:
    # Untied: lm_head (d → vocab, no bias) under the LM's shifted cross-entropy: T d columns.
    model, x = gpt2(tied=False), ids()
    fams = detect(model, x, confirm_batch=(x, x))
    assert counts(fams)["translation"] == (1, D)
    assert counts(fams)["norm_rescale"] == (2 * LAYERS + 1, (2 * LAYERS + 1) * D)  # + ln_f
    assert all(f.confirmed for f in fams), format_table(fams)


def test_gpt2_eager_attention() -> None:
    # attn_implementation="eager": softmax(q kᵀ · s + mask) written out, cast to the value dtype,
    # dropout, then @ v. One layer: 10 + 10 families of 2 heads; ln_1, ln_2 norm_rescale 8 each.
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=H, n_embd=D, vocab_size=VOCAB,
                                     n_positions=16, attn_implementation="eager")  # fmt: skip
    model, x = transformers.GPT2LMHeadModel(config).double(), ids()
    fams = detect(model, x, confirm_batch=(x, x))
    assert counts(fams) == {
        "attention_qk": (ENTRIES, ENTRIES * H),
        "attention_vo": (ENTRIES, ENTRIES * H),
        "norm_rescale": (2, 2 * D),
    }
    assert all(f.confirmed for f in fams), format_table(fams)


def test_bert_counts_and_confirmation() -> None:
    # Separate query/key/value Linear layers: 10 + 10 families of 2 heads per layer.
    # classifier (d → 3) on the logits under cross-entropy: T d columns + bias.
    # LayerNorms: embeddings.LayerNorm, attention.output.LayerNorm and layer 0's output.LayerNorm
    # also feed a residual add: no norm_rescale. The last output.LayerNorm reaches only
    # pooler.dense (through the pick of token 0): norm_rescale d. dense → GELU → dense and
    # pooler → tanh → classifier: no rescale. Residual streams (post-LN): the three embedding
    # tables write into a sum read only by embeddings.LayerNorm (scale, 1 group); in each layer
    # the previous LayerNorm's affine and attention.output.dense write a stream read by q, k, v
    # and normalised by attention.output.LayerNorm, whose affine and output.dense write one read
    # by intermediate.dense and normalised by output.LayerNorm: 2 stream_rescale of 1 group each.
    model, x = bert(), ids()
    y = torch.tensor([0, 1, 2, 1])
    fams = detect(model, x, confirm_batch=(x, y))
    assert fams.path == "export"
    assert counts(fams) == {
        "scale": (1, 1),
        "stream_rescale": (2 * LAYERS, 2 * LAYERS),
        "translation": (2, D + 1),
        "norm_rescale": (1, D),
        "attention_qk": (LAYERS * ENTRIES, LAYERS * ENTRIES * H),
        "attention_vo": (LAYERS * ENTRIES, LAYERS * ENTRIES * H),
    }
    assert all(f.confirmed for f in fams), format_table(fams)
    norm = next(f for f in fams if f.symmetry == "norm_rescale")
    assert norm.layer == "bert.encoder.layer.1.output.LayerNorm → bert.pooler.dense"


def _train(model, opt, x, steps):
    torch.manual_seed(1)  # the same dropout masks with and without the tracker
    for _ in range(steps):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()


def _qk_charges(model, layer):
    """C_h = A Aᵀ + a aᵀ − B Bᵀ − b bᵀ, A = head h's q columns of c_attn.weight, transposed."""
    attn = model.transformer.h[layer].attn
    w, b = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()
    out = []
    for h in range(H):
        q, k = slice(h * R, (h + 1) * R), slice(D + h * R, D + (h + 1) * R)
        A, B, a, c = w[:, q].T, w[:, k].T, b[q, None], b[k, None]
        out.append(A @ A.T + a @ a.T - B @ B.T - c @ c.T)
    return out


def test_gpt2_tracked_exact_law_and_bit_identical(gpt2_found) -> None:
    steps = 50
    _, found = gpt2_found
    model, x = gpt2(), ids()
    twin = copy.deepcopy(model)
    bindings = bindings_from_families(model, list(found))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tracker = track(model, opt, bindings, log_every=5)
    scale0 = [float(charge_terms(b).max()) for b in bindings]
    C0 = _qk_charges(model, 0)
    _train(model, opt, x, steps)
    scale1 = [float(charge_terms(b).max()) for b in bindings]
    rows, sizes, worst, i = tracker.records(), [f.n_groups for f in tracker.families], 0.0, 0
    final: dict[tuple[str, str], float] = {}
    while i < len(rows):
        for k, g in enumerate(sizes):
            chunk = rows[i : i + g]
            scale = max(scale0[k], scale1[k], *(abs(r["observed"]) for r in chunk))
            worst = max(worst, *(abs(r["discrete"] - r["observed"]) / scale for r in chunk))
            for r in chunk:
                if r["step"] == steps and r["symmetry"] == "attention_qk":
                    final[(r["layer"], r["label"])] = r["observed"]
            i += g
    assert all(f.status == "tracked" for f in tracker.families)
    assert worst <= 1e-9, worst
    # observed charges of layer 0 vs C_h from the weights, read the way HF splits c_attn
    C = _qk_charges(model, 0)
    moved = max(float((c - c0).abs().max() / c0.abs().max()) for c, c0 in zip(C, C0, strict=True))
    assert moved > 1e-3, moved  # the charges moved: the law is not checked on constants
    layer0 = {lab: q for (layer, lab), q in final.items() if ".h.0." in layer}
    assert len(layer0) == ENTRIES * H
    for label, q in layer0.items():
        h, (a, b) = int(label[1]), map(int, label[3:-1].split(","))
        truth = float(C[h][a, b] if a != b else C[h][a, a] / 2)
        assert abs(q - truth) <= 1e-12 * max(1.0, abs(truth)), (label, q, truth)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    _train(twin, opt_b, x, steps)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _Conv1DNet(torch.nn.Module):
    """x (B, 6) → Conv1D(6 → 8) → ReLU → Conv1D(8 → 3): GPT-2's layer in a traceable net."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c1, self.act, self.c2 = Conv1D(8, 6), torch.nn.ReLU(), Conv1D(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.act(self.c1(x)))


def test_conv1d_rescale_and_translation_bind_transposed_layout() -> None:
    # Weights are (in, out): hidden unit j is column j of c1.weight (+ c1.bias[j]) and row j of
    # c2.weight. R: 8 units. T: c2's input features are its weight rows: 8 groups, + bias 1.
    torch.manual_seed(0)
    model = _Conv1DNet().double()
    torch.nn.init.normal_(model.c1.bias)
    x, y = torch.randn(7, 6, dtype=torch.float64), torch.arange(7) % 3
    fams = detect(model, x, confirm_batch=(x, y))
    assert fams.path == "fx"
    assert counts(fams) == {"translation": (2, 9), "rescale": (1, 8)}
    rescale = next(f for f in fams if f.symmetry == "rescale")
    assert rescale.blocks == {
        "theta_1": [BlockSlice("c1.weight", 1), BlockSlice("c1.bias", 0)],
        "theta_2": [BlockSlice("c2.weight", 0)],
    }
    columns = next(f for f in fams if f.symmetry == "translation" and f.n_groups == 8)
    assert columns.blocks == {"theta": [BlockSlice("c2.weight", 0)]}
    assert all(f.confirmed for f in fams), format_table(fams)
