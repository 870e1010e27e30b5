"""Small real networks on sklearn's digits with their symmetry families, optimizers, schedulers,
a training loop and a recorder that measures every law input by hand (the reference of
``support.reference_sgd``): shared by the tracker tests.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import symmech
from support.reference_sgd import Reference, Slot, sgd_update
from symmech.reference.numeric_laws import SGDHyper

DTYPE = torch.float64


ROOT = Path(__file__).resolve().parents[2]
LAW_COLUMNS = ("discrete", "discrete_residual", "first_order", "second_order")

# ---------------------------------------------------------------------------------------------
# Small real networks on sklearn's digits, each with its symmetry families
# ---------------------------------------------------------------------------------------------


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    rows = np.random.default_rng(0).choice(len(x), size=64, replace=False)
    return x[rows], y[rows]


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


@dataclass
class FamilySpec:
    symmetry: str
    layer: str
    slots: list[Slot]
    constants: dict[str, torch.Tensor]

    def reference(self) -> Reference:
        return Reference(self.symmetry, self.slots, self.constants)


@dataclass
class Net:
    name: str
    model: nn.Module
    loss: Callable[[], torch.Tensor]
    families: list[FamilySpec]
    lr: float

    def params(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def bindings(self) -> list[symmech.Binding]:
        p = self.params()
        out = []
        for f in self.families:
            blocks: dict[str, list] = {}
            for s in f.slots:
                item = (p[s.name], s.dim) if s.view is None else (p[s.name], s.dim, s.view)
                blocks.setdefault(s.block, []).append(item)
            out.append(
                symmech.bind(f.symmetry, layer=f.layer, constants=f.constants or None, **blocks)
            )
        return out


NETS = ("translation", "scale", "rescale", "conv_flatten", "quadratic", "linear_pair")


def make_net(name: str, dtype: torch.dtype = DTYPE, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    xn, yn = _digits()
    x = torch.tensor(xn, dtype=dtype)
    y = torch.tensor(yn, dtype=torch.long)
    img = x.reshape(-1, 1, 8, 8)
    const: dict[str, torch.Tensor] = {}
    if name == "translation":
        model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
        fams = [
            FamilySpec("translation", "fc.columns", [Slot("theta", "2.weight", 1)], {}),
            FamilySpec("translation", "fc.bias", [Slot("theta", "2.bias", None)], {}),
        ]
        inputs, lr = x, 0.2
    elif name == "scale":  # conv -> BatchNorm (eps 1e-12): scale of each output channel
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4, eps=1e-12),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        fams = [
            FamilySpec(
                "scale", "conv", [Slot("theta", "0.weight", 0), Slot("theta", "0.bias", 0)], {}
            )
        ]
        inputs, lr = img, 0.1
    elif name in ("rescale", "quadratic"):
        act = nn.ReLU() if name == "rescale" else Square()
        model = nn.Sequential(nn.Linear(64, 6), act, nn.Linear(6, 10))
        if name == "quadratic":
            with torch.no_grad():
                model[0].weight.mul_(0.5)
                model[0].bias.mul_(0.5)
        sym = "rescale" if name == "rescale" else "quadratic_rescale"
        fams = [
            FamilySpec(
                sym,
                "hidden",
                [
                    Slot("theta_1", "0.weight", 0),
                    Slot("theta_1", "0.bias", 0),
                    Slot("theta_2", "2.weight", 1),
                ],
                {},
            )
        ]
        inputs, lr = x, (0.1 if name == "rescale" else 0.02)
    elif name == "conv_flatten":  # conv -> ReLU -> Flatten -> Linear: views after the flatten
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 10))
        view = (10, 3, 36)
        fams = [
            FamilySpec(
                "rescale",
                "conv",
                [
                    Slot("theta_1", "0.weight", 0),
                    Slot("theta_1", "0.bias", 0),
                    Slot("theta_2", "3.weight", 1, view),
                ],
                {},
            ),
            FamilySpec("translation", "fc.channels", [Slot("theta", "3.weight", 1, view)], {}),
            FamilySpec("translation", "fc.bias", [Slot("theta", "3.bias", None)], {}),
        ]
        inputs, lr = img, 0.05
    elif name == "linear_pair":  # f(x) = W2 W1 x with MSE: U = W1ᵀ, V = W2
        model = nn.Sequential(nn.Linear(64, 4, bias=False), nn.Linear(4, 10, bias=False))
        a = torch.randn(4, 4, dtype=DTYPE)
        const = {"E": (0.5 * (a + a.T)).to(dtype)}
        fams = [
            FamilySpec(
                "linear_pair",
                "pair",
                [Slot("U", "0.weight", None, "T"), Slot("V", "1.weight", None)],
                const,
            )
        ]
        inputs, lr = x, 0.02
    else:
        raise ValueError(name)
    model = model.to(dtype)
    if name == "linear_pair":
        target = F.one_hot(y, 10).to(dtype)

        def loss() -> torch.Tensor:
            return F.mse_loss(model(inputs), target)
    else:

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(inputs), y)

    return Net(name, model, loss, fams, lr)


SCHEDULERS = (None, "step", "exp", "lambda")


def make_scheduler(opt, kind: str | None):
    if kind is None:
        return None
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=97, gamma=0.5)
    if kind == "exp":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.999)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1.0 + 0.01 * k))


@dataclass
class Config:
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    scheduler: str | None = None

    def hyper(self, lr) -> SGDHyper:
        return SGDHyper(lr, self.momentum, self.dampening, self.weight_decay, self.nesterov)


def make_opt(net: Net, cfg: Config, lr_factor: float = 1.0) -> torch.optim.SGD:
    lr = net.lr * lr_factor * (1.0 - cfg.momentum)  # comparable effective step for every β
    return torch.optim.SGD(
        net.model.parameters(),
        lr=lr,
        momentum=cfg.momentum,
        dampening=cfg.dampening,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )


def train(
    net: Net, opt, n: int, sched=None, before_step: Callable[[int], None] | None = None
) -> None:
    for k in range(n):
        opt.zero_grad(set_to_none=True)
        net.loss().backward()
        if before_step is not None:
            before_step(k)
        opt.step()
        if sched is not None:
            sched.step()


def train_with_reductions(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    mode: str | None,
    steps: int,
    between: Callable[[int], None] | None = None,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    **track_options,
) -> tuple[nn.Module, symmech.Tracker | None]:
    """SGD (lr 0.05, momentum 0.9, weight decay 1e-3; or ``optimizer(parameters)``) on one fixed
    batch, cross-entropy; with ``mode`` set, the tracker's products reduced that way
    (``fused.MODE``) and a tracker attached with ``track_options`` (None: untracked).
    ``between(step)`` runs after each step."""
    from symmech.runtime import fused

    x, y = batch
    if optimizer is not None:
        opt = optimizer(model.parameters())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    tracker = None
    if mode is not None:
        fused.MODE = mode
        tracker = symmech.track(model, opt, example_input=(x, y), log_every=1, **track_options)
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if between is not None:
            between(step)
    return model, tracker


def columns(rows: list[dict], layer: str) -> dict[str, np.ndarray]:
    """Tracker rows of one family as (n_steps+1, G) arrays (None -> nan)."""
    mine = [r for r in rows if r["layer"] == layer]
    steps = sorted({r["step"] for r in mine})
    groups = sorted({r["group"] for r in mine})
    out = {}
    for col in ("observed", "residual", "gradient_flow", "continuous", *LAW_COLUMNS, "t"):
        a = np.full((len(steps), len(groups)), np.nan)
        for r in mine:
            v = r[col]
            a[steps.index(r["step"]), r["group"]] = np.nan if v is None else v
        out[col] = a
    out["step"] = np.array(steps)
    return out


def rel_err(pred: np.ndarray, obs: np.ndarray, scale: np.ndarray) -> float:
    """max over steps and groups of |pred - obs| / (per-group scale)."""
    return float(np.max(np.abs(pred - obs) / scale[None, :]))


class HandRecorder:
    """Data terms measured by hand before each optimizer step (reads only; changes nothing)."""

    def __init__(self, net: Net, opt: torch.optim.SGD, cfg: Config) -> None:
        self.net, self.opt, self.cfg = net, opt, cfg
        self.refs = {f.layer: f.reference() for f in net.families}
        self.data = {
            f.layer: {k: [] for k in ("uJu", "uJb", "gJg", "r", "rabs", "Q", "Qabs")}
            for f in net.families
        }
        self.lr: list[float] = []

    def __call__(self, k: int) -> None:
        cfg, opt = self.cfg, self.opt
        (group,) = opt.param_groups
        lr = float(group["lr"])
        th, gr, u, b = {}, {}, {}, {}
        for name, p in self.net.params().items():
            th[name] = p.detach().to(DTYPE).clone()
            gr[name] = p.grad.detach().to(DTYPE).clone()
            buf = opt.state.get(p, {}).get("momentum_buffer")
            buf = None if buf is None else buf.detach().to(DTYPE)
            u[name], b[name] = sgd_update(
                th[name],
                gr[name],
                buf,
                lr,
                cfg.momentum,
                cfg.dampening,
                cfg.weight_decay,
                cfg.nesterov,
            )
            if b[name] is None:
                b[name] = u[name]
        self.lr.append(lr)
        for layer, ref in self.refs.items():
            d = self.data[layer]
            d["uJu"].append(ref.form(u, u))
            d["uJb"].append(ref.form(u, b))
            d["gJg"].append(ref.form(gr, gr))
            d["r"].append(ref.xi_dot(th, gr))
            d["rabs"].append(ref.xi_dot(th, gr, absolute=True))
            d["Q"].append(ref.charge(th))
            d["Qabs"].append(ref.charge_abs(th))

    def arrays(self, layer: str) -> dict[str, np.ndarray]:
        return {k: torch.stack(v).numpy() for k, v in self.data[layer].items()}


#: The configuration of the long runs: momentum, weight decay and a step schedule.
RICH = Config(momentum=0.9, weight_decay=5e-4, scheduler="step")


# ---------------------------------------------------------------------------------------------
# The charge measured by hand after every step, and bit-identical training
# ---------------------------------------------------------------------------------------------


def hand_charges(net: Net) -> dict[str, np.ndarray]:
    """Q of every family of ``net`` now, from the hand-written reference (float64)."""
    th = {n: p.detach().to(DTYPE) for n, p in net.params().items()}
    return {f.layer: f.reference().charge(th).numpy() for f in net.families}


def law_error(
    rows: list[dict], charges: list[dict[str, np.ndarray]], law: str = "discrete"
) -> float:
    """max |law − Q| / max|Q| over rows with a prediction; ``charges[k]``: Q before tracker step k."""
    worst = 0.0
    scale = {
        layer: max(float(np.max(np.abs(q[layer]))) for q in charges) or 1.0 for layer in charges[0]
    }
    seen = 0
    for r in rows:
        if r[law] is None or r["layer"] not in scale:
            continue
        want = charges[r["step"]][r["layer"]][r["group"]]
        worst = max(worst, abs(r[law] - want) / scale[r["layer"]])
        seen += 1
    assert seen > 0, "no row had a prediction"
    return worst


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor: equal bits ⇔ identical values, NaN included."""
    t = t.detach().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_training(a: nn.Module, b: nn.Module, opt_a, opt_b) -> None:
    """Parameters, buffers and optimizer state bit for bit equal."""
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(bits(p), bits(q)), name
    for (name, p), (_, q) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(p, q), name
    pa = [p for g in opt_a.param_groups for p in g["params"]]
    pb = [p for g in opt_b.param_groups for p in g["params"]]
    for p, q in zip(pa, pb):
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(bits(sa[k]), bits(sb[k])), k


#: the record columns two computations of the same run must agree in
RECORD_KEYS = ("observed", "residual", "discrete", "discrete_residual", "first_order",
               "second_order", "angular_update", "dQ_step", "dQ_decay")  # fmt: skip


def worst_record_difference(a: list[dict], b: list[dict]) -> float:
    """The largest difference of :data:`RECORD_KEYS` between two runs' records, relative to
    1 + |value|; the rows must match in step, layer, group and status, and a value missing or
    NaN on one side must be so on the other."""
    assert len(a) == len(b) and len(a) > 0
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        assert (ra["step"], ra["layer"], ra["group"]) == (rb["step"], rb["layer"], rb["group"])
        assert ra["status"] == rb["status"], (ra["status"], rb["status"])
        for k in RECORD_KEYS:
            x, y = ra.get(k), rb.get(k)
            if x is None or (isinstance(x, float) and np.isnan(x)):
                assert y is None or (isinstance(y, float) and np.isnan(y)), (k, x, y)
                continue
            worst = max(worst, abs(x - y) / (1.0 + abs(x)))
    return worst
