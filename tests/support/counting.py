"""Family counts per symmetry, for the detection tests that compare them with counts by hand."""

from __future__ import annotations

from collections import Counter


def counts(
    families: list, skip: tuple[str, ...] = ("stream_rescale",)
) -> dict[str, tuple[int, int]]:
    """symmetry -> (number of families, total number of groups), leaving out ``skip`` (residual
    streams are counted by tests/model/test_streams.py)."""
    n, groups = Counter(), Counter()
    for f in families:
        n[f.symmetry] += 1
        groups[f.symmetry] += f.n_groups
    return {k: (n[k], groups[k]) for k in n if k not in skip}
