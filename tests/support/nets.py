"""Small float64 PyTorch networks with a known symmetry, bound to the blocks of a library spec.

Shared by ``tests/derive/test_geometry.py`` and ``tests/derive/test_noether_flow.py``. Everything here is an
*independent* reference for the engine: losses, gradients and Hessian-vector products come from
the real network through autograd / ``torch.func``, never from symmech.

A :class:`Problem` flattens all parameters of a network into one float64 vector θ, so that a
Hessian-vector product covers every parameter (cross terms between the symmetry's blocks and the
rest of the network included). Each block of the spec is an *index tensor* into θ, shaped like
the block: a column vector (n × 1) for ``Block("theta")``, a matrix for ``Block("U", (d, r))``.
Index tensors are built from per-parameter ``arange`` tensors with ordinary indexing, transposes
and concatenation, so "the incoming row and bias of hidden unit j" or "Uᵀ is the first layer's
weight" are written once, in the builders below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

import symmech
from symmech import library

DTYPE = torch.float64

#: Spec constructors by name (the engine's library).
SPECS: dict[str, Callable[[], symmech.Symmetry]] = {
    "translation": library.translation,
    "scale": library.scale,
    "rescale": library.rescale,
    "quadratic_rescale": library.quadratic_rescale,
    "linear_pair": lambda: library.linear_pair("symmetric"),
    "linear_pair_antisymmetric": lambda: library.linear_pair("antisymmetric"),
}


@functools.cache
def derivation(name: str) -> symmech.Derivation:
    """``symmech.derive`` of a library spec, once per test session (derive is pure)."""
    return symmech.derive(SPECS[name]())


@functools.cache
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0  # pixels in [0, 1]
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # centred, O(1), no division by ~0 for blank pixels
    return x, y


def digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random rows of scikit-learn's bundled digits (64 features, 10 classes), float64."""
    x, y = _digits_numpy()
    rows = np.random.default_rng(seed).choice(len(x), size=n, replace=False)
    return torch.tensor(x[rows], dtype=DTYPE), torch.tensor(y[rows], dtype=torch.long)


@dataclass
class Problem:
    """A full-batch loss L(θ) of a real network, with the spec's blocks located inside θ."""

    name: str  #: the library spec name (key of :data:`SPECS`)
    model: nn.Module
    loss_of_outputs: Callable[[torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    theta0: torch.Tensor  #: all parameters, flattened, float64
    blocks: dict[str, torch.Tensor]  #: block name -> index tensor into θ, shaped like the block
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  #: e.g. {"E": ...}
    _slices: dict[str, tuple[int, int, torch.Size]] = field(default_factory=dict)

    def __repr__(self) -> str:  # short, for hypothesis' falsifying examples
        shapes = {k: tuple(v.shape) for k, v in self.blocks.items()}
        return f"<{self.name} problem: {self.model} blocks {shapes}>"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis' pretty printer
        printer.text(repr(self))

    # -- the loss and its derivatives, all over the FULL parameter vector -----------------
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: theta[a:b].view(shape) for k, (a, b, shape) in self._slices.items()}

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, self.unflatten(theta), (self.inputs,))
        return self.loss_of_outputs(out)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """∇L(θ) by plain reverse-mode autograd (about 10× faster here than torch.func.grad)."""
        theta = theta.detach().requires_grad_(True)
        return torch.autograd.grad(self.loss(theta), theta)[0]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(θ) v by forward-over-reverse differentiation (torch.func.jvp of torch.func.grad)."""
        return jvp(grad(self.loss), (theta,), (v,))[1]

    def hessian_norm(self, theta: torch.Tensor, seed: int = 0, iters: int = 1) -> float:
        """A rough ‖H‖ (power iterations; one gives a lower bound): the scale of round-off in an HVP."""
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(theta.shape, generator=gen, dtype=DTYPE)
        v = v / v.norm()
        est = 0.0
        for _ in range(iters):
            hv = self.hvp(theta, v)
            est = float(hv.norm())
            v = hv / max(est, 1e-300)
        return est

    # -- moving between the full vector and per-block values ------------------------------
    def block_values(self, full: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """Gather each block out of a full-length vector: ``{prefix + name: values}``."""
        return {prefix + k: full[idx] for k, idx in self.blocks.items()}

    def scatter(self, per_block: dict[str, torch.Tensor], base: torch.Tensor | None = None):
        """A full-length vector equal to ``base`` (zeros by default) with the blocks overwritten."""
        out = torch.zeros_like(self.theta0) if base is None else base.clone()
        for k, idx in self.blocks.items():
            out[idx.reshape(-1)] = torch.as_tensor(per_block[k], dtype=DTYPE).reshape(-1)
        return out

    def in_blocks(self) -> torch.Tensor:
        """Boolean mask of the entries of θ that belong to some block."""
        mask = torch.zeros(self.theta0.shape, dtype=torch.bool)
        for idx in self.blocks.values():
            mask[idx.reshape(-1)] = True
        return mask

    def check_blocks_disjoint(self) -> None:
        flat = torch.cat([idx.reshape(-1) for idx in self.blocks.values()])
        assert len(torch.unique(flat)) == len(flat), "blocks overlap"


def _problem(
    name: str,
    model: nn.Module,
    loss_of_outputs: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    make_blocks: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    constants: dict[str, torch.Tensor] | None = None,
) -> Problem:
    model = model.to(DTYPE)
    slices, index, parts, offset = {}, {}, [], 0
    for key, p in model.named_parameters():
        n = p.numel()
        slices[key] = (offset, offset + n, p.shape)
        index[key] = torch.arange(offset, offset + n).reshape(p.shape)
        parts.append(p.detach().reshape(-1))
        offset += n
    theta0 = torch.cat(parts).to(DTYPE).clone()
    prob = Problem(
        name,
        model,
        loss_of_outputs,
        inputs,
        theta0,
        make_blocks(index),
        dict(constants or {}),
        slices,
    )
    prob.check_blocks_disjoint()
    return prob


def _column(idx: torch.Tensor) -> torch.Tensor:
    return idx.reshape(-1, 1)


def _ce(y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda logits: F.cross_entropy(logits, y)


def softmax_classifier(hidden: int, seed: int, unit: int, bind: str, n: int = 96) -> Problem:
    """digits → Linear(64, hidden) → tanh → Linear(hidden, 10) → softmax cross-entropy.

    Translation acts on the logits' layer: ``bind="column"`` binds θ to the final weight's
    column ``unit`` (one input unit across all 10 classes), ``bind="bias"`` to the final bias.
    """
    torch.manual_seed(seed)
    x, y = digits(n, seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def blocks(ix):
        if bind == "column":
            return {"theta": _column(ix["2.weight"][:, unit])}
        return {"theta": _column(ix["2.bias"])}

    return _problem("translation", model, _ce(y), x, blocks)


def conv_batchnorm(channels: int, seed: int, unit: int, n: int = 32, eps: float = 1e-30) -> Problem:
    """digits (1×8×8) → Conv2d(1, c, 3, pad 1) → BatchNorm2d(c) → ReLU → AvgPool(2) → Linear(16c, 10).

    Scale acts on one output channel of the conv: θ = (weight[unit] flattened, bias[unit]).
    BatchNorm uses batch statistics (``track_running_stats=False``, so torch.func sees no
    buffer updates); ``eps`` is far below the batch variance, so the symmetry is exact to
    float64 round-off (with eps = 1e-5 it would be broken at the 1e-5 level).
    """
    torch.manual_seed(seed)
    x, y = digits(n, seed)
    model = nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels, eps=eps, track_running_stats=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * channels, 10),
    )
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)

    def blocks(ix):
        return {
            "theta": _column(
                torch.cat([ix["0.weight"][unit].reshape(-1), ix["0.bias"][unit : unit + 1]])
            )
        }

    return _problem("scale", model, _ce(y), x.reshape(n, 1, 8, 8), blocks)


def _two_layer(
    name: str, activation: nn.Module, hidden: int, seed: int, unit: int, n: int, in_scale: float
) -> Problem:
    torch.manual_seed(seed)
    x, y = digits(n, seed)
    model = nn.Sequential(nn.Linear(64, hidden), activation, nn.Linear(hidden, 10))

    def blocks(ix):
        incoming = torch.cat([ix["0.weight"][unit], ix["0.bias"][unit : unit + 1]])
        return {"theta_1": _column(incoming), "theta_2": _column(ix["2.weight"][:, unit])}

    return _problem(name, model, _ce(y), in_scale * x, blocks)


def relu_mlp(hidden: int, seed: int, unit: int, n: int = 96) -> Problem:
    """digits → Linear(64, h) → ReLU → Linear(h, 10) → cross-entropy.

    Rescale acts on hidden unit ``unit``: θ₁ = (incoming row, bias), θ₂ = outgoing column.
    """
    return _two_layer("rescale", nn.ReLU(), hidden, seed, unit, n, 1.0)


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def quadratic_mlp(hidden: int, seed: int, unit: int, n: int = 96) -> Problem:
    """digits → Linear(64, h) → x² → Linear(h, 10) → cross-entropy (quadratic_rescale)."""
    return _two_layer("quadratic_rescale", Square(), hidden, seed, unit, n, 0.5)


def random_structured(r: int, structure: str, gen: torch.Generator) -> torch.Tensor:
    """A random symmetric or antisymmetric r × r matrix of spectral norm 1 (0 if r = 1 and
    antisymmetric). Only αE matters to the action, so fixing ‖E‖ loses nothing and keeps
    ‖e^{αE}‖ ≤ e^{|α|}: round-off in E1/E2 is amplified by at most that."""
    a = torch.randn(r, r, generator=gen, dtype=DTYPE)
    e = (a + a.T) / 2 if structure == "symmetric" else (a - a.T) / 2
    norm = torch.linalg.matrix_norm(e, 2)
    return e / norm if norm > 0 else e


def linear_net(
    d: int, r: int, k: int, seed: int, structure: str = "symmetric", n: int = 32
) -> Problem:
    """f(x) = V Uᵀ x as Linear(d, r, no bias) → Linear(r, k, no bias), MSE on random data.

    The first layer's weight is Uᵀ (r × d) and the second's is V (k × r); the spec's constant
    (r × r) is a random symmetric or antisymmetric matrix, bound under the spec's own name.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    y = torch.randn(n, k, generator=gen, dtype=DTYPE)
    model = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, k, bias=False))

    def blocks(ix):
        return {"U": ix["0.weight"].T, "V": ix["1.weight"]}

    # ((out - y) ** 2).mean() rather than F.mse_loss: torch 2.13's jvp-of-grad through
    # F.mse_loss fails with "ZeroTensors are immutable" (a torch.func issue, not symmech's).
    name = "linear_pair" if structure == "symmetric" else "linear_pair_antisymmetric"
    (const,) = derivation(name).symmetry.constants  # named "E" (symmetric) or "A"
    E = random_structured(r, structure, gen)
    return _problem(name, model, lambda out: ((out - y) ** 2).mean(), x, blocks, {const.name: E})


def evaluate(d: symmech.Derivation, quantity: str, **arrays):
    """``d.evaluate`` on torch tensors; for actions with e^{αE} the values go through NumPy.

    torch 2.13's ``torch.linalg.matrix_exp`` is off by up to ~2.5e-10 in float64 for a single
    matrix with norm in about (0.01, 0.1) (a wrong coefficient in its degree-8 Taylor branch,
    pytorch/pytorch#196592), which would swamp the round-off-level checks here; symmech's NumPy
    backend uses ``scipy.linalg.expm``. Results come back as float64 torch tensors.
    """
    if not d.symmetry.uses_matrix_exponential:
        return d.evaluate(quantity, **arrays)
    plain = {k: v.detach().numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()}
    out = d.evaluate(quantity, **plain)

    def back(x):
        return torch.as_tensor(np.asarray(x), dtype=DTYPE)

    return {k: back(v) for k, v in out.items()} if isinstance(out, dict) else back(out)


def random_alpha(name: str, rng: np.random.Generator) -> float:
    """A group element away from the identity: α ∈ [1/2, 2] (multiplicative) or [−1, 1]."""
    if derivation(name).symmetry.is_multiplicative:
        return float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    return float(rng.uniform(-1.0, 1.0))
