"""The per-step bookkeeping done in few operations: the stacked law step and batched directions.

:meth:`~symmech.runtime.stepper.Laws.step` advances the laws of Q, the anatomy and the buffer's
shares as one stack; :func:`~symmech.runtime.directions.directions_of` computes Adam's directions
of many tensors with one foreach call per operation. Both are checked against independent
computations: SGD and a general step simulated by hand in float64 (Q observed from the weights),
and ``torch.optim`` itself.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from symmech.laws.names import ANATOMY, PREDICTIONS
from symmech.runtime.directions import SMALL, direction, directions_of
from symmech.runtime.stepper import General, Hyper, Laws, StepData

DT = torch.float64


def _q(thetas: list[torch.Tensor]) -> torch.Tensor:
    """½|θ|² per group (the scale charge: ξ = θ, κ = 2)."""
    return torch.stack([0.5 * (t * t).sum() for t in thetas])


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys)])


@pytest.mark.parametrize("nesterov", [False, True])
def test_stacked_sgd_step_follows_simulated_sgd(nesterov: bool) -> None:
    """Three groups; tracking starts on a run where group 2 already has a buffer (its share
    measured), groups 0 and 1 get theirs in the first tracked step (a per-group fresh mask).
    discrete_residual and ⟨ξ, b⟩ follow the observed values, the anatomy adds up to the change."""
    gen = torch.Generator().manual_seed(3)
    lr, beta, tau, lam = 0.05, 0.9, 0.0 if nesterov else 0.2, 0.01
    shapes = [(5,), (7,), (4,)]
    thetas = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    mats = [torch.randn(s[0], s[0], generator=gen, dtype=DT) * 0.3 for s in shapes]
    shifts = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]

    def grads() -> list[torch.Tensor]:
        return [m @ t + c for m, t, c in zip(mats, thetas, shifts)]

    bufs: list[torch.Tensor | None] = [None, None, None]
    # before tracking: two plain momentum steps of group 2 only (the others have no gradient)
    for _ in range(2):
        g = grads()[2] + lam * thetas[2]
        bufs[2] = g.clone() if bufs[2] is None else beta * bufs[2] + (1 - tau) * g
        u = g + beta * bufs[2] if nesterov else bufs[2]
        thetas[2] = thetas[2] - lr * u
    q0 = _q(thetas)
    laws = Laws(2.0, q0)
    hyper = Hyper(lr=lr, momentum=beta, dampening=tau, weight_decay=lam, nesterov=nesterov)
    for k in range(6):
        g = grads()
        r = _dot(thetas, g)
        xi_b = None
        fresh: torch.Tensor | bool = False
        if k == 0:
            share = float(_dot(thetas[2:], [bufs[2]])[0])
            xi_b = torch.tensor([math.nan, math.nan, share], dtype=DT)
            fresh = torch.tensor([True, True, False])
        d = [gi + lam * t for gi, t in zip(g, thetas)]
        bufs = [di.clone() if b is None else beta * b + (1 - tau) * di for di, b in zip(d, bufs)]
        us = [di + beta * b if nesterov else b for di, b in zip(d, bufs)]
        laws.step(
            StepData(
                hyper,
                uJu=_dot(us, us),
                uJb=_dot(us, bufs),
                residual=r,
                xi_b=xi_b,
                fresh=fresh,
            )
        )
        thetas = [t - lr * u for t, u in zip(thetas, us)]
        q = _q(thetas)
        torch.testing.assert_close(laws.discrete_residual, q, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(laws.xi_b_residual, _dot(thetas, bufs), rtol=1e-11, atol=1e-12)
        parts = laws.dQ_decay + laws.dQ_breaking + laws.dQ_step + laws.dQ_history
        torch.testing.assert_close(parts, q - q0, rtol=1e-11, atol=1e-12)
        split = laws.xi_b_decay + laws.xi_b_breaking + laws.xi_b_step + laws.xi_b_history
        torch.testing.assert_close(split, laws.xi_b_residual, rtol=1e-11, atol=1e-12)


def test_stacked_general_step_with_mixed_shrinks() -> None:
    """θₖ₊₁ = Sθₖ − ηa with a different shrink per tensor of a group (Q(Sθ) − s²Q(θ) measured):
    both laws follow ½|θ|² observed, the anatomy adds up, the angle matches the weights."""
    gen = torch.Generator().manual_seed(5)
    pairs = [[torch.randn(n, generator=gen, dtype=DT) for n in (3, 4)] for _ in range(2)]
    shrinks, eta = (0.99, 0.97), 0.1

    def q_of(ps):
        return torch.stack([0.5 * sum((t * t).sum() for t in p) for p in ps])

    q0 = q_of(pairs)
    laws = Laws(2.0, q0, turning=torch.tensor([True, False]))
    for _ in range(4):
        a = [[torch.randn(t.shape, generator=gen, dtype=DT) for t in p] for p in pairs]
        shrunk = [[s * t for s, t in zip(shrinks, p)] for p in pairs]
        step = [[eta * x for x in ap] for ap in a]
        xi_a = torch.stack(
            [sum((x * y).sum() for x, y in zip(sp, st)) for sp, st in zip(shrunk, step)]
        )
        aja = torch.stack([sum((y * y).sum() for y in st) for st in step])
        mixed = q_of(shrunk) - shrinks[0] ** 2 * q_of(pairs)
        new = [[x - y for x, y in zip(sp, st)] for sp, st in zip(shrunk, step)]
        moved = [[n - o for n, o in zip(np_, op)] for np_, op in zip(new, pairs)]
        djd = torch.stack([sum((m * m).sum() for m in mp) for mp in moved])
        cos = [
            sum((x * y).sum() for x, y in zip(o, n)) / math.sqrt(4 * q_of([o])[0] * q_of([n])[0])
            for o, n in zip(pairs, new)
        ]
        laws.step(
            StepData(Hyper(lr=eta), None, None, general=General(shrinks[0], xi_a, aja, mixed, djd))
        )
        pairs = new
        q = q_of(pairs)
        torch.testing.assert_close(laws.discrete, q, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(laws.discrete_residual, q, rtol=1e-12, atol=1e-13)
        parts = laws.dQ_decay + laws.dQ_breaking + laws.dQ_step + laws.dQ_history
        torch.testing.assert_close(parts, q - q0, rtol=1e-11, atol=1e-12)
        assert math.isclose(float(laws.angular_update[0]), math.acos(float(cos[0])), rel_tol=1e-6)
        assert math.isnan(float(laws.angular_update[1]))


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.AdamW, dict(weight_decay=0.1)),
        (torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
        (torch.optim.Adam, dict(maximize=True, foreach=False)),
    ],
)
def test_directions_of_batches_adam(cls, kw) -> None:
    """One foreach pass for the small tensors, the large one alone: each direction equals
    :func:`direction`'s bit for bit, and sθ − ηa is the step torch takes."""
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(n, generator=gen, dtype=DT)) for n in (3, 17, SMALL + 5)
    ]
    opt = cls(params, lr=0.01, **kw)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=DT)
        got = directions_of(opt, 0, params)
        for p, d in zip(params, got):
            one = direction(opt, 0, p)
            assert (d.shrink, d.eta) == (one.shrink, one.eta)
            assert torch.equal(d.a, one.a)
        predicted = [d.shrink * p.detach() - d.eta * d.a for p, d in zip(params, got)]
        opt.step()
        for p, want in zip(params, predicted):
            torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=1e-15)


def test_directions_of_falls_back_without_state_or_grad() -> None:
    """The first step (no state yet) and a tensor without a gradient go one by one, as before."""
    a, b = (torch.nn.Parameter(torch.ones(4, dtype=DT)) for _ in range(2))
    opt = torch.optim.Adam([a, b], lr=0.1)
    a.grad = torch.full((4,), 0.5, dtype=DT)
    got = directions_of(opt, 0, [a, b])
    assert torch.equal(got[1].a, torch.zeros(4, dtype=DT))
    predicted = got[0].shrink * a.detach() - got[0].eta * got[0].a
    opt.step()
    torch.testing.assert_close(a.detach(), predicted, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("same", [True, False])
def test_bank_scales_raw_sums_once(same: bool) -> None:
    """A family hands ⟨ξ, a⟩ and ⟨a, J a⟩ unscaled with its factors; the bank's stack equals
    each family's sums times its own factors, whether they share them (one product) or not."""
    from types import SimpleNamespace

    from symmech.runtime.bank import Bank

    fams = [SimpleNamespace(n_groups=n) for n in (2, 3)]
    bank = Bank(fams)  # type: ignore[arg-type]
    bank.laws = Laws(2.0, torch.zeros(5, dtype=DT))
    raw = [torch.arange(1.0, 1.0 + n, dtype=torch.float32) for n in (2, 3)]
    scales = [(0.3, 0.09), (0.3, 0.09) if same else (0.7, 0.49)]
    data = [
        StepData(Hyper(lr=0.1), None, None, general=General(0.99, r, 2 * r, scale=s))
        for r, s in zip(raw, scales)
    ]
    got = bank._general(data, Hyper(lr=0.1), data).general
    assert got is not None and got.scale == (1.0, 1.0)
    want_x = torch.cat([(r * s[0]).double() for r, s in zip(raw, scales)])
    want_a = torch.cat([(2 * r * s[1]).double() for r, s in zip(raw, scales)])
    assert torch.equal(got.xi_a, want_x) and torch.equal(got.aJa, want_a)


@settings(max_examples=60, deadline=None)
@given(
    lr=st.sampled_from([0.0, 1e-3, 0.1]),
    beta=st.sampled_from([0.0, 0.5, 0.9]),
    tau=st.sampled_from([0.0, 0.3]),
    lam=st.sampled_from([0.0, 5e-4, 0.1]),
    nesterov=st.booleans(),
    kappa=st.sampled_from([1.0, 2.0]),
    missing=st.sampled_from([(), ("residual",), ("gJg",), ("residual", "gJg")]),
    seed=st.integers(0, 2**16),
)
def test_the_steady_step_as_one_matrix_is_the_stacked_step(
    lr, beta, tau, lam, nesterov, kappa, missing, seed
) -> None:
    """A steady SGD step (not the first, no restart, no share to re-read, none fresh or idle) is
    one product with a matrix made from the stacked step itself: over 12 random steps of random
    data, every law, the anatomy, the shares, the continuous models, the equilibrium and the
    angle equal those of the stacked step (the same law, summed in another order) to 1e-12 of the
    state's scale."""
    if nesterov and (beta == 0.0 or tau != 0.0):
        return
    gen = torch.Generator().manual_seed(seed)
    g = 6
    q0 = torch.rand(g, generator=gen, dtype=DT) + 0.5
    hyper = Hyper(lr=lr, momentum=beta, dampening=tau, weight_decay=lam, nesterov=nesterov)
    fast, slow = Laws(kappa, q0), Laws(kappa, q0)
    slow._steady_sgd = lambda data: False  # type: ignore[method-assign]
    seen = 0
    for k in range(12):
        uJu = torch.rand(g, generator=gen, dtype=DT)
        values = {
            "uJu": uJu,
            "uJb": uJu * torch.rand(g, generator=gen, dtype=DT),
            "gJg": torch.rand(g, generator=gen, dtype=DT),
            "residual": 1e-3 * torch.randn(g, generator=gen, dtype=DT),
        }
        for name in missing:
            values[name] = None
        for laws in (fast, slow):
            laws.step(StepData(hyper, rotation_eq=0.1, **values))
        seen += int(fast._steady_sgd(StepData(hyper, **values)) and k > 0)
        for name in (*PREDICTIONS, *ANATOMY, "equilibrium", "xi_b", "xi_b_residual"):
            a, b = getattr(fast, name), getattr(slow, name)
            scale = 1.0 + b.abs().max().item() if not b.isnan().all() else 1.0
            assert torch.allclose(a, b, rtol=0, atol=1e-12 * scale, equal_nan=True), (k, name)
        a, b = fast.angular_update, slow.angular_update
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True), k
    assert seen >= 10 and fast._linear  # the product ran on every step after the first
