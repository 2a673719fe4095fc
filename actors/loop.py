"""Driving the measuring loop from outside: start the detached Manager and follow it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import ray

from actors.remote import get_or_create_manager
from cluster.core.settings import Settings

# The longest the driver waits for news from the Manager (``Manager.status`` returns as
# soon as progress changes): the status line and the time-out are checked this often.
WAIT_S = 1.0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_loop(settings: Settings, until_full: bool, once: bool, timeout_s: float | None,
             progress: Callable[[str], None] = _stderr) -> bool:
    """Drive the detached Manager (Ray already initialised); True when the goal was reached.

    ``progress`` gets a status line whenever it changes, and the reason on a time-out.
    With ``until_full`` the run ends when every pair is full or unmeasurable (its adapter
    or dataset cannot be used as configured); unmeasurable pairs are named with their
    reason and make the result False."""
    manager = get_or_create_manager(settings)
    ray.get(manager.ensure_started.remote())
    start = time.monotonic()
    last, printed = "", -1.0
    wait_s = 0.0  # the first status at once
    while True:
        status = ray.get(manager.status.remote(detail=False, wait_s=wait_s))
        wait_s = WAIT_S
        stuck = status["unmeasurable_pairs"]
        valid, target, in_flight = status["valid"], status["target"], status["in_flight"]
        line = (f"[{time.monotonic() - start:6.1f}s] samples {valid}/{target} "
                f"({100 * valid / max(target, 1):.0f}%), in flight {in_flight}"
                + (f", unmeasurable pairs {len(stuck)}" if stuck else "")
                + f", failed stage calls {status['pipeline_errors']} (re-driven)")
        if line[10:] != last and time.monotonic() - printed >= 1.0:  # a line a second at most
            progress(line)
            last, printed = line[10:], time.monotonic()
        if until_full and status.get("settled", status["full"]):
            if line[10:] != last:
                progress(line)  # the final count, however soon after the previous line
            for pair in stuck:
                progress(f"error: {pair['node_id']} x {pair['task']} cannot be measured: "
                         f"{pair['reason']}")
            return not stuck
        if once and status["ticks"] >= 1 and in_flight == 0:
            return True
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            progress(f"error: timed out after {timeout_s:.0f}s with {valid}/{target} samples")
            for pair in stuck:
                progress(f"error: {pair['node_id']} x {pair['task']} cannot be measured: "
                         f"{pair['reason']}")
            return False
