"""The loop's processes under a Linux scheduling policy of the operator's choice.

The loop's work (drawing, recording, scoring) waits on nodes most of the time and is
never urgent to the millisecond, while a model served on the same machine (a Ray Serve
app, a node under test on a shared box) is: under ``SCHED_IDLE`` the loop runs only on
cores nothing else wants, under ``SCHED_BATCH`` it keeps its share but never preempts on
wake-up. Linux keeps the policy per thread and new threads inherit their creator's, so
every thread the process already has (Ray's own included) is moved.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_POLICIES = {"idle": "SCHED_IDLE", "batch": "SCHED_BATCH"}


def _policy_number(policy: str) -> int | None:
    """The OS constant of ``policy``; None for "normal" or where the OS has no such policy."""
    return None if policy == "normal" else getattr(os, _POLICIES[policy], None)


def apply_cpu_policy(policy: str) -> int:
    """Move every thread of this process to ``policy`` ("idle", "batch"; "normal" leaves
    them). Returns the threads moved; where the OS has no such policy, 0 and a warning."""
    if policy == "normal":
        return 0
    number = _policy_number(policy)
    if number is None or not os.path.isdir("/proc/self/task"):
        log.warning("cpu_policy.unsupported policy=%s: left at the OS default", policy)
        return 0
    moved = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), number, os.sched_param(0))
            moved += 1
        except (ProcessLookupError, PermissionError):  # ended meanwhile / not allowed
            continue
    return moved


def enter_cpu_policy(policy: str) -> bool:
    """Move the calling thread to ``policy``: a ``preexec_fn`` for a child server the
    loop starts (the embedded stores), whose own threads and forks inherit it."""
    number = _policy_number(policy)
    if number is None:
        return False
    try:
        os.sched_setscheduler(0, number, os.sched_param(0))
    except PermissionError:
        return False
    return True
