"""A slow, obvious torch computation of every tracked quantity, written from the definitions only.

Per group j, each block is the concatenation of slice j of every bound tensor, J and c are written
by hand per symmetry, and the update u is built the way ``torch.optim.SGD`` builds it (checked
against a real ``torch.optim.SGD`` step in ``tests/codegen``). Nothing here calls symmech to compute
a reference value; generated functions and the tracker are only ever compared with these loops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# The hand-written reference
# ---------------------------------------------------------------------------------------------

#: ξ = Jθ + c per block: the J weight of every block (J = w·I), and c (translation: 𝟙).
J_WEIGHT = {
    "translation": {"theta": 0.0},
    "scale": {"theta": 1.0},
    "rescale": {"theta_1": 1.0, "theta_2": -1.0},
    "quadratic_rescale": {"theta_1": 1.0, "theta_2": -2.0},
}
OFFSET = {"translation": 1.0}
#: κ with ⟨ξ, θ⟩ = κ Q: translation 1, every quadratic charge 2.
KAPPA = {
    "translation": 1.0,
    "scale": 2.0,
    "rescale": 2.0,
    "quadratic_rescale": 2.0,
    "linear_pair": 2.0,
}


@dataclass(frozen=True)
class Slot:
    """One bound slice: ``block`` gets slice j along ``dim`` of params[name] (after ``view``)."""

    block: str
    name: str
    dim: int | None
    view: tuple[int, ...] | str | None = None


def shaped(t: torch.Tensor, view) -> torch.Tensor:
    if view is None:
        return t
    if view == "T":
        return t.t()
    return t.reshape(view)


def reduce_dims(x: torch.Tensor, dim: int | None) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.ndim))
    dim = dim % x.ndim
    return tuple(i for i in range(x.ndim) if i != dim)


@dataclass
class Reference:
    """Per-group Q, r and ⟨x, Jy⟩ by explicit loops over groups and slices."""

    symmetry: str
    slots: list[Slot]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys(s.block for s in self.slots))

    def n_groups(self, params: dict[str, torch.Tensor]) -> int:
        s = self.slots[0]
        x = shaped(params[s.name], s.view)
        return 1 if s.dim is None else x.shape[s.dim]

    def piece(self, state: dict[str, torch.Tensor], block: str, j: int) -> torch.Tensor:
        parts = []
        for s in self.slots:
            if s.block != block:
                continue
            x = shaped(state[s.name], s.view)
            parts.append(x if s.dim is None else x.select(s.dim, j))
        if self.symmetry == "linear_pair":
            assert len(parts) == 1
            return parts[0]  # the whole matrix: J acts by right-multiplication with E
        return torch.cat([p.reshape(-1) for p in parts])

    def J(self, block: str, x: torch.Tensor, absolute: bool = False) -> torch.Tensor:
        if self.symmetry == "linear_pair":
            E = self.constants["E"].to(x.dtype)
            E = E.abs() if absolute else E
            sign = 1.0 if (block == "U" or absolute) else -1.0
            return sign * (x @ E)
        w = J_WEIGHT[self.symmetry][block]
        return (abs(w) if absolute else w) * x

    def c(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, OFFSET.get(self.symmetry, 0.0))

    def _per_group(self, params, fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        return torch.stack([fn(j) for j in range(self.n_groups(params))])

    def form(self, x: dict, y: dict, absolute: bool = False) -> torch.Tensor:
        """⟨x, Jy⟩ per group (with |x|, |J|, |y| when ``absolute``: the round-off scale)."""

        def one(j):
            total = torch.zeros((), dtype=DTYPE)
            for b in self.blocks:
                xb, yb = self.piece(x, b, j), self.piece(y, b, j)
                if absolute:
                    xb, yb = xb.abs(), yb.abs()
                total = total + torch.sum(xb * self.J(b, yb, absolute))
            return total

        return self._per_group(x, one)

    def xi_dot(self, theta: dict, v: dict, absolute: bool = False) -> torch.Tensor:
        """⟨Jθ + c, v⟩ per group."""

        def one(j):
            total = torch.zeros((), dtype=DTYPE)
            for b in self.blocks:
                tb, vb = self.piece(theta, b, j), self.piece(v, b, j)
                if absolute:
                    xi, vb = self.J(b, tb.abs(), True) + self.c(tb).abs(), vb.abs()
                else:
                    xi = self.J(b, tb) + self.c(tb)
                total = total + torch.sum(xi * vb)
            return total

        return self._per_group(theta, one)

    def charge(self, theta: dict) -> torch.Tensor:
        """Q = ½⟨θ, Jθ⟩ + ⟨c, θ⟩ per group."""

        def lin(j):
            return sum(
                torch.sum(self.c(p) * p) for p in (self.piece(theta, b, j) for b in self.blocks)
            )

        return 0.5 * self.form(theta, theta) + self._per_group(theta, lin)

    def charge_abs(self, theta: dict) -> torch.Tensor:
        """½⟨|θ|, |J||θ|⟩ + ⟨|c|, |θ|⟩: the scale of round-off in Q (Q itself may cross 0)."""
        absd = {k: v.abs() for k, v in theta.items()}

        def lin(j):
            return sum(
                torch.sum(self.c(p).abs() * p)
                for p in (self.piece(absd, b, j) for b in self.blocks)
            )

        return 0.5 * self.form(absd, absd, absolute=True) + self._per_group(theta, lin)

    # arguments of the generated functions, built here from the slots (not by symmech.bind)
    def args(self, state: dict[str, torch.Tensor]) -> dict[str, list]:
        out: dict[str, list] = {b: [] for b in self.blocks}
        for s in self.slots:
            x = shaped(state[s.name], s.view)
            out[s.block].append((x, reduce_dims(x, s.dim)))
        return out


def sgd_update(theta, grad, buf, lr, momentum, dampening, weight_decay, nesterov):
    """(u, b_new) exactly as torch.optim.SGD's single-tensor step builds them (b_new None: β=0)."""
    d = grad + weight_decay * theta if weight_decay != 0 else grad.clone()
    if momentum == 0:
        return d, None
    b = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
    u = d + momentum * b if nesterov else b
    return u, b


def sgd_case(momentum: float, nesterov: bool, first: bool) -> str:
    if momentum == 0:
        return "plain"
    return (
        ("nesterov_first" if first else "nesterov") if nesterov else ("first" if first else "sgd")
    )


# ---------------------------------------------------------------------------------------------
# Layouts: how the blocks of each symmetry sit in real layers
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    params: dict[str, tuple[int, ...]]
    slots: list[Slot]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)


def _sym_matrix(r: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(r, r, generator=gen, dtype=DTYPE)
    return 0.5 * (a + a.T)


def layout(symmetry: str, kind: str, n: dict[str, int], gen: torch.Generator) -> Layout:
    """A binding of ``symmetry`` in a layer arrangement ``kind`` with sizes ``n``."""
    C, K, D, P, k = n["C"], n["K"], n["D"], n["P"], n["k"]
    if symmetry == "translation":
        if kind == "fc_columns":  # final Linear(D, K) before softmax: column j across classes
            return Layout({"fc.weight": (K, D)}, [Slot("theta", "fc.weight", 1)])
        if kind == "fc_bias":  # the whole bias vector is one group
            return Layout({"fc.bias": (K,)}, [Slot("theta", "fc.bias", None)])
        if kind == "flatten_channels":  # Linear after Flatten, viewed (K, C, P): channel c
            return Layout({"fc.weight": (K, C * P)}, [Slot("theta", "fc.weight", 1, (K, C, P))])
    if symmetry == "scale":
        if kind == "conv":  # Conv2d(D, C, k) -> BatchNorm: weight[c] and bias[c]
            return Layout(
                {"conv.weight": (C, D, k, k), "conv.bias": (C,)},
                [Slot("theta", "conv.weight", 0), Slot("theta", "conv.bias", 0)],
            )
        if kind == "fc_rows":
            return Layout(
                {"fc.weight": (C, D), "fc.bias": (C,)},
                [Slot("theta", "fc.weight", 0), Slot("theta", "fc.bias", 0)],
            )
        if kind == "whole":  # a layer before LayerNorm-like normalisation: one group
            return Layout(
                {"fc.weight": (C, D), "fc.bias": (C,)},
                [Slot("theta", "fc.weight", None), Slot("theta", "fc.bias", None)],
            )
    if symmetry in ("rescale", "quadratic_rescale"):
        if kind == "mlp":  # Linear(D, C) -> act -> Linear(C, K)
            return Layout(
                {"l1.weight": (C, D), "l1.bias": (C,), "l2.weight": (K, C)},
                [
                    Slot("theta_1", "l1.weight", 0),
                    Slot("theta_1", "l1.bias", 0),
                    Slot("theta_2", "l2.weight", 1),
                ],
            )
        if kind == "conv_flatten":  # Conv2d(D, C, k) -> act -> Flatten -> Linear(C*P, K)
            return Layout(
                {"conv.weight": (C, D, k, k), "conv.bias": (C,), "fc.weight": (K, C * P)},
                [
                    Slot("theta_1", "conv.weight", 0),
                    Slot("theta_1", "conv.bias", 0),
                    Slot("theta_2", "fc.weight", 1, (K, C, P)),
                ],
            )
    if symmetry == "linear_pair" and kind == "pair":  # x -> W2 W1 x, U = W1ᵀ (D×C), V = W2 (K×C)
        return Layout(
            {"fc1.weight": (C, D), "fc2.weight": (K, C)},
            [Slot("U", "fc1.weight", None, "T"), Slot("V", "fc2.weight", None)],
            {"E": _sym_matrix(C, gen)},
        )
    raise ValueError(f"no layout {kind!r} for {symmetry}")


LAYOUTS = {
    "translation": ("fc_columns", "fc_bias", "flatten_channels"),
    "scale": ("conv", "fc_rows", "whole"),
    "rescale": ("mlp", "conv_flatten"),
    "quadratic_rescale": ("mlp", "conv_flatten"),
    "linear_pair": ("pair",),
}
SYMMETRIES = tuple(LAYOUTS)


@st.composite
def sgd_hyper(draw) -> dict:
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.sampled_from([1e-3, 0.05, 0.3])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.7])),
        "weight_decay": draw(st.sampled_from([0.0, 1e-4, 5e-2])),
        "nesterov": nesterov,
    }


sizes = st.fixed_dictionaries(
    {
        "C": st.integers(1, 5),
        "K": st.integers(1, 4),
        "D": st.integers(1, 4),
        "P": st.integers(1, 4),
        "k": st.integers(1, 3),
    }
)


def close_to(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, what: str, rtol=1e-12):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = (got - want).abs()
    bound = rtol * scale + 1e-300
    assert torch.all(err <= bound), (
        f"{what}: error {err.max():.3e} > {rtol:g} x scale {scale.max():.3e}"
    )
