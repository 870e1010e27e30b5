"""Evaluate matrix expressions on concrete arrays: NumPy, PyTorch (with autograd), or
explicit SymPy matrices of scalar symbols (for exact checks at small sizes).

A small tree walker of our own: SymPy's ``lambdify`` prints ``Matrix`` results without
autograd and fails on ``Max`` with floats (docs/architecture.md, "Known pitfalls").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import sympy as sp
from sympy.matrices.expressions import (
    HadamardProduct,
    Identity,
    Inverse,
    MatAdd,
    MatMul,
    MatPow,
    MatrixSymbol,
    OneMatrix,
    Trace,
    Transpose,
    ZeroMatrix,
)

from .matrix_ops import Inner, MatrixExp

Backend = str  # "numpy" | "torch" | "sympy"


class _Ops:
    def __init__(self, backend: Backend, like: Any = None) -> None:
        self.backend = backend
        self.like = like
        if backend == "torch":
            import torch

            self.torch = torch

    def ones(self, r: int, c: int):
        if self.backend == "numpy":
            return np.ones((r, c))
        if self.backend == "torch":
            return self.torch.ones(r, c, dtype=self.like.dtype, device=self.like.device)
        return sp.ones(r, c)

    def zeros(self, r: int, c: int):
        if self.backend == "numpy":
            return np.zeros((r, c))
        if self.backend == "torch":
            return self.torch.zeros(r, c, dtype=self.like.dtype, device=self.like.device)
        return sp.zeros(r, c)

    def eye(self, n: int):
        if self.backend == "numpy":
            return np.eye(n)
        if self.backend == "torch":
            return self.torch.eye(n, dtype=self.like.dtype, device=self.like.device)
        return sp.eye(n)

    def matmul(self, a, b):
        return a @ b if self.backend != "sympy" else a * b

    def hadamard(self, a, b):
        return a * b if self.backend != "sympy" else a.multiply_elementwise(b)

    def transpose(self, a):
        return a.T

    def trace(self, a):
        if self.backend == "numpy":
            return np.trace(a)
        if self.backend == "torch":
            return self.torch.trace(a)
        return a.trace()

    def inner(self, a, b):
        if self.backend == "sympy":
            return sum(x * y for x, y in zip(a, b))
        return (a * b).sum()

    def expm(self, a):
        if self.backend == "numpy":
            from scipy.linalg import expm

            return expm(a)
        if self.backend == "torch":
            # a batch of two takes torch's accurate path (single matrices can lose ~1e-10 in float64)
            return self.torch.linalg.matrix_exp(self.torch.stack([a, a]))[0]
        return a.exp()

    def inv(self, a):
        if self.backend == "numpy":
            return np.linalg.inv(a)
        if self.backend == "torch":
            return self.torch.linalg.inv(a)
        return a.inv()

    def scalar_fn(self, name: str, x):
        if self.backend == "sympy":
            return getattr(sp, name)(x)
        if self.backend == "torch" and isinstance(x, self.torch.Tensor):
            return getattr(self.torch, name)(x)
        return getattr(np, name)(x)


_SCALAR_FUNCS = {sp.exp: "exp", sp.log: "log", sp.sin: "sin", sp.cos: "cos", sp.Abs: "abs"}


def evaluate_expr(
    expr: sp.Basic,
    env: Mapping[sp.Basic, Any],
    backend: Backend = "numpy",
    like: Any = None,
):
    """Evaluate ``expr`` with every matrix symbol and scalar symbol looked up in ``env``.

    Dimension symbols missing from ``env`` are inferred from the shapes of the bound
    matrices. ``like`` (torch only) gives dtype and device for constants such as 𝟙.
    """
    env = dict(env)
    ops = _Ops(backend, like)
    if backend == "torch" and like is None:
        tensors = [v for v in env.values() if hasattr(v, "dtype") and hasattr(v, "device")]
        ops.like = tensors[0] if tensors else ops.torch.zeros((), dtype=ops.torch.float64)
    for sym, value in list(env.items()):
        if isinstance(sym, MatrixSymbol):
            rows, cols = sym.shape
            shape = tuple(value.shape) if backend != "sympy" else value.shape
            if len(shape) != 2:
                raise ValueError(
                    f"{sym.name} must be 2-D (a column vector may be 1-D), got shape {tuple(shape)}"
                )
            for dim, size in ((rows, shape[0]), (cols, shape[1])):
                if isinstance(dim, sp.Symbol):
                    if dim in env and int(env[dim]) != int(size):
                        raise ValueError(
                            f"size mismatch: {sym.name} has {dim} = {int(size)}, another array has {dim} = {int(env[dim])}"
                        )
                    env[dim] = int(size)
                elif getattr(dim, "is_Integer", False) and int(dim) != int(size):
                    raise ValueError(
                        f"size mismatch: {sym.name} needs {int(dim)} along an axis, got {int(size)}"
                    )

    def size(d) -> int:
        value = sp.sympify(d).xreplace(
            {
                k: sp.Integer(v)
                for k, v in env.items()
                if isinstance(k, sp.Symbol) and isinstance(v, int)
            }
        )
        if not value.is_Integer:
            raise KeyError(f"cannot infer the size {d}: bind a block that has it")
        return int(value)

    def walk(node):
        if isinstance(node, MatrixSymbol):
            if node not in env:
                raise KeyError(node.name)
            return env[node]
        if isinstance(node, OneMatrix):
            return ops.ones(size(node.shape[0]), size(node.shape[1]))
        if isinstance(node, ZeroMatrix):
            return ops.zeros(size(node.shape[0]), size(node.shape[1]))
        if isinstance(node, Identity):
            return ops.eye(size(node.shape[0]))
        if isinstance(node, MatAdd):
            vals = [walk(a) for a in node.args]
            out = vals[0]
            for v in vals[1:]:
                out = out + v
            return out
        if isinstance(node, MatMul):
            scalar = sp.S.One
            out = None
            for a in node.args:
                if getattr(a, "is_Matrix", False):
                    v = walk(a)
                    out = v if out is None else ops.matmul(out, v)
                else:
                    scalar = scalar * a
            coeff = walk(scalar) if scalar != 1 else None
            return out if coeff is None else coeff * out
        if isinstance(node, Transpose):
            return ops.transpose(walk(node.arg))
        if isinstance(node, HadamardProduct):
            vals = [walk(a) for a in node.args]
            out = vals[0]
            for v in vals[1:]:
                out = ops.hadamard(out, v)
            return out
        if isinstance(node, MatrixExp):
            return ops.expm(walk(node.arg))
        if isinstance(node, Inverse):
            return ops.inv(walk(node.arg))
        if isinstance(node, MatPow):
            base, exp = walk(node.base), int(node.exp)
            out = ops.eye(size(node.shape[0]))
            for _ in range(exp):
                out = ops.matmul(out, base)
            return out
        if isinstance(node, Trace):
            return ops.trace(walk(node.arg))
        if isinstance(node, Inner):
            return ops.inner(walk(node.args[0]), walk(node.args[1]))
        # scalars
        if isinstance(node, sp.Symbol):
            if node not in env:
                if backend == "sympy":
                    return node  # exact checks keep free scalars (such as alpha) symbolic
                raise KeyError(node.name)
            return env[node]
        if node.is_Number:
            return node if backend == "sympy" else float(node)
        if isinstance(node, sp.Add):
            vals = [walk(a) for a in node.args]
            out = vals[0]
            for v in vals[1:]:
                out = out + v
            return out
        if isinstance(node, sp.Mul):
            out = 1
            for a in node.args:
                out = out * walk(a)
            return out
        if isinstance(node, sp.Pow):
            return walk(node.base) ** walk(node.exp)
        for func, name in _SCALAR_FUNCS.items():
            if isinstance(node, func):
                return ops.scalar_fn(name, walk(node.args[0]))
        if node in (sp.pi, sp.E):
            return float(node) if backend != "sympy" else node
        raise NotImplementedError(f"cannot evaluate {type(node).__name__}: {node}")

    return walk(expr)


def explicit_matrix(
    sym: MatrixSymbol, rows: int, cols: int, structure: str = "general"
) -> sp.Matrix:
    """An explicit SymPy matrix of scalar symbols standing for ``sym`` at a concrete size."""
    name = sym.name
    entries = [[sp.Symbol(f"{name}[{i},{j}]", real=True) for j in range(cols)] for i in range(rows)]
    m = sp.Matrix(entries)
    if structure == "symmetric":
        m = sp.Matrix(rows, cols, lambda i, j: entries[min(i, j)][max(i, j)])
    elif structure == "antisymmetric":
        m = sp.Matrix(
            rows,
            cols,
            lambda i, j: entries[i][j] if i < j else (-entries[j][i] if i > j else 0),
        )
    return m


def random_array(shape: tuple[int, int], rng: np.random.Generator, structure: str = "general"):
    """A random float64 array, symmetric/antisymmetric when asked."""
    a = rng.standard_normal(shape)
    if structure == "symmetric":
        a = (a + a.T) / 2
    elif structure == "antisymmetric":
        a = (a - a.T) / 2
    return a
