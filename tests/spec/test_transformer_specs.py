"""The transformer specs: the engine derives their charges, and they say what they claim.

attention_qk / attention_vo are the linear pair with a head's names, so their charge is checked
here on concrete matrices with SymPy, not against the engine's own formula text; the scores (or
the head output) are checked invariant numerically; the antisymmetric directions claim no charge.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from scipy.linalg import expm

import symmech
from symmech.spec import library


@pytest.mark.parametrize("make", [library.attention_qk, library.attention_vo])
def test_head_pair_charge_is_half_E_dot_the_charge_matrix(make) -> None:
    d = symmech.derive(make())
    first, second = (b.name for b in d.symmetry.blocks)
    rng = np.random.default_rng(1)
    P, R = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    m = rng.normal(size=(3, 3))
    E = m + m.T
    Q = float(np.asarray(d.evaluate("conserved", **{first: P, second: R, "E": E})))
    C = P.T @ P - R.T @ R  # W Wᵀ (+ b bᵀ) of the first pair member minus the second's
    assert Q == pytest.approx(0.5 * float(np.sum(E * C)), rel=1e-12)


@pytest.mark.parametrize("make", [library.attention_qk, library.attention_vo])
def test_antisymmetric_direction_has_no_charge_and_says_why(make) -> None:
    d = symmech.derive(make("antisymmetric"))
    assert d.conserved is None
    assert "antisymmetric" in d.why_no_conserved or "not symmetric" in d.why_no_conserved


def test_qk_action_leaves_scores_unchanged_and_vo_the_head_output() -> None:
    rng = np.random.default_rng(0)
    n, r = 5, 3
    x, x2 = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))
    Q, K, V, O = (
        rng.normal(size=(n, r)),
        rng.normal(size=(n, r)),
        rng.normal(size=(n, r)),
        rng.normal(size=(4, r)),
    )
    E = rng.normal(size=(r, r))  # any E: the symmetry is GL(r)
    Q2, K2 = Q @ expm(0.7 * E), K @ expm(-0.7 * E.T)
    assert np.allclose((Q2.T @ x).T @ (K2.T @ x2), (Q.T @ x).T @ (K.T @ x2), rtol=1e-12)
    V2, O2 = V @ expm(0.7 * E), O @ expm(-0.7 * E.T)
    assert np.allclose(O2 @ V2.T @ x, O @ V.T @ x, rtol=1e-12)


def test_norm_rescale_is_the_rescale_action_under_its_own_name() -> None:
    norm, plain = library.norm_rescale(), library.rescale()
    assert norm.name == "norm_rescale" and norm.description != plain.description
    assert [sp.sstr(i) for i in norm.action.values()] == [sp.sstr(i) for i in plain.action.values()]
    assert "normalisation" in norm.description
