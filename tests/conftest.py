"""Settings for the whole test run: CPU threads, hypothesis profiles, strict numpy errors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Two cores on developer machines and CI; more threads only add contention for small tensors.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# "ci": reproducible (derandomize) and modest; "dev": random search, failures kept in the database.
# Neither has a deadline: the first call into torch or SymPy can take far longer than later ones.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=30,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50, print_blob=True)


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _on_ci() else "dev"))

#: Floating-point errors that fail a test. Underflow is left out on purpose: decaying
#: accumulators (e^{rΔt} over many steps) and softmax tails underflow to 0 legitimately.
NUMPY_ERRORS: dict[str, str] = {
    "divide": "raise",
    "over": "raise",
    "invalid": "raise",
    "under": "ignore",
}


@pytest.fixture(autouse=True)
def _strict_numpy_errors() -> Iterator[None]:
    """Turn numpy division by zero, overflow and invalid operations into errors in every test."""
    with np.errstate(**NUMPY_ERRORS):  # type: ignore[arg-type]
        yield


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for modules that step tiny tensors (threads only add contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
