"""``ray.loop_cpu_policy``: every thread of the process moves, those started later inherit."""

from __future__ import annotations

import subprocess
import sys

from cluster.core.settings import PROJECT_ROOT, RaySettings

SCRIPT = """
import os, threading
from actors.cpu_policy import apply_cpu_policy
stop = threading.Event()
early = [threading.Thread(target=stop.wait) for _ in range(3)]
for t in early: t.start()
assert apply_cpu_policy("normal") == 0 and os.sched_getscheduler(0) == os.SCHED_OTHER
moved = apply_cpu_policy(POLICY)
late = threading.Thread(target=stop.wait); late.start()
tids = [int(t) for t in os.listdir("/proc/self/task")]
print(moved, sorted({os.sched_getscheduler(t) for t in tids}), len(tids))
stop.set()
"""


def _run(policy: str) -> str:
    code = SCRIPT.replace("POLICY", repr(policy))
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True,
                          capture_output=True, text=True).stdout.split()


def test_every_thread_moves_and_new_threads_inherit_the_policy() -> None:
    import os

    moved, policies, threads = _run("idle")
    assert int(moved) == 4 and int(threads) == 5  # main + 3 early; the late one inherits
    assert policies == f"[{os.SCHED_IDLE}]"
    assert _run("batch")[1] == f"[{os.SCHED_BATCH}]"


def test_idle_is_the_default() -> None:
    assert RaySettings().loop_cpu_policy == "idle"
