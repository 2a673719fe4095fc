"""The leaderboard as a text table (``testbench scores``, ``make run``), and the pairs
that cannot be measured with their reasons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.core.buffers import UnmeasurablePair


def _task_label(row: dict[str, Any]) -> str:
    """A task's name; a group's subtasks (``depth`` > 0) indented under it."""
    depth = int(row.get("depth", 0))
    return ("  " * (depth - 1) + "└ " if depth else "") + str(row["task"])


def format_scores(rows: list[dict[str, Any]]) -> str:
    """One block per (node, task); rows with ``depth`` (groups folded over their subtasks,
    ``cluster/leaderboard/groups.py::fold_groups``) keep their order."""
    header = (f"{'node':<22} {'task':<16} {'metric':<31} {'mean ± stderr':>17} {'n':>4} "
              f"{'err%':>6} {'p50 s':>7} {'p95 s':>7}  errors")
    lines = [header, "-" * len(header)]
    folded = any("depth" in r for r in rows)
    previous_node = None
    for row in rows if folded else sorted(rows, key=lambda r: (r["node_id"], r["task"])):
        metrics = row.get("metrics") or {"-": None}
        for i, (name, m) in enumerate(sorted(metrics.items())):
            val = "-" if m is None else (
                f"{m['mean']:.4f} ± {m['stderr']:.4f}" if m.get("stderr") is not None
                else f"{m['mean']:.4f}")
            p50 = row.get("latency_p50_s")
            p95 = row.get("latency_p95_s")
            first = i == 0
            errs = ",".join(f"{k}={v}" for k, v in (row.get("errors_by_code") or {}).items())
            err_pct = f"{100 * row['error_rate']:.1f}" if first else ""
            p50s = f"{p50:.3f}" if first and p50 is not None else ""
            p95s = f"{p95:.3f}" if first and p95 is not None else ""
            node = row["node_id"] if first and row["node_id"] != previous_node else ""
            lines.append(
                f"{node:<22} {_task_label(row) if first else '':<16} "
                f"{name:<31} {val:>17} {row['n'] if first else '':>4} "
                f"{err_pct:>6} {p50s:>7} {p95s:>7}  {errs if first else ''}")
        if folded:
            previous_node = row["node_id"]
    return "\n".join(lines)


UNMEASURABLE_TITLE = ("pairs that cannot be measured as configured (retried with backoff; "
                      "they resume once the cause is fixed):")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_unmeasurable(pairs: Sequence[UnmeasurablePair], now: float) -> str:
    """One line per pair: how many draws in a row failed, for how long, and why."""
    header = f"{'node':<22} {'task':<16} {'attempts':>8} {'for':>8}  reason"
    lines = [header, "-" * len(header)]
    for p in sorted(pairs, key=lambda p: (p.node_id, p.task)):
        lines.append(f"{p.node_id:<22} {p.task:<16} {p.attempts:>8} "
                     f"{_age(now - p.since):>8}  {p.reason}")
    return "\n".join(lines)
