"""Families evaluated as batches (attention heads: every charge-matrix entry of a head from one
matrix product, :mod:`symmech.runtime.batched`) and the per-call shared slices, on real networks
in float64 under SGD and AdamW:

* the tracker's observed Q and rₖ at every step against an independent computation from the
  weights (attention: C_h = A Aᵀ + a aᵀ − B Bᵀ − b bᵀ per head; every family: the generated
  functions on plain (tensor, dims) pairs, x M multiplied out, no Gram matrix, no stacking),
  ≤ 1e-12 of the family's scale;
* the batched tracker against the same tracker with batching switched off (every family its own
  evaluation): the same records to ≤ 1e-12 of the scale, the exact law as close to the observed Q;
* training bit-identical to an untracked twin; the batches really ran (not fallen back).
"""

from __future__ import annotations

import copy

import pytest
import torch

import symmech
from symmech.demo.models import build_model, transformer_block

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 12


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)


def _transformer():
    torch.manual_seed(0)
    model = transformer_block(d_model=16, n_heads=2, d_ff=32, seq_len=8, in_features=8)
    x = torch.randn(16, 8, 8, dtype=torch.float64)
    return model.double(), x


def _vgg():
    torch.manual_seed(0)
    model = build_model("vgg-tiny-bn", in_channels=1, num_classes=10, image_size=8)
    return model.double(), torch.randn(16, 1, 8, 8, dtype=torch.float64)


def _plain(binding, read) -> dict:
    """Every block of a binding as plain (tensor, reduce dims) pairs of ``read(parameter)``."""
    return {
        name: [s.prepare(read(s.tensor).detach()) for s in slices]
        for name, slices in binding.blocks.items()
    }


def _head_entries(model) -> dict:
    """Q of every (family, head, entry) from the weights: ½⟨E, C_h⟩ with E = eᵢeⱼᵀ + eⱼeᵢᵀ."""
    att = model.attn
    heads = att.n_heads

    def rows(w):
        return w.detach().reshape(heads, -1, w.shape[1])

    def bias(b):
        return b.detach().reshape(heads, -1, 1)

    A, B = rows(att.q_proj.weight), rows(att.k_proj.weight)
    a, b = bias(att.q_proj.bias), bias(att.k_proj.bias)
    qk = A @ A.mT + a @ a.mT - B @ B.mT - b @ b.mT
    V, v = rows(att.v_proj.weight), bias(att.v_proj.bias)
    O = att.out_proj.weight.detach().reshape(-1, heads, V.shape[1]).permute(1, 2, 0)
    vo = V @ V.mT + v @ v.mT - O @ O.mT
    out = {}
    for name, C in (("attention_qk", qk), ("attention_vo", vo)):
        r = C.shape[1]
        for h in range(heads):
            for i in range(r):
                for j in range(i, r):
                    out[(name, f"h{h}[{i},{j}]")] = float(C[h, i, j] if i != j else C[h, i, i] / 2)
    return out


def _run(make, make_optimizer, batched: bool):
    model, x = make()
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(model)
    opt = make_optimizer(model)
    tracker = symmech.track(model, opt, example_input=(x, y), log_every=1)
    truth: list[list[tuple]] = []  # per step and family: (Q, r) from the weights
    tracker.weights = []  # θ before every step, and after the last
    for _ in range(STEPS):
        tracker.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if not batched:  # every family its own evaluation
            for f in tracker.families:
                f.batch = None
        if tracker.detection_pending:  # the families appear in this step's hook
            truth.append([])
        else:
            truth.append(_independent(tracker, model))
        opt.step()
    tracker.weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    twin_opt = make_optimizer(twin)
    for _ in range(STEPS):
        twin_opt.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        twin_opt.step()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # training bit-identical
    return tracker, truth


def _independent(tracker, model) -> list[tuple]:
    entries = _head_entries(model) if hasattr(model, "attn") else {}
    out = []
    for f in tracker.families:
        b, m = f.binding, f.module
        const = (b.constants,) if m.CONSTANTS else ()
        th = _plain(b, lambda p: p)
        # copies: a per-entry group's value may be a view of the live tensor itself
        q = m.charge(th, *const).reshape(-1).clone()
        r = m.residual(th, _plain(b, lambda p: p.grad), *const).reshape(-1).clone()
        if f.symmetry.startswith("attention"):
            weights = torch.tensor(
                [entries[(f.symmetry, lab)] for lab in b.labels], dtype=torch.float64
            )
            assert torch.allclose(q, weights, rtol=0, atol=1e-12 * float(q.abs().max()))
        out.append((q, r))
    return out


def _rows_by_step(tracker) -> dict[int, list[list[dict]]]:
    sizes = [f.n_groups for f in tracker.families]
    by_step: dict[int, list[dict]] = {}
    for row in tracker.records(final=False):
        by_step.setdefault(row["step"], []).append(row)
    out = {}
    for step, rows in by_step.items():
        split, i = [], 0
        for g in sizes:
            split.append(rows[i : i + g])
            i += g
        assert i == len(rows)
        out[step] = split
    return out


@pytest.mark.parametrize("make", [_transformer, _vgg], ids=["transformer", "vgg-tiny-bn"])
@pytest.mark.parametrize("make_optimizer", [_sgd, _adamw], ids=["sgd", "adamw"])
def test_batched_agrees_with_weights_and_with_per_family(make, make_optimizer) -> None:
    tracker, truth = _run(make, make_optimizer, batched=True)
    plain, _ = _run(make, make_optimizer, batched=False)
    batches = {id(f.batch): f.batch for f in tracker.families if f.batch is not None}
    if make is _transformer:
        assert batches and all(len(b.members) > 1 and not b.off for b in batches.values())
    assert all(f.tracked for f in tracker.families)
    got, ref = _rows_by_step(tracker), _rows_by_step(plain)
    assert sorted(got) == sorted(ref) and len(got) >= STEPS - 1
    scales = [
        max(abs(r["observed"]) for rows in got.values() for r in rows[k]) or 1.0
        for k in range(len(tracker.families))
    ]
    checked = 0
    for step, families in got.items():
        for k, rows in enumerate(families):
            scale = scales[k]
            for key in ("observed", "residual", "discrete", "discrete_residual"):
                a = torch.tensor([r[key] for r in rows], dtype=torch.float64)
                b = torch.tensor([r[key] for r in ref[step][k]], dtype=torch.float64)
                assert torch.allclose(a, b, rtol=0, atol=1e-12 * scale), (step, k, key)
            law = torch.tensor([r["discrete_residual"] - r["observed"] for r in rows])
            assert float(law.abs().max()) <= 1e-9 * scale  # the exact law (fed r) holds
            if truth[step]:
                q, res = truth[step][k]
                a = torch.tensor([r["observed"] for r in rows], dtype=torch.float64)
                assert torch.allclose(a, q, rtol=0, atol=1e-12 * scale), (step, k)
                a = torch.tensor([r["residual"] for r in rows], dtype=torch.float64)
                assert torch.allclose(a, res, rtol=0, atol=1e-12 * scale), (step, k)
                checked += 1
    assert checked >= (STEPS - 1) * len(tracker.families)


def _group_rows(binding, weights: dict, names: list[str]) -> torch.Tensor:
    """Every group's entries of the bound tensors, one row per group (float64)."""
    parts = []
    for slices in binding.blocks.values():
        for s in slices:
            k = next(i for i, t in enumerate(binding.tensors) if t is s.tensor)
            x = s.shaped(weights[names[k]])
            parts.append(x.movedim(s.dim, 0).reshape(x.shape[s.dim], -1))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("make_optimizer", [_sgd, _adamw], ids=["sgd", "adamw"])
def test_angular_update_of_scale_groups_in_a_shared_bank(make_optimizer) -> None:
    """Scale (Q = ½|θ|²) and rescale families share a bank on vgg-tiny-bn; the angle is
    computed on the scale rows only. Against the angle between θₖ₋₁ and θₖ from the weights
    (2 asin(|u − v|/2) of the unit vectors, float64), and None for every other family."""
    tracker, _ = _run(_vgg, make_optimizer, batched=True)
    families = tracker.families
    assert {f.symmetry for f in families} >= {"scale", "rescale"}
    banks = {id(tracker._bank_of[id(f)]) for f in families if f.symmetry in ("scale", "rescale")}
    assert len(banks) == 1  # one bank holds both
    rows = _rows_by_step(tracker)
    checked = 0
    for step, per_family in rows.items():
        if step == 0:
            continue
        for f, fam_rows in zip(families, per_family, strict=True):
            got = [r["angular_update"] for r in fam_rows]
            if f.symmetry != "scale":
                assert all(v is None for v in got)
                continue
            names = f.names
            u = _group_rows(f.binding, tracker.weights[step - 1], names)
            v = _group_rows(f.binding, tracker.weights[step], names)
            u = u / u.norm(dim=1, keepdim=True)
            v = v / v.norm(dim=1, keepdim=True)
            angle = 2.0 * torch.asin((u - v).norm(dim=1) / 2.0)
            got_t = torch.tensor(got, dtype=torch.float64)
            assert float(angle.min()) > 0.0
            assert torch.allclose(got_t, angle, rtol=1e-6, atol=0), (step, f.layer)
            checked += 1
    assert checked >= (STEPS - 2) * sum(f.symmetry == "scale" for f in families)


def test_reductions_shared_within_a_hook_call_only() -> None:
    """Two families' slices of one tensor on one group axis (distinct BoundSlice objects) get
    the same per-group ⟨x, y⟩ once per hook call; after the call the values are recomputed
    (they follow an in-place update); both against the sums written out in float64."""
    from symmech.runtime.binding import BoundSlice
    from symmech.runtime.reductions import ReductionCache

    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64))
    g = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    cache = ReductionCache()
    a, b = BoundSlice(w, 1), BoundSlice(w, 1)
    first = cache.slice(w, a, "theta").dot(cache.slice(g, a))
    again = cache.slice(w, b, "theta").dot(cache.slice(g, b))
    assert again is first
    ref = torch.tensor([float((w[:, i] * g[:, i]).sum()) for i in range(4)], dtype=torch.float64)
    assert torch.allclose(first, ref, rtol=1e-14, atol=0)
    other_axis = cache.slice(w, BoundSlice(w, 0), "theta").dot(cache.slice(g, BoundSlice(w, 0)))
    assert other_axis.shape == (6,)
    cache.clear()
    with torch.no_grad():
        w.mul_(2.0)
    moved = cache.slice(w, b, "theta").dot(cache.slice(g, b))
    assert moved is not first and torch.allclose(moved, 2.0 * ref, rtol=1e-14, atol=0)


def test_first_charge_kept_as_a_copy() -> None:
    """A translation family with one group per entry of a bias: its charge is the bias itself,
    so Q₀ must be a copy, not a view that follows training (checked against the initial bias)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    start = lin.bias.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    tracker = symmech.track(lin, opt, [symmech.bind("translation", theta=[(lin.bias, 0)])])
    x = torch.randn(8, 3, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        lin(x).square().sum().backward()
        opt.step()
    assert not torch.equal(lin.bias.detach(), start)  # training moved the bias
    family = tracker.families[0]
    assert family.n_groups == 4
    assert torch.equal(family.q0, start)
    assert torch.equal(family.state_dict()["q0"], start)


def test_measured_residual_kept_as_a_copy() -> None:
    """The same family: rₖ = ⟨ξ, gₖ⟩ of a one-entry group is the gradient entry itself, so the
    residual the family holds must not change when the gradient is zeroed in place."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    tracker = symmech.track(lin, opt, [symmech.bind("translation", theta=[(lin.bias, 0)])])
    x = torch.randn(8, 3, dtype=torch.float64)
    opt.zero_grad()
    lin(x).square().sum().backward()
    grad = lin.bias.grad.detach().clone()
    opt.step()
    family = tracker.families[0]
    assert torch.equal(family.residual, grad)  # ξ = 1 per entry: rₖ is the gradient entry
    opt.zero_grad(set_to_none=False)  # zeroes .grad in place
    assert torch.equal(family.residual, grad)
