"""Stopping a child process the one way testbench does it: ask, wait, then kill.

Used by every local server testbench starts (embedded stores, the cheater zoo, the
external-store fixtures), so a server that ignores its stop signal never outlives the run.
"""

from __future__ import annotations

import logging
import signal
import subprocess

log = logging.getLogger(__name__)


def stop_process(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    *,
    stop_signal: int | None = signal.SIGTERM,
    timeout_s: float = 30.0,
    kill_timeout_s: float = 10.0,
    name: str = "process",
) -> None:
    """Stop ``proc`` and reap it. ``stop_signal=None`` asks by closing its stdin instead
    (a helper that exits at end of input). Its stdout is closed afterwards."""
    if proc.poll() is None:
        if stop_signal is None:
            if proc.stdin is not None:
                proc.stdin.close()
        else:
            proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("process.kill name=%s pid=%d reason=stop_timeout", name, proc.pid)
            proc.kill()
            proc.wait(timeout=kill_timeout_s)
    if proc.stdout is not None:
        proc.stdout.close()
