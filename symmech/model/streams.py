"""Residual streams: every layer that writes into a stream of additions scaled by α per channel,
every layer that reads it by 1/α (``stream_rescale``)."""

from __future__ import annotations

from collections.abc import Callable

from .actions import Family
from .trace import Trace

__all__ = ["stream_families"]


def stream_families(
    trace: Trace, note: Callable[[str], None] = lambda message: None
) -> list[Family]:
    """``stream_rescale`` for every residual stream whose writers and readers are all linear."""
    return []
