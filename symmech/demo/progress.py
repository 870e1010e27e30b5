"""A one-line text progress bar for training loops (no dependency): redrawn in place on a
terminal, a full line at most every few seconds in a log."""

from __future__ import annotations

import math
import sys
import time
from typing import IO

from torch import Tensor


def format_progress(
    done: int, total: int, *, width: int = 24, loss: float | None = None, label: str = ""
) -> str:
    """``[######      ] 120/400 loss 0.53``: the bar is full only when ``done == total``."""
    total = max(int(total), 0)
    done = min(max(int(done), 0), total)
    filled = width if total == 0 else (width * done) // total
    text = f"[{'#' * filled}{' ' * (width - filled)}] {done}/{total}"
    if label:
        text = f"{label} {text}"
    if loss is not None and math.isfinite(loss):
        text += f" loss {loss:.3g}"
    elif loss is not None:
        text += f" loss {loss}"
    return text


class ProgressBar:
    """A one-line text progress bar on ``stream`` (stderr by default).

    On a terminal the line is redrawn in place (``\\r``) at most every ``min_interval`` seconds;
    elsewhere (a log file, a pipe) a new line is written at most every ``log_interval`` seconds.
    The final state is always drawn. The loss is read (``.item()``, a host sync on a GPU) only
    when the bar is drawn. ``enabled=False`` draws nothing; ``tty`` overrides the detection.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        stream: IO[str] | None = None,
        enabled: bool = True,
        min_interval: float = 0.1,
        log_interval: float = 10.0,
        tty: bool | None = None,
    ) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.min_interval = min_interval if tty else log_interval
        self._last = -math.inf
        self._width = 0
        self._done = -1

    def update(self, done: int, loss: Tensor | float | None = None) -> None:
        if not self.enabled or done == self._done:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last < self.min_interval:
            return
        self._last, self._done = now, done
        value = float(loss.item()) if isinstance(loss, Tensor) else loss
        line = format_progress(done, self.total, loss=value, label=self.label)
        if self.tty:
            pad = " " * max(self._width - len(line), 0)
            self.stream.write("\r" + line + pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


# --------------------------------------------------------------------------------------------
# error table
