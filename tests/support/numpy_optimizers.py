"""NumPy replicas of torch.optim's updates, written from the optimizers' documented algorithms.

Each replica turns (θₖ, gₖ) and its own state into (sₖ, ηₖ, aₖ) with θₖ₊₁ = sₖθₖ − ηₖaₖ, so a test
can compare the replica's θₖ₊₁ with torch's (they agree to round-off) and feed aₖ to the exact
law. Nothing here calls symmech or reads torch's optimizer state: the state is rebuilt from the
gradients alone, which makes the replicas an independent oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Step = tuple[float, float, np.ndarray]  # (s, eta, a)


@dataclass
class SGD:
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    buf: np.ndarray | None = None

    def step(self, theta: np.ndarray, grad: np.ndarray) -> Step:
        g = -grad if self.maximize else grad
        d = g + self.weight_decay * theta
        if self.momentum == 0:
            return 1.0, self.lr, d
        self.buf = (
            d.copy() if self.buf is None else self.momentum * self.buf + (1 - self.dampening) * d
        )
        u = d + self.momentum * self.buf if self.nesterov else self.buf
        return 1.0, self.lr, u


@dataclass
class Adam:
    """Adam (coupled L2 decay) or AdamW (``decoupled=True``), with amsgrad and maximize."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False
    t: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    vmax: np.ndarray | None = None

    def step(self, theta: np.ndarray, grad: np.ndarray) -> Step:
        g = -grad if self.maximize else grad.copy()
        s = 1.0
        if self.weight_decay:
            if self.decoupled:
                s = 1.0 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * theta
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = np.zeros_like(theta), np.zeros_like(theta)
            self.vmax = np.zeros_like(theta)
        self.t += 1
        self.m = self.m + (g - self.m) * (1 - b1)
        self.v = self.v * b2 + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        v = self.v
        if self.amsgrad:
            self.vmax = np.maximum(self.vmax, self.v)
            v = self.vmax
        denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
        return s, self.lr / bc1, self.m / denom


@dataclass
class RMSprop:
    lr: float
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    maximize: bool = False
    sq: np.ndarray | None = None
    avg: np.ndarray | None = None
    buf: np.ndarray | None = None

    def step(self, theta: np.ndarray, grad: np.ndarray) -> Step:
        g = -grad if self.maximize else grad
        g = g + self.weight_decay * theta
        if self.sq is None:
            self.sq, self.avg, self.buf = (np.zeros_like(theta) for _ in range(3))
        self.sq = self.sq * self.alpha + (1 - self.alpha) * g * g
        if self.centered:
            self.avg = self.avg + (g - self.avg) * (1 - self.alpha)
            denom = np.sqrt(self.sq - self.avg * self.avg) + self.eps
        else:
            denom = np.sqrt(self.sq) + self.eps
        if self.momentum > 0:
            self.buf = self.momentum * self.buf + g / denom
            return 1.0, self.lr, self.buf
        return 1.0, self.lr, g / denom


@dataclass
class Adagrad:
    lr: float
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    maximize: bool = False
    t: int = 0
    total: np.ndarray | None = field(default=None)

    def step(self, theta: np.ndarray, grad: np.ndarray) -> Step:
        g = -grad if self.maximize else grad
        g = g + self.weight_decay * theta
        if self.total is None:
            self.total = np.full_like(theta, self.initial_accumulator_value)
        self.t += 1
        clr = self.lr / (1 + (self.t - 1) * self.lr_decay)
        self.total = self.total + g * g
        return 1.0, clr, g / (np.sqrt(self.total) + self.eps)
