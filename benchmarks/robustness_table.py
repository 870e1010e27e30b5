"""The everyday situations where a tracker used to be silently wrong: each one run, one table.

    python benchmarks/robustness_table.py

Each case is the reproduction of the issue that listed it (float64, a Linear-ReLU-Linear
classifier on random data), run with the current tracker. Per case it prints the worst relative
error of the exact law over the tracked rows (``discrete`` for families called ``tracked``,
``discrete_residual`` for ``approximate``), the statuses seen, and the first warning. A case
passes when every family is exact to 1e-9 or says why it is not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

import symmech

torch.set_default_dtype(torch.float64)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    return m, x, y


def _steps(m, opt, x, y, n, sched=None, loss=F.cross_entropy):
    for _ in range(n):
        opt.zero_grad()
        loss(m(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _worst(tr) -> tuple[float, str]:
    worst = 0.0
    for r in tr.records():
        law = "discrete_residual" if r["status"].startswith("approximate") else "discrete"
        if r[law] is None:
            continue
        scale = max(abs(r["observed"]), 1e-12)
        worst = max(worst, abs(r[law] - r["observed"]) / scale)
    statuses = sorted({f.status.split(":")[0] for f in tr.families})
    return worst, ", ".join(statuses)


def late_attach():
    m, x, y = _setup()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _steps(m, opt, x, y, 5)
    tr = symmech.track(m, opt, example_input=(x, y))
    _steps(m, opt, x, y, 5)
    return tr


def lr_zero():
    m, x, y = _setup()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 5))
    tr = symmech.track(m, opt, example_input=(x, y))
    _steps(m, opt, x, y, 10, sched)
    return tr


def fused_scaler():
    m, x, y = _setup()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    sc = torch.amp.GradScaler("cpu", init_scale=1024.0)
    tr = symmech.track(m, opt, example_input=(x, y))
    for _ in range(10):
        opt.zero_grad()
        sc.scale(F.cross_entropy(m(x), y)).backward()
        sc.step(opt)
        sc.update()
    return tr


def frozen():
    m, x, y = _setup()
    m[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    tr = symmech.track(m, opt, example_input=(x, y))
    _steps(m, opt, x, y, 10)
    return tr


def closure():
    m, x, y = _setup()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    tr = symmech.track(m, opt, example_input=(x, y))

    def loss():
        opt.zero_grad()
        out = F.cross_entropy(m(x), y)
        out.backward()
        return out

    for _ in range(10):
        opt.step(loss)
    return tr


def nan_rollback():
    m, x, y = _setup()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    tr = symmech.track(m, opt, example_input=(x, y))
    _steps(m, opt, x, y, 3)
    good = ({k: v.clone() for k, v in m.state_dict().items()}, opt.state_dict())
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    m[0].weight.grad[0, 0] = float("nan")
    opt.step()
    m.load_state_dict(good[0])
    opt.load_state_dict(good[1])
    _steps(m, opt, x, y, 5)
    return tr


def momentum_switch():
    m, x, y = _setup()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.0)
    tr = symmech.track(m, opt, example_input=(x, y))
    _steps(m, opt, x, y, 3)
    opt.param_groups[0]["momentum"] = 0.9
    _steps(m, opt, x, y, 3)
    opt.param_groups[0]["momentum"] = 0.0
    _steps(m, opt, x, y, 3)
    return tr


def bce():
    m, x, _ = _setup()
    target = torch.rand(32, 3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    tr = symmech.track(
        m, opt, example_input=(x, target), loss_fn=F.binary_cross_entropy_with_logits
    )
    _steps(m, opt, x, target, 10, loss=F.binary_cross_entropy_with_logits)
    return tr


def adamw_no_decay_on_biases():
    m, x, y = _setup()
    groups = [
        {"params": [p for n, p in m.named_parameters() if n.endswith("weight")]},
        {"params": [p for n, p in m.named_parameters() if n.endswith("bias")], "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-2)
    tr = symmech.track(m, opt, example_input=(x, y))
    _steps(m, opt, x, y, 10)
    return tr


CASES: dict[str, Callable] = {
    "attach after 5 momentum steps": late_attach,
    "lr = 0 at step 0 (warm-up)": lr_zero,
    "fused Nesterov + GradScaler": fused_scaler,
    "first layer frozen": frozen,
    "optimizer.step(closure)": closure,
    "NaN step, then rollback": nan_rollback,
    "momentum 0 → 0.9 → 0": momentum_switch,
    "BCE loss (no translation symmetry)": bce,
    "AdamW, no decay on biases": adamw_no_decay_on_biases,
}


def main() -> None:
    print("| case | worst exact-law error | statuses | first warning |")
    print("|---|---|---|---|")
    for name, case in CASES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tr = case()
                worst, statuses = _worst(tr)
                err = f"{worst:.1e}"
            except Exception as exc:  # a crash is a result here
                err, statuses = f"{type(exc).__name__}: {exc}", "-"
        first = next((str(w.message) for w in caught if "symmech" in str(w.message)), "")
        first = first.replace("|", "/")[:110]
        print(f"| {name} | {err} | {statuses} | {first} |")


if __name__ == "__main__":
    main()
