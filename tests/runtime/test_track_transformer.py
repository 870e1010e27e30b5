"""Tracking the transformer symmetries found by detection: attention_qk / attention_vo per head
and charge-matrix entry, norm_rescale, rescale, translation and the residual stream's scale
(read only by LayerNorms, so approximate: its law is fed the measured residual), float64 under SGD with momentum
and weight decay. The observed charges are checked against C_h computed here from the weights,
the exact discrete law against the observed charges (relative to the family's scale), and
training against an untracked copy (bit-identical)."""

from __future__ import annotations

import copy

import pytest
import torch
from support.blocks import TinySwin
from support.sgd import digits_batches
from support.zoo import transformer_block
from torch import nn

import symmech
from symmech.model.detect import detect
from symmech.runtime.attach import bindings_from_families
from symmech.runtime.error_scale import charge_terms

pytestmark = pytest.mark.usefixtures("single_thread")

# scale: the residual stream's writers, read only by LayerNorms (broken by their eps alone; the
# exact law is fed the measured residual ⟨ξ, g⟩ like any approximate symmetry)
KINDS = {"attention_qk", "attention_vo", "norm_rescale", "rescale", "scale", "translation"}


class _Encoder(nn.Module):
    """8 tokens of 8 pixels → Linear → nn.TransformerEncoderLayer (pre-LN, ReLU) → mean → head."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layer = nn.TransformerEncoderLayer(
            d, heads, 16, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x.reshape(x.shape[0], 8, 8))).mean(dim=1))


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _per_family(tracker):
    """Rows split by family (records are ordered by step, then family, then group)."""
    rows = tracker.records()
    sizes = [f.n_groups for f in tracker.families]
    out = [[] for _ in sizes]
    i = 0
    while i < len(rows):
        for k, g in enumerate(sizes):
            chunk = rows[i : i + g]
            assert {(r["symmetry"], r["layer"], r["step"]) for r in chunk} == {
                (tracker.families[k].symmetry, tracker.families[k].layer, rows[i]["step"])
            }
            out[k].append(chunk)
            i += g
    return out


def _head_charges(w_a, b_a, w_b, b_b, heads):
    """C_h = A Aᵀ + a aᵀ − B Bᵀ − b bᵀ per head for row-blocks of two weights (heads, r, r)."""
    A = w_a.reshape(heads, -1, w_a.shape[1])
    B = w_b.reshape(heads, -1, w_b.shape[1])
    C = A @ A.mT - B @ B.mT
    if b_a is not None:
        a, b = b_a.reshape(heads, -1, 1), b_b.reshape(heads, -1, 1)
        C = C + a @ a.mT - b @ b.mT
    return C


def _vo_charges(w_v, b_v, w_o, heads):
    """C_h = W_V,h W_V,hᵀ + b bᵀ − W_O[:, h]ᵀ W_O[:, h] (heads, r, r)."""
    V = w_v.reshape(heads, -1, w_v.shape[1])
    O = w_o.reshape(w_o.shape[0], heads, -1).permute(1, 2, 0)  # (heads, r, out)
    C = V @ V.mT - O @ O.mT
    if b_v is not None:
        b = b_v.reshape(heads, -1, 1)
        C = C + b @ b.mT
    return C


def _expected_q(C):
    """Q of entry (i, j), E = eᵢeⱼᵀ + eⱼeᵢᵀ (i < j) or eᵢeᵢᵀ: ½⟨E, C⟩ = C_ij or ½ C_ii."""
    out = {}
    heads, r, _ = C.shape
    for h in range(heads):
        for i in range(r):
            for j in range(i, r):
                out[f"h{h}[{i},{j}]"] = float(C[h, i, j] if i != j else C[h, i, i] / 2)
    return out


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _adamw_no_decay_on_norms_and_biases(model):
    """The usual transformer set-up: AdamW, weight decay on matrices only (per-tensor settings)."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": 0.05}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-3)


def _run(model, steps, charges, make_optimizer=_sgd, kinds=KINDS):
    torch.manual_seed(0)
    ((x, y),) = digits_batches(1, 32)
    twin = copy.deepcopy(model)
    families = list(detect(model, x))
    assert {f.symmetry for f in families} == kinds
    bindings = bindings_from_families(model, families)
    assert len(bindings) == len(families)
    opt = make_optimizer(model)
    tracker = symmech.track(model, opt, bindings, log_every=max(1, steps // 20))
    scale0 = [float(charge_terms(b).max()) for b in bindings]
    _train(model, opt, x, y, steps)
    scale1 = [float(charge_terms(b).max()) for b in bindings]
    per_family = _per_family(tracker)
    expected = {key: _expected_q(C) for key, C in charges(model).items()}
    worst: dict[str, float] = {}
    checked = streams = 0
    for k, (fam, logs) in enumerate(zip(tracker.families, per_family, strict=True)):
        law = "discrete"
        if "normalised by" in fam.layer or fam.symmetry == "scale":  # a norm's eps breaks it
            assert fam.symmetry in ("scale", "stream_rescale"), fam.layer  # and it says so
            if fam.status != "tracked":
                assert fam.status.startswith("approximate: |r| = "), fam.status
                law = "discrete_residual"  # the exact law fed the measured rₖ = ⟨ξ, gₖ⟩
        else:
            assert fam.status == "tracked", (fam.symmetry, fam.layer, fam.status)
        observed = [r["observed"] for rows in logs for r in rows]
        scale = max(scale0[k], scale1[k], *(abs(q) for q in observed))
        err = max(abs(r[law] - r["observed"]) for rows in logs for r in rows) / scale
        worst[fam.symmetry] = max(worst.get(fam.symmetry, 0.0), err)
        final = logs[-1]
        assert final[0]["step"] == steps
        binding = bindings[k]
        if fam.symmetry.startswith("attention"):
            assert len(binding.labels) == binding.n_groups
            truth = expected[(fam.symmetry, fam.layer)]
            for g, row in enumerate(final):
                assert row["label"] == binding.labels[g]  # records name each entry
                assert abs(row["observed"] - truth[row["label"]]) <= 1e-12 * scale
                checked += 1
        else:
            assert [row["label"] for row in final] == [str(g) for g in range(fam.n_groups)]
        if fam.layer.startswith("stream ") and fam.n_groups == 1:  # Q by hand: ½Σ|θ₁|² − ½Σ|θ₂|²
            truth = _whole_stream_charge(model, families[k])
            assert abs(final[0]["observed"] - truth) <= 1e-12 * scale
            streams += 1
    assert all(e <= 1e-9 for e in worst.values()), worst
    assert streams == sum(f.layer.startswith("stream ") and f.n_groups == 1 for f in families)
    n_attention = sum(f.n_groups for f in families if f.symmetry.startswith("attention"))
    assert checked == n_attention
    # the laws moved: Q at the end differs from Q at the start (no vacuous pass)
    moved = max(
        abs(logs[-1][g]["observed"] - logs[0][g]["observed"])
        for logs in per_family
        for g in range(len(logs[0]))
    )
    assert moved > 1e-3
    opt_b = make_optimizer(twin)
    _train(twin, opt_b, x, y, steps)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    return worst


def _whole_stream_charge(model, family) -> float:
    """Q of a one-group stream family from the weights: ½ Σ |writer|² − ½ Σ |reader|²."""
    params = dict(model.named_parameters())

    def half_sq(block: str) -> float:
        return 0.5 * sum(float(params[s.param].detach().pow(2).sum()) for s in family.blocks[block])

    if family.symmetry == "scale":
        return half_sq("theta")
    return half_sq("theta_1") - half_sq("theta_2")


def _block_charges(model):
    att, heads = model.attn, model.attn.heads
    qk = _head_charges(att.q.weight, att.q.bias, att.k.weight, att.k.bias, heads)
    vo = _vo_charges(att.v.weight, att.v.bias, att.out.weight, heads)
    return {("attention_qk", "attn"): qk.detach(), ("attention_vo", "attn"): vo.detach()}


def _encoder_charges(model):
    mha = model.layer.self_attn
    d, heads = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qk = _head_charges(w[:d], b[:d], w[d : 2 * d], b[d : 2 * d], heads)
    vo = _vo_charges(w[2 * d :], b[2 * d :], mha.out_proj.weight, heads)
    name = "layer.self_attn"
    return {("attention_qk", name): qk.detach(), ("attention_vo", name): vo.detach()}


def test_nanogpt_block_explicit_softmax_1000_steps():
    # d = 16, 4 heads of r = 4: 10 entries per charge matrix, 4 heads each
    torch.manual_seed(0)
    worst = _run(transformer_block(d=16, heads=4, hidden=32).double(), 1000, _block_charges)
    assert set(worst) == KINDS


def test_nanogpt_block_adamw_1000_steps():
    # AdamW without decay on norms and biases: the preconditioner breaks every symmetry (kinetic
    # breaking), the exact law still holds entry by entry
    torch.manual_seed(0)
    model = transformer_block(d=16, heads=4, hidden=32).double()
    worst = _run(model, 1000, _block_charges, _adamw_no_decay_on_norms_and_biases)
    assert set(worst) == KINDS


def test_sdpa_block_300_steps():
    # the same block with F.scaled_dot_product_attention; 300 steps keep the file fast
    torch.manual_seed(1)
    model = transformer_block(d=8, heads=2, hidden=16).double()
    model.attn.fused = True
    _run(model, 300, _block_charges)


def test_transformer_encoder_layer_300_steps():
    # nn.TransformerEncoderLayer (nn.MultiheadAttention inside, read from its parameters)
    torch.manual_seed(2)
    # the encoder layer is one node of the graph: its stream is read from the module
    # (embedding, out_proj and linear2 against the head, normalised by norm1 and norm2)
    _run(_Encoder().double(), 300, _encoder_charges, kinds=KINDS - {"scale"} | {"stream_rescale"})


class _PostNormStack(nn.Module):
    """Linear → nn.TransformerEncoder of 2 post-norm layers with a final LayerNorm → head."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        layer = nn.TransformerEncoderLayer(d, heads, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x.reshape(x.shape[0], 8, 8))).mean(dim=1))


def _stack_charges(model):
    out = {}
    for i, layer in enumerate(model.enc.layers):
        mha = layer.self_attn
        d, heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight, mha.in_proj_bias
        qk = _head_charges(w[:d], b[:d], w[d : 2 * d], b[d : 2 * d], heads)
        vo = _vo_charges(w[2 * d :], b[2 * d :], mha.out_proj.weight, heads)
        name = f"enc.layers.{i}.self_attn"
        out[("attention_qk", name)], out[("attention_vo", name)] = qk.detach(), vo.detach()
    return out


def test_post_norm_transformer_encoder_streams_300_steps():
    """Post-norm segments inside the stack (norm1 → FF, norm2 → next attention, the last norm2
    against the final norm), the stream into the first attention, and the final norm against
    the head: each detected, confirmed, its Q equal to the weights' and its law exact."""
    torch.manual_seed(3)
    model = _PostNormStack().double()
    layers = [f.layer for f in detect(model, digits_batches(1, 32)[0][0])]
    streams = [n for n in layers if n.startswith("stream ")]
    assert len(streams) == 6, streams  # 2 norm1 → FF, 1 norm2 → attention, last norm2, in, out
    _run(model, 300, _stack_charges, kinds=KINDS - {"norm_rescale"} | {"stream_rescale"})


class _DigitsSwin(nn.Module):
    """The digits as 8×8 images into Swin blocks (shifted windows, F.linear attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.swin = TinySwin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(x.reshape(x.shape[0], 1, 8, 8))


def _swin_charges(model):
    out = {}
    for stage in (1, 3):
        for block in (0, 1):
            name = f"swin.features.{stage}.{block}.attn"
            att = model.get_submodule(name)
            d, heads = att.proj.weight.shape[0], att.heads
            w, b = att.qkv.weight, att.qkv.bias
            out[("attention_qk", f"{name}.qkv")] = _head_charges(
                w[:d], b[:d], w[d : 2 * d], b[d : 2 * d], heads
            ).detach()
            out[("attention_vo", name)] = _vo_charges(
                w[2 * d :], b[2 * d :], att.proj.weight, heads
            ).detach()
    return out


def test_swin_window_attention_by_f_linear_300_steps():
    # torchvision's Swin projects q, k, v and the output with F.linear of the modules' weights:
    # its heads are tracked like any attention's (the charges by hand, the law exact)
    torch.manual_seed(4)
    kinds = {"attention_qk", "attention_vo", "norm_rescale", "scale", "translation"}
    _run(_DigitsSwin().double(), 300, _swin_charges, kinds=kinds)
