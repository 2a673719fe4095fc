"""A long run's progress on a terminal: one status line (redrawn in place on a TTY, one
line per change otherwise) and log lines above it (``testbench eval``)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressDisplay:
    """One status line on stderr (redrawn in place on a terminal) and log lines above it."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr  # as it is now, not at import
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._t0 = time.monotonic()
        self._last = ""

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()

    def log(self, message: str) -> None:
        if not self._enabled:
            return
        self._write(("\r\x1b[2K" if self._tty else "") + f"  {message}\n")
        if self._tty and self._last:
            self._write(self._last)

    def update(
        self,
        state: str,
        progress: list[tuple[str, int, int | None, int]],
        percent: float | None = None,
        eta_s: float | None = None,
    ) -> None:
        """``percent`` (the run's, counting the answered part of docs in flight) replaces
        the share of docs scored; ``eta_s`` is shown when known."""
        if not self._enabled:
            return
        done = sum(d for _, d, _, _ in progress)
        total = sum(t or 0 for _, _, t, _ in progress)
        width = 24
        share = percent / 100 if percent is not None else (done / total if total else 0.0)
        filled = min(width, int(width * share))
        bar = "█" * filled + "░" * (width - filled)
        tasks = "  ".join(
            f"{task} {d}/{t if t is not None else '?'}" + (f" ({f} failed)" if f else "")
            for task, d, t, f in progress
        )
        pct = f"{100 * share:3.0f}%" if total else "  -%"
        eta = f"  ETA {format_duration(eta_s)}" if eta_s is not None else ""
        line = f"[{time.monotonic() - self._t0:6.1f}s] {state:<9} {bar} {pct}  {tasks}{eta}"
        if line == self._last:
            return
        self._last = line
        self._write(f"\r\x1b[2K{line}" if self._tty else f"{line}\n")

    def close(self) -> None:
        if self._enabled and self._tty and self._last:
            self._write("\n")
